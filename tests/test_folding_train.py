"""The folding trainer: exact resume after an interruption, the non-finite guard, refusing a checkpoint of another
architecture, and what a run writes (Megatron-layout checkpoints, metrics.jsonl, TensorBoard)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from folding_helpers import REPO_ROOT, micro_config, write_small_chains
from megatron_protein.training import checkpointing
from megatron_protein.training.folding_arguments import RunOptions
from megatron_protein.training.folding_trainer import FoldingTrainer, FoldingTrainingError

LOSS_TERMS = ("loss", "fape", "fape_aux", "distogram", "masked_msa", "plddt")


def _config(**overrides):
    # Dropout, profile dropout, recycling and FAPE clamping all on: every random choice must resume exactly.
    base = dict(model__evoformer__msa_dropout=0.15, model__evoformer__pair_dropout=0.25,
                model__structure_module__dropout=0.1, model__max_recycling_iters=1, data__profile_dropout=0.5,
                loss__fape_clamp_fraction=0.5, train__train_step=6, train__save_step=3, train__eval_step=0)
    base.update(overrides)
    return micro_config(**base)


@pytest.fixture(scope="module")
def small_chains(tmp_path_factory):
    return write_small_chains(str(tmp_path_factory.mktemp("chains") / "small.npz"), n_train=8, n_valid=1)


def _run(model_dir, data, **options):
    options = {"plot": False, "tensorboard": False, **options}
    return RunOptions(model_dir=str(model_dir), data=data, **options)


def test_resume_after_interruption_reproduces_the_uninterrupted_losses(tmp_path, small_chains):
    full = FoldingTrainer(_config(), _run(tmp_path / "full", small_chains)).train()
    first = FoldingTrainer(_config(), _run(tmp_path / "cut", small_chains, exit_step=3)).train()
    assert first.exited and first.step == 3 and checkpointing.read_tracker(str(tmp_path / "cut")) == 3
    resumed_trainer = FoldingTrainer(_config(), _run(tmp_path / "cut", small_chains))
    assert resumed_trainer.step == 3 and resumed_trainer.batches.consumed_samples == 3 * 2
    resumed = resumed_trainer.train()
    assert len(full.losses) == 6 and len(first.losses) + len(resumed.losses) == 6
    assert first.losses + resumed.losses == full.losses  # exactly, term by term
    # same final weights, bit for bit
    a = checkpointing.load_state(str(tmp_path / "full"), resumed_trainer.groups)[0]["model"]
    b = checkpointing.load_state(str(tmp_path / "cut"), resumed_trainer.groups)[0]["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # metrics.jsonl: one line per step with every loss term, no duplicates after the resume
    lines = [json.loads(line) for line in open(tmp_path / "cut" / "metrics.jsonl")]
    train_lines = [r for r in lines if r["split"] == "train"]
    assert [r["step"] for r in train_lines] == [1, 2, 3, 4, 5, 6]
    assert all(all(term in r for term in LOSS_TERMS) for r in train_lines)
    assert [r["loss"] for r in train_lines] == pytest.approx([s["loss"] for s in full.losses], rel=1e-12)
    assert any(r["split"] == "valid" and "lddt_ca" in r and "helix_lddt_ca" in r for r in lines)


def test_non_finite_steps_never_reach_the_weights(tmp_path, monkeypatch, small_chains):
    import megatron_protein.training.folding_trainer as trainer_module

    real_loss = trainer_module.alphafold_loss
    bad_steps = {2, 4, 5}
    calls = {"n": 0}

    def poisoned(outputs, batch, config, use_clamped_fape=True, step=None):
        calls["n"] += 1
        loss, terms = real_loss(outputs, batch, config, use_clamped_fape, step)
        if calls["n"] in bad_steps:
            loss = loss * float("nan")
            terms = {**terms, "loss": loss.detach()}
        return loss, terms

    monkeypatch.setattr(trainer_module, "alphafold_loss", poisoned)
    trainer = FoldingTrainer(_config(train__train_step=6, train__save_step=0), _run(tmp_path, small_chains))
    before = {}

    real_step = trainer.train_step

    def spy(batch, step):
        before[step] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        return real_step(batch, step)

    trainer.train_step = spy
    result = trainer.train()
    assert result.skipped_steps == 3 and [bool(t) for t in result.losses] == [True, False, True, False, False, True]
    after_bad = before[2]  # the weights before step index 2 (step 3) equal those before the bad step index 1
    assert all(torch.equal(after_bad[k], before[1][k]) for k in after_bad)
    assert trainer.scheduler.num_steps == 3  # skipped steps do not advance the schedule
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())

    calls["n"] = 0
    bad_steps.update(range(1, 100))
    stopping = FoldingTrainer(_config(train__train_step=20, train__save_step=0,
                                      train__max_consecutive_skips=3), _run(tmp_path / "stop", small_chains))
    with pytest.raises(FoldingTrainingError, match="3 consecutive steps had a non-finite loss"):
        stopping.train()
    assert checkpointing.read_tracker(str(tmp_path / "stop")) is None


def test_refuses_a_checkpoint_of_another_architecture(tmp_path, small_chains):
    FoldingTrainer(_config(train__train_step=1), _run(tmp_path, small_chains)).train()
    other = _config(train__train_step=2, model__c_z=8)
    with pytest.raises(checkpointing.CheckpointError, match=r"model\.c_z: checkpoint 16, this run 8"):
        FoldingTrainer(other, _run(tmp_path, small_chains))
    with pytest.raises(checkpointing.CheckpointError, match=r"model\.c_z"):
        FoldingTrainer(other, _run(tmp_path / "new", small_chains, init_model=str(tmp_path)))


@pytest.mark.slow
def test_command_line_run_and_bad_checkpoint_error(tmp_path, small_chains):
    """folding/train.py end to end (2 steps, 1 held-out chain), then a mismatching rerun: one error line, exit 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = [sys.executable, os.path.join(REPO_ROOT, "folding", "train.py"), "--model_dir", str(tmp_path),
              "--train_step", "2", "--log_step", "1", "--data", small_chains,
              "--override", "model.evoformer.num_blocks=1", "--override", "model.c_z=16", "--crop_size", "24"]
    done = subprocess.run(common, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "step      2/2 | loss" in done.stdout and "steps/s" in done.stdout and "ETA" in done.stdout
    assert "ideal alpha-helix, same length" in done.stdout and "extended strand, same length" in done.stdout
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (tmp_path / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt").is_file()
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tensorboard"))
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
    assert any(name.startswith("plddt_") and name.endswith(".png") for name in os.listdir(tmp_path))
    def no_nan(constant):
        raise AssertionError(f"eval_final.json holds {constant}, which is not JSON")

    summary = json.loads((tmp_path / "eval_final.json").read_text(), parse_constant=no_nan)
    assert {"lddt_ca", "tm_score", "helix_lddt_ca", "extended_tm_score", "lddt_ca_local", "lddt_ca_nonlocal",
            "rg_ratio", "helix_rg_ratio"} <= set(summary["with_profile"])
    assert summary["against_helix"]["sequence_only"]["num_chains"] == 1
    assert "above the helix on" in done.stdout and (tmp_path / "heldout_lddt.png").stat().st_size > 0
    bad = subprocess.run(common[:-4] + ["--override", "model.c_z=8", "--crop_size", "24"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path}") and "model.c_z: checkpoint 16" in lines[0]
    other_seed = subprocess.run(common + ["--seed", "7"], capture_output=True, text=True, env=env, timeout=300)
    assert other_seed.returncode == 2, other_seed.stderr[-2000:]
    lines = other_seed.stderr.strip().splitlines()
    assert len(lines) == 1 and "trained with --seed 1234, this run has seed 7" in lines[0], lines


def test_a_bad_msa_stops_the_run_before_the_first_step(tmp_path, small_chains, capsys):
    """An MSA whose query is another sequence: one error line naming the file, exit 2, no checkpoint written."""
    from megatron_protein.training.folding_main import main as folding_main

    chain_id = str(np.load(small_chains)["ids"][0])
    msa_dir = tmp_path / "msas"
    msa_dir.mkdir()
    (msa_dir / f"{chain_id}.a3m").write_text(">query\nACDEFGHIK\n>hit\nACDEFGHIK\n")
    model_dir = tmp_path / "model"
    code = folding_main(["--model_dir", str(model_dir), "--data", small_chains, "--msa_dir", str(msa_dir),
                         "--train_step", "2", "--override", "model.evoformer.num_blocks=1", "--no_plot",
                         "--no_tensorboard"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and f"{chain_id}.a3m" in err and "Traceback" not in err, err
    assert not (model_dir / "latest_checkpointed_iteration.txt").exists()


def test_paired_comparison_with_the_helix():
    """Counts of chains above the helix and the one-sided Wilcoxon p-value, against scipy on the same pairs; a model
    equal to the baseline on every chain gets p = 1 and no chain above it."""
    from scipy.stats import wilcoxon

    from megatron_protein.training.folding_eval import compare_with_baseline, format_summary

    rng = np.random.default_rng(0)
    helix = rng.uniform(0.1, 0.5, size=12)
    model = helix + np.r_[np.full(9, 0.05), np.full(3, -0.02)] + rng.normal(0, 0.001, size=12)
    chains = [{"lddt_ca": m, "tm_score": h, "helix_lddt_ca": h, "helix_tm_score": h,
               "extended_lddt_ca": 0.1, "extended_tm_score": 0.1} for m, h in zip(model, helix)]
    summary = {"chains": chains, "lddt_ca": model.mean(), "tm_score": helix.mean(), "helix_lddt_ca": helix.mean(),
               "helix_tm_score": helix.mean(), "extended_lddt_ca": 0.1, "extended_tm_score": 0.1}
    out = compare_with_baseline(summary, "helix")
    assert out["num_chains"] == 12 and out["chains_above_helix_lddt_ca"] == 9
    assert out["wilcoxon_p_above_helix_lddt_ca"] == pytest.approx(wilcoxon(model, helix, alternative="greater").pvalue)
    assert out["wilcoxon_p_above_helix_lddt_ca"] < 0.05
    assert out["chains_above_helix_tm_score"] == 0 and out["wilcoxon_p_above_helix_tm_score"] == 1.0
    assert "above the helix on 9 of 12 chains by lDDT-Ca" in format_summary([("model", summary)])
