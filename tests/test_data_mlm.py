"""MLM samples: masking statistics, specials never masked, cropping, packing masks, determinism across runs/ranks."""
import os

import numpy as np
import pytest
import torch

from megatron_protein.data.indexed_dataset import MMapIndexedDataset, make_dataset
from megatron_protein.data.mlm_dataset import IGNORE_INDEX, MLMDataset, attention_mask_from_segments
from megatron_protein.data.tokenizer import IUPACTokenizer
from tests.harness import run_distributed

TOK = IUPACTokenizer()
SPECIALS = {0, 1, 2, 3, 4}


def make_residue_dataset(path, count=400, low=20, high=300, seed=0):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(5, 30, size=rng.integers(low, high)) for _ in range(count)]
    return make_dataset(str(path / "seqs"), seqs), seqs


def test_masking_statistics(tmp_path):
    ds, _ = make_residue_dataset(tmp_path)
    mlm = MLMDataset(ds, seq_length=128, num_samples=1200, seed=7)
    samples = [mlm[i] for i in range(len(mlm))]
    tokens = torch.stack([s["tokens"] for s in samples])
    labels = torch.stack([s["labels"] for s in samples])
    original = torch.where(labels != IGNORE_INDEX, labels, tokens)
    residue = original >= 5
    chosen = labels != IGNORE_INDEX
    assert residue.sum() >= 100_000
    assert abs(chosen.sum().item() / residue.sum().item() - 0.15) < 0.01
    as_mask = (tokens == TOK.mask_id) & chosen
    unchanged = (tokens == labels) & chosen
    randomised = chosen & ~as_mask & ~unchanged
    n = chosen.sum().item()
    # a random replacement can draw the original letter (1 in 20): expected unchanged = 0.1 + 0.1/20
    assert abs(as_mask.sum().item() / n - 0.8) < 0.01
    assert abs(unchanged.sum().item() / n - 0.105) < 0.01
    assert abs(randomised.sum().item() / n - 0.095) < 0.01
    assert set(tokens[randomised].unique().tolist()) <= set(TOK.standard_residue_ids.tolist())
    # special and padding tokens are never chosen, and are never changed
    assert not (chosen & ~residue).any()
    for s in samples:
        specials = torch.isin(s["tokens"], torch.tensor([0, 2, 3]))
        assert s["tokens"][0] == TOK.cls_id
        assert torch.equal(specials, ~s["padding_mask"] | (s["tokens"] == 2) | (s["tokens"] == 3))
        assert torch.equal(s["loss_mask"] > 0, s["labels"] != IGNORE_INDEX)
        assert s["loss_mask"].sum() >= 1


def test_single_sequence_samples_and_cropping(tmp_path):
    seqs = [np.arange(5, 30), np.tile(np.arange(5, 30), 10), np.array([5, 6, 7])]
    ds = make_dataset(str(tmp_path / "c"), seqs)
    mlm = MLMDataset(ds, seq_length=32, num_samples=30, seed=3)
    seen_offsets = set()
    for i in range(len(mlm)):
        s = mlm[i]
        original = torch.where(s["labels"] != IGNORE_INDEX, s["labels"], s["tokens"])
        n = int(s["padding_mask"].sum())
        assert original[0] == TOK.cls_id and original[n - 1] == TOK.sep_id and (original[n:] == 0).all()
        residues = original[1:n - 1].numpy()
        source = seqs[int(mlm.order[i])]
        # a contiguous window of the source sequence, cropped to seq_length - 2 when longer
        assert len(residues) == min(len(source), 30)
        starts = [k for k in range(len(source) - len(residues) + 1)
                  if np.array_equal(source[k:k + len(residues)], residues)]
        assert starts
        if len(source) > 30:
            seen_offsets.add(starts[0])
        assert torch.equal(s["position_ids"], torch.arange(32))
        assert torch.equal(s["segment_ids"], s["padding_mask"].long())
        assert all(v.shape == (32,) for v in s.values())
    assert len(seen_offsets) > 1  # crops are random, not always the prefix
    # every epoch visits every sequence once
    assert sorted(mlm.order[:3].tolist()) == [0, 1, 2] and sorted(mlm.order[3:6].tolist()) == [0, 1, 2]


def test_packed_samples_are_block_diagonal(tmp_path):
    ds, seqs = make_residue_dataset(tmp_path, count=200, low=5, high=60)
    mlm = MLMDataset(ds, seq_length=128, num_samples=50, seed=11, packed=True)
    single = MLMDataset(ds, seq_length=128, num_samples=50, seed=11)
    real_packed = sum(int(mlm[i]["padding_mask"].sum()) for i in range(50))
    real_single = sum(int(single[i]["padding_mask"].sum()) for i in range(50))
    assert real_packed > 2 * real_single
    for i in range(50):
        s = mlm[i]
        original = torch.where(s["labels"] != IGNORE_INDEX, s["labels"], s["tokens"])
        members = mlm.order[mlm.windows[i]:mlm.windows[i + 1]]
        segments = s["segment_ids"]
        assert segments.max() == len(members) >= 1
        for k, seq_index in enumerate(members, start=1):
            where = (segments == k).nonzero().flatten()
            assert torch.equal(where, torch.arange(where[0], where[-1] + 1))  # contiguous
            piece = original[where]
            assert piece[0] == TOK.cls_id and piece[-1] == TOK.sep_id
            assert np.array_equal(piece[1:-1].numpy(), seqs[int(seq_index)])  # whole sequences
            assert torch.equal(s["position_ids"][where], torch.arange(len(where)))
        mask = attention_mask_from_segments(segments[None])[0, 0]
        expected = torch.ones(128, 128, dtype=torch.bool)
        for k in range(1, len(members) + 1):
            idx = (segments == k).nonzero().flatten()
            expected[idx[:, None], idx[None, :]] = False
        assert torch.equal(mask, expected)
    # consecutive windows take consecutive sequences of the shuffled order
    assert mlm.windows[0] == 0 and (np.diff(mlm.windows) >= 1).all()


def test_attention_mask_small_case():
    mask = attention_mask_from_segments(torch.tensor([[1, 1, 2, 0]]))
    assert mask.shape == (1, 1, 4, 4)
    assert mask[0, 0].int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 1]]


def test_deterministic_and_cached(tmp_path):
    ds, _ = make_residue_dataset(tmp_path, count=50)
    a = MLMDataset(ds, 64, 100, seed=5, packed=True)
    cached = sorted(f for f in os.listdir(tmp_path) if f.endswith(".npy"))
    assert len(cached) == 2 and all("_mlm_packed_100ns_64sl_5s_" in f for f in cached)
    b = MLMDataset(MMapIndexedDataset(str(tmp_path / "seqs")), 64, 100, seed=5, packed=True)
    assert isinstance(b.order, np.memmap)  # read from the cache, not rebuilt
    for i in (0, 17, 99):
        assert all(torch.equal(a[i][k], b[i][k]) for k in a[i])
    # a damaged cache entry is detected and rebuilt
    np.save(str(tmp_path / [f for f in cached if f.endswith("_windows.npy")][0]), np.arange(5))
    d = MLMDataset(ds, 64, 100, seed=5, packed=True)
    assert np.array_equal(d.windows, a.windows)
    c = MLMDataset(ds, 64, 100, seed=6, packed=True)
    assert not torch.equal(a[0]["tokens"], c[0]["tokens"])
    with pytest.raises(IndexError):
        a[100]


def _samples_on_rank(prefix, indices):
    ds = MMapIndexedDataset(prefix)
    mlm = MLMDataset(ds, 64, 300, seed=9, packed=True, cache_dir=os.path.dirname(prefix))
    return {i: mlm[i] for i in indices}


def test_same_samples_across_ranks(tmp_path):
    make_residue_dataset(tmp_path, count=80)
    prefix = str(tmp_path / "seqs")
    indices = [0, 1, 150, 299]
    reference = _samples_on_rank(prefix, indices)  # single process, which also caches the map
    os.remove(next(str(tmp_path / f) for f in os.listdir(tmp_path) if f.endswith("_windows.npy")))
    ranks = run_distributed(_samples_on_rank, 2, prefix, indices)  # both ranks rebuild the map concurrently
    for per_rank in ranks:
        for i in indices:
            assert all(torch.equal(per_rank[i][k], reference[i][k]) for k in reference[i])


def test_rejects_empty_sequences(tmp_path):
    ds = make_dataset(str(tmp_path / "z"), [[5, 6], []])
    with pytest.raises(ValueError, match="empty sequences"):
        MLMDataset(ds, 16, 4, seed=0)
