"""Unsupervised contacts from attention maps (Rao et al. 2021): APC and symmetrisation as defined, the maps are the
model's own attention, and the L1 logistic regression finds a contact signal that is there (and scores it with the
same precision metric as the supervised task)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tape_tasks.attention_contacts import (AttentionContactRegression, apc, attention_maps, pair_features,
                                           protein_features, symmetrize)
from tape_tasks.config import ProteinBertConfig
from tape_tasks.datasets import ProteinnetDataset, open_split
from tape_tasks.metrics import contact_metrics
from tape_tasks.model import ProteinBertModel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_apc_and_symmetrize_follow_their_definitions():
    rng = np.random.default_rng(0)
    x = rng.random((3, 7, 7))
    s = x + x.transpose(0, 2, 1)
    expected = s - s.sum(-1, keepdims=True) * s.sum(-2, keepdims=True) / s.sum((-1, -2), keepdims=True)
    got = apc(symmetrize(torch.from_numpy(x))).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got, got.transpose(0, 2, 1), atol=1e-12)
    np.testing.assert_allclose(got.sum(-1), 0.0, atol=1e-12)  # APC of a symmetric map: rows sum to zero


def test_attention_maps_are_the_models_own_and_drop_specials():
    torch.manual_seed(0)
    config = ProteinBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=40)
    model = ProteinBertModel(config).eval()
    ids = torch.randint(5, 25, (2, 12))
    ids[:, 0], ids[0, -1] = 2, 3
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    maps = attention_maps(model, ids, mask)
    assert maps.shape == (2, 2 * 4, 12, 12)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 8, 12))
    assert float(maps[1, :, :, 9:].abs().max()) == 0.0  # padding keys get no attention
    # the first layer's maps written out: softmax(q k^T / sqrt(d)) of the input LayerNorm of the embeddings
    layer = model.encoder.layer[0]
    h = layer.input_ln(model.embeddings(ids[:1]))
    q = layer.attention.self.query(h).view(1, 12, 4, 8).transpose(1, 2)
    k = layer.attention.self.key(h).view(1, 12, 4, 8).transpose(1, 2)
    torch.testing.assert_close(maps[0, :4], torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)[0])
    features = pair_features(maps[0], length=10)
    assert features.shape == (10, 10, 8)


def test_regression_finds_a_planted_contact_signal_and_is_scored_like_the_task():
    rng = np.random.default_rng(1)
    features, targets, lengths = [], [], []
    for _ in range(12):
        length = int(rng.integers(30, 60))
        contacts = (rng.random((length, length)) < 0.05).astype(np.int64)
        contacts = np.triu(contacts, 1)
        contacts = contacts + contacts.T
        i, j = np.indices(contacts.shape)
        contacts[np.abs(i - j) < 6] = -1
        f = rng.normal(size=(length, length, 6))
        f[..., 2] += 3.0 * (contacts == 1)  # channel 2 carries the signal
        features.append(f)
        targets.append(contacts)
        lengths.append(length)
    regression = AttentionContactRegression().fit(features[:6], targets[:6])
    assert np.argmax(np.abs(regression.coefficients)) == 2
    predictions = [regression.predict(f) for f in features[6:]]
    scores = contact_metrics(predictions, targets[6:], lengths[6:], names=("precision_at_l5",), ranges=("all",))
    assert scores["precision_at_l5[all 6+]"] > 0.8
    shuffled = [np.random.default_rng(2).permutation(p.reshape(-1)).reshape(p.shape) for p in predictions]
    chance = contact_metrics(shuffled, targets[6:], lengths[6:], names=("precision_at_l5",), ranges=("all",))
    assert chance["precision_at_l5[all 6+]"] < 0.3


def test_runs_on_the_embedded_proteinnet_split():
    records = open_split(os.path.join(REPO, "data", "tape"), "proteinnet", "proteinnet", "train", "json")
    dataset = ProteinnetDataset(records)
    short = [i for i in range(len(dataset)) if len(records[i]["primary"]) <= 100][:4]
    assert len(short) == 4
    torch.manual_seed(0)
    model = ProteinBertModel(ProteinBertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=64, max_position_embeddings=104))
    features, targets, lengths = protein_features(model, dataset, short)
    assert [f.shape for f in features] == [(n, n, 8) for n in lengths]
    regression = AttentionContactRegression().fit(features[:3], targets[:3])
    probability = regression.predict(features[3])
    assert probability.shape == (lengths[3], lengths[3]) and np.all((probability > 0) & (probability < 1))
    np.testing.assert_allclose(probability, probability.T, atol=1e-12)
    with pytest.raises(ValueError, match="fit the regression first"):
        AttentionContactRegression().predict(features[0])
