"""Distributed and file-system edges of checkpointing: --distributed-timeout-minutes reaches the process group, the
tracker is read on rank 0 only, re-saving an iteration never leaves the tracker naming a missing directory,
renames are followed by directory fsyncs, and a resume on other data is refused unless asked for."""
from __future__ import annotations

import os
import shutil
import time

import pytest
import torch

from harness import run_distributed
from test_pretrain_parallel import make_tiny_data, tiny_argv, train_run

from megatron_protein.parallel import scg
from megatron_protein.training import checkpointing
from megatron_protein.utils import fs


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return make_tiny_data(str(tmp_path_factory.mktemp("pfam")), train=60, valid=8)


def _timed_out_collective(argv, marker):
    """Rank 1 never joins the all-reduce (it waits for rank 0 to give up); rank 0 reports how long it waited."""
    import datetime

    import torch.distributed as dist

    from megatron_protein.training.arguments import configs_from_args, parse_args

    config = configs_from_args(parse_args(argv))
    groups = scg.init_process_group(config.parallel.degrees(),
                                    timeout=datetime.timedelta(minutes=config.parallel.distributed_timeout_minutes))
    if groups.rank == 1:
        deadline = time.monotonic() + 60
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        return None
    started = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
        outcome = "completed"
    except Exception as exc:  # noqa: BLE001 - the timeout is the point
        outcome = type(exc).__name__
    waited = time.monotonic() - started
    open(marker, "w").close()
    return outcome, waited


@pytest.mark.slow
def test_distributed_timeout_minutes_bounds_a_wait_for_a_stopped_rank(tmp_path, data_prefix):
    argv = tiny_argv(data_prefix) + ["--distributed-timeout-minutes", "0.05"]  # 3 s
    outcome, waited = run_distributed(_timed_out_collective, 2, argv, str(tmp_path / "done"), timeout=120)[0]
    assert outcome != "completed" and 2.0 < waited < 30.0, (outcome, waited)


def _resume_with_a_stale_tracker_on_rank_1(argv, stale_iteration):
    """Rank 1's file system shows an older tracker (as a stale NFS cache would); rank 0's iteration is used."""
    from megatron_protein.training import train_loop
    from megatron_protein.training.arguments import configs_from_args, parse_args

    real = checkpointing.read_tracker
    config = configs_from_args(parse_args(argv))
    groups = scg.init_process_group(config.parallel.degrees())
    checkpointing.read_tracker = lambda load: stale_iteration if groups.rank == 1 else real(load)
    try:
        return train_loop.Pretrainer(config, groups).iteration
    finally:
        checkpointing.read_tracker = real


@pytest.mark.slow
def test_every_rank_resumes_the_iteration_rank_0_read(tmp_path, data_prefix):
    save = str(tmp_path / "ckpt")
    argv = tiny_argv(data_prefix, extra=["--save", save, "--save-interval", "2"])
    argv[argv.index("--train-iters") + 1] = "4"
    train_run(argv)
    assert checkpointing.read_tracker(save) == 4
    resume = tiny_argv(data_prefix, extra=["--load", save])
    resume[resume.index("--train-iters") + 1] = "6"
    assert run_distributed(_resume_with_a_stale_tracker_on_rank_1, 2, resume, 2, timeout=180) == [4, 4]


@pytest.mark.parametrize("atomic_swap", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_resaving_an_iteration_never_leaves_the_tracker_naming_a_missing_directory(tmp_path, monkeypatch,
                                                                                  atomic_swap):
    """Save iteration 3, then save iteration 3 again: after every file-system step of the second save, a reader
    (our loader, and the converter's) finds a complete checkpoint of iteration 3."""
    from megatron_protein.conversion import megatron_checkpoint as mc
    from megatron_protein.training.optimizer import LRScheduler

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = LRScheduler(optimizer, 1e-3, 0.0, 0, 10, "constant")
    import argparse
    args = argparse.Namespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    save = str(tmp_path / "ckpt")
    checkpointing.save_checkpoint(save, 3, model, optimizer, scheduler, args)
    if not atomic_swap:
        monkeypatch.setattr(fs, "exchange", lambda a, b: False)
    groups = scg.current()
    checks = []

    def reader_sees_iteration_3(step):
        if checkpointing.read_tracker(save) != 3:
            return
        state, path = checkpointing.load_state(save, groups)
        assert state["iteration"] == 3, (step, path)
        assert os.path.isfile(os.path.join(mc.read_tracker(save), "mp_rank_00", "model_optim_rng.pt")), step
        checks.append(step)

    for name in ("replace_durably", "exchange"):
        real = getattr(fs, name)

        def wrapped(*a, _real=real, _name=name):
            result = _real(*a)
            reader_sees_iteration_3(f"after {_name}{a}")
            return result
        monkeypatch.setattr(fs, name, wrapped)
    real_rmtree = shutil.rmtree

    def rmtree(path, *a, **k):
        reader_sees_iteration_3(f"before rmtree {path}")
        real_rmtree(path, *a, **k)
        reader_sees_iteration_3(f"after rmtree {path}")
    monkeypatch.setattr(checkpointing.shutil, "rmtree", rmtree)
    with torch.no_grad():
        model.weight.add_(1.0)
    checkpointing.save_checkpoint(save, 3, model, optimizer, scheduler, args)
    assert len(checks) >= 4, checks
    state, _ = checkpointing.load_state(save, groups)
    assert torch.equal(state["model"]["weight"], model.weight)  # the second save is the one in place
    assert sorted(os.listdir(save)) == ["iter_0000003", checkpointing.TRACKER_FILENAME]


def test_renames_are_followed_by_directory_fsyncs(tmp_path, monkeypatch):
    from megatron_protein.training.optimizer import LRScheduler

    events = []
    real_replace, real_fsync_dir = os.replace, fs.fsync_dir
    monkeypatch.setattr(fs.os, "replace", lambda a, b: (events.append(("rename", os.path.abspath(b))),
                                                        real_replace(a, b))[1])
    monkeypatch.setattr(fs, "fsync_dir", lambda p: (events.append(("fsync", os.path.abspath(p))),
                                                    real_fsync_dir(p))[1])
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    import argparse
    save = str(tmp_path / "ckpt")
    checkpointing.save_checkpoint(save, 1, model, optimizer, LRScheduler(optimizer, 1e-3, 0.0, 0, 2, "constant"),
                                  argparse.Namespace())
    renames = [i for i, e in enumerate(events) if e[0] == "rename"]
    assert len(renames) == 3  # the rank's file, the iteration directory, the tracker
    for i in renames:
        directory = os.path.dirname(events[i][1])
        assert ("fsync", directory) in events[i + 1:], f"no fsync of {directory} after renaming {events[i][1]}"


def test_resuming_on_other_data_is_refused_unless_asked(tmp_path, data_prefix):
    save = str(tmp_path / "ckpt")
    argv = tiny_argv(data_prefix, extra=["--save", save, "--load", save])
    argv[argv.index("--train-iters") + 1] = "2"
    train_run(argv)
    other = make_tiny_data(str(tmp_path / "other"), train=60, valid=8)  # same content, another data set
    resume = tiny_argv(other, extra=["--save", save, "--load", save])
    resume[resume.index("--train-iters") + 1] = "3"
    with pytest.raises(checkpointing.CheckpointError, match=rf"iter_0000002: this checkpoint was trained with "
                                                            rf"--data-path {data_prefix}, but this run has {other}"):
        train_run(resume)
    link = str(tmp_path / "link")  # the same data under another name resumes: real paths are compared
    os.symlink(os.path.dirname(data_prefix), link)
    same = tiny_argv(os.path.join(link, os.path.basename(data_prefix)), extra=["--save", save, "--load", save])
    same[same.index("--train-iters") + 1] = "3"
    assert len(train_run(same)["losses"]) == 1
    resume[resume.index("--train-iters") + 1] = "4"
    assert len(train_run(resume + ["--allow-data-path-change"])["losses"]) == 1
