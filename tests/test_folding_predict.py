"""folding/predict.py: PDB output that re-reads through the structure reader with pLDDT in the B-factor column, JSON
summaries, several records, MSA input, chunked == unchunked, and clear one-line errors on bad input with nothing
written."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from folding_helpers import REPO_ROOT, micro_config, write_small_chains
from megatron_protein.inference.predict import predict
from megatron_protein.structure import io as structure_io
from megatron_protein.training import checkpointing
from megatron_protein.training.folding_arguments import RunOptions
from megatron_protein.training.folding_trainer import FoldingTrainer

SEQ_A = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQ"
SEQ_B = "GSHMSLFDFFKNKGSAA"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data = write_small_chains(str(root / "small.npz"), n_train=4, n_valid=1)
    config = micro_config(train__train_step=2, train__save_step=0)
    FoldingTrainer(config, RunOptions(model_dir=str(root / "model"), data=data, plot=False,
                                      tensorboard=False)).train()
    return str(root / "model")


def _fasta(path, records):
    path.write_text("".join(f">{name} some description\n{seq}\n" for name, seq in records))
    return str(path)


def _listing(directory):
    return sorted(os.listdir(directory))


def test_one_record_pdb_rereads_with_plddt_in_b_factors(checkpoint, tmp_path):
    out = tmp_path / "pred.pdb"
    assert predict(["--fasta", _fasta(tmp_path / "a.fasta", [("protA", SEQ_A)]), "--checkpoint", checkpoint,
                    "--output", str(out), "--num_recycles", "1"]) == 0
    chain = structure_io.read_chain(str(out))
    assert chain.sequence == SEQ_A
    summary = json.load(open(tmp_path / "pred.json"))
    assert summary["length"] == len(SEQ_A) and summary["num_recycles"] == 1
    assert summary["msa_source"] == "single-sequence" and summary["msa_depth"] == 1
    assert {"mean_plddt", "seconds", "checkpoint", "config_preset", "device"} <= set(summary)
    b = chain.b_factors[chain.atom_mask > 0]
    assert 0.0 <= b.min() and b.max() <= 100.0
    per_residue = [chain.b_factors[i][chain.atom_mask[i] > 0] for i in range(len(chain))]
    assert all(np.ptp(v) < 1e-6 for v in per_residue)  # one pLDDT per residue on every atom
    assert np.mean([v[0] for v in per_residue]) == pytest.approx(summary["mean_plddt"], abs=0.01)
    # backbone atoms N, CA, C, O (+ CB for non-glycine) with ideal bond lengths
    ca = chain.atom_positions[:, 1]
    n = chain.atom_positions[:, 0]
    assert np.linalg.norm(n - ca, axis=-1) == pytest.approx(1.46, abs=0.02)
    assert _listing(tmp_path) == ["a.fasta", "pred.json", "pred.pdb"]


def test_several_records_go_to_a_directory_and_chunking_changes_nothing(checkpoint, tmp_path):
    fasta = _fasta(tmp_path / "two.fasta", [("first", SEQ_A), ("second", SEQ_B)])
    assert predict(["--fasta", fasta, "--checkpoint", checkpoint, "--output", str(tmp_path / "out")]) == 0
    assert _listing(tmp_path / "out") == ["first.pdb", "second.pdb", "summary.json"]
    summary = json.load(open(tmp_path / "out" / "summary.json"))
    assert [s["name"] for s in summary] == ["first", "second"] and summary[1]["length"] == len(SEQ_B)
    assert predict(["--fasta", fasta, "--checkpoint", checkpoint, "--output", str(tmp_path / "chunked"),
                    "--chunk_size", "3"]) == 0
    for name in ("first", "second"):
        plain = structure_io.read_chain(str(tmp_path / "out" / f"{name}.pdb"))
        chunked = structure_io.read_chain(str(tmp_path / "chunked" / f"{name}.pdb"))
        np.testing.assert_allclose(chunked.atom_positions, plain.atom_positions, atol=2e-3)  # PDB's 3 decimals


def test_msa_input(checkpoint, tmp_path):
    msa = tmp_path / "a.a3m"
    homologue = SEQ_A[:10] + "--" + SEQ_A[12:40].lower().upper() + "kk" + SEQ_A[40:]
    msa.write_text(f">query\n{SEQ_A}\n>hom1\n{homologue}\n>hom2\n{'-' * 5 + SEQ_A[5:]}\n")
    out = tmp_path / "m.pdb"
    assert predict(["--fasta", _fasta(tmp_path / "a.fasta", [("protA", SEQ_A)]), "--checkpoint", checkpoint,
                    "--output", str(out), "--msa", str(msa)]) == 0
    assert json.load(open(tmp_path / "m.json"))["msa_depth"] == 3


def _expect_error(capsys, argv, where, what, out_dir):
    before = _listing(out_dir)
    assert predict(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"error: {where}"), err[0]
    assert what in err[0], err[0]
    assert _listing(out_dir) == before  # nothing written, no temporary files left


def test_bad_inputs_give_one_line_errors_and_write_nothing(checkpoint, tmp_path, capsys):
    out = str(tmp_path / "x.pdb")
    bad = _fasta(tmp_path / "bad.fasta", [("ok", SEQ_B), ("weird", "MKT1AY")])
    _expect_error(capsys, ["--fasta", bad, "--checkpoint", checkpoint, "--output", out],
                  f"{bad}: record 'weird'", "letter '1' at position 4 is not an amino acid", tmp_path)
    empty = tmp_path / "empty.fasta"
    empty.write_text("\n")
    _expect_error(capsys, ["--fasta", str(empty), "--checkpoint", checkpoint, "--output", out], str(empty),
                  "no FASTA records", tmp_path)
    fasta = _fasta(tmp_path / "a.fasta", [("protA", SEQ_A)])
    wrong = tmp_path / "wrong.a3m"
    wrong.write_text(f">query\n{SEQ_B}\n>hom\n{SEQ_B}\n")
    _expect_error(capsys, ["--fasta", fasta, "--checkpoint", checkpoint, "--output", out, "--msa", str(wrong)],
                  str(wrong), "protA", tmp_path)
    _expect_error(capsys, ["--fasta", fasta, "--checkpoint", str(tmp_path), "--output", out], str(tmp_path),
                  "nothing to resume from", tmp_path)


def test_checkpoint_of_another_config_is_refused(checkpoint, tmp_path, capsys):
    """A checkpoint whose weights do not fit its recorded config (another model's weights), and one that is not a
    folding checkpoint at all."""
    from megatron_protein.parallel import scg

    state, path = checkpointing.load_state(checkpoint, scg.current())
    other = tmp_path / "other"
    (other / "iter_0000002" / "mp_rank_00").mkdir(parents=True)
    state["args"].folding_config["model"]["c_z"] = 8
    torch.save(state, other / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt")
    (other / "latest_checkpointed_iteration.txt").write_text("2")
    fasta = _fasta(tmp_path / "a.fasta", [("protA", SEQ_A)])
    out = str(tmp_path / "x.pdb")
    _expect_error(capsys, ["--fasta", fasta, "--checkpoint", str(other), "--output", out],
                  str(other / "iter_0000002"), "weights do not fit its config", tmp_path)
    del state["args"].folding_config
    torch.save(state, other / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt")
    _expect_error(capsys, ["--fasta", fasta, "--checkpoint", str(other), "--output", out],
                  str(other / "iter_0000002"), "not a folding checkpoint", tmp_path)


@pytest.mark.slow
def test_command_line(checkpoint, tmp_path):
    fasta = _fasta(tmp_path / "a.fasta", [("protA", SEQ_B)])
    done = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "folding", "predict.py"), "--fasta", fasta,
                           "--checkpoint", checkpoint, "--output", str(tmp_path / "p.pdb")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "protA: 17 residues, mean pLDDT" in done.stdout
    assert structure_io.read_chain(str(tmp_path / "p.pdb")).sequence == SEQ_B
