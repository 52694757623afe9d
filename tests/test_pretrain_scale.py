"""Pretraining with the interleaved pipeline schedule and with sequence parallelism follows the one-process curve.

A tiny protein BERT (4 layers, hidden 32, 4 heads, seq 32, dropout off, sparse prediction on unless said) trains for
5 steps on the embedded Pfam sample, global batch 8 as 4 micro-batches of 2 (so PP=2 has a steady state), and is
compared with the one-process run of the same configuration:

- 2 processes: PP=2 with 2 model chunks per rank (``--num-layers-per-virtual-pipeline-stage 1``); TP=2; TP=2 with
  ``--sequence-parallel`` (sparse prediction), with ``--no-sparse-prediction --recompute-activations``, and with
  ``--compile-layers``;
- 4 processes: TP=2 x PP=2 with 2 chunks and sequence parallelism together.

Losses and gradient norms: |diff| <= 1e-6 + 1e-5 |reference| (the layouts sum in other orders); the
sequence-parallel runs also against TP=2 without it. The interleaved run saved at iteration 3 (``--exit-interval``)
and resumed from its ``model0``/``model1`` checkpoint gives the uninterrupted losses exactly, and the converter
merges that checkpoint into the same weights as the one-process checkpoint of the same iteration (atol 1e-5) and
converts it to a TAPE directory.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from harness import run_distributed
from test_pretrain_parallel import LOSS_ATOL, LOSS_RTOL, make_tiny_data, train_run, train_runs


def argv(data_prefix: str, tp: int = 1, pp: int = 1, extra=()) -> list[str]:
    return ["--data-path", data_prefix, "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "5",
            "--lr", "1e-3", "--lr-warmup-iters", "1", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--eval-iters", "0", "--log-interval", "1", "--seed", "7",
            "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp), *extra]


INTERLEAVED = ["--num-layers-per-virtual-pipeline-stage", "1"]
SP = ["--sequence-parallel"]


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return make_tiny_data(str(tmp_path_factory.mktemp("pfam")))


@pytest.fixture(scope="module")
def references(data_prefix, tmp_path_factory):
    """One process (this pytest process), sparse and dense prediction; the sparse one saves at iteration 5."""
    assert os.environ.get("WORLD_SIZE", "1") == "1"
    save = str(tmp_path_factory.mktemp("reference_checkpoint"))
    return {"sparse": train_run(argv(data_prefix, extra=["--save", save])), "save": save,
            "dense": train_run(argv(data_prefix, extra=["--no-sparse-prediction"]))}


def assert_close_curve(runs: list[dict], reference: dict, what: str) -> None:
    for run in runs:
        where = f"{what}, rank {run['rank']} {run['coords']}"
        assert len(run["losses"]) == len(reference["losses"]) == 5, where
        np.testing.assert_allclose(run["losses"], reference["losses"], rtol=LOSS_RTOL, atol=LOSS_ATOL,
                                   err_msg=f"losses of {where}")
        np.testing.assert_allclose(run["grad_norms"], reference["grad_norms"], rtol=LOSS_RTOL, atol=LOSS_ATOL,
                                   err_msg=f"grad norms of {where}")


@pytest.mark.slow
def test_interleaved_and_sequence_parallel_follow_one_process(data_prefix, references, tmp_path):
    save = str(tmp_path / "interleaved")
    two = [argv(data_prefix, pp=2, extra=INTERLEAVED),
           argv(data_prefix, pp=2, extra=INTERLEAVED + ["--save", save, "--exit-interval", "3"]),
           argv(data_prefix, pp=2, extra=INTERLEAVED + ["--save", save, "--load", save]),
           argv(data_prefix, tp=2),
           argv(data_prefix, tp=2, extra=SP),
           argv(data_prefix, tp=2, extra=SP + ["--no-sparse-prediction", "--recompute-activations"]),
           argv(data_prefix, tp=2, extra=SP + ["--compile-layers"])]
    # The compiled layers are traced with aot_eager here (no C++ generated: tests/test_compiled_layers.py covers
    # inductor's numerics).
    per_rank = run_distributed(train_runs, 2, two, timeout=400, env={"MEGATRON_PROTEIN_COMPILE_BACKEND": "aot_eager"})
    full, first, resumed, tp2, tp2_sp, tp2_sp_dense, tp2_sp_compiled = (
        [runs[i] for runs in per_rank] for i in range(len(two)))
    assert_close_curve(full, references["sparse"], "PP=2 interleaved (2 chunks)")
    for f, a, b in zip(full, first, resumed):   # resumed from model0/model1 checkpoints: exactly the same bits
        assert len(a["losses"]) == 3 and len(b["losses"]) == 2
        assert a["losses"] + b["losses"] == f["losses"], f"rank {f['rank']}"
        assert a["exit_reason"] == "--exit-interval 3"
    assert_close_curve(tp2, references["sparse"], "TP=2")
    assert_close_curve(tp2_sp, references["sparse"], "TP=2 sequence parallel")
    for with_sp, without in zip(tp2_sp, tp2):
        assert_close_curve([with_sp], without, "TP=2 sequence parallel against TP=2 on the same rank")
    assert_close_curve(tp2_sp_dense, references["dense"], "TP=2 sequence parallel, dense, recompute")
    assert_close_curve(tp2_sp_compiled, references["sparse"], "TP=2 sequence parallel, --compile-layers")

    # The interleaved checkpoint: Megatron's model0/model1 entries, merged by the converter into the weights of
    # the one-process checkpoint of the same iteration.
    from megatron_protein.conversion import megatron_checkpoint as mc
    from megatron_protein.utils.safe_load import load_torch_file
    shard = load_torch_file(os.path.join(save, "iter_0000005", "mp_rank_00_001", "model_optim_rng.pt"))
    assert "model" not in shard and sorted(k for k in shard if k.startswith("model")) == ["model0", "model1"]
    assert shard["args"].virtual_pipeline_model_parallel_size == 2
    assert "word_embeddings_for_head" in shard["model1"] and "word_embeddings_for_head" not in shard["model0"]
    checkpoint = mc.load_checkpoint(save)
    assert (checkpoint.tp_size, checkpoint.pp_size, checkpoint.num_chunks) == (1, 2, 2)
    merged = mc.merge_partitions(checkpoint)
    expected = mc.merge_partitions(mc.load_checkpoint(references["save"]))
    assert list(merged) == list(expected)
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
    # The whole converter (TAPE directory, verified against our model on the merged weights) takes it too.
    from megatron_protein.conversion.to_tape import convert
    from tape_tasks import ProteinBertForMaskedLM
    convert(save, str(tmp_path / "tape"), table_file=None)
    assert ProteinBertForMaskedLM.from_pretrained(str(tmp_path / "tape")).config.num_hidden_layers == 4


@pytest.mark.slow
def test_tp2_x_pp2_interleaved_with_sequence_parallel_follows_one_process(data_prefix, references):
    (per_rank,) = [run_distributed(train_run, 4, argv(data_prefix, tp=2, pp=2, extra=INTERLEAVED + SP),
                                   timeout=400)]
    assert_close_curve(per_rank, references["sparse"], "TP=2 x PP=2, 2 chunks, sequence parallel")


def test_flags_of_the_interleaved_schedule_and_sequence_parallelism_are_checked(data_prefix):
    from megatron_protein.training.arguments import parse_args
    with pytest.raises(ValueError, match="needs --pipeline-model-parallel-size >= 2"):
        parse_args(argv(data_prefix, extra=INTERLEAVED))
    with pytest.raises(ValueError, match="must divide the layers of a pipeline stage"):
        parse_args(argv(data_prefix, pp=2, extra=["--num-layers-per-virtual-pipeline-stage", "3"]))
    with pytest.raises(ValueError, match="needs --tensor-model-parallel-size >= 2"):
        parse_args(argv(data_prefix, extra=SP))
    with pytest.raises(ValueError, match="--seq-length 30 to be a multiple of --tensor-model-parallel-size 4"):
        parse_args(argv(data_prefix, tp=4, extra=SP + ["--seq-length", "30"]))
    args = parse_args(argv(data_prefix, pp=2, extra=["--num-layers-per-virtual-pipeline-stage", "1"]))
    assert args.virtual_pipeline_model_parallel_size == 2
    assert parse_args(argv(data_prefix)).virtual_pipeline_model_parallel_size is None
