"""Masked-language-model samples over a Megatron indexed dataset of protein sequences.

Two layouts, both returning windows of exactly ``seq_length`` tokens:

* **one sequence per sample** (TAPE, Megatron BERT): ``<cls> residues <sep> <pad> ...``; a sequence longer than
  ``seq_length - 2`` is cropped to a random window of that length.
* **packed** (ProteinLM): several whole sequences per window, each wrapped in its own ``<cls> ... <sep>``, with
  position ids restarting at 0 for each sequence and segment ids 1..k; attention is block-diagonal
  (:func:`attention_mask_from_segments`), so a packed window computes what k separate samples would. Sequences are
  packed greedily in the shuffled order; a sequence longer than ``seq_length - 2`` is cropped and fills a window
  alone.

Masking follows BERT (Devlin et al. 2019, section 3.1): each residue is chosen for prediction with probability
``mask_prob`` (0.15); a chosen residue becomes ``<mask>`` with probability 0.8, a random standard amino acid with
0.1, and stays itself with 0.1. Only residue letters are ever chosen: ``<cls>``, ``<sep>``, ``<pad>`` and
``<unk>`` never are (TAPE's ``MaskedLanguageModelingDataset`` could mask ``<cls>``/``<sep>``; this one cannot). At
least one residue is chosen in every sample so no sample has an empty loss. Each sample records, per position,
which of the three a predicted residue went through (``prediction_kind``: :data:`PREDICTED_AS_MASK`,
:data:`PREDICTED_AS_RANDOM`, :data:`PREDICTED_AS_KEPT`; :data:`NOT_PREDICTED` elsewhere), so that evaluation can
score the ``<mask>`` positions apart from the kept ones, whose input shows the answer (see
``megatron_protein.training.mlm_metrics``). A random replacement may draw the original residue (as in BERT); it
still counts as randomised, since the model could not know it was not a substitution.

Determinism: the order of sequences (one shuffled permutation per epoch) is the *index map*, built once from the
seed and cached as ``.npy`` next to the data (written atomically), so a restarted job and every rank read the same
order. The random choices of sample ``i`` (crop offsets, masked positions, replacements) come from
``numpy.random.default_rng([seed, i])``, so any rank, any worker and any run get the same sample ``i``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile

import numpy as np
import torch

from .indexed_dataset import MMapIndexedDataset, make_world_readable
from .tokenizer import IUPACTokenizer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
#: ``prediction_kind`` values: what the input showed at a position whose residue is predicted.
NOT_PREDICTED, PREDICTED_AS_MASK, PREDICTED_AS_RANDOM, PREDICTED_AS_KEPT = 0, 1, 2, 3
_TOK = IUPACTokenizer  # the special ids are the shared convention for every tokenizer
NUM_SPECIAL_TOKENS = 5


def attention_mask_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask ``[b, 1, s, s]`` from segment ids ``[b, s]``; True = masked out.

    Query q may attend to key k only when both are in the same sequence: ``seg[q] == seg[k] != 0``. Padding keys
    (segment 0) are always masked; padding query rows are fully masked (their outputs are never used).
    """
    if segment_ids.dim() != 2:
        raise ValueError(f"segment_ids must be [batch, seq], got shape {tuple(segment_ids.shape)}")
    query = segment_ids.unsqueeze(-1)  # [b, s, 1]
    key = segment_ids.unsqueeze(-2)  # [b, 1, s]
    return ((query != key) | (key == 0)).unsqueeze(1)


class MLMDataset(torch.utils.data.Dataset):
    """``num_samples`` MLM samples of length ``seq_length`` drawn from ``indexed_dataset`` (see the module doc).

    Item ``i`` is a dict of tensors, each of length ``seq_length``:
    ``tokens`` int64, ``labels`` int64 (original id where predicted, -100 elsewhere), ``loss_mask`` float32,
    ``padding_mask`` bool (True at real tokens), ``position_ids`` int64, ``segment_ids`` int64,
    ``prediction_kind`` int64 (:data:`NOT_PREDICTED`, or what the input shows at a predicted residue:
    :data:`PREDICTED_AS_MASK` / :data:`PREDICTED_AS_RANDOM` / :data:`PREDICTED_AS_KEPT`).
    """

    def __init__(self, indexed_dataset: MMapIndexedDataset, seq_length: int, num_samples: int, seed: int,
                 mask_prob: float = 0.15, packed: bool = False, cache_dir: str | None = None,
                 random_token_ids: np.ndarray | None = None, mask_token_prob: float = 0.8,
                 random_token_prob: float = 0.1, name: str | None = None) -> None:
        if seq_length < 3:
            raise ValueError(f"seq_length must be at least 3 (<cls>, one residue, <sep>), got {seq_length}")
        if len(indexed_dataset) == 0:
            raise ValueError(f"indexed dataset {getattr(indexed_dataset, 'prefix', '?')} has no sequences")
        if np.any(np.asarray(indexed_dataset.sizes) == 0):
            raise ValueError(f"indexed dataset {getattr(indexed_dataset, 'prefix', '?')} holds empty sequences; "
                             "re-run preprocess (it drops them)")
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        if mask_token_prob + random_token_prob > 1.0:
            raise ValueError("mask_token_prob + random_token_prob must be <= 1")
        self.dataset = indexed_dataset
        self.seq_length = int(seq_length)
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.mask_prob = float(mask_prob)
        self.mask_token_prob = float(mask_token_prob)
        self.random_token_prob = float(random_token_prob)
        self.packed = bool(packed)
        self.random_token_ids = (np.asarray(random_token_ids) if random_token_ids is not None
                                 else IUPACTokenizer().standard_residue_ids)
        self.max_residues = self.seq_length - 2
        prefix = getattr(indexed_dataset, "prefix", None)
        self.cache_dir = cache_dir if cache_dir is not None else (os.path.dirname(os.path.abspath(prefix))
                                                                  if prefix else None)
        self.name = name or (os.path.basename(prefix) if prefix else "dataset")
        self.order, self.windows = self._load_or_build_index_map()

    # ------------------------------------------------------------------------------------------- index map
    def _cache_key(self) -> str:
        sizes = np.asarray(self.dataset.sizes)
        digest = hashlib.sha1(sizes.tobytes()).hexdigest()[:12]  # the map is only valid for these sizes
        mode = "packed" if self.packed else "single"
        return (f"{self.name}_mlm_{mode}_{self.num_samples}ns_{self.seq_length}sl_{self.seed}s_"
                f"{len(sizes)}seq_{digest}")

    def _build_order(self, count: int, rng: np.random.Generator) -> np.ndarray:
        """``count`` sequence indices: shuffled epochs laid end to end (each epoch is a fresh permutation)."""
        n = len(self.dataset)
        epochs = -(-count // n)
        return np.concatenate([rng.permutation(n) for _ in range(epochs)])[:count].astype(np.int64)

    def _build_packed(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Greedy packing: window w holds ``order[windows[w]:windows[w+1]]``."""
        n = len(self.dataset)
        footprint = np.minimum(np.asarray(self.dataset.sizes, dtype=np.int64), self.max_residues) + 2
        windows = np.empty(self.num_samples + 1, dtype=np.int64)
        orders = []
        position, used, w = 0, 0, 0  # position in the concatenated order; tokens used in window w
        windows[0] = 0
        while w < self.num_samples:
            epoch = rng.permutation(n)
            orders.append(epoch)
            for s in footprint[epoch].tolist():
                if used + s > self.seq_length:
                    w += 1
                    windows[w] = position
                    used = 0
                    if w == self.num_samples:
                        break
                used += s
                position += 1
            else:
                continue
            break
        order = np.concatenate(orders)[: int(windows[-1])].astype(np.int64)
        return order, windows

    def _index_map_is_valid(self, order: np.ndarray, windows: np.ndarray | None = None) -> bool:
        n = len(self.dataset)
        if self.packed:
            return (windows is not None and windows.shape == (self.num_samples + 1,) and windows[0] == 0
                    and order.shape == (int(windows[-1]),) and bool(np.all(np.diff(windows) >= 1))
                    and (order.size == 0 or 0 <= order.min() <= order.max() < n))
        return order.shape == (self.num_samples,) and 0 <= order.min() <= order.max() < n

    def _load_or_build_index_map(self) -> tuple[np.ndarray, np.ndarray | None]:
        key = self._cache_key()
        paths = ([os.path.join(self.cache_dir, key + "_order.npy")] +
                 ([os.path.join(self.cache_dir, key + "_windows.npy")] if self.packed else [])) \
            if self.cache_dir else []
        if paths and all(os.path.exists(p) for p in paths):
            arrays = [np.load(p, mmap_mode="r") for p in paths]
            if self._index_map_is_valid(*arrays):
                return arrays[0], (arrays[1] if self.packed else None)
            logger.warning("MLM index map %s does not match its parameters; rebuilding it", paths[0])
        rng = np.random.default_rng(self.seed)
        if self.packed:
            order, windows = self._build_packed(rng)
            arrays = [order, windows]
        else:
            order, windows = self._build_order(self.num_samples, rng), None
            arrays = [order]
        if paths:
            try:
                os.makedirs(self.cache_dir, exist_ok=True)
                for path, array in zip(paths, arrays):
                    _save_npy_atomic(path, array)
                logger.info("MLM index map for %s cached in %s", self.name, paths[0])
            except OSError as err:  # a read-only data directory still trains; it just rebuilds the map
                logger.warning("could not cache the MLM index map in %s (%s); kept in memory", self.cache_dir, err)
        return order, windows

    # ---------------------------------------------------------------------------------------------- samples
    def __len__(self) -> int:
        return self.num_samples

    def _crop(self, index: int, rng: np.random.Generator) -> np.ndarray:
        size = int(self.dataset.sizes[index])
        if size <= self.max_residues:
            return self.dataset[index]
        start = int(rng.integers(0, size - self.max_residues + 1))
        return self.dataset.get(index, start, self.max_residues)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, i])
        L = self.seq_length
        tokens = np.full(L, _TOK.pad_id, dtype=np.int64)
        position_ids = np.zeros(L, dtype=np.int64)
        segment_ids = np.zeros(L, dtype=np.int64)
        members = (self.order[self.windows[i]:self.windows[i + 1]] if self.packed else self.order[i:i + 1])
        cursor = 0
        for k, seq_index in enumerate(np.asarray(members).tolist(), start=1):
            residues = self._crop(seq_index, rng)
            n = len(residues) + 2
            tokens[cursor] = _TOK.cls_id
            tokens[cursor + 1:cursor + n - 1] = residues
            tokens[cursor + n - 1] = _TOK.sep_id
            position_ids[cursor:cursor + n] = np.arange(n)
            segment_ids[cursor:cursor + n] = k
            cursor += n
        if not self.packed:
            position_ids = np.arange(L, dtype=np.int64)  # as Megatron/TAPE: positions run on through padding
        tokens, labels, kind = self._mask(tokens, rng)
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy((labels != IGNORE_INDEX).astype(np.float32)),
            "padding_mask": torch.from_numpy(segment_ids != 0),
            "position_ids": torch.from_numpy(position_ids),
            "segment_ids": torch.from_numpy(segment_ids),
            "prediction_kind": torch.from_numpy(kind),
        }

    def _mask(self, tokens: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """BERT 80/10/10 masking over residue positions only; returns (input tokens, labels, prediction kind)."""
        candidates = tokens >= NUM_SPECIAL_TOKENS
        chosen = (rng.random(len(tokens)) < self.mask_prob) & candidates
        if not chosen.any():
            positions = np.flatnonzero(candidates)
            chosen[positions[rng.integers(len(positions))]] = True
        labels = np.where(chosen, tokens, IGNORE_INDEX)
        action = rng.random(len(tokens))
        to_mask = chosen & (action < self.mask_token_prob)
        to_random = chosen & (action >= self.mask_token_prob) & (action < self.mask_token_prob
                                                                  + self.random_token_prob)
        out = tokens.copy()
        out[to_mask] = _TOK.mask_id
        out[to_random] = rng.choice(self.random_token_ids, size=int(to_random.sum()))
        kind = np.full(len(tokens), NOT_PREDICTED, dtype=np.int64)
        kind[chosen] = PREDICTED_AS_KEPT
        kind[to_mask] = PREDICTED_AS_MASK
        kind[to_random] = PREDICTED_AS_RANDOM
        return out, labels, kind


def _save_npy_atomic(path: str, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.ascontiguousarray(array))
        make_world_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def split_prefixes(prefix: str) -> dict[str, str]:
    """``PREFIX_train``/``_valid``/``_test`` as written by ``preprocess --split-*`` (only the ones that exist)."""
    from .indexed_dataset import dataset_exists

    return {split: f"{prefix}_{split}" for split in ("train", "valid", "test") if dataset_exists(f"{prefix}_{split}")}
