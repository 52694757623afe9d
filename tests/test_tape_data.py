"""TAPE data files: LMDB and JSON give the same batches, TAPE's label layouts, batching, and errors on bad input."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from tape_tasks.datasets import (BucketBatchSampler, DataFileError, ProteinnetDataset, available_splits, collate,
                                 make_loader, open_split, write_lmdb)
from tape_tasks.registry import TASKS, get_task
from tape_tasks.tokenizer import TAPETokenizer, TokenizationError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED = os.path.join(REPO, "data", "tape")

#: task -> (folder, stem, split) of the embedded files used here.
TASK_FILES = {
    "secondary_structure": ("secondary_structure", "secondary_structure", "valid"),
    "secondary_structure_8": ("secondary_structure", "secondary_structure", "valid"),
    "contact_prediction": ("proteinnet", "proteinnet", "valid"),
    "remote_homology": ("remote_homology", "remote_homology", "valid"),
    "fluorescence": ("fluorescence", "fluorescence", "valid"),
    "stability": ("stability", "stability", "valid"),
    "masked_language_modeling": ("pfam", "pfam", "valid"),
}


def _as_tape_lmdb_record(record: dict) -> dict:
    """TAPE's LMDB records hold numpy arrays where the JSON files hold lists."""
    return {k: (np.asarray(v) if isinstance(v, list) else v) for k, v in record.items()}


@pytest.mark.parametrize("task_name", sorted(TASK_FILES))
def test_lmdb_and_json_give_identical_batches(tmp_path, task_name):
    folder, stem, split = TASK_FILES[task_name]
    with open(os.path.join(EMBEDDED, folder, f"{stem}_{split}.json")) as f:
        records = json.load(f)[:12]
    os.makedirs(tmp_path / folder)
    with open(tmp_path / folder / f"{stem}_{split}.json", "w") as f:
        json.dump(records, f)
    write_lmdb([_as_tape_lmdb_record(r) for r in records], str(tmp_path / folder / f"{stem}_{split}.lmdb"))
    task = get_task(task_name)
    batches = {}
    for fmt in ("json", "lmdb"):
        dataset = task.dataset(str(tmp_path), split, data_format=fmt, seed=3, num_labels=1195 if
                               task_name == "remote_homology" else None)
        batches[fmt] = list(make_loader(dataset, 4, shuffle=True, seed=5))
    assert len(batches["json"]) == 3
    for a, b in zip(batches["json"], batches["lmdb"]):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_tokenizer_uses_tape_ids_and_names_bad_letters():
    tok = TAPETokenizer()
    assert tok.vocab_size == 30
    assert tok.encode("ACZ").tolist() == [2, 5, 7, 29, 3]
    assert tok.encode("X").tolist() == [2, 27, 3]
    assert tok.decode(tok.encode("MKTAYIAK")) == "MKTAYIAK"
    with pytest.raises(TokenizationError, match=r"record r7: .*'J' at position 2.*\['1', 'J'\]"):
        tok.encode("ACJD1", record="r7")


def test_secondary_structure_labels_are_padded_at_specials():
    records = open_split(EMBEDDED, "secondary_structure", "secondary_structure", "train")
    example = get_task("secondary_structure").make_dataset(records, None, 3, 0)[0]
    raw = records[0]
    assert example["input_ids"].tolist() == TAPETokenizer().encode(raw["primary"]).tolist()
    assert example["targets"].tolist() == [-1] + list(raw["ss3"]) + [-1]
    assert int(example["protein_length"]) == len(raw["primary"])


def test_contact_map_from_tertiary_at_8_angstrom():
    # Residues on a line 3 A apart, except residue 9 which sits 7.5 A from residue 0.
    coords = [[3.0 * k, 0.0, 0.0] for k in range(12)]
    coords[9] = [0.0, 7.5, 0.0]
    valid = [True] * 12
    valid[11] = False

    class Records(list):
        path = "<memory>"

    example = ProteinnetDataset(Records([{"id": "toy", "primary": "A" * 12, "tertiary": coords,
                                          "valid_mask": valid}]))[0]
    contacts = example["targets"]
    assert contacts.shape == (12, 12)
    i, j = np.indices(contacts.shape)
    assert (contacts[np.abs(i - j) < 6] == -1).all()          # TAPE: |i - j| < 6 is never scored
    assert (contacts[11] == -1).all() and (contacts[:, 11] == -1).all()   # invalid residue
    assert contacts[0, 9] == 1 and contacts[9, 0] == 1        # 7.5 A
    assert contacts[0, 6] == 0                                # 18 A
    assert contacts[3, 9] == 0                                # sqrt(81 + 56.25) > 8


def test_missing_split_lists_the_splits_found(tmp_path):
    with pytest.raises(DataFileError, match=r"split 'cb513' not found.*splits found there: \['test', 'train', "
                                            r"'valid'\]"):
        open_split(EMBEDDED, "secondary_structure", "secondary_structure", "cb513")
    with pytest.raises(DataFileError, match="no proteinnet_.*point --data_dir"):
        open_split(str(tmp_path), "proteinnet", "proteinnet", "train")
    assert available_splits(EMBEDDED, "remote_homology", "remote_homology") == [
        "test_family_holdout", "test_fold_holdout", "test_superfamily_holdout", "train", "valid"]


def test_record_without_the_task_keys_names_the_record(tmp_path):
    os.makedirs(tmp_path / "stability")
    records = [{"id": "ok", "primary": "MKV", "stability_score": [0.5]},
               {"id": "broken", "primary": "MKV", "score": [1.0]}]
    (tmp_path / "stability" / "stability_train.json").write_text(json.dumps(records))
    dataset = get_task("stability").dataset(str(tmp_path), "train")
    assert dataset[0]["targets"].tolist() == [0.5]
    with pytest.raises(DataFileError, match=r"stability_train.json: record 1 \(id 'broken'\) lacks key\(s\) "
                                            r"\['stability_score'\] needed by task stability"):
        dataset[1]


def test_sequence_outside_the_vocabulary_names_file_and_record(tmp_path):
    os.makedirs(tmp_path / "fluorescence")
    (tmp_path / "fluorescence" / "fluorescence_valid.json").write_text(json.dumps(
        [{"id": "gfp_1", "primary": "MSKGEJLF", "log_fluorescence": [3.1]}]))
    dataset = get_task("fluorescence").dataset(str(tmp_path), "valid")
    with pytest.raises(TokenizationError, match=r"fluorescence_valid.json: 0 \(id 'gfp_1'\).*'J' at position 5"):
        dataset[0]


def test_bad_labels_and_files(tmp_path):
    os.makedirs(tmp_path / "secondary_structure")
    (tmp_path / "secondary_structure" / "secondary_structure_train.json").write_text(json.dumps(
        [{"id": "s1", "primary": "MKVL", "ss3": [0, 1, 2]}]))
    with pytest.raises(DataFileError, match=r"record 0 \(id 's1'\): 'ss3' has 3 labels for 4 residues"):
        get_task("secondary_structure").dataset(str(tmp_path), "train")[0]
    (tmp_path / "secondary_structure" / "secondary_structure_valid.json").write_text('[{"id": 1,\n "primary": ]')
    with pytest.raises(DataFileError, match="secondary_structure_valid.json: line 2"):
        get_task("secondary_structure").dataset(str(tmp_path), "valid")


def test_bucket_batches_cover_every_example_once_and_shard():
    lengths = np.random.default_rng(0).integers(10, 300, size=103)
    single = list(BucketBatchSampler(lengths, 8, shuffle=True, seed=1))
    flat = sorted(i for b in single for i in b)
    assert flat == list(range(103))
    # Batches hold similar lengths: far less spread than random batches.
    spread = np.mean([np.ptp(lengths[b]) for b in single])
    assert spread < 0.5 * np.ptp(lengths)
    # Two ranks: disjoint shards of the same batch list; training pads to equal step counts.
    r0 = list(BucketBatchSampler(lengths, 8, shuffle=True, seed=1, rank=0, world_size=2))
    r1 = list(BucketBatchSampler(lengths, 8, shuffle=True, seed=1, rank=1, world_size=2))
    assert r0 + r1 != [] and sorted(i for b in r0 + r1 for i in b) == list(range(103))
    assert (len(r0), len(r1)) == (7, 6)
    p1 = list(BucketBatchSampler(lengths, 8, shuffle=True, seed=1, rank=1, world_size=2, pad_to_equal=True))
    assert len(p1) == 7
    # A new epoch reshuffles.
    sampler = BucketBatchSampler(lengths, 8, shuffle=True, seed=1)
    sampler.set_epoch(1)
    assert list(sampler) != single


def test_collate_pads_ids_with_zero_and_targets_with_minus_one():
    examples = [{"input_ids": np.array([2, 5, 3]), "input_mask": np.ones(3, dtype=np.int64),
                 "targets": np.array([[-1, 1], [1, -1]]), "protein_length": np.asarray(1)},
                {"input_ids": np.array([2, 5, 6, 7, 3]), "input_mask": np.ones(5, dtype=np.int64),
                 "targets": np.zeros((3, 3), dtype=np.int64), "protein_length": np.asarray(3)}]
    batch = collate(examples)
    assert batch["input_ids"].tolist() == [[2, 5, 3, 0, 0], [2, 5, 6, 7, 3]]
    assert batch["input_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["targets"][0].tolist() == [[-1, 1, -1], [1, -1, -1], [-1, -1, -1]]
    assert batch["protein_length"].tolist() == [1, 3]


def test_every_embedded_record_is_readable():
    """The committed data set is usable by every task (keys, vocabulary, label ranges)."""
    for name, task in TASKS.items():
        for split in available_splits(EMBEDDED, task.folder, task.file_stem):
            dataset = task.dataset(EMBEDDED, split)
            for i in range(len(dataset)):
                dataset[i]
