"""Checkpoints: Megatron layout, exact resume, a kill during a save, clear mismatch errors.

- Resume: a run interrupted at iteration 3 (``--exit-interval 3``) and resumed with ``--load`` in a fresh process
  reproduces the losses of the uninterrupted 6-iteration run bit for bit on CPU, with dropout on (so the RNG state,
  including the model-parallel tracker, must be restored too), at TP=1 and at TP=2 x PP=2.
- Crash safety: a process SIGKILLed in the middle of writing the checkpoint of iteration 4 leaves iteration 2 as the
  latest checkpoint, loadable, and a run resumed from it finishes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from harness import run_distributed
from pfam_fixtures import REPO
from test_pretrain_parallel import make_tiny_data, tiny_argv, train_run, train_runs

from megatron_protein.parallel import scg
from megatron_protein.training import checkpointing


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return make_tiny_data(str(tmp_path_factory.mktemp("pfam")))


def six_iterations(data_prefix, save=None, tp=1, pp=1, extra=()):
    argv = tiny_argv(data_prefix, tp=tp, pp=pp, dropout=0.1, extra=list(extra))
    argv[argv.index("--train-iters") + 1] = "6"
    if save:
        argv += ["--save", save, "--load", save]
    return argv


def test_resume_reproduces_uninterrupted_losses_exactly(data_prefix, tmp_path):
    uninterrupted = train_run(six_iterations(data_prefix))["losses"]
    save = str(tmp_path / "ckpt")
    first = train_run(six_iterations(data_prefix, save, extra=["--exit-interval", "3"]))["losses"]
    assert checkpointing.read_tracker(save) == 3
    assert os.path.isfile(os.path.join(save, "iter_0000003", "mp_rank_00", "model_optim_rng.pt"))
    # A fresh process: nothing survives from the first run but the checkpoint.
    (resumed,) = run_distributed(train_run, 1, six_iterations(data_prefix, save))
    assert len(first) == 3 and len(resumed["losses"]) == 3
    assert first + resumed["losses"] == uninterrupted  # exact: same bits on CPU


def test_resume_is_exact_under_tensor_and_pipeline_parallelism(data_prefix, tmp_path):
    """Uninterrupted, interrupted at 3, resumed: three runs one after the other in the same 4 processes (the
    resumed run rebuilds everything and takes its state from the checkpoint alone)."""
    save = str(tmp_path / "ckpt")
    per_rank = run_distributed(train_runs, 4, [
        six_iterations(data_prefix, tp=2, pp=2),
        six_iterations(data_prefix, save, tp=2, pp=2, extra=["--exit-interval", "3"]),
        six_iterations(data_prefix, save, tp=2, pp=2)], timeout=300)
    for full, first, resumed in per_rank:
        assert len(first["losses"]) == 3 and len(resumed["losses"]) == 3
        assert first["losses"] + resumed["losses"] == full["losses"], f"rank {full['rank']} {full['coords']}"
    assert sorted(os.listdir(os.path.join(save, "iter_0000003"))) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    last_stage = torch.load(os.path.join(save, "iter_0000003", "mp_rank_01_001", "model_optim_rng.pt"),
                            weights_only=False)
    # Megatron-LM's nested BertModel.state_dict_for_save_checkpoint layout, layer indices local to the stage.
    model = last_stage["model"]
    assert sorted(model) == ["language_model", "lm_head", "word_embeddings_for_head"]
    assert sorted(model["language_model"]) == ["encoder"]  # no embedding on the last stage
    assert "layers.0.input_layernorm.weight" in model["language_model"]["encoder"]
    assert "final_layernorm.weight" in model["language_model"]["encoder"]
    assert sorted(model["word_embeddings_for_head"]) == ["weight"]
    assert {"bias", "dense.weight", "layernorm.weight"} <= set(model["lm_head"])
    first_stage = torch.load(os.path.join(save, "iter_0000003", "mp_rank_00_000", "model_optim_rng.pt"),
                             weights_only=False)
    assert sorted(first_stage["model"]) == ["language_model"]
    assert sorted(first_stage["model"]["language_model"]["embedding"]) == ["position_embeddings", "word_embeddings"]
    assert first_stage["opt_param_scheduler"] == first_stage["lr_scheduler"]
    assert len(first_stage["rng_state"]) == 1  # one entry per data-parallel rank (dp = 1 here)


KILLER = r"""
import os, signal, sys
import torch
sys.path.insert(0, {tests!r})
from test_pretrain_parallel import train_run

real_save, calls = torch.save, [0]

def save_then_die(obj, path, *args, **kwargs):
    calls[0] += 1
    if calls[0] == 2:                       # the checkpoint of iteration 4: write half a file, then get killed
        real_save(obj, path, *args, **kwargs)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *args, **kwargs)

torch.save = save_then_die
train_run({argv!r})
"""


def test_kill_during_save_leaves_the_last_checkpoint_loadable(data_prefix, tmp_path):
    save = str(tmp_path / "ckpt")
    argv = tiny_argv(data_prefix, extra=["--save", save, "--load", save, "--save-interval", "2"])
    argv[argv.index("--train-iters") + 1] = "4"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")])}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-c", KILLER.format(tests=os.path.join(REPO, "tests"), argv=argv)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert checkpointing.read_tracker(save) == 2, "the tracker must still name the last complete checkpoint"
    assert os.path.isdir(os.path.join(save, "iter_0000004.tmp"))      # the interrupted save, never renamed
    assert not os.path.exists(os.path.join(save, "iter_0000004"))
    state = torch.load(os.path.join(save, "iter_0000002", "mp_rank_00", "model_optim_rng.pt"), weights_only=False)
    assert state["iteration"] == 2 and state["args"].consumed_train_samples == 16
    resumed = train_run(argv)
    assert len(resumed["losses"]) == 2  # iterations 3 and 4
    assert checkpointing.read_tracker(save) == 4
    assert not os.path.exists(os.path.join(save, "iter_0000004.tmp"))


def test_mismatched_model_size_or_degrees_fail_clearly(data_prefix, tmp_path):
    save = str(tmp_path / "ckpt")
    argv = tiny_argv(data_prefix, extra=["--save", save])
    argv[argv.index("--train-iters") + 1] = "1"
    train_run(argv)
    bigger = tiny_argv(data_prefix, extra=["--load", save])
    bigger[bigger.index("--hidden-size") + 1] = "64"
    with pytest.raises(checkpointing.CheckpointError, match=r"hidden_size: checkpoint 32, arguments 64"):
        train_run(bigger)
    state, path = checkpointing.load_state(save, scg.current())
    wider = type(state["args"])(**{**vars(state["args"]), "tensor_model_parallel_size": 2})
    with pytest.raises(checkpointing.CheckpointError, match=r"tensor_model_parallel_size: checkpoint 1, arguments 2"):
        checkpointing.check_args_match(state["args"], wider, path)


def test_tracker_file_errors_name_the_file(tmp_path):
    (tmp_path / checkpointing.TRACKER_FILENAME).write_text("seven\n")
    with pytest.raises(checkpointing.CheckpointError, match="latest_checkpointed_iteration.txt: expected an "
                                                            "iteration number"):
        checkpointing.read_tracker(str(tmp_path))
