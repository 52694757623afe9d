"""The folding launcher under torchrun (gloo, CPU): ``--distributed --dap_degree 2`` and ``--bp_degree 2`` runs write
the same ``metrics.jsonl`` as the one-process run with the same seed and data, and bad layouts fail clearly.

The runs train the trainer's own loss (FAPE, distogram, masked MSA, pLDDT) for 3 Adam steps on the embedded real
chains with ``--no_dropout``, then evaluate one held-out chain. All three use the Parallel Evoformer
(``outer_product_mean_position=end``) so that one reference serves DAP and BP. Compared line by line: the loss terms
and the gradient norm of every step (rtol 1e-5: float32 sums in another order, then a few Adam steps), the held-out
metrics (rtol 1e-4), and the learning rate exactly.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from harness import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
TORCHRUN = os.path.join(os.path.dirname(PYTHON), "torchrun")
COMMON = ["--override", "model.evoformer.num_blocks=1", "--override", "model.extra_msa.num_blocks=1",
          "--override", "model.evoformer.outer_product_mean_position=end",
          "--crop_size", "23", "--max_msa_clusters", "5", "--max_extra_msa", "3", "--batch_size", "1",
          "--max_recycling_iters", "0", "--train_step", "3", "--log_step", "1", "--eval_step", "0",
          "--save_step", "0", "--eval_max_chains", "1", "--no_plot", "--no_tensorboard", "--no_dropout"]
TIMEOUT = 400


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)


def _train(model_dir, *flags, nproc=1):
    if nproc == 1:
        cmd = [PYTHON, os.path.join(REPO, "folding", "train.py")]
    else:
        cmd = [TORCHRUN, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1", "--master_port",
               str(free_port()), os.path.join(REPO, "folding", "train.py")]
    return subprocess.run(cmd + COMMON + ["--model_dir", str(model_dir), *flags], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)


def _metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _assert_same_metrics(ours, reference, label):
    assert len(ours) == len(reference), f"{label}: {len(ours)} lines vs {len(reference)}"
    for mine, ref in zip(ours, reference):
        assert mine["split"] == ref["split"] and mine.get("step") == ref.get("step"), (label, mine, ref)
        rtol = 1e-5 if ref["split"] == "train" else 1e-4
        for key, value in ref.items():
            if key in ("steps_per_s", "seconds") or not isinstance(value, float):
                continue
            assert math.isclose(mine[key], value, rel_tol=rtol, abs_tol=1e-7), (
                f"{label} {ref['split']} step {ref.get('step')} {key}: {mine[key]} vs {value}")
        if "lr" in ref:
            assert mine["lr"] == ref["lr"]


@pytest.mark.slow
def test_dap2_and_bp2_launches_write_the_one_process_metrics(tmp_path):
    single = _train(tmp_path / "single", "--seed", "0")
    assert single.returncode == 0, single.stderr[-3000:]
    reference = _metrics(tmp_path / "single")
    assert [m["split"] for m in reference].count("train") == 3
    for label, flags in [("dap2", ["--dap_degree", "2"]), ("bp2", ["--bp_degree", "2"])]:
        run = _train(tmp_path / label, "--distributed", *flags, "--seed", "0", nproc=2)
        assert run.returncode == 0, f"{label}:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
        _assert_same_metrics(_metrics(tmp_path / label), reference, label)
        # One checkpoint file, written once (by global rank 0), that a one-process run can resume from.
        assert os.listdir(tmp_path / label / "iter_0000003") == ["mp_rank_00"]


@pytest.mark.slow
def test_parallel_flags_without_torchrun_fail_clearly(tmp_path):
    run = subprocess.run([PYTHON, os.path.join(REPO, "folding", "train.py"), "--dap_degree", "2", "--seed", "0",
                          "--model_dir", str(tmp_path / "x")], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and "needs several processes: launch with torchrun" in run.stderr, run.stderr
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE")}
    run = subprocess.run([PYTHON, os.path.join(REPO, "folding", "train.py"), "--distributed", "--model_dir",
                          str(tmp_path / "y")], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "RANK/WORLD_SIZE are not set" in run.stderr, run.stderr
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


@pytest.mark.slow
@pytest.mark.parametrize("flags, message", [
    (["--dap_degree", "2"], "--seed: required with --dap_degree 2"),
    (["--dap_degree", "3", "--seed", "0"], "does not divide the world size 2"),
])
def test_bad_parallel_launches_fail_on_every_rank(tmp_path, flags, message):
    run = _train(tmp_path / "bad", "--distributed", *flags, nproc=2)
    # Exits (no rank waits in a collective) with the error; torchrun stops the other rank as soon as one exits, so
    # how many ranks got to print it depends on timing (each rank's own check is tested in tests/test_bp_hooks.py).
    assert run.returncode != 0
    assert message in run.stderr, run.stderr[-3000:]
    assert not os.path.exists(tmp_path / "bad" / "metrics.jsonl")


@pytest.mark.slow
def test_dap2_prediction_writes_the_one_process_structure(tmp_path):
    """``torchrun --nproc_per_node 2 folding/predict.py --dap_degree 2`` (17 residues: padded to 18) gives the
    one-process PDB and pLDDT (coordinates 2e-3 A: the PDB's 3 decimals; pLDDT 1e-3), written once by rank 0."""
    from folding_helpers import micro_config, write_small_chains
    from megatron_protein.structure import io as structure_io
    from megatron_protein.training.folding_arguments import RunOptions
    from megatron_protein.training.folding_trainer import FoldingTrainer

    data = write_small_chains(str(tmp_path / "small.npz"), n_train=4, n_valid=1)
    FoldingTrainer(micro_config(train__train_step=1, train__save_step=0),
                   RunOptions(model_dir=str(tmp_path / "model"), data=data, plot=False, tensorboard=False)).train()
    fasta = tmp_path / "q.fasta"
    fasta.write_text(">query\nGSHMSLFDFFKNKGSAA\n")
    predict = os.path.join(REPO, "folding", "predict.py")
    args = ["--fasta", str(fasta), "--checkpoint", str(tmp_path / "model"), "--chunk_size", "4"]
    single = subprocess.run([PYTHON, predict, *args, "--output", str(tmp_path / "one.pdb")], cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert single.returncode == 0, single.stderr[-3000:]
    split = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                            str(free_port()), predict, *args, "--dap_degree", "2", "--output",
                            str(tmp_path / "dap.pdb")], cwd=REPO, env=_env(), capture_output=True, text=True,
                           timeout=TIMEOUT)
    assert split.returncode == 0, split.stderr[-3000:]
    assert split.stdout.count("query: 17 residues") == 1                   # rank 0 reports and writes
    one, two = (structure_io.read_chain(str(tmp_path / name)) for name in ("one.pdb", "dap.pdb"))
    assert one.atom_positions.shape == two.atom_positions.shape == (17, 37, 3)
    assert abs(one.atom_positions - two.atom_positions).max() < 2e-3
    with open(tmp_path / "one.json") as f, open(tmp_path / "dap.json") as g:
        a, b = json.load(f), json.load(g)
    assert math.isclose(a["mean_plddt"], b["mean_plddt"], abs_tol=1e-3) and b["dap_degree"] == 2
