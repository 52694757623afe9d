"""Masked-position metrics: the loss at <mask> positions is computed there only; the three kinds of predicted
position partition the predicted positions; the unigram baselines are what their definitions say.

The expected values are written out with numpy in float64 from constructed float32 logits; the model's
cross-entropy (vocab_parallel_cross_entropy) computes in float32, so losses agree to float32 rounding (relative
1e-6); sums, counts and the unigram baselines (float64 throughout) to 1e-12. The parallel reduction is tested
against one process in tests/test_pretrain_parallel.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from megatron_protein.data.indexed_dataset import make_dataset
from megatron_protein.data.mlm_dataset import (IGNORE_INDEX, NOT_PREDICTED, PREDICTED_AS_KEPT, PREDICTED_AS_MASK,
                                               PREDICTED_AS_RANDOM, MLMDataset)
from megatron_protein.data.tokenizer import IUPACTokenizer
from megatron_protein.parallel import scg
from megatron_protein.training.mlm_metrics import MLMMetrics, training_frequencies

TOK = IUPACTokenizer()
V = 32  # padded vocabulary of the logits
VOCAB = 30


@pytest.fixture(autouse=True)
def single_process():
    return scg.init_process_group([("dp", None), ("pp", 1), ("tp", 1)])


def constructed_batch():
    """logits [2, 7, V] float64 with known values, labels and kinds with every kind and unpredicted positions."""
    rng = np.random.default_rng(5)
    logits = (rng.normal(size=(2, 7, V)) * 3).astype(np.float32)
    kinds = np.array([[0, 1, 1, 3, 0, 2, 1],
                      [1, 0, 2, 1, 3, 3, 0]])
    labels = np.where(kinds > 0, rng.integers(5, 25, size=kinds.shape), IGNORE_INDEX)
    return logits, labels, kinds


def expected_mean_nll(logits, labels, where) -> float:
    """Mean -log softmax over the real vocabulary (the padding columns VOCAB..V-1 are not part of the model)."""
    logits = logits.astype(np.float64)[..., :VOCAB]
    log_p = logits - scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    rows, cols = np.nonzero(where)
    return float(-log_p[rows, cols, labels[rows, cols]].mean())


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_masked_position_loss_is_computed_only_where_the_input_was_mask(layout):
    logits, labels, kinds = constructed_batch()
    metrics = MLMMetrics(VOCAB)
    if layout == "dense":  # [b, s, V] logits, -100 labels and kind 0 where nothing is predicted
        metrics.add_logits(torch.from_numpy(logits), torch.from_numpy(labels), torch.from_numpy(kinds))
    else:  # sparse prediction: the predicted positions only, in row-major order
        where = kinds > 0
        metrics.add_logits(torch.from_numpy(logits[where]), torch.from_numpy(labels[where]),
                           torch.from_numpy(kinds[where]))
    out = metrics.summary()
    for name, kind in (("masked", PREDICTED_AS_MASK), ("randomised", PREDICTED_AS_RANDOM),
                       ("kept", PREDICTED_AS_KEPT)):
        expected = expected_mean_nll(logits, labels, kinds == kind)
        assert out[f"{name}_loss"] == pytest.approx(expected, rel=1e-6), name
        assert out[f"{name}_perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
        assert out[f"{name}_tokens"] == int((kinds == kind).sum())
    assert out["masked_tokens"] == 5
    assert out["all_loss"] == pytest.approx(expected_mean_nll(logits, labels, kinds > 0), rel=1e-6)
    # The masked loss differs from the all-positions one: it really is a different set of positions.
    assert abs(out["masked_loss"] - out["all_loss"]) > 1e-3


def test_vocabulary_padding_rows_take_no_probability():
    logits, labels, kinds = constructed_batch()
    metrics = MLMMetrics(VOCAB)
    metrics.add_logits(torch.from_numpy(logits), torch.from_numpy(labels), torch.from_numpy(kinds))
    boosted = logits.copy()
    boosted[..., VOCAB:] += 50.0  # padding rows with huge logits would dominate a softmax over all 32
    other = MLMMetrics(VOCAB)
    other.add_logits(torch.from_numpy(boosted), torch.from_numpy(labels), torch.from_numpy(kinds))
    assert other.summary()["masked_loss"] == metrics.summary()["masked_loss"]


def test_changing_a_logit_outside_mask_positions_leaves_the_masked_loss_unchanged():
    logits, labels, kinds = constructed_batch()
    before = MLMMetrics(VOCAB)
    before.add_logits(torch.from_numpy(logits), torch.from_numpy(labels), torch.from_numpy(kinds))
    changed = logits.copy()
    changed[kinds != PREDICTED_AS_MASK] += np.random.default_rng(0).normal(size=changed[kinds != 1].shape) * 5
    after = MLMMetrics(VOCAB)
    after.add_logits(torch.from_numpy(changed), torch.from_numpy(labels), torch.from_numpy(kinds))
    assert after.summary()["masked_loss"] == before.summary()["masked_loss"]
    assert after.summary()["kept_loss"] != before.summary()["kept_loss"]


def test_kinds_partition_the_predicted_positions_sums_add_up():
    logits, labels, kinds = constructed_batch()
    metrics = MLMMetrics(VOCAB)
    metrics.add_logits(torch.from_numpy(logits), torch.from_numpy(labels), torch.from_numpy(kinds))
    out = metrics.summary()
    parts = ("masked", "randomised", "kept")
    assert sum(out[f"{k}_tokens"] for k in parts) == out["all_tokens"] == int((kinds > 0).sum())
    total = sum(out[f"{k}_loss"] * out[f"{k}_tokens"] for k in parts)
    assert total == pytest.approx(out["all_loss"] * out["all_tokens"], rel=1e-12)
    counts = metrics.label_counts.numpy()
    np.testing.assert_array_equal(counts[1:].sum(0), counts[0])


def test_dataset_prediction_kinds_partition_the_predicted_positions(tmp_path):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(5, 30, size=rng.integers(20, 200)) for _ in range(200)]
    ds = make_dataset(str(tmp_path / "seqs"), seqs)
    for packed in (False, True):
        mlm = MLMDataset(ds, seq_length=96, num_samples=300, seed=3, packed=packed)
        totals = np.zeros(4, dtype=np.int64)
        for i in range(len(mlm)):
            s = mlm[i]
            kind, labels, tokens = s["prediction_kind"], s["labels"], s["tokens"]
            predicted = labels != IGNORE_INDEX
            assert torch.equal(kind != NOT_PREDICTED, predicted)
            assert torch.equal(s["loss_mask"] > 0, kind != NOT_PREDICTED)
            assert bool((tokens[kind == PREDICTED_AS_MASK] == TOK.mask_id).all())
            assert bool((tokens[kind == PREDICTED_AS_KEPT] == labels[kind == PREDICTED_AS_KEPT]).all())
            randomised = tokens[kind == PREDICTED_AS_RANDOM]
            assert bool(torch.isin(randomised, torch.as_tensor(TOK.standard_residue_ids)).all())
            assert not bool((tokens[~predicted] == TOK.mask_id).any())
            totals += np.bincount(kind.numpy(), minlength=4)
        n = totals[1:].sum()
        assert abs(totals[PREDICTED_AS_MASK] / n - 0.8) < 0.02
        assert abs(totals[PREDICTED_AS_RANDOM] / n - 0.1) < 0.02
        assert abs(totals[PREDICTED_AS_KEPT] / n - 0.1) < 0.02


def test_prediction_kinds_do_not_change_the_samples(tmp_path):
    """Recording the kinds draws nothing from the sample's generator: tokens and labels are those of the masking
    rule (a fixed sample of a fixed dataset and seed, written out)."""
    ds = make_dataset(str(tmp_path / "seqs"), [np.arange(5, 25)])
    s = MLMDataset(ds, seq_length=24, num_samples=1, seed=11, mask_prob=0.5)[0]
    rng = np.random.default_rng([11, 0])
    tokens = np.array([TOK.cls_id, *range(5, 25), TOK.sep_id, TOK.pad_id, TOK.pad_id])
    chosen = (rng.random(24) < 0.5) & (tokens >= 5)
    action = rng.random(24)
    expected_mask = chosen & (action < 0.8)
    assert torch.equal(s["prediction_kind"] == PREDICTED_AS_MASK, torch.from_numpy(expected_mask))
    assert torch.equal(s["labels"] != IGNORE_INDEX, torch.from_numpy(chosen))


def test_unigram_baselines_follow_their_definitions():
    rng = np.random.default_rng(1)
    labels = rng.integers(5, 25, size=400)
    kinds = np.where(rng.random(400) < 0.8, PREDICTED_AS_MASK, PREDICTED_AS_KEPT)
    per_token = torch.from_numpy(rng.random(400))
    train_counts = np.bincount(rng.integers(5, 25, size=5000), minlength=VOCAB)
    q = training_frequencies(train_counts, VOCAB)
    assert q[:5].sum() == 0 and q.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(q[5:], (train_counts[5:] + 1) / (train_counts[5:].sum() + 25))
    metrics = MLMMetrics(VOCAB)
    metrics.add(per_token, torch.from_numpy(labels), torch.from_numpy(kinds))
    out = metrics.summary(q)
    masked = labels[kinds == PREDICTED_AS_MASK]
    own = np.bincount(masked, minlength=VOCAB) / masked.size
    assert out["masked_unigram_own_perplexity"] == pytest.approx(math.exp(scipy.stats.entropy(own)), rel=1e-12)
    assert out["masked_unigram_train_perplexity"] == pytest.approx(math.exp(-np.log(q[masked]).mean()), rel=1e-12)
    assert out["masked_unigram_own_perplexity"] <= out["masked_unigram_train_perplexity"]  # Gibbs' inequality
    assert out["masked_below_unigram_own"] == pytest.approx(
        1 - out["masked_perplexity"] / out["masked_unigram_own_perplexity"], rel=1e-12)


def test_inconsistent_inputs_are_rejected():
    metrics = MLMMetrics(VOCAB)
    with pytest.raises(ValueError, match="same shape"):
        metrics.add(torch.zeros(3), torch.zeros(3, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="kinds and labels disagree"):
        metrics.add(torch.zeros(2), torch.tensor([IGNORE_INDEX, 7]), torch.tensor([1, 1]))
