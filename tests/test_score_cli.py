"""folding/score.py as a user runs it (subprocess): metrics, residue matching, several predictions, bad input.

Predictions are perturbed copies of real chains (data/structures/pdb), written with the project's PDB writer; the
CLI's numbers are compared with the metrics called in process on the same coordinates (exact up to the 3 decimals
of the PDB format: 1e-3 on lDDT/TM/GDT, 1e-2 A on RMSD).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_protein.structure import metrics as M
from megatron_protein.structure.io import read_chain, write_pdb

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCORE = os.path.join(REPO, "folding", "score.py")
REF = os.path.join(REPO, "data", "structures", "pdb", "dssp_pdb", "1eteA.pdb")
KEYS = {"lddt_ca", "tm_score", "gdt_ts", "gdt_ha", "rmsd", "n_residues"}


def run(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, SCORE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def perturbed(chain, sigma, seed, renumber=0):
    rng = np.random.default_rng(seed)
    out = read_chain(chain.source_path)
    noise = rng.normal(0, sigma, size=out.atom_positions.shape).astype(np.float32)
    out.atom_positions = np.where(out.atom_mask[..., None] > 0, out.atom_positions + noise, 0).astype(np.float32)
    out.residue_index = out.residue_index + renumber
    return out


@pytest.fixture(scope="module")
def predictions(tmp_path_factory):
    ref = read_chain(REF)
    d = tmp_path_factory.mktemp("preds")
    paths = []
    for k, sigma in enumerate((0.5, 1.5, 3.0)):
        p = d / f"model_{k}.pdb"
        write_pdb(perturbed(ref, sigma, k), str(p), plddt=np.full(len(ref), 70.0))
        paths.append(p)
    return ref, d, paths


def test_identical_structure_scores_perfectly():
    res = run(REF, REF, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert set(out) == KEYS
    assert out["lddt_ca"] == 1.0 and out["gdt_ts"] == 1.0 and out["gdt_ha"] == 1.0
    assert out["tm_score"] == pytest.approx(1.0, abs=1e-9) and out["rmsd"] == pytest.approx(0.0, abs=1e-4)
    assert out["n_residues"] == len(read_chain(REF))


def test_cli_numbers_are_the_metrics(predictions, tmp_path):
    ref, _, paths = predictions
    out_file = tmp_path / "score.json"
    res = run(paths[1], REF, "--chain", "A", "--ref-chain", "A", "--json", "--output", out_file)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert json.loads(out_file.read_text()) == got
    pred = read_chain(str(paths[1]))
    m = ref.ca_mask > 0
    p, t = pred.ca_positions[m].astype(np.float64), ref.ca_positions[m].astype(np.float64)
    ts, ha = M.gdt_ts_ha(p, t)
    assert got["lddt_ca"] == pytest.approx(M.lddt_ca(p, t), abs=1e-3)
    assert got["tm_score"] == pytest.approx(M.tm_score(p, t), abs=1e-3)
    assert got["gdt_ts"] == pytest.approx(ts, abs=1e-3) and got["gdt_ha"] == pytest.approx(ha, abs=1e-3)
    assert got["rmsd"] == pytest.approx(M.rmsd(p, t), abs=1e-2)
    assert 0.3 < got["tm_score"] < 0.99
    # A coarser seed spacing searches less and finds (nearly) the same maxima.
    fast = run(paths[1], REF, "--json", "--search-step", "4")
    assert fast.returncode == 0, fast.stderr
    fast = json.loads(fast.stdout)
    assert fast["tm_score"] <= got["tm_score"] + 1e-9  # its seeds are a subset of the full search's
    for key in ("tm_score", "gdt_ts", "gdt_ha"):
        assert fast[key] == pytest.approx(got[key], abs=0.01)
    assert run(paths[1], REF, "--search-step", "0").returncode == 2


def test_align_matches_renumbered_prediction(tmp_path):
    ref = read_chain(REF)
    pred = perturbed(ref, 1.0, 7, renumber=1000)
    pred_path = tmp_path / "renumbered.pdb"
    write_pdb(pred, str(pred_path))
    by_number = run(pred_path, REF, "--json")
    assert by_number.returncode == 2 and "try --align" in by_number.stderr
    aligned = run(pred_path, REF, "--json", "--align")
    assert aligned.returncode == 0, aligned.stderr
    out = json.loads(aligned.stdout)
    assert out["n_residues"] == len(ref)
    m = ref.ca_mask > 0
    assert out["tm_score"] == pytest.approx(M.tm_score(pred.ca_positions[m], ref.ca_positions[m]), abs=1e-3)


def test_directory_and_glob_give_one_row_each_and_the_mean(predictions):
    _, d, paths = predictions
    res = run(d, REF, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [row["prediction"] for row in out["predictions"]] == [str(p) for p in paths]
    for key in KEYS:
        assert out["mean"][key] == pytest.approx(np.mean([row[key] for row in out["predictions"]]))
    tm = [row["tm_score"] for row in out["predictions"]]
    assert tm[0] > tm[1] > tm[2]  # more noise, lower score
    table = run(os.path.join(d, "model_*.pdb"), REF)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.strip().splitlines()
    assert len(lines) == 2 + 3 + 2 and lines[-1].startswith("mean of 3")


@pytest.mark.parametrize("case", ["missing-chain", "not-a-structure", "empty"])
def test_bad_input_one_line_error_exit_2_nothing_written(tmp_path, case):
    out_file = tmp_path / "out.json"
    if case == "missing-chain":
        args, bad = [REF, REF, "--chain", "Q"], REF
    else:
        bad = tmp_path / ("notes.pdb" if case == "not-a-structure" else "empty.pdb")
        bad.write_text("this is a note, not a structure\n" if case == "not-a-structure" else "")
        args = [bad, REF]
    res = run(*args, "--json", "--output", out_file)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}")
    expected = {"missing-chain": "no protein chain 'Q'", "not-a-structure": ":1: no ATOM/HETATM records",
                "empty": "empty file"}[case]
    assert expected in lines[0]
    assert res.stdout == "" and not out_file.exists()
