"""evaluate_mlm: a converted model gives the numbers the trainer measured, in every format.

A tiny protein BERT is pretrained for 5 steps in this process (the project's trainer; it evaluates its held-out
split at the end and saves a Megatron checkpoint). ``evaluate_mlm`` then scores the same samples (same sequences,
sample count, length and masking seed) from the Megatron checkpoint, from the TAPE directory the converter writes
and from its Hugging Face ESM export: all must equal the trainer's own evaluation (float32 models computed by
differently structured code: relative 1e-5 on losses; token counts exactly).
"""
from __future__ import annotations

import json
import os

import pytest

from pfam_fixtures import write_pretraining_data
from test_pretrain_parallel import tiny_argv, train_run

EVAL_ITERS, GLOBAL_BATCH = 2, 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate_mlm")
    prefix = write_pretraining_data(str(root), train=120, valid=30)
    save = str(root / "checkpoints")
    result = train_run(tiny_argv(prefix, extra=["--save", save, "--eval-iters", str(EVAL_ITERS),
                                                "--eval-interval", "5"]))
    (evaluation,) = [e for e in result["evaluations"] if e["split"] == "valid"]
    return prefix, save, evaluation, root


def trainer_samples(prefix: str) -> dict:
    """What the trainer scored for 'valid': its sequences, sample count, sample length and masking seed."""
    from megatron_protein.training.pretrain_data import SPLITS
    return {"sequences": f"{prefix}_valid", "num_samples": EVAL_ITERS * GLOBAL_BATCH, "seq_length": 32,
            "seed": 7 + SPLITS.index("valid")}


def score(model_path: str, prefix: str) -> dict:
    from megatron_protein.evaluate_mlm import evaluate, load_model, read_sequences, training_residue_counts
    s = trainer_samples(prefix)
    return evaluate(load_model(model_path), read_sequences(s["sequences"]), seed=s["seed"],
                    num_samples=s["num_samples"], seq_length=s["seq_length"],
                    train_counts=training_residue_counts(f"{prefix}_train"))["metrics"]


def assert_same_metrics(got: dict, want: dict, where: str) -> None:
    for key, value in want.items():
        if key in ("iteration", "split", "title", "tokens_seen"):
            continue
        if key.endswith("tokens") or key == "tokens":
            assert got[key] == value, f"{where}: {key} {got[key]} != {value}"
        else:
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), f"{where}: {key}"


def test_megatron_checkpoint_reproduces_the_trainers_evaluation(trained):
    prefix, save, evaluation, _ = trained
    assert evaluation["masked_tokens"] > 0
    assert_same_metrics(score(save, prefix), evaluation, "Megatron checkpoint")


def test_tape_and_hf_esm_exports_give_the_same_numbers(trained):
    pytest.importorskip("transformers")
    from megatron_protein.conversion.to_tape import convert
    prefix, save, evaluation, root = trained
    out = str(root / "tape")
    convert(save, out, formats=("tape", "hf-esm"), table_file=None)
    assert_same_metrics(score(out, prefix), evaluation, "TAPE directory")
    assert_same_metrics(score(os.path.join(out, "hf-esm"), prefix), evaluation, "Hugging Face ESM export")


def test_command_line_prints_json_and_fixed_seed_repeats(trained, tmp_path, capsys):
    from megatron_protein.evaluate_mlm import main
    from pfam_fixtures import SAMPLE_FASTA
    prefix, save, _, _ = trained
    fasta = tmp_path / "few.fasta"
    with open(SAMPLE_FASTA) as f:
        lines = f.read().split(">")[1:9]
    fasta.write_text("".join(">" + record for record in lines))
    report = main([save, str(fasta), "--seed", "3", "--output", str(tmp_path / "out.json")])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "out.json").read_text()) == json.loads(json.dumps(report))
    assert report["model_format"] == "megatron" and report["sequences"] == 8
    assert report["train_data"].endswith("pfam_train")  # found through the checkpoint's data_path
    assert report["cropped_sequences"] == sum(1 for r in lines if len("".join(r.split("\n")[1:])) > 30)
    again = main([save, str(fasta), "--seed", "3"])
    assert again["metrics"] == report["metrics"]
    other = main([save, str(fasta), "--seed", "4"])
    assert other["metrics"]["masked_loss"] != report["metrics"]["masked_loss"]


def test_errors_name_the_file_and_what_was_expected(tmp_path):
    from megatron_protein.evaluate_mlm import main
    with pytest.raises(SystemExit, match="no such model"):
        main([str(tmp_path / "missing"), str(tmp_path / "x.fasta")])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(SystemExit, match="neither a Megatron checkpoint"):
        main([str(tmp_path / "empty_dir"), str(tmp_path / "x.fasta")])
