"""Megatron-LM's memory-mapped indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``), byte-compatible both ways.

File format (Megatron-LM ``megatron/core/datasets/indexed_dataset.py``, "MMIDIDX"; all integers little-endian):

``PREFIX.idx``::

    offset  size            content
    0       9               magic b"MMIDIDX\\x00\\x00"
    9       8   uint64      version, always 1
    17      1   uint8       dtype code of the tokens in .bin: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                            6 float64, 7 float32, 8 uint16
    18      8   uint64      N = number of sequences
    26      8   uint64      D = number of document indices
    34      4*N int32       sizes: tokens per sequence
    ..      8*N int64       pointers: byte offset of each sequence in .bin
    ..      8*D int64       document indices: 0, then the sequence count at the end of each document

``PREFIX.bin`` holds the tokens of all sequences back to back, in the dtype above (uint16 when the vocabulary has
fewer than 65,500 entries, int32 otherwise, as Megatron's ``DType.optimal_dtype``).

Here each protein sequence is one document (document indices 0, 1, ..., N), which is what Megatron's BERT dataset
sees for one-sentence documents. The reader is a numpy memmap: opening costs O(1) memory and ``ds[i]`` is a view.

The builder keeps nothing per sequence in memory: tokens, sizes and document indices stream to temporary files
that are turned into ``.bin``/``.idx`` by ``finalize()`` and renamed into place, so an interrupted run never leaves a
partial ``.bin``/``.idx`` under the final name.
"""
from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from typing import Iterable

import numpy as np

from megatron_protein.utils.errors import UserError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count (34 bytes)
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
               8: np.uint16}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


class IndexedDatasetError(UserError, ValueError):
    """A .bin/.idx pair that does not follow the MMIDIDX format; the message names the file and the problem."""


def best_fitting_dtype(vocab_size: int | None) -> type:
    """uint16 when every id fits (vocab < 65,500, Megatron's rule), else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def data_file_path(prefix: str) -> str:
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    return prefix + ".idx"


def make_world_readable(path: str) -> None:
    """Give a temporary file (mkstemp makes it 0600) the permissions a normal ``open`` would, before renaming it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def dataset_exists(prefix: str) -> bool:
    return os.path.exists(index_file_path(prefix)) and os.path.exists(data_file_path(prefix))


class MMapIndexedDataset:
    """Read a Megatron ``.bin``/``.idx`` pair. ``len(ds)`` sequences; ``ds[i]`` is a read-only ndarray of token ids.

    ``ds.sizes`` (int32 [N]), ``ds.pointers`` (int64 [N]) and ``ds.doc_idx`` (int64 [D]) are memmapped views.
    The header and every array length are checked against the file sizes, so a truncated or foreign file fails
    here with the file name and what was expected, not later with a garbage read.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        idx_path, bin_path = index_file_path(prefix), data_file_path(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"indexed dataset file {path} does not exist")
        idx_bytes = os.path.getsize(idx_path)
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise IndexedDatasetError(f"{idx_path}: truncated header: {len(head)} bytes, expected at least "
                                      f"{_HEADER.size} (MMIDIDX magic, version, dtype, counts)")
        magic, version, code, count, doc_count = _HEADER.unpack(head)
        if magic != INDEX_MAGIC:
            raise IndexedDatasetError(f"{idx_path}: bad magic {magic!r}, expected {INDEX_MAGIC!r} "
                                      "(Megatron mmap indexed dataset)")
        if version != INDEX_VERSION:
            raise IndexedDatasetError(f"{idx_path}: unsupported version {version}, expected {INDEX_VERSION}")
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code}, expected one of "
                                      f"{sorted(DTYPE_CODES)}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + 4 * count + 8 * count + 8 * doc_count
        if idx_bytes < expected:
            raise IndexedDatasetError(
                f"{idx_path}: truncated: {idx_bytes} bytes, expected {expected} for {count} sequences and "
                f"{doc_count} document indices")
        self._idx_mmap = np.memmap(idx_path, mode="r", dtype=np.uint8)
        offset = _HEADER.size
        self.sizes = np.frombuffer(self._idx_mmap, dtype=np.int32, count=count, offset=offset)
        offset += self.sizes.nbytes
        self.pointers = np.frombuffer(self._idx_mmap, dtype=np.int64, count=count, offset=offset)
        offset += self.pointers.nbytes
        self.doc_idx = np.frombuffer(self._idx_mmap, dtype=np.int64, count=doc_count, offset=offset)

        bin_bytes = os.path.getsize(bin_path)
        needed = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if count else 0
        if bin_bytes < needed:
            raise IndexedDatasetError(f"{bin_path}: truncated: {bin_bytes} bytes, the index {idx_path} needs "
                                      f"{needed}")
        # np.memmap refuses empty files; an empty dataset has nothing to map.
        self._bin_mmap = np.memmap(bin_path, mode="r", dtype=np.uint8) if bin_bytes else np.zeros(0, np.uint8)

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn get the prefix and map the files again, instead of a copy of them.
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, index: int) -> np.ndarray:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"sequence {index} out of range for {self.prefix} with {n} sequences")
        return np.frombuffer(self._bin_mmap, dtype=self.dtype, count=int(self.sizes[index]),
                             offset=int(self.pointers[index]))

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens ``offset : offset + length`` of sequence ``index`` (Megatron's ``get``); reads only those bytes."""
        size = int(self.sizes[index])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"slice [{offset}:{offset + length}] outside sequence {index} of length {size}")
        return np.frombuffer(self._bin_mmap, dtype=self.dtype, count=length,
                             offset=int(self.pointers[index]) + offset * self.dtype.itemsize)

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))


class MMapIndexedDatasetBuilder:
    """Write a Megatron ``.bin``/``.idx`` pair, streaming (memory does not grow with the number of sequences).

    Usage::

        with MMapIndexedDatasetBuilder(prefix, dtype=np.uint16) as builder:
            for ids in sequences:
                builder.add_item(ids)
                builder.end_document()
        # finalize() ran on a clean exit; on an exception the temporary files are deleted.

    Nothing exists under ``PREFIX.bin``/``PREFIX.idx`` until ``finalize()`` renames the completed files.
    """

    def __init__(self, prefix: str, dtype: type = np.uint16) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} has no MMIDIDX code; use one of "
                             f"{[np.dtype(d).name for d in DTYPE_CODES.values()]}")
        directory = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(directory, exist_ok=True)
        base = os.path.basename(prefix)
        self._tmp_paths = []

        def tmp(suffix):
            fd, path = tempfile.mkstemp(prefix=f".{base}.", suffix=suffix + ".tmp", dir=directory)
            self._tmp_paths.append(path)
            return os.fdopen(fd, "wb")

        opened = []
        try:
            for suffix in (".bin", ".sizes", ".docs"):
                opened.append(tmp(suffix))
        except BaseException:  # a signal or a full disk between two files: leave none behind
            for f in opened:
                f.close()
            for path in self._tmp_paths:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise
        self._bin, self._sizes, self._docs = opened
        self._idx_tmp_path = None
        self._count = 0
        self._doc_count = 1
        self._docs.write(np.array([0], dtype=np.int64).tobytes())
        self._max_value = np.iinfo(self.dtype).max if self.dtype.kind in "iu" else None
        self._closed = False

    def add_item(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append one sequence of token ids (its tokens go to .bin, its length to the index)."""
        array = np.asarray(tokens)
        if self._max_value is not None and array.size and (array.max() > self._max_value or array.min() < 0
                                                           and self.dtype.kind == "u"):
            raise ValueError(f"token ids {array.min()}..{array.max()} do not fit {self.dtype} in {self.prefix}.bin")
        self._bin.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sizes.write(np.int32(array.size).tobytes())
        self._count += 1

    def end_document(self) -> None:
        """Close the current document (Megatron: one document may hold several sequences)."""
        self._docs.write(np.int64(self._count).tobytes())
        self._doc_count += 1

    def add_document(self, tokens) -> None:
        """One sequence that is a whole document (the protein case)."""
        self.add_item(tokens)
        self.end_document()

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append many sequences at once, each its own document: ``tokens`` is their concatenation."""
        lengths = np.asarray(lengths, dtype=np.int64)
        tokens = np.asarray(tokens)
        if int(lengths.sum()) != tokens.size:
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {tokens.size} tokens were given")
        if not lengths.size:
            return
        if self._max_value is not None and tokens.size and (tokens.max() > self._max_value or tokens.min() < 0
                                                            and self.dtype.kind == "u"):
            raise ValueError(f"token ids {tokens.min()}..{tokens.max()} do not fit {self.dtype} in {self.prefix}.bin")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sizes.write(lengths.astype(np.int32).tobytes())
        self._docs.write(np.arange(self._count + 1, self._count + 1 + lengths.size, dtype=np.int64).tobytes())
        self._count += int(lengths.size)
        self._doc_count += int(lengths.size)

    def __len__(self) -> int:
        return self._count

    def finalize(self, chunk: int = 1 << 16) -> None:
        """Write the .idx from the streamed sizes (pointers computed chunk by chunk) and rename both files."""
        if self._closed:
            raise RuntimeError(f"builder for {self.prefix} is already closed")
        for f in (self._bin, self._sizes, self._docs):
            f.close()
        directory = os.path.dirname(os.path.abspath(self.prefix))
        fd, self._idx_tmp_path = tempfile.mkstemp(prefix=f".{os.path.basename(self.prefix)}.", suffix=".idx.tmp",
                                                  dir=directory)
        self._tmp_paths.append(self._idx_tmp_path)
        itemsize = self.dtype.itemsize
        with os.fdopen(fd, "wb") as idx:
            idx.write(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, CODE_OF_DTYPE[self.dtype], self._count,
                                   self._doc_count))
            sizes_path, docs_path = self._tmp_paths[1], self._tmp_paths[2]
            with open(sizes_path, "rb") as sizes_file:  # sizes, copied in chunks
                while block := sizes_file.read(4 * chunk):
                    idx.write(block)
            with open(sizes_path, "rb") as sizes_file:  # pointers = exclusive prefix sum of sizes * itemsize
                carry = 0
                while block := sizes_file.read(4 * chunk):
                    sizes = np.frombuffer(block, dtype=np.int32).astype(np.int64) * itemsize
                    ends = np.cumsum(sizes) + carry
                    idx.write((ends - sizes).tobytes())
                    carry = int(ends[-1])
            with open(docs_path, "rb") as docs_file:
                while block := docs_file.read(8 * chunk):
                    idx.write(block)
        for path in (self._tmp_paths[0], self._idx_tmp_path):
            make_world_readable(path)
        os.replace(self._tmp_paths[0], data_file_path(self.prefix))
        os.replace(self._idx_tmp_path, index_file_path(self.prefix))
        for path in self._tmp_paths[1:3]:
            os.unlink(path)
        self._tmp_paths = []
        self._closed = True

    def abort(self) -> None:
        """Delete every temporary file; nothing is left under the output prefix."""
        if self._closed:
            return
        for f in (self._bin, self._sizes, self._docs):
            f.close()
        for path in self._tmp_paths:
            if os.path.exists(path):
                os.unlink(path)
        self._tmp_paths = []
        self._closed = True

    def __enter__(self) -> "MMapIndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self._closed:
                self.finalize()
        else:
            self.abort()

    def __del__(self) -> None:
        try:
            self.abort()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def make_dataset(prefix: str, sequences: Iterable[Iterable[int]], dtype: type = np.uint16) -> MMapIndexedDataset:
    """Write every sequence as its own document and open the result (a convenience for tests and tools)."""
    with MMapIndexedDatasetBuilder(prefix, dtype=dtype) as builder:
        for seq in sequences:
            builder.add_document(seq)
    return MMapIndexedDataset(prefix)
