"""Every command prints its known errors as one line ``error: <file>[:<line>]: <what was expected>`` and exits with
2; under torchrun one rank prints it and nothing else is shown; unexpected exceptions keep their traceback.
Preprocess killed by SIGTERM or SIGINT leaves no temporary file; the temporary files of a run killed with SIGKILL
are removed by the next run on the same prefix (which takes over the dead run's lock)."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from pfam_fixtures import REPO, SAMPLE_FASTA

from megatron_protein.utils.errors import run_cli

ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                         "MASTER_PORT", "MEGATRON_PROTEIN_TRACEBACK")},
       "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
ONE_ERROR_LINE = re.compile(r"error: [^\n]+\n")


def _script(*parts):
    return os.path.join(REPO, *parts)


def _run(args, **kwargs):
    return subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=240, **kwargs)


def _main_of(name: str):
    """The ``main`` of a command-line script of the repository, loaded from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.replace("-", "_").replace("/", "_")[:-3], _script(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _tape(main_name: str):
    from tape_tasks import cli

    main = getattr(cli, main_name)

    def run(argv):
        main(argv)
        return 0
    return run


COMMANDS = {
    "pretrain": lambda: _main_of("pretrain/pretrain_protein_bert.py"),
    "preprocess": lambda: __import__("megatron_protein.data.preprocess", fromlist=["main"]).main,
    "converter": lambda: _main_of("converter/megatron-converter.py"),
    "reshard": lambda: _main_of("converter/reshard.py"),
    "tape_train": lambda: _tape("train_main"),
    "tape_eval": lambda: _tape("eval_main"),
    "tape_embed": lambda: _tape("embed_main"),
}


@pytest.mark.parametrize("command,argv,expected", [
    ("pretrain", ["--data-path", "/nonexistent/pfam"],
     r"error: --data-path /nonexistent/pfam: neither /nonexistent/pfam\.bin/\.idx nor"),
    ("pretrain", ["--data-path", "x", "--tensor-model-parallel-size", "5"],
     r"error: tensor-model-parallel size 5 does not divide num_attention_heads 12$"),
    ("pretrain", ["--data-path", "x", "--bogus"], r"error: unrecognized arguments: --bogus \(see .* --help\)$"),
    ("preprocess", ["--input", "/nonexistent.fasta", "--output-prefix", "{tmp}/p"],
     r"error: /nonexistent\.fasta: no such file or directory"),
    ("preprocess", ["--input", SAMPLE_FASTA, "--output-prefix", "{tmp}/p", "--split-random", "1,2"],
     r"error: --split-random expects three non-negative numbers"),
    ("converter", ["--src", "/nonexistent", "--out", "{tmp}/o"],
     r"error: /nonexistent: no such file or directory \(expected a Megatron save directory"),
    ("reshard", ["--src", "/nonexistent", "--out", "{tmp}/o"],
     r"error: the following arguments are required: --tp \(see .* --help\)$"),
    ("tape_train", ["transformer", "stability", "--data_dir", "{tmp}", "--from_pretrained", "{tmp}/none"],
     r"error: {tmp}/none/config\.json: no config\.json"),
    ("tape_eval", ["onehot", "stability", "{tmp}", "--data_dir", "{tmp}"],
     r"error: {tmp}/config\.json: no config\.json"),
    ("tape_embed", ["onehot", "{tmp}/none.fasta", "{tmp}/out.npz"], r"error: {tmp}/none\.fasta: No such file"),
])
def test_every_command_prints_one_line_and_exits_2(tmp_path, capsys, command, argv, expected):
    argv = [part.replace("{tmp}", str(tmp_path)) for part in argv]
    assert run_cli(COMMANDS[command](), argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert re.match(expected.replace("{tmp}", re.escape(str(tmp_path))), errors[0]), errors[0]


def test_a_script_exits_2_with_one_line(tmp_path):
    """The scripts themselves (not only their main): a real process, its exit status and its stderr."""
    proc = _run([_script("finetune", "tape_embed.py"), "onehot", str(tmp_path / "none.fasta"), str(tmp_path / "o")])
    assert proc.returncode == 2 and ONE_ERROR_LINE.fullmatch(proc.stderr), proc.stderr[-3000:]


def test_unexpected_exceptions_keep_their_traceback(capsys):
    def buggy(argv):
        return {}["missing"]

    with pytest.raises(KeyError):
        run_cli(buggy)

    def known(argv):
        raise FileNotFoundError(2, "No such file or directory", "/data/x.fasta")

    assert run_cli(known) == 2
    assert capsys.readouterr().err == "error: /data/x.fasta: No such file or directory\n"


@pytest.mark.slow
def test_an_error_under_torchrun_is_printed_once_without_a_traceback(tmp_path):
    """2 ranks through megatron_protein.launch (what scripts/pretrain_pfam.sh runs): one line, exit status 2."""
    proc = _run(["-m", "megatron_protein.launch", "--standalone", "--nproc_per_node", "2",
                 _script("pretrain", "pretrain_protein_bert.py"), "--data-path", str(tmp_path / "missing"),
                 "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
                 "--tensor-model-parallel-size", "2"], cwd=str(tmp_path))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if "error:" in line]
    assert errors == [f"error: --data-path {tmp_path / 'missing'}: neither {tmp_path / 'missing'}.bin/.idx nor "
                      f"{tmp_path / 'missing'}_train.bin/.idx exist; create them with python -m "
                      f"megatron_protein.data.preprocess --input FILE --output-prefix {tmp_path / 'missing'}"], output
    assert "Traceback" not in output and "ChildFailedError" not in output and "FAILED" not in output, output


# --------------------------------------------------------------------------------------------- signals
def _big_fasta(tmp_path, copies: int = 12) -> str:
    """The sample several times over (a few seconds of preprocessing on this machine)."""
    path = tmp_path / "big.fasta"
    with open(SAMPLE_FASTA) as f:
        text = f.read()
    with open(path, "w") as f:
        for _ in range(copies):
            f.write(text)
    return str(path)


def _temp_files(directory) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


def _start_and_freeze_mid_run(fasta, prefix, workers=1):
    """Start preprocess and SIGSTOP it once its temporary files exist (in the middle of the work)."""
    # A job started in the background by a non-interactive shell (as CI may run this suite) inherits SIGINT ignored,
    # and Python then leaves it ignored: give the child the default disposition, as a terminal would.
    proc = subprocess.Popen([sys.executable, "-m", "megatron_protein.data.preprocess", "--input", fasta,
                             "--output-prefix", prefix, "--split-by-family", "0.9,0.05,0.05", "--no-progress",
                             "--workers", str(workers)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    directory = os.path.dirname(prefix)
    deadline = time.monotonic() + 120
    while not [n for n in _temp_files(directory) if n.startswith("." + os.path.basename(prefix))]:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "preprocess made no temporary file"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGSTOP)
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_preprocess_leaves_no_temporary_file(tmp_path, signum):
    fasta = _big_fasta(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    proc = _start_and_freeze_mid_run(fasta, str(out / "pfam"))
    assert _temp_files(out)
    os.kill(proc.pid, signum)
    os.kill(proc.pid, signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (-signum, 128 + signum, 130), err[-3000:]
    assert os.listdir(out) == [], "left behind: " + ", ".join(os.listdir(out))
    assert "Traceback" not in err, err[-3000:]


@pytest.mark.slow
def test_the_next_run_removes_what_a_killed_run_left(tmp_path):
    from megatron_protein.data.indexed_dataset import MMapIndexedDataset

    fasta = _big_fasta(tmp_path, copies=2)
    out = tmp_path / "out"
    out.mkdir()
    other = out / ".other_train.abcd1234.bin.tmp"  # another prefix's file: not ours to remove
    other.write_text("x")
    proc = _start_and_freeze_mid_run(fasta, str(out / "pfam"))
    left = _temp_files(out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert len(left) > 1 and os.path.exists(out / "pfam.lock")
    rerun = _run(["-m", "megatron_protein.data.preprocess", "--input", fasta, "--output-prefix", str(out / "pfam"),
                  "--split-by-family", "0.9,0.05,0.05", "--no-progress"])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "taking over the lock" in rerun.stderr and "removed" in rerun.stderr and "killed" in rerun.stderr
    assert _temp_files(out) == [other.name]
    assert sum(len(MMapIndexedDataset(str(out / f"pfam_{s}"))) for s in ("train", "valid", "test")) == 2 * 3912
