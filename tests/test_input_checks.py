"""Bad input is refused before work starts, naming the file and the line or record: empty FASTA, a Pfam record cut
in the middle, a split that would be empty, an empty pretraining dataset, a TAPE split with a missing label (found
up front, not mid-epoch or never) and an empty TAPE split."""
from __future__ import annotations

import json
import os

import pytest

from pfam_fixtures import SAMPLE_FASTA
from test_pretrain_parallel import tiny_argv, train_run

from megatron_protein.data.indexed_dataset import make_dataset
from megatron_protein.data.preprocess import PreprocessError, preprocess
from megatron_protein.data.readers import InputFormatError
from megatron_protein.training.pretrain_data import DataError


def _first_records(n: int) -> list[str]:
    """The first ``n`` records of the embedded Pfam sample, as text (header line + sequence lines)."""
    records, current = [], []
    with open(SAMPLE_FASTA) as f:
        for line in f:
            if line.startswith(">") and current:
                records.append("".join(current))
                current = []
                if len(records) == n:
                    break
            current.append(line)
    return records


@pytest.mark.parametrize("content,message", [
    ("", r"in\.fasta: empty file; expected .* records"),
    ("\n\n  \n", r"in\.fasta: no records found"),
])
def test_empty_fasta_is_refused_and_nothing_is_written(tmp_path, content, message):
    fasta = tmp_path / "in.fasta"
    fasta.write_text(content)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PreprocessError, match=message):
        preprocess([str(fasta)], str(out / "pfam"), input_format="fasta", progress=False)
    assert os.listdir(out) == []


def test_a_record_cut_mid_sequence_contradicts_its_envelope(tmp_path):
    records = _first_records(3)
    header, sequence = records[2].split("\n", 1)
    residues = sequence.replace("\n", "")
    truncated = header + "\n" + residues[: len(residues) // 2] + "\n"  # the file ends in the middle of record 3
    fasta = tmp_path / "cut.fasta"
    fasta.write_text(records[0] + records[1] + truncated)
    line = records[0].count("\n") + records[1].count("\n") + 1
    name = header[1:].split()[0]
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputFormatError, match=rf"cut\.fasta:{line}: record {name.replace('/', '/')} has "
                                               rf"{len(residues) // 2} residues, but its Pfam envelope .* says "
                                               rf"{len(residues)}; the record is truncated"):
        preprocess([str(fasta)], str(out / "pfam"), progress=False)
    assert os.listdir(out) == []


def test_a_split_that_would_be_empty_is_refused(tmp_path):
    fasta = tmp_path / "two_families.fasta"
    fasta.write_text("".join(_first_records(2)))  # two records of one or two families
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PreprocessError, match=r"the (valid|test) split \(.*_(valid|test)\) would be empty although it "
                                              r"gets 0\.25 of the families: the input has only [12] families"):
        preprocess([str(fasta)], str(out / "pfam"), split_by_family=(0.5, 0.25, 0.25), progress=False)
    assert os.listdir(out) == []
    # A split asked to be empty is fine.
    preprocess([str(fasta)], str(out / "pfam"), split_by_family=(1.0, 0.0, 0.0), progress=False)


def test_pretraining_on_an_empty_dataset_names_the_file(tmp_path):
    prefix = str(tmp_path / "empty")
    make_dataset(prefix + "_train", [])
    make_dataset(prefix + "_valid", [[5, 6, 7]])
    with pytest.raises(DataError, match=rf"{prefix}_train\.bin: the training split holds no sequences"):
        train_run(tiny_argv(prefix))
    one = str(tmp_path / "one")
    make_dataset(one, [[5, 6, 7]])
    with pytest.raises(DataError, match=rf"{one}\.bin: --split 0,1,0 leaves no sequence for training"):
        train_run(tiny_argv(one, extra=["--split", "0,1,0"]))


# --------------------------------------------------------------------------------------------------- TAPE
@pytest.fixture(scope="module")
def tape(tmp_path_factory):
    from test_tape_train import TINY, _small_copy

    from tape_tasks.config import ProteinBertConfig
    from tape_tasks.model import ProteinBertForMaskedLM

    root = tmp_path_factory.mktemp("tape")
    data = _small_copy(str(root / "data"))
    pretrained = str(root / "pretrained")
    ProteinBertForMaskedLM(ProteinBertConfig(**TINY)).save_pretrained(pretrained)
    return {"root": str(root), "data": data, "pretrained": pretrained}


def _train_args(tape, task, name):
    return ["transformer", task, "--data_dir", tape["data"], "--output_dir", os.path.join(tape["root"], "runs"),
            "--log_dir", os.path.join(tape["root"], "logs"), "--batch_size", "4", "--max_steps", "1",
            "--from_pretrained", tape["pretrained"], "--time_or_name", name]


def test_a_tape_record_without_its_label_is_found_before_the_first_step(tape):
    from tape_tasks.cli import train_main
    from tape_tasks.datasets import DataFileError

    path = os.path.join(tape["data"], "fluorescence", "fluorescence_train.json")
    records = json.load(open(path))
    del records[-1]["log_fluorescence"]  # the last record: one max step of batch 4 would never read it
    json.dump(records, open(path, "w"))
    try:
        with pytest.raises(DataFileError, match=rf"fluorescence_train\.json: record {len(records) - 1} \(id .*\) lacks "
                                                r"key\(s\) \['log_fluorescence'\] needed by task fluorescence"):
            train_main(_train_args(tape, "fluorescence", "missing"))
        assert not os.path.exists(os.path.join(tape["root"], "runs", "fluorescence_transformer_missing"))
        records[-1]["log_fluorescence"] = ["bright"]
        json.dump(records, open(path, "w"))
        with pytest.raises(DataFileError, match=r"'log_fluorescence' cannot be read as float32"):
            train_main(_train_args(tape, "fluorescence", "garbled"))
    finally:
        records[-1]["log_fluorescence"] = [3.0]
        json.dump(records, open(path, "w"))


def test_an_empty_tape_split_is_refused(tape):
    from tape_tasks.cli import eval_main, train_main
    from tape_tasks.datasets import DataFileError

    path = os.path.join(tape["data"], "stability", "stability_valid.json")
    saved = open(path).read()
    json.dump([], open(path, "w"))
    try:
        with pytest.raises(DataFileError, match=r"stability_valid\.json: the split holds no records"):
            train_main(_train_args(tape, "stability", "empty"))
        with pytest.raises(DataFileError, match=r"stability_valid\.json: the split holds no records"):
            eval_main(["transformer", "stability", tape["pretrained"], "--data_dir", tape["data"], "--split",
                       "valid"])
    finally:
        open(path, "w").write(saved)
