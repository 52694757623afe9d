"""Train/valid/test MLM datasets for pretraining and the order in which ranks read them.

Sources (:func:`build_datasets`):

- ``--data-path PREFIX`` where ``PREFIX_train``, ``PREFIX_valid`` (and ``PREFIX_test``) exist: the splits written
  by ``python -m megatron_protein.data.preprocess --split-by-family``, i.e. whole Pfam families held out for
  validation and test; with ``--holdout-sequences`` also ``PREFIX_valid_infamily`` and ``PREFIX_test_infamily``,
  sequences held out from the training families (the second held-out set, what TAPE's and ProteinLM's Pfam
  validation measure). Every split that exists is evaluated and reported under its own name.
- ``--data-path PREFIX`` naming one dataset: cut by sequence index into contiguous train/valid/test ranges with
  ``--split`` weights (Megatron's ``--split 949,50,1``).
- ``--train-data-path/--valid-data-path/--test-data-path``: explicit prefixes.
- ``--data-path W1 PREFIX1 W2 PREFIX2 ...``: a blend (:class:`BlendedDataset`, Megatron-LM's): each prefix is
  resolved as above into its own train/valid/test, and each split of the blend draws from the prefixes' splits in
  proportion to the (normalised) weights; several prefixes without weights are weighted by their sizes.

Reading order (:class:`PretrainingSampler`, Megatron's ``MegatronPretrainingSampler``): global batch ``k`` is the
samples ``[k G, (k+1) G)``; within it, micro-batch ``m`` of data-parallel rank ``r`` is
``k G + m (b dp) + r b + [0, b)`` for micro batch ``b``. The position in the stream is one integer,
``consumed_samples``, saved in checkpoints, so a resumed run reads exactly the samples the uninterrupted one would.
With one dp rank and the same global batch, the micro-batches are the same sets of samples as with many, so DP
changes who computes a micro-batch, never what is computed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from megatron_protein.data.indexed_dataset import MMapIndexedDataset, dataset_exists
from megatron_protein.data.mlm_dataset import MLMDataset, attention_mask_from_segments
from megatron_protein.training.arguments import split_weights
from megatron_protein.utils.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test", "valid_infamily", "test_infamily")  # order fixes each split's masking seed
#: The held-out sets, validation and test, in reporting order.
VALID_SPLITS = ("valid", "valid_infamily")
TEST_SPLITS = ("test", "test_infamily")


class DataError(UserError, ValueError):
    """The pretraining data cannot be used (an empty training split); the message names the files."""


class IndexedSubset:
    """Sequences ``[start, stop)`` of an indexed dataset, with the reader interface MLMDataset uses."""

    def __init__(self, dataset: MMapIndexedDataset, start: int, stop: int, name: str):
        self.dataset, self.start, self.stop = dataset, start, stop
        self.sizes = np.asarray(dataset.sizes[start:stop])
        self.prefix = f"{dataset.prefix}_{name}{start}-{stop}"

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"sequence {index} out of range for {self.prefix} with {len(self)} sequences")
        return self.dataset[self.start + index]

    def get(self, index: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        return self.dataset.get(self.start + index, offset, length)


def split_ranges(num_sequences: int, split: str) -> dict[str, tuple[int, int]]:
    """Megatron's --split: contiguous [start, stop) per split from weights like '949,50,1' or '98,2' (the
    missing weights are 0), at the rounded cumulative fractions as Megatron-core computes them."""
    weights = np.array(split_weights(split), dtype=np.float64)
    bounds = np.round(np.concatenate([[0.0], np.cumsum(weights / weights.sum())]) * num_sequences).astype(int)
    bounds[-1] = num_sequences
    return {name: (int(bounds[i]), int(bounds[i + 1])) for i, name in enumerate(SPLITS[:3])}


def resolve_sources(data_path: Optional[str], split: str, train_data_path: Optional[str] = None,
                    valid_data_path: Optional[str] = None, test_data_path: Optional[str] = None) -> dict:
    """Map each split to an indexed dataset (or subset); None for a split with no data."""
    explicit = {"train": train_data_path, "valid": valid_data_path, "test": test_data_path}
    if train_data_path is not None:
        return {name: (MMapIndexedDataset(explicit[name]) if explicit.get(name) else None) for name in SPLITS}
    if data_path is None:
        raise ConfigError("no data: give --data-path or --train-data-path")
    if dataset_exists(f"{data_path}_train"):
        return {name: (MMapIndexedDataset(f"{data_path}_{name}") if dataset_exists(f"{data_path}_{name}")
                       else None) for name in SPLITS}
    if not dataset_exists(data_path):
        raise FileNotFoundError(
            f"--data-path {data_path}: neither {data_path}.bin/.idx nor {data_path}_train.bin/.idx exist; "
            f"create them with python -m megatron_protein.data.preprocess --input FILE --output-prefix {data_path}")
    full = MMapIndexedDataset(data_path)
    sources = {"valid_infamily": None, "test_infamily": None}
    for name, (start, stop) in split_ranges(len(full), split).items():
        sources[name] = IndexedSubset(full, start, stop, name) if stop > start else None
    return sources


def check_training_data(sources: dict, split: str, data_path: Optional[str] = None) -> None:
    """Raise :class:`DataError` naming the file when there is nothing to train on (before any model is built)."""
    train = sources.get("train")
    if train is not None and len(train) > 0:
        if np.any(np.asarray(train.sizes) == 0):
            raise DataError(f"{train.prefix}.bin: holds empty sequences; re-run preprocess (it drops them)")
        return
    if train is None and data_path is not None and dataset_exists(data_path) and not dataset_exists(
            f"{data_path}_train"):
        size = len(MMapIndexedDataset(data_path))
        raise DataError(f"{data_path}.bin: --split {split} leaves no sequence for training (the dataset has {size}); "
                        f"give the train split a larger weight or preprocess more data")
    prefix = getattr(train, "prefix", None)
    if prefix is not None:
        raise DataError(f"{prefix}.bin: the training split holds no sequences; preprocess an input with records "
                        f"(python -m megatron_protein.data.preprocess)")
    raise DataError("no training data: the data path has no train split (PREFIX_train or a --split with a train "
                    "weight)")


def build_datasets(sources: dict, seq_length: int, num_samples: dict[str, int], seed: int,
                   mask_prob: float = 0.15, packed: bool = False, cache_dir: Optional[str] = None,
                   mask_token_prob: float = 0.8, random_token_prob: float = 0.1) -> dict:
    """One :class:`MLMDataset` per split that has data and a positive sample count."""
    datasets = {}
    for offset, name in enumerate(SPLITS):
        source = sources.get(name)
        if source is None or len(source) == 0 or num_samples.get(name, 0) <= 0:
            datasets[name] = None
            continue
        # Distinct seeds per split so that masking never repeats between train and validation.
        datasets[name] = MLMDataset(source, seq_length, num_samples[name], seed + offset, mask_prob=mask_prob,
                                    packed=packed, cache_dir=cache_dir, name=f"{os.path.basename(source.prefix)}",
                                    mask_token_prob=mask_token_prob, random_token_prob=random_token_prob)
        logger.info("%s: %d samples of length %d from %d sequences (%s)", name, num_samples[name], seq_length,
                    len(source), source.prefix)
    return datasets


# ---------------------------------------------------------------------------------------------------------------
# Blends (--data-path W1 A W2 B)
# ---------------------------------------------------------------------------------------------------------------

#: Megatron's ``mid_level_dataset_surplus``: each blended dataset builds this fraction more samples than its share.
BLEND_SURPLUS = 0.005


def blending_indices(weights, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron-LM's ``build_blending_indices`` (``megatron/core/datasets/helpers.cpp``), the same arithmetic in
    double precision: sample ``i`` goes to the dataset whose share is furthest behind its weight, ``argmax_d
    (w_d * max(i, 1) - count_d)`` (the first on ties), and is that dataset's ``count_d``-th sample. Deterministic;
    after ``n`` samples every dataset has been drawn ``w_d * n`` times within one sample for two datasets, two
    for three (measured in tests/test_megatron_flags.py). Returns ``(dataset_index int16 [size], dataset_sample_index int64 [size])``.

    Pure Python, about 3 us per sample for two or three datasets (measured at load 15 on the 2-core development
    machine; Megatron compiles it); the results are cached beside the MLM index maps (:class:`BlendedDataset`)."""
    weights = [float(w) for w in weights]
    counts = [0] * len(weights)
    dataset_index = np.empty(size, dtype=np.int16)
    sample_index = np.empty(size, dtype=np.int64)
    indices = range(len(weights))
    for i in range(size):
        t = float(max(i, 1))
        best, best_error = 0, weights[0] * t - counts[0]
        for d in indices[1:]:
            error = weights[d] * t - counts[d]
            if error > best_error:
                best, best_error = d, error
        dataset_index[i] = best
        sample_index[i] = counts[best]
        counts[best] += 1
    return dataset_index, sample_index


class BlendedDataset(torch.utils.data.Dataset):
    """``size`` samples drawn from ``datasets`` in proportion to ``weights`` (Megatron-LM's ``BlendedDataset``):
    sample ``i`` is ``datasets[dataset_index[i]][dataset_sample_index[i]]`` with the indices of
    :func:`blending_indices`. The weights are normalised; each dataset must hold at least its share of samples
    (:func:`blend_sizes` adds Megatron's surplus). The indices are cached as ``.npy`` in ``cache_dir``."""

    def __init__(self, datasets: list, weights: list[float], size: int, name: str = "blend",
                 cache_dir: Optional[str] = None):
        total = float(sum(weights))
        if not datasets or len(datasets) != len(weights) or not total > 0:
            raise ValueError(f"a blend needs one positive weight per dataset, got {weights} for {len(datasets)}")
        self.datasets = list(datasets)
        self.weights = [float(w) / total for w in weights]
        self.size = int(size)
        self.dataset_index, self.dataset_sample_index = self._load_or_build(name, cache_dir)
        for d, dataset in enumerate(self.datasets):
            used = self.dataset_sample_index[self.dataset_index == d]
            if used.size and int(used.max()) >= len(dataset):
                raise ValueError(f"blend {name}: dataset {d} ({getattr(dataset, 'name', '?')}) has {len(dataset)} "
                                 f"samples but the blend reads sample {int(used.max())}")

    def _load_or_build(self, name: str, cache_dir: Optional[str]) -> tuple[np.ndarray, np.ndarray]:
        if cache_dir is None:
            return blending_indices(self.weights, self.size)
        key = hashlib.sha1(repr((self.weights, self.size)).encode()).hexdigest()[:12]
        path = os.path.join(cache_dir, f"{name}_blend_{self.size}ns_{key}.npz")
        if os.path.isfile(path):
            with np.load(path) as cached:
                return cached["dataset_index"], cached["dataset_sample_index"]
        dataset_index, sample_index = blending_indices(self.weights, self.size)
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=cache_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, dataset_index=dataset_index, dataset_sample_index=sample_index)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return dataset_index, sample_index

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        if not 0 <= index < self.size:
            raise IndexError(f"sample {index} out of range for a blend of {self.size}")
        return self.datasets[int(self.dataset_index[index])][int(self.dataset_sample_index[index])]


def blend_sizes(weights: list[float], size: int) -> list[int]:
    """Samples to build per blended dataset for ``size`` blended samples (Megatron's
    ``_get_size_per_split_per_dataset``: ``ceil(ceil(size * w) * (1 + surplus))``)."""
    total = float(sum(weights))
    return [int(math.ceil(math.ceil(size * w / total) * (1 + BLEND_SURPLUS))) for w in weights]


def resolve_blend(blend: list, split: str) -> list[tuple[Optional[float], str, dict]]:
    """``(weight, prefix, sources)`` per prefix of a ``--data-path`` blend (:func:`resolve_sources` each)."""
    return [(weight, prefix, resolve_sources(prefix, split)) for weight, prefix in blend]


def check_blend_training_data(blend_sources: list, split: str) -> None:
    for _, prefix, sources in blend_sources:
        check_training_data(sources, split, prefix)


def build_blended_datasets(blend_sources: list, seq_length: int, num_samples: dict[str, int], seed: int,
                           mask_prob: float = 0.15, packed: bool = False, cache_dir: Optional[str] = None,
                           mask_token_prob: float = 0.8, random_token_prob: float = 0.1) -> dict:
    """One :class:`BlendedDataset` per split: the split of every prefix that has one, weighted by the blend's
    weights (by the split's number of sequences where the blend gave none), each prefix's MLM samples built with
    the split's seed as in :func:`build_datasets`."""
    datasets = {}
    for offset, name in enumerate(SPLITS):
        count = num_samples.get(name, 0)
        members = [(weight, prefix, sources[name]) for weight, prefix, sources in blend_sources
                   if sources.get(name) is not None and len(sources[name]) > 0]
        if count <= 0 or not members:
            datasets[name] = None
            continue
        weights = [weight if weight is not None else float(len(source)) for weight, _, source in members]
        sizes = blend_sizes(weights, count)
        parts = [MLMDataset(source, seq_length, n, seed + offset, mask_prob=mask_prob, packed=packed,
                            cache_dir=cache_dir, name=os.path.basename(source.prefix),
                            mask_token_prob=mask_token_prob, random_token_prob=random_token_prob)
                 for (_, _, source), n in zip(members, sizes)]
        blend_name = "+".join(os.path.basename(source.prefix) for _, _, source in members)[:120]
        datasets[name] = BlendedDataset(parts, weights, count, name=blend_name,
                                        cache_dir=cache_dir or parts[0].cache_dir)
        logger.info("%s: %d samples blended from %s", name, count, ", ".join(
            f"{w / sum(weights):.3f} x {source.prefix}" for w, (_, _, source) in zip(weights, members)))
    return datasets


def blend_sources_by_split(blend_sources: list) -> dict:
    """For each split, the first prefix's source of it (None when no prefix has it): what code that asks only
    whether a split exists (its title, say) reads for a blend."""
    found: dict = {}
    for _, _, sources in blend_sources:
        for name, source in sources.items():
            if found.get(name) is None and source is not None and len(source) > 0:
                found[name] = source
    return {name: found.get(name) for name in SPLITS}


def blend_residue_counts(blend_sources: list, split: str = "train") -> np.ndarray:
    """Residue counts of the blend's ``split`` as the blend draws it: each prefix's histogram (:func:`residue_counts`)
    scaled to the prefix's weight (its number of sequences for an unweighted blend), summed, in units of the total
    number of residues."""
    members = [(weight, sources[split]) for weight, _, sources in blend_sources
               if sources.get(split) is not None and len(sources[split]) > 0]
    if not members:
        return np.zeros(0)
    weights = np.array([w if w is not None else float(len(src)) for w, src in members], dtype=np.float64)
    weights /= weights.sum()
    histograms = [residue_counts(source).astype(np.float64) for _, source in members]
    total = sum(float(h.sum()) for h in histograms)
    mixture = np.zeros(max(h.size for h in histograms))
    for weight, histogram in zip(weights, histograms):
        if histogram.sum() > 0:
            mixture[:histogram.size] += weight * histogram / histogram.sum() * total
    return mixture


@dataclass
class PretrainingSampler:
    """Indices of this rank's micro-batches, starting at ``consumed_samples`` (see module docstring)."""

    total_samples: int
    consumed_samples: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int

    def __post_init__(self):
        if self.consumed_samples >= self.total_samples:
            raise ValueError(f"no samples left: consumed {self.consumed_samples} of {self.total_samples}")

    def __iter__(self) -> Iterator[list[int]]:
        stride = self.micro_batch_size * self.dp_size
        start = self.consumed_samples
        while start + stride <= self.total_samples:
            first = start + self.dp_rank * self.micro_batch_size
            yield list(range(first, first + self.micro_batch_size))
            start += stride


def collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def micro_batch_loader(dataset: MLMDataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                       dp_size: int, num_workers: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=num_workers, persistent_workers=False,
                                         # its own generator: creating the iterator must not draw from the
                                         # global RNG, or a resumed run's dropout would diverge
                                         generator=torch.Generator())
    return iter(loader)


def attention_mask(batch: dict[str, torch.Tensor], packed: bool) -> torch.Tensor:
    """Bool mask, True = masked out: block-diagonal by segment when packed, else padding keys only [b,1,1,s]."""
    if packed:
        return attention_mask_from_segments(batch["segment_ids"])
    return (~batch["padding_mask"])[:, None, None, :]


def split_titles(data_path: Optional[str], sources: dict) -> dict[str, str]:
    """What each held-out split holds, in words, for logs and summaries: held-out families when preprocess split by
    family (its ``PREFIX_summary.json`` says so), sequences of the training families for the ``*_infamily``
    splits, and plain "held-out sequences" otherwise (Megatron's --split by index, or a random split)."""
    by_family = False
    if data_path is not None and os.path.exists(f"{data_path}_summary.json"):
        try:
            with open(f"{data_path}_summary.json") as f:
                by_family = json.load(f).get("split") == "by-family"
        except (OSError, ValueError):
            by_family = False
    other = "held-out families" if by_family else "held-out sequences"
    titles = {"valid": other, "test": other, "valid_infamily": "held-out sequences of training families",
              "test_infamily": "held-out sequences of training families"}
    return {name: titles[name] for name in SPLITS if name != "train" and sources.get(name) is not None}


def residue_counts(source, chunk_tokens: int = 1 << 24) -> np.ndarray:
    """Token-id histogram of every sequence of ``source`` (an indexed dataset or :class:`IndexedSubset`).

    Sequences written back to back (what every Megatron builder writes) are counted straight from the memory-mapped
    ``.bin`` in chunks of ``chunk_tokens`` (about 1 s per 10^9 tokens); anything else one sequence at a time."""
    dataset, start, stop = ((source.dataset, source.start, source.stop) if isinstance(source, IndexedSubset)
                            else (source, 0, len(source)))
    counts = np.zeros(0, dtype=np.int64)

    def add(tokens: np.ndarray) -> None:
        nonlocal counts
        if tokens.size == 0:
            return
        chunk = np.bincount(tokens.astype(np.int64, copy=False))
        if chunk.size > counts.size:
            counts = np.pad(counts, (0, chunk.size - counts.size))
        counts[:chunk.size] += chunk

    if stop <= start:
        return counts
    pointers = getattr(dataset, "pointers", None)
    buffer = getattr(dataset, "_bin_mmap", None)
    if pointers is not None and buffer is not None:
        itemsize = dataset.dtype.itemsize
        sizes = np.asarray(dataset.sizes[start:stop], dtype=np.int64)
        ptr = np.asarray(pointers[start:stop], dtype=np.int64)
        if np.array_equal(ptr[1:], ptr[:-1] + sizes[:-1] * itemsize):  # contiguous
            total = int(sizes.sum())
            for offset in range(0, total, chunk_tokens):
                n = min(chunk_tokens, total - offset)
                add(np.frombuffer(buffer, dtype=dataset.dtype, count=n, offset=int(ptr[0]) + offset * itemsize))
            return counts
    for chunk_start in range(start, stop, 4096):
        add(np.concatenate([np.asarray(dataset[i]) for i in range(chunk_start, min(stop, chunk_start + 4096))]))
    return counts


def unigram_perplexity(source) -> tuple[float, int]:
    """exp(entropy) of the residue frequencies of ``source`` itself: the perplexity of the best model that
    ignores context (an oracle unigram, fitted on the very residues it is scored on). A masked LM that learned
    anything about proteins must beat it. Returns (perplexity, number of residues)."""
    counts = residue_counts(source)
    total = int(counts.sum())
    if total == 0:
        return float("nan"), 0
    p = counts[counts > 0] / total
    return float(math.exp(-(p * np.log(p)).sum())), total
