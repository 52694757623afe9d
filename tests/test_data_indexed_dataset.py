"""Megatron mmap indexed dataset: round trips, byte layout against a file laid out by hand, bad files."""
import os
import struct

import numpy as np
import pytest

from megatron_protein.data.indexed_dataset import (IndexedDatasetError, MMapIndexedDataset,
                                                   MMapIndexedDatasetBuilder, best_fitting_dtype, make_dataset)


def hand_laid_idx(sizes, doc_idx, dtype_code, itemsize):
    """The .idx bytes written from Megatron-LM's format description, without our writer."""
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", dtype_code)
    out += struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx))
    out += b"".join(struct.pack("<i", s) for s in sizes)
    pointer = 0
    for s in sizes:
        out += struct.pack("<q", pointer)
        pointer += s * itemsize
    out += b"".join(struct.pack("<q", d) for d in doc_idx)
    return out


SEQUENCES = [[5, 6, 7], [29], [8, 9, 10, 11, 12, 13, 14], [2, 3, 0, 1, 4]]


@pytest.mark.parametrize("dtype,code,fmt", [(np.uint16, 8, "<H"), (np.int32, 4, "<i")])
def test_writer_matches_the_format_byte_for_byte(tmp_path, dtype, code, fmt):
    prefix = str(tmp_path / "ours")
    make_dataset(prefix, SEQUENCES, dtype=dtype)
    expected_idx = hand_laid_idx([len(s) for s in SEQUENCES], list(range(len(SEQUENCES) + 1)), code,
                                 np.dtype(dtype).itemsize)
    expected_bin = b"".join(struct.pack(fmt, t) for s in SEQUENCES for t in s)
    assert open(prefix + ".idx", "rb").read() == expected_idx
    assert open(prefix + ".bin", "rb").read() == expected_bin


def test_reader_reads_a_hand_laid_file(tmp_path):
    # A file as Megatron writes it for 2 documents of 2 and 1 sentences (doc_idx 0, 2, 3), int32 tokens.
    sentences = [[100000, 7], [3, 4, 5], [65600]]
    prefix = str(tmp_path / "megatron")
    with open(prefix + ".idx", "wb") as f:
        f.write(hand_laid_idx([len(s) for s in sentences], [0, 2, 3], 4, 4))
    with open(prefix + ".bin", "wb") as f:
        f.write(np.array([t for s in sentences for t in s], dtype="<i4").tobytes())
    ds = MMapIndexedDataset(prefix)
    assert len(ds) == 3 and ds.dtype == np.int32
    assert [ds[i].tolist() for i in range(3)] == sentences
    assert ds.doc_idx.tolist() == [0, 2, 3]
    assert ds.sizes.tolist() == [2, 3, 1]
    assert ds.get(1, 1, 2).tolist() == [4, 5]
    assert ds[-1].tolist() == [65600]


def test_round_trip_random(tmp_path):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 30, size=rng.integers(1, 500)) for _ in range(3000)]
    ds = make_dataset(str(tmp_path / "r"), seqs, dtype=best_fitting_dtype(30))
    assert ds.dtype == np.uint16 and len(ds) == 3000
    assert all(np.array_equal(ds[i], s) for i, s in enumerate(seqs))
    assert ds.num_tokens == sum(len(s) for s in seqs)
    assert best_fitting_dtype(70000) is np.int32
    with pytest.raises(IndexError):
        ds[3000]


def test_pickles_by_prefix(tmp_path):
    import pickle

    ds = make_dataset(str(tmp_path / "p"), SEQUENCES)
    blob = pickle.dumps(ds)
    assert len(blob) < 200  # the prefix, not the data
    again = pickle.loads(blob)
    assert [again[i].tolist() for i in range(len(again))] == SEQUENCES


def test_empty_dataset(tmp_path):
    ds = make_dataset(str(tmp_path / "e"), [])
    assert len(ds) == 0 and ds.doc_idx.tolist() == [0]


def test_truncated_idx_names_the_file(tmp_path):
    prefix = str(tmp_path / "t")
    make_dataset(prefix, SEQUENCES)
    data = open(prefix + ".idx", "rb").read()
    with open(prefix + ".idx", "wb") as f:
        f.write(data[:-5])
    with pytest.raises(IndexedDatasetError, match=r"t\.idx: truncated: \d+ bytes, expected \d+"):
        MMapIndexedDataset(prefix)
    with open(prefix + ".idx", "wb") as f:
        f.write(data[:20])
    with pytest.raises(IndexedDatasetError, match=r"t\.idx: truncated header"):
        MMapIndexedDataset(prefix)
    with open(prefix + ".idx", "wb") as f:
        f.write(b"NOTMAGIC\x00" + data[9:])
    with pytest.raises(IndexedDatasetError, match="bad magic"):
        MMapIndexedDataset(prefix)


def test_truncated_bin_names_the_file(tmp_path):
    prefix = str(tmp_path / "b")
    make_dataset(prefix, SEQUENCES)
    os.truncate(prefix + ".bin", 4)
    with pytest.raises(IndexedDatasetError, match=r"b\.bin: truncated"):
        MMapIndexedDataset(prefix)


def test_builder_leaves_nothing_on_error(tmp_path):
    prefix = str(tmp_path / "fail")
    with pytest.raises(RuntimeError, match="boom"):
        with MMapIndexedDatasetBuilder(prefix) as builder:
            builder.add_document([5, 6])
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="do not fit uint16"):
        with MMapIndexedDatasetBuilder(prefix) as builder:
            builder.add_document([70000])
    assert os.listdir(tmp_path) == []
