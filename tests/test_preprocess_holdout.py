"""preprocess --holdout-sequences: the second held-out set, sequences of the training families.

On the embedded Pfam sample: the in-family splits hold only training families, never a held-out family; no
sequence of them is in the training split; the fractions are as asked; the output does not depend on --workers;
and the pretraining data sources find and name every split.
"""
from __future__ import annotations

import filecmp
import json
import os

import numpy as np
import pytest

from megatron_protein.data.indexed_dataset import MMapIndexedDataset
from megatron_protein.data.preprocess import preprocess
from megatron_protein.data.readers import read_fasta
from megatron_protein.data.tokenizer import IUPACTokenizer
from pfam_fixtures import SAMPLE_FASTA

SPLITS = ("train", "valid", "test", "valid_infamily", "test_infamily")


@pytest.fixture(scope="module")
def split_sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("holdout")
    prefix = str(root / "one" / "pfam")
    summary = preprocess([SAMPLE_FASTA], prefix, split_by_family=(0.9, 0.05, 0.05), holdout_sequences=(0.05, 0.05),
                         seed=1234, workers=1, progress=False)
    return prefix, summary, root


def families_by_split(summary_prefix: str) -> dict:
    """Family of every record, per split, by matching the records' token arrays to the written sequences."""
    tokenizer = IUPACTokenizer()
    by_sequence = {}
    for record in read_fasta(SAMPLE_FASTA):
        by_sequence.setdefault(tokenizer.encode_array(record.sequence)[0].tobytes(), set()).add(record.family)
    out = {}
    for split in SPLITS:
        ds = MMapIndexedDataset(f"{summary_prefix}_{split}")
        out[split] = [by_sequence[np.asarray(ds[i]).astype(np.int16).tobytes()] for i in range(len(ds))]
    return out


def test_in_family_splits_hold_training_families_only_and_no_training_sequence(split_sample):
    prefix, summary, _ = split_sample
    families = families_by_split(prefix)
    train = set().union(*families["train"])
    held_out_families = set().union(*families["valid"], *families["test"])
    assert not train & held_out_families
    for split in ("valid_infamily", "test_infamily"):
        members = set().union(*families[split])
        assert members and members <= train, split
        assert not members & held_out_families
    train_sequences = {np.asarray(s).tobytes() for s in MMapIndexedDataset(f"{prefix}_train")}
    for split in ("valid_infamily", "test_infamily"):
        ds = MMapIndexedDataset(f"{prefix}_{split}")
        assert not any(np.asarray(ds[i]).tobytes() in train_sequences for i in range(len(ds)))
    counts = {name: summary["outputs"][f"{prefix}_{name}"]["sequences"] for name in SPLITS}
    training_family_records = counts["train"] + counts["valid_infamily"] + counts["test_infamily"]
    for split in ("valid_infamily", "test_infamily"):
        assert abs(counts[split] / training_family_records - 0.05) < 0.015, counts
    assert summary["holdout_sequences"] == [0.05, 0.05]
    assert sum(counts.values()) == 3912


def test_output_does_not_depend_on_workers(split_sample):
    prefix, _, root = split_sample
    other = str(root / "two" / "pfam")
    preprocess([SAMPLE_FASTA], other, split_by_family=(0.9, 0.05, 0.05), holdout_sequences=(0.05, 0.05), seed=1234,
               workers=2, progress=False)
    for split in SPLITS:
        for ext in ("bin", "idx"):
            assert filecmp.cmp(f"{prefix}_{split}.{ext}", f"{other}_{split}.{ext}", shallow=False), (split, ext)


def test_pretraining_sources_find_and_name_every_split(split_sample):
    from megatron_protein.training.pretrain_data import resolve_sources, split_titles
    prefix, _, _ = split_sample
    sources = resolve_sources(prefix, "949,50,1")
    assert all(sources[name] is not None for name in SPLITS)
    titles = split_titles(prefix, sources)
    assert titles == {"valid": "held-out families", "test": "held-out families",
                      "valid_infamily": "held-out sequences of training families",
                      "test_infamily": "held-out sequences of training families"}
    with open(f"{prefix}_summary.json") as f:
        assert json.load(f)["split"] == "by-family"


def test_holdout_needs_a_family_split_and_valid_fractions(tmp_path):
    with pytest.raises(ValueError, match="needs --split-by-family"):
        preprocess([SAMPLE_FASTA], str(tmp_path / "x"), holdout_sequences=(0.05, 0.05), progress=False)
    with pytest.raises(ValueError, match="sum below 1"):
        preprocess([SAMPLE_FASTA], str(tmp_path / "y"), split_by_family=(0.9, 0.05, 0.05),
                   holdout_sequences=(0.6, 0.5), progress=False)
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".bin", ".idx"))]
