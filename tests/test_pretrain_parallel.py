"""Pretraining under TP=2, PP=2, TP=2 x DP=2 and TP=2 x PP=2 follows the single-process loss curve.

Each parallel run trains the same tiny protein BERT (hidden 32, 2 layers, 4 heads, seq 32, global batch 8 as 2
micro-batches of 4, dropout off) on the same real Pfam sequences for 5 steps and is compared with the one-process
run of the same configuration (world size 1: every collective is the identity). The layouts reduce in different
orders, so losses and gradient norms agree to float32 rounding: we require |diff| <= 1e-6 + 1e-5 |reference|
(observed on CPU: at most 5e-7 in the loss, 1e-7 in the gradient norm).

After the 5 steps each run evaluates both held-out sets (held-out sequences and in-family sequences: 2 global
batches each) and the honest metrics (loss at <mask>, randomised and kept positions, their unigram baselines) must
equal the one-process numbers: the same tolerance for losses, exactly for token counts, so they are reduced over
pp and dp once each and never summed over tp.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from harness import run_distributed
from pfam_fixtures import write_pretraining_data


LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-6


def make_tiny_data(directory: str, train: int = 200, valid: int = 40, valid_infamily: int = 0) -> str:
    """PREFIX_train / PREFIX_valid (/ PREFIX_valid_infamily) indexed datasets from the first sequences of the
    embedded Pfam sample."""
    return write_pretraining_data(directory, train=train, valid=valid, valid_infamily=valid_infamily)


#: Evaluate both held-out sets once, after the last of the 5 steps, on 2 global batches each.
EVAL_FLAGS = ["--eval-iters", "2", "--eval-interval", "5"]


def tiny_argv(data_prefix: str, tp: int = 1, pp: int = 1, dropout: float = 0.0, extra: list[str] = ()) -> list[str]:
    return ["--data-path", data_prefix, "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "5",
            "--lr", "1e-3", "--lr-warmup-iters", "1", "--hidden-dropout", str(dropout), "--attention-dropout",
            str(dropout), "--eval-iters", "0", "--log-interval", "1", "--seed", "7",
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp), *extra]


def train_run(argv: list[str]) -> dict:
    """Parse, lay out the groups from the environment (1 process or a harness rank), train, report."""
    from megatron_protein.parallel import scg
    from megatron_protein.training.arguments import configs_from_args, parse_args
    from megatron_protein.training.train_loop import pretrain

    import torch

    config = configs_from_args(parse_args(argv))
    groups = scg.init_process_group(config.parallel.degrees())
    # One thread, as every harness rank: the in-process reference then runs the same kernels (same bits) and is
    # not slowed down by thread oversubscription on a shared 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = pretrain(config, groups)
    finally:
        torch.set_num_threads(threads)
    return {"losses": result.losses, "masked_losses": result.masked_losses, "grad_norms": result.grad_norms,
            "evaluations": result.evaluations, "rank": groups.rank,
            "coords": {a: groups.rank_in(a) for a in ("dp", "pp", "tp")}, "exit_reason": result.exit_reason}


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return make_tiny_data(str(tmp_path_factory.mktemp("pfam")), valid_infamily=40)


@pytest.fixture(scope="module")
def reference(data_prefix):
    """The single-process run (this pytest process: no process group, every collective the identity)."""
    assert os.environ.get("WORLD_SIZE", "1") == "1"
    return train_run(tiny_argv(data_prefix, extra=EVAL_FLAGS))


def assert_same_curve(ranks: list[dict], reference: dict) -> None:
    ref_losses = np.array(reference["losses"])
    ref_norms = np.array(reference["grad_norms"])
    assert len(ref_losses) == 5 and np.all(np.isfinite(ref_losses))
    assert ref_losses[-1] < ref_losses[0], f"the reference run did not learn: {ref_losses}"
    ref_evals = reference["evaluations"]
    assert [e["split"] for e in ref_evals] == ["valid", "valid_infamily"]
    assert all(e["masked_tokens"] > 0 and e["kept_tokens"] > 0 and e["randomised_tokens"] > 0 for e in ref_evals)
    for r in ranks:
        losses, norms = np.array(r["losses"]), np.array(r["grad_norms"])
        where = f"rank {r['rank']} {r['coords']}"
        np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL, atol=LOSS_ATOL, err_msg=f"losses on {where}")
        np.testing.assert_allclose(r["masked_losses"], reference["masked_losses"], rtol=LOSS_RTOL, atol=LOSS_ATOL,
                                   err_msg=f"<mask>-position training losses on {where}")
        np.testing.assert_allclose(norms, ref_norms, rtol=LOSS_RTOL, atol=LOSS_ATOL,
                                   err_msg=f"grad norms on {where}")
        assert [e["split"] for e in r["evaluations"]] == [e["split"] for e in ref_evals], where
        for got, want in zip(r["evaluations"], ref_evals):
            for key, value in want.items():
                if key.endswith("_tokens") or key in ("tokens", "iteration", "split", "title", "tokens_seen"):
                    assert got[key] == value, f"{key} of {want['split']} on {where}: {got[key]} != {value}"
                else:
                    np.testing.assert_allclose(got[key], value, rtol=LOSS_RTOL, atol=LOSS_ATOL,
                                               err_msg=f"{key} of {want['split']} on {where}")


def train_runs(argvs: list[list[str]]) -> list[dict]:
    """Several runs one after the other in the same processes (one process launch instead of several)."""
    return [train_run(argv) for argv in argvs]


# Layouts per launch: (tp, pp) pairs run one after the other by the same 2 or 4 processes.
LAYOUTS = {2: [(2, 1), (1, 2)], 4: [(2, 1), (2, 2)]}


@pytest.mark.parametrize("world", [2, 4], ids=["tp2,pp2", "tp2xdp2,tp2xpp2"])
def test_parallel_training_follows_single_process_curve(data_prefix, reference, world):
    layouts = LAYOUTS[world]
    per_rank = run_distributed(train_runs, world, [tiny_argv(data_prefix, tp=tp, pp=pp, extra=EVAL_FLAGS)
                                                   for tp, pp in layouts], timeout=300)
    for i, (tp, pp) in enumerate(layouts):
        ranks = [runs[i] for runs in per_rank]
        dp = world // (tp * pp)
        assert sorted(tuple(sorted(r["coords"].items())) for r in ranks) == sorted(
            tuple(sorted({"dp": d, "pp": p, "tp": t}.items()))
            for d in range(dp) for p in range(pp) for t in range(tp)), f"layout tp={tp} pp={pp} dp={dp}"
        assert_same_curve(ranks, reference)
