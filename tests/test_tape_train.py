"""tape_train / tape_eval / tape_embed end to end on (a few records of) the embedded TAPE data.

Each task trains a few steps from a pretrained tiny model and is evaluated; ``--force_save`` and ``--time_or_name``
behave as ProteinLM's; a resumed run continues where it stopped; data-parallel training on 2 gloo ranks gives the
weights of the single-process run with the same global batch.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch

from harness import run_distributed
from tape_tasks.cli import embed_main, eval_main, train_main
from tape_tasks.config import ProteinBertConfig
from tape_tasks.model import ProteinBertForMaskedLM
from tape_tasks.registry import TASKS
from tape_tasks.training import TrainConfig, run_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED = os.path.join(REPO, "data", "tape")

TINY = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=512, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _small_copy(dest: str, train: int = 8, other: int = 4) -> str:
    """The shortest records of every embedded split (real TAPE-format data, small enough for a test)."""
    for task in TASKS.values():
        folder = os.path.join(EMBEDDED, task.folder)
        os.makedirs(os.path.join(dest, task.folder), exist_ok=True)
        for name in os.listdir(folder):
            with open(os.path.join(folder, name)) as f:
                content = json.load(f)
            if isinstance(content, list):   # the shortest records: real data, cheap to run
                content = sorted(content, key=lambda r: len(r["primary"]))[
                    :train if name.endswith("_train.json") else other]
            with open(os.path.join(dest, task.folder, name), "w") as f:
                json.dump(content, f)
    return dest


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("tape")
    data = _small_copy(str(root / "data"))
    torch.manual_seed(0)
    pretrained = str(root / "pretrained")
    ProteinBertForMaskedLM(ProteinBertConfig(**TINY)).save_pretrained(pretrained)
    return {"root": str(root), "data": data, "pretrained": pretrained}


def _train_args(ws, task, *extra, model="transformer"):
    args = [model, task, "--data_dir", ws["data"], "--output_dir", os.path.join(ws["root"], "runs"),
            "--log_dir", os.path.join(ws["root"], "logs"), "--batch_size", "4", "--max_steps", "2",
            "--num_train_epochs", "1", "--warmup_steps", "1", "--learning_rate", "1e-3"]
    if model == "transformer":
        args += ["--from_pretrained", ws["pretrained"]]
    return args + list(extra)


EVAL_SPLIT = {"secondary_structure": "test", "secondary_structure_8": "valid", "contact_prediction": "test",
              "remote_homology": "test_fold_holdout", "fluorescence": "test", "stability": "test",
              "masked_language_modeling": "holdout"}
EXPECTED_METRIC = {"secondary_structure": "accuracy", "secondary_structure_8": "accuracy",
                   "contact_prediction": "precision_at_l5[medium_long 12+]", "remote_homology": "accuracy",
                   "fluorescence": "spearmanr", "stability": "mse", "masked_language_modeling": "accuracy"}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_each_task_trains_and_evaluates(workspace, task):
    result = train_main(_train_args(workspace, task, "--time_or_name", "t"))
    run_dir = result.save_dir
    assert os.path.basename(run_dir) == f"{task}_transformer_t"
    assert result.steps == 2 and all(np.isfinite(result.train_losses + result.valid_losses))
    assert {"config.json", "pytorch_model.bin", "checkpoint.bin", "args.json"} <= set(os.listdir(run_dir))
    # The backbone came from the pretrained directory and moved by training.
    before = torch.load(os.path.join(workspace["pretrained"], "pytorch_model.bin"), weights_only=True)
    after = torch.load(os.path.join(run_dir, "pytorch_model.bin"), weights_only=True)
    key = "bert.encoder.layer.0.intermediate.dense.weight"
    assert not torch.equal(before[key], after[key])
    results = eval_main(["transformer", task, run_dir, "--data_dir", workspace["data"], "--split",
                         EVAL_SPLIT[task], "valid"])
    written = json.load(open(os.path.join(run_dir, f"tape_eval_{task}.json")))
    assert set(written["splits"]) == {EVAL_SPLIT[task], "valid"}
    value = written["splits"][EVAL_SPLIT[task]][EXPECTED_METRIC[task]]
    assert value == pytest.approx(results[EVAL_SPLIT[task]][EXPECTED_METRIC[task]])
    assert np.isfinite(value) and written["splits"]["valid"]["num_examples"] == 4


def test_onehot_baseline_trains_and_evaluates(workspace, capsys):
    result = train_main(_train_args(workspace, "stability", "--time_or_name", "base", model="onehot"))
    assert os.path.basename(result.save_dir) == "stability_onehot_base"
    eval_main(["onehot", "stability", result.save_dir, "--data_dir", workspace["data"], "--metrics", "spearmanr",
               "mae"])
    table = capsys.readouterr().out
    assert re.search(r"spearmanr\s+-?\d\.\d{4}", table) and "mae" in table and "mse" not in table


def test_contact_eval_prints_the_range_with_every_number(workspace, capsys):
    run_dir = os.path.join(workspace["root"], "contact_forced")
    train_main(_train_args(workspace, "contact_prediction", "--force_save", run_dir))
    eval_main(["transformer", "contact_prediction", run_dir, "--data_dir", workspace["data"], "--metrics",
               "precision_at_l5", "--contact_range", "long", "all"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("precision")]
    assert [r.split()[0] + " " + r.split()[1] for r in rows] == ["precision_at_l5[all 6+]",
                                                                 "precision_at_l5[long 24+]"]


def test_force_save_writes_the_initial_model_and_exits(workspace):
    path = os.path.join(workspace["root"], "forced")
    runs = os.path.join(workspace["root"], "runs_forced")
    result = train_main(_train_args(workspace, "secondary_structure", "--force_save", path, "--output_dir", runs))
    assert result.steps == 0 and not os.path.exists(runs)
    assert sorted(os.listdir(path)) == ["config.json", "pytorch_model.bin"]
    saved = torch.load(os.path.join(path, "pytorch_model.bin"), weights_only=True)
    pretrained = torch.load(os.path.join(workspace["pretrained"], "pytorch_model.bin"), weights_only=True)
    backbone = [k for k in pretrained if k.startswith("bert.")]
    assert backbone and all(torch.equal(saved[k], pretrained[k]) for k in backbone)
    assert any(k.startswith("classify.") for k in saved) and not any(k.startswith("mlm.") for k in saved)


def test_time_or_name_default_is_timestamp_and_six_digits(workspace):
    out = os.path.join(workspace["root"], "named")
    result = train_main(_train_args(workspace, "stability", "--output_dir", out, "--max_steps", "1",
                                    "--eval_freq", "0"))
    name = os.path.basename(result.save_dir)
    assert re.fullmatch(r"stability_transformer_\d{2}-\d{2}-\d{2}-\d{2}-\d{2}-\d{2}_\d{6}", name), name
    assert os.listdir(out) == [name]
    with pytest.raises(ValueError, match="time_or_name"):
        train_main(_train_args(workspace, "stability", "--time_or_name", "a/b"))


def test_resume_continues_from_the_checkpoint(workspace):
    first = train_main(_train_args(workspace, "fluorescence", "--time_or_name", "r1", "--max_steps", "-1"))
    assert first.epochs == 1 and first.steps == 2          # 8 records / batch 4
    state = torch.load(os.path.join(first.save_dir, "checkpoint.bin"), weights_only=False)
    assert state["epoch"] == 0 and state["step"] == 2
    second = train_main(_train_args(workspace, "fluorescence", "--time_or_name", "r2", "--max_steps", "-1",
                                    "--num_train_epochs", "2", "--resume_from_checkpoint", "--from_pretrained",
                                    first.save_dir))
    assert second.epochs == 2 and second.steps == 4 and len(second.train_losses) == 1


def test_missing_split_and_wrong_model_type_are_reported(workspace, tmp_path):
    with pytest.raises(ValueError, match=r"split 'train' not found.*no stability_"):
        train_main(_train_args(workspace, "stability", "--data_dir", str(tmp_path)))
    with pytest.raises(ValueError, match="model_type 'transformer' but the command asked for 'onehot'"):
        train_main(_train_args(workspace, "stability", "--from_pretrained", workspace["pretrained"],
                               model="onehot"))
    with pytest.raises(ValueError, match="--fp16 needs a CUDA"):
        train_main(_train_args(workspace, "stability", "--fp16", "--no_cuda"))


def test_bf16_training_runs(workspace):
    result = train_main(_train_args(workspace, "stability", "--bf16", "--time_or_name", "bf16"))
    assert result.steps == 2 and np.isfinite(result.train_losses[0])


def test_embed_writes_pooled_and_per_residue_vectors(workspace, tmp_path):
    fasta = tmp_path / "x.fasta"
    fasta.write_text(">p1 first\nMKTAYIAKQR\n>p2\nMKV\nLLA\n")
    path = embed_main(["transformer", str(fasta), str(tmp_path / "emb"), workspace["pretrained"],
                       "--full_sequence_embed"])
    data = np.load(path)
    assert data["ids"].tolist() == ["p1", "p2"]
    assert data["pooled"].shape == (2, 16) and data["residues"].shape == (16, 16)
    assert data["offsets"].tolist() == [0, 10, 16]
    # Mean pooling = the mean of the per-residue vectors.
    assert np.allclose(data["pooled"][1], data["residues"][10:16].mean(0), atol=1e-5)
    fasta.write_text(">bad\nMKJV\n")
    with pytest.raises(ValueError, match=r"x.fasta: bad.*'J'"):
        embed_main(["transformer", str(fasta), str(tmp_path / "emb2"), workspace["pretrained"]])


def _dp_train(data_dir, pretrained, out_dir, batch_size):
    result = run_train(TrainConfig(
        model_type="transformer", task="stability", from_pretrained=pretrained, data_dir=data_dir,
        output_dir=out_dir, log_dir=os.path.join(out_dir, "logs"), exp_name="dp", batch_size=batch_size,
        learning_rate=1e-3, warmup_steps=1, max_steps=2, num_train_epochs=1, dropout=0.0, shuffle=False,
        eval_freq=1))
    if result.save_dir is None:   # not rank 0
        return None
    return {"weights": torch.load(os.path.join(result.save_dir, "pytorch_model.bin"), weights_only=True),
            "valid_loss": result.valid_losses[0]}


def test_data_parallel_matches_single_process(workspace, tmp_path):
    single = _dp_train(workspace["data"], workspace["pretrained"], str(tmp_path / "one"), 8)
    results = run_distributed(_dp_train, 2, workspace["data"], workspace["pretrained"], str(tmp_path / "two"), 8,
                              timeout=240)
    parallel = results[0]
    assert results[1] is None
    for key, value in single["weights"].items():
        assert torch.allclose(value, parallel["weights"][key], atol=2e-5, rtol=1e-4), key
    assert parallel["valid_loss"] == pytest.approx(single["valid_loss"], rel=1e-5)


def test_patience_save_on_improvement_and_tensorboard(workspace):
    """learning rate 0: the validation loss never improves after epoch 0, so --patience 2 stops after epoch 2 and
    --save_freq improvement saved only epoch 0; TensorBoard holds every step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train_main(_train_args(workspace, "stability", "--time_or_name", "patience", "--max_steps", "-1",
                                    "--num_train_epochs", "10", "--learning_rate", "0", "--patience", "2",
                                    "--save_freq", "improvement"))
    assert result.epochs == 3 and result.steps == 6
    assert result.valid_losses[0] == result.valid_losses[1] == result.valid_losses[2]
    state = torch.load(os.path.join(result.save_dir, "checkpoint.bin"), weights_only=False)
    assert state["epoch"] == 0
    events = EventAccumulator(os.path.join(workspace["root"], "logs", result.run_name))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert len(events.Scalars("valid/loss")) == 3


def test_protein_longer_than_the_position_table_is_reported_before_training(workspace, tmp_path):
    short = str(tmp_path / "short_positions")
    config = ProteinBertConfig(**{**TINY, "max_position_embeddings": 40})
    ProteinBertForMaskedLM(config).save_pretrained(short)
    with pytest.raises(ValueError, match=r"secondary_structure_train.json: \d+ record\(s\) longer than the "
                                         r"model's max_position_embeddings 40.*first record \d+ \(id '"):
        train_main(_train_args(workspace, "secondary_structure", "--from_pretrained", short))
