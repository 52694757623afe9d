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

Reading order (:class:`PretrainingSampler`, Megatron's ``MegatronPretrainingSampler``): global batch ``k`` is the
samples ``[k G, (k+1) G)``; within it, micro-batch ``m`` of data-parallel rank ``r`` is
``k G + m (b dp) + r b + [0, b)`` for micro batch ``b``. The position in the stream is one integer,
``consumed_samples``, saved in checkpoints, so a resumed run reads exactly the samples the uninterrupted one would.
With one dp rank and the same global batch, the micro-batches are the same sets of samples as with many, so DP
changes who computes a micro-batch, never what is computed.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from megatron_protein.data.indexed_dataset import MMapIndexedDataset, dataset_exists
from megatron_protein.data.mlm_dataset import MLMDataset, attention_mask_from_segments
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
    """Megatron's --split: contiguous [start, stop) per split from weights like '949,50,1'."""
    weights = np.array([float(x) for x in split.replace("/", ",").split(",")], dtype=np.float64)
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
