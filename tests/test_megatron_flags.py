"""Megatron-LM's data and run-length flags: blends, --split with two weights, --train-samples and the --lr-*-samples
schedule, --exit-duration-in-mins, --exit-signal-handler (SIGTERM: save, stop, resume exactly) and the errors
Megatron-LM raises (both warmup flags, --loss-scale without --fp16, mixed iteration and sample flags)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from harness import run_distributed
from pfam_fixtures import REPO
from test_pretrain_parallel import make_tiny_data, tiny_argv, train_run

from megatron_protein.data.indexed_dataset import make_dataset
from megatron_protein.data.tokenizer import IUPACTokenizer
from megatron_protein.parallel import scg
from megatron_protein.training import checkpointing
from megatron_protein.training.arguments import configs_from_args, parse_args
from megatron_protein.training.pretrain_data import blending_indices, resolve_sources
from megatron_protein.training.train_loop import Pretrainer


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return make_tiny_data(str(tmp_path_factory.mktemp("pfam")))


def write_dataset(prefix: str, sequences: list[str]) -> str:
    tokenizer = IUPACTokenizer()
    make_dataset(prefix, [tokenizer.encode(s) for s in sequences])
    return prefix


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """A holds only alanine/glycine sequences, B only leucine/lysine ones: a sample tells where it came from."""
    root = tmp_path_factory.mktemp("blend")
    rng = np.random.default_rng(0)
    a = ["".join(rng.choice(list("AG"), size=int(rng.integers(8, 20)))) for _ in range(60)]
    b = ["".join(rng.choice(list("LK"), size=int(rng.integers(8, 20)))) for _ in range(40)]
    return write_dataset(str(root / "A"), a), write_dataset(str(root / "B"), b)


def small_argv(data_path: list[str], extra: list[str] = ()) -> list[str]:
    return ["--data-path", *data_path, "--num-layers", "1", "--hidden-size", "16", "--num-attention-heads", "2",
            "--seq-length", "24", "--micro-batch-size", "4", "--global-batch-size", "8", "--eval-iters", "0",
            "--seed", "3", *extra]


def pretrainer(argv: list[str]) -> Pretrainer:
    config = configs_from_args(parse_args(argv))
    return Pretrainer(config, scg.init_process_group(config.parallel.degrees()))


# ------------------------------------------------------------------------------------------------------- blends

def test_blending_indices_follow_megatrons_greedy_rule():
    # Worked by hand from helpers.cpp: argmax_d (w_d * max(i, 1) - count_d), the first dataset on ties.
    dataset, sample = blending_indices([0.75, 0.25], 8)
    assert dataset.tolist() == [0, 1, 0, 0, 0, 1, 0, 0]
    assert sample.tolist() == [0, 0, 1, 2, 3, 1, 4, 5]
    again = blending_indices([0.75, 0.25], 8)
    assert np.array_equal(again[0], dataset) and np.array_equal(again[1], sample)  # deterministic


@pytest.mark.parametrize("weights, tolerance", [([0.7, 0.3], 1.0), ([0.5, 0.3, 0.2], 2.0), ([0.9, 0.05, 0.05], 2.0)])
def test_each_dataset_is_drawn_in_its_weights_proportion(weights, tolerance):
    """Over N = 20,000 samples, after every prefix of n samples each dataset has been drawn w_d * n times within
    ``tolerance`` samples: 1 for two datasets, 2 for three (so within 0.01% of its weight at the end)."""
    n = 20_000
    dataset, sample = blending_indices(weights, n)
    for d, w in enumerate(weights):
        drawn = np.cumsum(dataset == d)
        assert np.max(np.abs(drawn - w * np.arange(1, n + 1))) <= tolerance
        # each dataset's samples are taken in order, once each
        assert np.array_equal(sample[dataset == d], np.arange(int(drawn[-1])))


def test_weighted_data_path_blends_the_training_samples(two_datasets):
    """--data-path 0.7 A 0.3 B through the trainer's own datasets: 2,000 training samples, 70% from A within one
    sample at every prefix; every sample comes whole from one dataset; a run trains on the blend."""
    a, b = two_datasets
    trainer = pretrainer(small_argv(["0.7", a, "0.3", b], ["--split", "100,0,0", "--train-iters", "250"]))
    train = trainer.datasets["train"]
    assert len(train) == 2000
    assert trainer.datasets["valid"] is None and trainer.datasets["test"] is None  # --split 100,0,0
    tok = IUPACTokenizer()
    a_ids, b_ids = set(tok.encode("AG")), set(tok.encode("LK"))
    from_a = []
    for i in range(len(train)):
        labels = train[i]["labels"].numpy()  # the original residues at the predicted positions
        residues = {int(t) for t in labels[labels >= 0]}
        assert residues and (residues <= a_ids or residues <= b_ids), residues
        from_a.append(residues <= a_ids)
    drawn = np.cumsum(from_a)
    assert np.max(np.abs(drawn - 0.7 * np.arange(1, len(train) + 1))) <= 1.0
    assert train.datasets[0].num_samples == 1407 and train.datasets[1].num_samples == 603  # Megatron's surplus
    short = pretrainer(small_argv(["0.7", a, "0.3", b], ["--split", "100,0,0", "--train-iters", "3"]))
    result = short.train()
    assert len(result.losses) == 3 and np.all(np.isfinite(result.losses))


def test_blend_errors_name_the_problem(two_datasets):
    a, b = two_datasets
    with pytest.raises(ValueError, match="not a mix"):
        configs_from_args(parse_args(small_argv(["0.7", a, b])))
    with pytest.raises(ValueError, match="must be positive"):
        configs_from_args(parse_args(small_argv(["0", a, "1", b])))


def test_split_with_two_weights_leaves_no_test_split(data_prefix, tmp_path):
    prefix = write_dataset(str(tmp_path / "one"), ["ACDEFGHIK" * 2] * 100)
    sources = resolve_sources(prefix, "98,2")
    assert len(sources["train"]) == 98 and len(sources["valid"]) == 2 and sources["test"] is None
    assert [len(resolve_sources(prefix, "949,50,1")[s] or []) for s in ("train", "valid", "test")] == [95, 5, 0]
    trainer = pretrainer(small_argv([prefix], ["--split", "98,2", "--train-iters", "2", "--eval-iters", "1"]))
    assert trainer.datasets["test"] is None and len(trainer.datasets["valid"]) == 8
    for bad in ("98,2,0,1", "a,b", "0,0"):
        with pytest.raises(ValueError, match="--split must be one to three"):
            configs_from_args(parse_args(small_argv([prefix], ["--split", bad])))


# --------------------------------------------------------------------------------------------- length, schedule

def test_train_samples_and_sample_schedule_equal_the_iteration_flags(data_prefix):
    """--train-samples 40 with warmup 16 and decay 32 samples at a global batch of 8 is the schedule of
    --train-iters 5 --lr-warmup-iters 2 --lr-decay-iters 4: 5 iterations, the same learning rates."""
    def lrs(trainer):
        values = []
        for _ in range(trainer.config.train.train_iters):
            values.append(trainer.scheduler.lr)
            trainer.scheduler.step()
        return values

    samples = pretrainer(small_argv([data_prefix], ["--train-samples", "40", "--lr-warmup-samples", "16",
                                                    "--lr-decay-samples", "32", "--lr", "1e-3", "--min-lr", "1e-4"]))
    iters = pretrainer(small_argv([data_prefix], ["--train-iters", "5", "--lr-warmup-iters", "2",
                                                  "--lr-decay-iters", "4", "--lr", "1e-3", "--min-lr", "1e-4"]))
    assert samples.config.train.train_iters == 5
    by_samples, by_iters = lrs(samples), lrs(iters)
    assert by_samples == pytest.approx(by_iters, rel=1e-12)
    assert by_samples == pytest.approx([5e-4, 1e-3, 1e-3, 5.5e-4, 1e-4], rel=1e-12)
    assert samples.scheduler.state_dict()["num_steps"] == 40  # Megatron counts the schedule in samples


@pytest.mark.parametrize("flags, message", [
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "3"], "not both"),
    (["--train-samples", "64", "--lr-warmup-fraction", "0.1", "--lr-warmup-samples", "8"], "not both"),
    (["--train-iters", "5", "--train-samples", "64"], "not both"),
    (["--lr-warmup-samples", "8"], "needs --train-samples"),
    (["--train-samples", "64", "--lr-decay-iters", "3"], "cannot be used with --train-samples"),
    (["--loss-scale", "128"], "--loss-scale 128 is a static loss scale for --fp16; this run is fp32"),
    (["--loss-scale", "128", "--bf16"], "this run is bf16"),
])
def test_contradicting_flags_are_errors(data_prefix, flags, message):
    with pytest.raises(ValueError, match=message):
        configs_from_args(parse_args(small_argv([data_prefix], flags)))


def test_exit_duration_saves_and_the_resume_is_exact(data_prefix, tmp_path):
    """--exit-duration-in-mins: the run stops after the first iteration past the limit (here a limit every
    iteration has passed), with a checkpoint; resumed runs continue the uninterrupted run's losses exactly."""
    save = str(tmp_path / "ckpt")
    argv = tiny_argv(data_prefix, dropout=0.1, extra=["--save", save, "--load", save])
    full = train_run(tiny_argv(data_prefix, dropout=0.1))["losses"]
    stopped = train_run(argv + ["--exit-duration-in-mins", "1e-9"])
    first = stopped["losses"]
    assert len(first) == 1 and checkpointing.read_tracker(save) == 1
    assert stopped["exit_reason"] == "--exit-duration-in-mins 1e-09 passed"
    rest = train_run(argv)["losses"]
    assert first + rest == full


SIGTERM_RUN = r"""
import os, signal, sys
sys.path.insert(0, {tests!r})
from megatron_protein.training import train_loop
from test_pretrain_parallel import train_run

real_step, calls = train_loop.Pretrainer.train_step, [0]

def step_then_sigterm(self, micro_batches):
    out = real_step(self, micro_batches)
    calls[0] += 1
    if calls[0] == {at} and int(os.environ.get("RANK", "0")) in {ranks}:
        os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends; delivered at once, handled by the trainer
    return out

train_loop.Pretrainer.train_step = step_then_sigterm
result = train_run({argv!r})
print("EXIT", result["exit_reason"])
print("LOSSES", result["losses"])
"""


def test_sigterm_saves_a_checkpoint_that_resumes_exactly(data_prefix, tmp_path):
    save = str(tmp_path / "ckpt")
    argv = tiny_argv(data_prefix, dropout=0.1, extra=["--save", save, "--load", save, "--exit-signal-handler"])
    script = SIGTERM_RUN.format(tests=os.path.join(REPO, "tests"), at=2, ranks=[0], argv=argv)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "EXIT SIGTERM received (--exit-signal-handler)" in done.stdout
    first = eval(done.stdout.split("LOSSES", 1)[1].strip())  # noqa: S307 - our own list of floats
    assert len(first) == 2 and checkpointing.read_tracker(save) == 2
    rest = train_run(argv)["losses"]
    full = train_run(tiny_argv(data_prefix, dropout=0.1))["losses"]
    assert first + rest == full
    # Without the flag SIGTERM keeps its default meaning (the process ends at once, nothing saved).
    plain = tiny_argv(data_prefix, extra=["--save", str(tmp_path / "plain")])
    script = SIGTERM_RUN.format(tests=os.path.join(REPO, "tests"), at=2, ranks=[0], argv=plain)
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": REPO})
    assert killed.returncode == -15 and checkpointing.read_tracker(str(tmp_path / "plain")) is None
