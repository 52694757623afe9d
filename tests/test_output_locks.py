"""Exclusive outputs: one job per --save, preprocess prefix, converter --out and TAPE run directory.

Two real jobs run at the same time: the first is a subprocess, frozen with SIGSTOP as soon as it holds its lock
(so the overlap does not depend on timing), the second runs here and must fail at once naming the first (host,
pid, start time); the first is then resumed and must finish as if alone. A lock left by a process that was
killed (SIGKILL) on this host is taken over with a warning; one recorded by another host is not.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pfam_fixtures import REPO, SAMPLE_FASTA
from test_pretrain_parallel import make_tiny_data, tiny_argv, train_run

from megatron_protein.training import checkpointing
from megatron_protein.utils.locks import LockError, OutputLock, lock_path

ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                         "MASTER_PORT")},
       "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")]), "OMP_NUM_THREADS": "1"}


def start_frozen(args: list[str], lock_file: str, timeout: float = 120.0) -> subprocess.Popen:
    """Start ``python args...`` and SIGSTOP it once ``lock_file`` exists (it then holds its output's lock)."""
    proc = subprocess.Popen([sys.executable, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + timeout
    while not os.path.exists(lock_file):
        if proc.poll() is not None:
            raise AssertionError(f"the first job ended before taking its lock: {proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the first job did not take its lock in time")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGSTOP)
    return proc


def resume(proc: subprocess.Popen, timeout: float = 300.0) -> tuple[int, str]:
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out + err


def assert_names_holder(message: str, pid: int) -> None:
    assert f"host {socket.gethostname()}" in message and f"pid {pid}" in message and "started 20" in message, message


# ------------------------------------------------------------------------------------------------ the lock
HOLD = "import sys; from megatron_protein.utils.locks import OutputLock; l = OutputLock(sys.argv[1]).acquire(); " \
       "print('held', flush=True); sys.stdin.read()"


def test_second_holder_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path, caplog):
    target = str(tmp_path / "out")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, target], env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LockError) as refused:
        OutputLock(target, "--save").acquire()
    assert_names_holder(str(refused.value), holder.pid)
    assert str(refused.value).startswith(f"{target}: --save is in use by another job")
    holder.kill()
    holder.wait()
    assert os.path.exists(lock_path(target))  # SIGKILL left the file behind
    with caplog.at_level(logging.WARNING, logger="megatron_protein.utils.locks"):
        with OutputLock(target) as lock:
            assert lock.held
            assert json.load(open(lock_path(target)))["pid"] == os.getpid()
    assert f"whose process is gone (host {socket.gethostname()}, pid {holder.pid}" in caplog.text
    assert not os.path.exists(lock_path(target))  # released


def test_a_lock_of_another_host_is_not_taken_over(tmp_path):
    target = str(tmp_path / "out")
    with open(lock_path(target), "w") as f:
        json.dump({"host": "node-elsewhere", "pid": 1, "started": "2026-12-01T08:00:00+00:00", "command": "x"}, f)
    with pytest.raises(LockError, match=r"host node-elsewhere, pid 1, started 2026-12-01T08:00:00\+00:00.*if that "
                                        r"job is dead, remove " + str(lock_path(target))):
        OutputLock(target).acquire()


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    """The recorded pid is alive but is another process (different start time): the lock is stale."""
    target = str(tmp_path / "out")
    with open(lock_path(target), "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getppid(), "process_start_ticks": 1,
                   "started": "2026-12-01T08:00:00+00:00"}, f)
    with OutputLock(target) as lock:
        assert lock.held


# ---------------------------------------------------------------------------------------- real jobs
PRETRAIN = "import sys; from test_pretrain_parallel import train_run; train_run(sys.argv[1:])"


@pytest.mark.slow
def test_two_pretraining_runs_on_one_save(tmp_path):
    data = make_tiny_data(str(tmp_path / "data"), train=60, valid=8)
    save = str(tmp_path / "ckpt")
    argv = tiny_argv(data, extra=["--save", save, "--load", save, "--save-interval", "2"])
    argv[argv.index("--train-iters") + 1] = "4"
    first = start_frozen(["-c", PRETRAIN, *argv], lock_path(save))
    try:
        started = time.monotonic()
        with pytest.raises(LockError) as refused:
            train_run(argv)
        assert time.monotonic() - started < 30, "the second run must fail at once"
        assert_names_holder(str(refused.value), first.pid)
    finally:
        status, log = resume(first)
    assert status == 0, log[-3000:]
    assert checkpointing.read_tracker(save) == 4
    assert sorted(os.listdir(save)) == ["iter_0000002", "iter_0000004", checkpointing.TRACKER_FILENAME]
    assert not os.path.exists(lock_path(save))


def test_two_preprocess_runs_on_one_prefix(tmp_path):
    from megatron_protein.data.indexed_dataset import MMapIndexedDataset
    from megatron_protein.data.preprocess import preprocess

    prefix = str(tmp_path / "out" / "pfam")
    os.makedirs(os.path.dirname(prefix))
    cli = ["-m", "megatron_protein.data.preprocess", "--input", SAMPLE_FASTA, "--output-prefix", prefix,
           "--split-by-family", "0.9,0.05,0.05", "--no-progress"]
    first = start_frozen(cli, lock_path(prefix))
    try:
        with pytest.raises(LockError) as refused:
            preprocess([SAMPLE_FASTA], prefix, split_random=(0.5, 0.25, 0.25), progress=False)
        assert_names_holder(str(refused.value), first.pid)
    finally:
        status, log = resume(first)
    assert status == 0, log[-3000:]
    assert sum(len(MMapIndexedDataset(f"{prefix}_{s}")) for s in ("train", "valid", "test")) == 3912
    assert json.load(open(f"{prefix}_summary.json"))["split"] == "by-family"  # the first run's, unmixed
    assert sorted(os.listdir(os.path.dirname(prefix))) == sorted(
        [f"pfam_{s}.{e}" for s in ("train", "valid", "test") for e in ("bin", "idx")] + ["pfam_summary.json"])


def test_converter_out_and_tape_run_directory_are_locked(tmp_path):
    from test_converter import full_megatron_state, megatron_args, save_megatron, shard_by_hand
    from test_tape_train import TINY, _small_copy

    from megatron_protein.conversion.reshard import reshard
    from megatron_protein.conversion.to_tape import convert
    from tape_tasks.cli import train_main
    from tape_tasks.config import ProteinBertConfig
    from tape_tasks.model import ProteinBertForMaskedLM

    save = save_megatron(str(tmp_path / "save"), shard_by_hand(full_megatron_state(32), 1, 1), megatron_args(1, 1, 32))
    out = str(tmp_path / "tape")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, out], env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockError, match=rf"{out}: --out is in use by another job \(host .* pid {holder.pid}"):
            convert(save, out, table_file=None)
        with pytest.raises(LockError, match=rf"--out is in use .* pid {holder.pid}"):
            reshard(save, out, 1, 1)
        assert not os.path.exists(out)

        data = _small_copy(str(tmp_path / "data"))
        pretrained = str(tmp_path / "pretrained")
        ProteinBertForMaskedLM(ProteinBertConfig(**TINY)).save_pretrained(pretrained)
        run_dir = tmp_path / "runs" / "stability_transformer_same"
        os.makedirs(run_dir.parent)
        with OutputLock(str(run_dir)):  # another job writing this run directory
            with pytest.raises(LockError, match=rf"{run_dir}: run directory is in use by another job"):
                train_main(["transformer", "stability", "--data_dir", data, "--output_dir", str(run_dir.parent),
                            "--log_dir", str(tmp_path / "logs"), "--batch_size", "4", "--max_steps", "1",
                            "--from_pretrained", pretrained, "--time_or_name", "same"])
        assert not run_dir.exists()
    finally:
        holder.kill()
        holder.wait()
