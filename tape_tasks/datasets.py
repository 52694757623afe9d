"""TAPE's data files (LMDB and JSON), the five task datasets, padding collation and length-bucketed batching.

Files are found where TAPE puts them: ``DATA_DIR/<folder>/<stem>_<split>.{lmdb,json}``, e.g.
``data/secondary_structure/secondary_structure_cb513.lmdb`` or ``data/proteinnet/proteinnet_valid.json``.

* LMDB (TAPE's download): an LMDB environment whose key ``b"num_examples"`` holds the pickled record count and
  whose keys ``b"0"``, ``b"1"``, ... hold pickled dict records, unpickled by a restricted unpickler that builds
  builtin values and NumPy arrays only (:func:`megatron_protein.utils.safe_load.load_record`).
* JSON (TAPE's ``JSONDataset``): one JSON list of dict records.

Both give the same records (numpy arrays in LMDB and lists in JSON are converted alike), so a split gives the same
batches in either format. A record lacking ``id`` gets its index as id, as in TAPE.

Per task (TAPE's ``datasets.py``), an example is a dict of numpy arrays:

* ``input_ids`` (``<cls>`` residues ``<sep>``), ``input_mask`` (ones), ``protein_length`` (residues),
* ``targets``: secondary structure -> ``ss3``/``ss8`` per residue, padded with -1 at <cls>/<sep>; contact
  prediction -> the L x L contact map of the ``tertiary`` coordinates at 8 Angstrom, -1 where ``valid_mask`` is
  false for either residue or |i - j| < 6; remote homology -> ``fold_label``; fluorescence ->
  ``log_fluorescence``; stability -> ``stability_score``; masked LM -> the original id at masked positions, -1
  elsewhere.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import os
import pickle
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from megatron_protein.utils import lmdb_envs
from megatron_protein.utils.errors import UserError
from megatron_protein.utils.safe_load import load_record

from .tokenizer import TAPETokenizer

logger = logging.getLogger(__name__)

FORMATS = ("lmdb", "json")
#: Files beside the splits that are not splits (remote_homology_label_maps.json).
NOT_SPLITS = {"label_maps"}


class DataFileError(UserError, ValueError):
    """A data file is missing, unreadable, or holds a record the task cannot use."""


# ----------------------------------------------------------------------------------------------------------------
# Record files


class JSONRecords:
    """A TAPE JSON split: a list of dict records, read once."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path) as f:
                records = json.load(f)
        except json.JSONDecodeError as e:
            raise DataFileError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(records, list):
            raise DataFileError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise DataFileError(f"{path}: record {i} is a {type(record).__name__}, expected an object")
        self._records = records

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self._records):
            raise IndexError(index)
        record = dict(self._records[index])
        record.setdefault("id", str(index))
        return record


class LMDBRecords:
    """A TAPE LMDB split. The environment is opened lazily, so the object can be sent to DataLoader workers, and
    shared with every other reader of the same file in the process (:mod:`megatron_protein.utils.lmdb_envs`:
    py-lmdb cannot open one file twice)."""

    def __init__(self, path: str):
        import lmdb  # imported here: JSON users do not need it

        self.path = path
        self._env = None
        try:
            with lmdb_envs.shared(path) as env, env.begin(write=False) as txn:
                raw = txn.get(b"num_examples")
        except (lmdb.Error, OSError) as e:
            raise DataFileError(f"{path}: cannot open as LMDB ({e})") from None
        if raw is None:
            raise DataFileError(f"{path}: LMDB has no 'num_examples' key; not a TAPE LMDB file")
        count = load_record(raw, f"{path}: num_examples")
        if not isinstance(count, (int, np.integer)) or count < 0:
            raise DataFileError(f"{path}: num_examples: expected a record count, found {count!r}")
        self._length = int(count)

    def _open(self):
        if self._env is None:
            self._env = lmdb_envs.acquire(self.path)
        return self._env

    def close(self) -> None:
        """Give the environment back (it closes when no other reader of the file holds it)."""
        if self._env is not None:
            env, self._env = self._env, None
            lmdb_envs.release(env)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_env"] = None
        return state

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._length:
            raise IndexError(index)
        with self._open().begin(write=False) as txn:
            raw = txn.get(str(index).encode())
        if raw is None:
            raise DataFileError(f"{self.path}: record {index} is missing (num_examples = {self._length})")
        record = load_record(raw, f"{self.path}: record {index}")
        if not isinstance(record, dict):
            raise DataFileError(f"{self.path}: record {index} is a {type(record).__name__}, expected a dict")
        record.setdefault("id", str(index))
        return record


def write_lmdb(records: Sequence[dict[str, Any]], path: str, map_size: int = 1 << 30) -> None:
    """Write ``records`` as a TAPE LMDB (pickled records under b"0", b"1", ..., plus b"num_examples").

    Written to a temporary directory first and renamed, so a reader never sees half a file.
    """
    import lmdb
    import shutil

    tmp = f"{path}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    env = lmdb.open(tmp, map_size=map_size, subdir=True)
    with env.begin(write=True) as txn:
        for i, record in enumerate(records):
            txn.put(str(i).encode(), pickle.dumps(record))
        txn.put(b"num_examples", pickle.dumps(len(records)))
    env.close()
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def available_splits(data_dir: str, folder: str, stem: str) -> list[str]:
    """Splits present for a task, e.g. ['casp12', 'train', 'valid'] (either format)."""
    found = set()
    for fmt in FORMATS:
        for path in glob.glob(os.path.join(data_dir, folder, f"{stem}_*.{fmt}")):
            found.add(os.path.basename(path)[len(stem) + 1:-(len(fmt) + 1)])
    return sorted(found - NOT_SPLITS)


def open_split(data_dir: str, folder: str, stem: str, split: str, data_format: str = "auto"):
    """The records of ``DATA_DIR/folder/stem_split.{lmdb,json}`` (LMDB preferred when both exist and 'auto')."""
    formats = FORMATS if data_format == "auto" else (data_format,)
    if data_format not in FORMATS + ("auto",):
        raise ValueError(f"data_format must be one of {FORMATS + ('auto',)}, got {data_format!r}")
    for fmt in formats:
        path = os.path.join(data_dir, folder, f"{stem}_{split}.{fmt}")
        if os.path.exists(path):
            return LMDBRecords(path) if fmt == "lmdb" else JSONRecords(path)
    expected = " or ".join(os.path.join(data_dir, folder, f"{stem}_{split}.{fmt}") for fmt in formats)
    found = available_splits(data_dir, folder, stem)
    hint = f"splits found there: {found}" if found else (
        f"no {stem}_*.lmdb/json file in {os.path.join(data_dir, folder)}; point --data_dir at the TAPE data "
        f"directory (or data/tape in this repository)")
    raise DataFileError(f"split '{split}' not found: expected {expected}; {hint}")


# ----------------------------------------------------------------------------------------------------------------
# Task datasets


class TAPEDataset(torch.utils.data.Dataset):
    """Records of one split turned into examples of one task; subclasses say which keys they need.

    :meth:`validate` checks every record up front (keys, sequence letters, label shapes and ranges: everything
    :meth:`__getitem__` would reject) and raises :class:`DataFileError` naming the first bad record, so a bad
    record is found before the first step, not mid-epoch; an empty split is an error too.
    """

    required_keys: tuple[str, ...] = ("primary",)
    task_name = "task"

    def __init__(self, records, tokenizer: Optional[TAPETokenizer] = None):
        self.records = records
        self.tokenizer = tokenizer or TAPETokenizer()

    def __len__(self) -> int:
        return len(self.records)

    def _record(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        missing = [k for k in self.required_keys if k not in record]
        if missing:
            raise DataFileError(
                f"{self.records.path}: record {index} (id {record.get('id')!r}) lacks key(s) {missing} needed by "
                f"task {self.task_name}; it has {sorted(record)}")
        return record

    def _tokens(self, record: dict[str, Any], index: int) -> np.ndarray:
        return self.tokenizer.encode(str(record["primary"]), record=f"{self.records.path}: {index} "
                                                                     f"(id {record.get('id')!r})")

    def _error(self, index: int, record: dict[str, Any], message: str) -> DataFileError:
        return DataFileError(f"{self.records.path}: record {index} (id {record.get('id')!r}): {message}")

    def _array(self, index: int, record: dict[str, Any], key: str, dtype) -> np.ndarray:
        try:
            return np.asarray(record[key], dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise self._error(index, record, f"'{key}' cannot be read as {np.dtype(dtype).name} values ({exc})") \
                from None

    def _targets(self, index: int, record: dict[str, Any], length: int):
        """The checked targets of a record with ``length`` residues (what :meth:`validate` runs per record)."""
        return None

    def check(self, index: int) -> None:
        """Raise :class:`DataFileError` naming record ``index`` if its example cannot be built."""
        record = self._record(index)
        self._targets(index, record, len(self._tokens(record, index)) - 2)

    def validate(self, progress: bool = False) -> None:
        """Check every record (see the class docstring)."""
        if len(self) == 0:
            raise DataFileError(f"{self.records.path}: the split holds no records; task {self.task_name} needs at "
                                f"least one")
        indices = range(len(self))
        if progress and len(self) > 20000:
            from tqdm import tqdm
            indices = tqdm(indices, desc=f"checking {os.path.basename(self.records.path)}", unit=" records",
                           mininterval=2.0)
        for index in indices:
            self.check(index)

    def length(self, index: int) -> int:
        """Residues of example ``index`` (for bucketing) without tokenizing it."""
        record = self.records[index]
        if "protein_length" in record:
            return int(record["protein_length"])
        return len(record.get("primary", ""))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        raise NotImplementedError


def _base_example(tokens: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": tokens, "input_mask": np.ones_like(tokens),
            "protein_length": np.asarray(len(tokens) - 2, dtype=np.int64)}


class SecondaryStructureDataset(TAPEDataset):
    """Per-residue 3-state (``ss3``: H/E/C = 0/1/2) or 8-state (``ss8``) labels, -1 at <cls>/<sep>."""

    def __init__(self, records, tokenizer=None, label_key: str = "ss3", num_labels: int = 3):
        super().__init__(records, tokenizer)
        self.label_key, self.num_labels = label_key, num_labels
        self.required_keys = ("primary", label_key)
        self.task_name = "secondary_structure" if label_key == "ss3" else "secondary_structure_8"

    def _targets(self, index, record, length):
        labels = self._array(index, record, self.label_key, np.int64).reshape(-1)
        if labels.shape[0] != length:
            raise self._error(index, record, f"'{self.label_key}' has {labels.shape[0]} labels for {length} "
                                             f"residues")
        if labels.size and (labels.max() >= self.num_labels or labels.min() < -1):
            raise self._error(index, record, f"'{self.label_key}' labels must be in -1..{self.num_labels - 1}, got "
                                             f"{labels.min()}..{labels.max()}")
        return labels

    def __getitem__(self, index):
        record = self._record(index)
        tokens = self._tokens(record, index)
        labels = self._targets(index, record, len(tokens) - 2)
        example = _base_example(tokens)
        example["targets"] = np.pad(labels, (1, 1), constant_values=-1)
        return example


class RemoteHomologyDataset(TAPEDataset):
    """One fold label per protein (``fold_label``)."""

    required_keys = ("primary", "fold_label")
    task_name = "remote_homology"

    def __init__(self, records, tokenizer=None, num_labels: int = 1195):
        super().__init__(records, tokenizer)
        self.num_labels = num_labels

    def _targets(self, index, record, length):
        label = self._array(index, record, "fold_label", np.int64)
        if label.size != 1:
            raise self._error(index, record, f"fold_label must be one integer, got {record['fold_label']!r}")
        label = int(label.reshape(()))
        if not 0 <= label < self.num_labels:
            raise self._error(index, record, f"fold_label {label} is outside 0..{self.num_labels - 1}")
        return label

    def __getitem__(self, index):
        record = self._record(index)
        tokens = self._tokens(record, index)
        example = _base_example(tokens)
        example["targets"] = np.asarray(self._targets(index, record, len(tokens) - 2), dtype=np.int64)
        return example


class ValueDataset(TAPEDataset):
    """One real value per protein, from ``label_key`` (a number or a one-element list, as TAPE stores it)."""

    def __init__(self, records, tokenizer=None, label_key: str = "log_fluorescence", task_name: str = "fluorescence"):
        super().__init__(records, tokenizer)
        self.label_key, self.task_name = label_key, task_name
        self.required_keys = ("primary", label_key)

    def _targets(self, index, record, length):
        value = self._array(index, record, self.label_key, np.float32).reshape(-1)
        if value.shape != (1,) or not np.isfinite(value).all():
            raise self._error(index, record, f"'{self.label_key}' must be one finite number, got "
                                             f"{record[self.label_key]!r}")
        return value

    def __getitem__(self, index):
        record = self._record(index)
        tokens = self._tokens(record, index)
        example = _base_example(tokens)
        example["targets"] = self._targets(index, record, len(tokens) - 2)
        return example


class ProteinnetDataset(TAPEDataset):
    """Contact maps: residues i, j are in contact when their ``tertiary`` points are closer than 8 Angstrom.

    As in TAPE, pairs with |i - j| < 6 and pairs with an invalid residue (``valid_mask`` false) get -1 (ignored by
    the loss and the metrics). ``tertiary`` holds one [x, y, z] point per residue (TAPE's CB, CA for glycine).
    """

    required_keys = ("primary", "tertiary", "valid_mask")
    task_name = "contact_prediction"
    contact_threshold = 8.0
    min_separation = 6

    def _targets(self, index, record, length):
        coords = self._array(index, record, "tertiary", np.float64)
        if coords.shape != (length, 3):
            raise self._error(index, record, f"'tertiary' has shape {coords.shape}, expected ({length}, 3): one "
                                             f"point per residue")
        valid = self._array(index, record, "valid_mask", bool).reshape(-1)
        if valid.shape != (length,):
            raise self._error(index, record, f"'valid_mask' has {valid.shape[0]} entries for {length} residues")
        if not np.isfinite(coords[valid]).all():
            raise self._error(index, record, "'tertiary' holds non-finite coordinates at residues marked valid")
        return coords, valid

    def __getitem__(self, index):
        record = self._record(index)
        tokens = self._tokens(record, index)
        coords, valid = self._targets(index, record, len(tokens) - 2)
        distances = np.sqrt(((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1))
        contacts = (distances < self.contact_threshold).astype(np.int64)
        i, j = np.indices(contacts.shape)
        invalid = ~(valid[:, None] & valid[None, :]) | (np.abs(i - j) < self.min_separation)
        contacts[invalid] = -1
        example = _base_example(tokens)
        example["targets"] = contacts
        return example


class MaskedLanguageModelingDataset(TAPEDataset):
    """BERT masking of ``primary`` (Devlin et al. 2019): 15% of residues are predicted; of those 80% become
    <mask>, 10% a random amino acid, 10% stay. The choice depends only on (seed, epoch, index), so an evaluation
    is repeatable; call ``set_epoch`` to draw new masks for each training epoch.
    """

    required_keys = ("primary",)
    task_name = "masked_language_modeling"

    def __init__(self, records, tokenizer=None, seed: int = 0, mask_prob: float = 0.15):
        super().__init__(records, tokenizer)
        self.seed, self.epoch, self.mask_prob = seed, 0, mask_prob

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index):
        record = self._record(index)
        tokens = self._tokens(record, index)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        targets = np.full_like(tokens, -1)
        residues = np.arange(1, len(tokens) - 1)
        chosen = residues[rng.random(residues.size) < self.mask_prob]
        if chosen.size == 0 and residues.size:
            chosen = rng.choice(residues, 1)
        targets[chosen] = tokens[chosen]
        action = rng.random(chosen.size)
        masked = tokens.copy()
        masked[chosen[action < 0.8]] = self.tokenizer.mask_id
        random_positions = chosen[(action >= 0.8) & (action < 0.9)]
        masked[random_positions] = rng.integers(5, self.tokenizer.vocab_size, random_positions.size)
        example = _base_example(masked)
        example["targets"] = targets
        return example


# ----------------------------------------------------------------------------------------------------------------
# Collation and batching


def pad_stack(arrays: Sequence[np.ndarray], value) -> np.ndarray:
    """Stack arrays of equal rank, padding every dimension to the largest size with ``value``."""
    shape = [len(arrays)] + [max(a.shape[d] for a in arrays) for d in range(arrays[0].ndim)]
    out = np.full(shape, value, dtype=arrays[0].dtype)
    for k, a in enumerate(arrays):
        out[(k,) + tuple(slice(0, s) for s in a.shape)] = a
    return out


#: Padding value per example key.
PAD_VALUES = {"input_ids": 0, "input_mask": 0, "targets": -1}


def collate(examples: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Pad and stack examples into a batch of tensors (ids and mask with 0, per-token/pair targets with -1)."""
    batch = {}
    for key in examples[0]:
        arrays = [np.asarray(e[key]) for e in examples]
        if arrays[0].ndim == 0 or (key == "targets" and arrays[0].dtype.kind == "f"):
            batch[key] = torch.from_numpy(np.stack(arrays))
        else:
            batch[key] = torch.from_numpy(pad_stack(arrays, PAD_VALUES.get(key, 0)))
    return batch


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of similar length (less padding), TAPE's bucketing; sharded over data-parallel ranks.

    Without ``shuffle`` the indices are sorted by length and cut into batches. With it, a generator seeded by
    (seed, epoch) draws random buckets, sorts each by length, cuts it into batches and shuffles the batches, so
    every rank draws the same batch list and then takes every ``world_size``-th batch. With
    ``pad_to_equal=True`` (training) the batch list is padded by repeating its first batches so that every rank runs
    the same number of steps (DistributedDataParallel needs that); evaluation shards without repeats.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, shuffle: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1, pad_to_equal: bool = False, bucket_size: int = 100):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = np.asarray(lengths)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.pad_to_equal = rank, world_size, pad_to_equal
        self.bucket_size = bucket_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        if not self.shuffle:
            order = np.argsort(self.lengths, kind="stable")
            batches = [order[s:s + self.batch_size].tolist() for s in range(0, len(order), self.batch_size)]
        else:
            # Random buckets of bucket_size * batch_size examples, each sorted by length and cut into batches,
            # then the batches shuffled (the torchnlp BucketBatchSampler that TAPE uses).
            rng = np.random.default_rng([self.seed, self.epoch])
            order = rng.permutation(len(self.lengths))
            span = self.bucket_size * self.batch_size
            batches = []
            for s in range(0, len(order), span):
                bucket = order[s:s + span]
                bucket = bucket[np.argsort(self.lengths[bucket], kind="stable")]
                batches += [bucket[k:k + self.batch_size].tolist() for k in range(0, len(bucket), self.batch_size)]
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.pad_to_equal and self.world_size > 1 and batches:
            per_rank = math.ceil(len(batches) / self.world_size)
            batches = batches + batches[:per_rank * self.world_size - len(batches)]
        return batches[self.rank::self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


def make_loader(dataset: TAPEDataset, batch_size: int, shuffle: bool, seed: int, rank: int = 0,
                world_size: int = 1, num_workers: int = 0, pad_to_equal: bool = False,
                collate_fn: Callable = collate) -> torch.utils.data.DataLoader:
    lengths = [dataset.length(i) for i in range(len(dataset))]
    sampler = BucketBatchSampler(lengths, batch_size, shuffle, seed, rank, world_size, pad_to_equal)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                                       num_workers=num_workers)
