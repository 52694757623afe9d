"""--bf16 / --fp16 with float32 main parameters, and --use-distributed-optimizer, through the pretraining trainer.

The tiny protein BERT of ``test_pretrain_parallel`` (hidden 32, 2 layers, seq 32, global batch 8) on real Pfam
sequences, dropout off unless said, every multi-process run compared with a run of the same model elsewhere:

- bf16 parameters with float32 main parameters against bf16 autocast (float32 parameters): both round the same
  weights to bf16 for every matmul but differ in what else runs in bf16 (LayerNorm, biases, the residual stream),
  so they agree to bf16 rounding: losses within ``BF16_LOSS_RTOL`` = 1e-3 relative and gradient norms within
  ``BF16_NORM_RTOL`` = 1e-2 (observed at most 8e-5 and 1.3e-3 in one process and at TP=2 and PP=2; fp16 with the
  loss scaler against fp16 autocast 7e-5 and 4e-4). A run that lost its updates misses the losses by 1-3%, one
  whose gradient lost a micro-batch the norms by 30% or more;
- DP=2 with the distributed optimizer against DP=2 without, float32 and bf16: within ``LOSS_RTOL`` /
  ``LOSS_ATOL`` (1e-5 / 1e-6, the other layouts' tolerance; observed: equal losses, norms within 3e-7, summed
  from other partial sums), and half the optimizer state per rank;
- resumes: bit for bit on CPU (one process with dropout; DP=2 with the distributed optimizer in fp32 and bf16,
  in fresh processes), and at another dp degree without the distributed optimizer within the tolerance above.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from harness import run_distributed
from test_pretrain_parallel import LOSS_ATOL, LOSS_RTOL, make_tiny_data, tiny_argv, train_run

from megatron_protein.models.megatron_layout import canonical_bert_state, flatten_state_dict
from megatron_protein.training import checkpointing

BF16_LOSS_RTOL, BF16_NORM_RTOL = 1e-3, 1e-2


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return make_tiny_data(str(tmp_path_factory.mktemp("pfam")))


def argv_for(data_prefix, extra=(), iterations=6, dropout=0.0, tp=1, pp=1):
    argv = tiny_argv(data_prefix, tp=tp, pp=pp, dropout=dropout, extra=list(extra))
    argv[argv.index("--train-iters") + 1] = str(iterations)
    return argv


def inspected_run(argv: list[str], poison_rank: int | None = None, poison_iteration: int = 0) -> dict:
    """:func:`train_run`, and what the run held at its end: parameter and main-parameter dtypes, the optimizer's
    state bytes, whether every weight is finite. ``poison_rank``: at ``poison_iteration`` that global rank puts a
    NaN into one element of its own gradient chunk after the gradient reduction (a fault only it sees)."""
    from megatron_protein.parallel import scg
    from megatron_protein.training import train_loop
    from megatron_protein.training.arguments import configs_from_args, parse_args
    from megatron_protein.training.mixed_precision_optimizer import MixedPrecisionOptimizer

    seen = {}
    original_init = train_loop.Pretrainer.__init__
    original_norm = MixedPrecisionOptimizer.grad_norm_and_finite
    calls = {"norm": 0}

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        seen["trainer"] = self

    def norm(self, loss=None):
        calls["norm"] += 1
        if calls["norm"] == poison_iteration and self.groups.rank == poison_rank:
            chunk = next(c for c in self.chunks if c.pieces)
            chunk.grad[chunk.pieces[0].offset] = float("nan")
        return original_norm(self, loss)

    train_loop.Pretrainer.__init__ = init
    MixedPrecisionOptimizer.grad_norm_and_finite = norm
    try:
        result = train_run(argv)
    finally:
        train_loop.Pretrainer.__init__ = original_init
        MixedPrecisionOptimizer.grad_norm_and_finite = original_norm
    trainer = seen["trainer"]
    result["param_dtypes"] = sorted({str(p.dtype) for p in trainer.model.parameters()})
    result["finite"] = all(bool(torch.isfinite(p).all()) for p in trainer.model.parameters())
    result["skipped"] = [i + 1 for i, n in enumerate(result["grad_norms"]) if not np.isfinite(n)]
    if isinstance(trainer.optimizer, MixedPrecisionOptimizer):
        result["main_dtypes"] = sorted({str(m.dtype) for m in trainer.optimizer.main_parameters()})
        result["state_bytes"] = trainer.optimizer.state_bytes()
    else:
        result["state_bytes"] = {"optimizer_state": sum(
            v.numel() * v.element_size() for s in trainer.optimizer.state.values() for v in s.values()
            if isinstance(v, torch.Tensor) and v.ndim > 0)}
    return result


def inspected_runs(runs: list[tuple]) -> list[dict]:
    return [inspected_run(*run) for run in runs]


def assert_close_curves(got: dict, want: dict, loss_rtol: float, norm_rtol: float, where: str,
                        loss_atol: float = 0.0) -> None:
    np.testing.assert_allclose(got["losses"], want["losses"], rtol=loss_rtol, atol=loss_atol,
                               err_msg=f"losses: {where}")
    np.testing.assert_allclose(got["grad_norms"], want["grad_norms"], rtol=norm_rtol, atol=loss_atol,
                               err_msg=f"grad norms: {where}")


# ------------------------------------------------------------------------------------------ one process
@pytest.fixture(scope="module")
def autocast_reference(data_prefix):
    return inspected_run(argv_for(data_prefix, ["--bf16", "--autocast"]))


def test_bf16_main_parameters_follow_bf16_autocast(data_prefix, autocast_reference):
    main = inspected_run(argv_for(data_prefix, ["--bf16"]))
    assert main["param_dtypes"] == ["torch.bfloat16"] and main["main_dtypes"] == ["torch.float32"]
    assert autocast_reference["param_dtypes"] == ["torch.float32"]
    assert autocast_reference["losses"][-1] < autocast_reference["losses"][0]
    assert_close_curves(main, autocast_reference, BF16_LOSS_RTOL, BF16_NORM_RTOL, "--bf16 vs --bf16 --autocast")
    assert main["losses"] != autocast_reference["losses"], "the bf16 run computed exactly what autocast did"


def test_fp16_main_parameters_with_the_loss_scaler_follow_fp16_autocast(data_prefix):
    flags = ["--fp16", "--initial-loss-scale", "4096", "--loss-scale-window", "2"]
    main = inspected_run(argv_for(data_prefix, flags))
    autocast = inspected_run(argv_for(data_prefix, flags + ["--autocast"]))
    assert main["param_dtypes"] == ["torch.float16"] and main["main_dtypes"] == ["torch.float32"]
    assert main["skipped"] == autocast["skipped"] == []
    assert_close_curves(main, autocast, BF16_LOSS_RTOL, BF16_NORM_RTOL, "--fp16 vs --fp16 --autocast")


def test_bf16_resume_is_exact_and_the_checkpoint_holds_float32_main_weights(data_prefix, tmp_path):
    """Interrupted at 3 and resumed in a fresh process = uninterrupted, bit for bit (dropout on). The saved
    weights are float32, not bf16 values widened (many are not representable in bf16), and they are the main
    parameters: a trainer loading them holds them as main and their bf16 rounding as its model. The converter
    writes them as they are."""
    flags = ["--bf16"]
    uninterrupted = train_run(argv_for(data_prefix, flags, dropout=0.1))["losses"]
    save = str(tmp_path / "ckpt")
    first = train_run(argv_for(data_prefix, flags + ["--save", save, "--exit-interval", "3"], dropout=0.1))
    (resumed,) = run_distributed(train_run, 1, argv_for(data_prefix, flags + ["--save", save, "--load", save],
                                                        dropout=0.1))
    assert first["losses"] + resumed["losses"] == uninterrupted

    state = torch.load(checkpointing.checkpoint_file(save, 3, 0, 0, 1), weights_only=False)
    saved = canonical_bert_state(state["model"])
    assert {str(v.dtype) for v in saved.values()} == {"torch.float32"}
    for name, value in saved.items():
        if value.ndim == 2:
            assert not torch.equal(value, value.bfloat16().float()), f"{name} holds bf16 values only"

    from megatron_protein.parallel import scg
    from megatron_protein.training.arguments import configs_from_args, parse_args
    from megatron_protein.training.train_loop import Pretrainer

    load3 = str(tmp_path / "at3")
    shutil.copytree(checkpointing.iteration_dir(save, 3), checkpointing.iteration_dir(load3, 3))
    checkpointing._write_text_atomically(os.path.join(load3, checkpointing.TRACKER_FILENAME), "3")
    config = configs_from_args(parse_args(argv_for(data_prefix, flags + ["--load", load3])))
    trainer = Pretrainer(config, scg.init_process_group(config.parallel.degrees()))
    main = trainer.optimizer.gather_main_params()
    for name, param in trainer.model.named_parameters():
        assert torch.equal(main[name], saved[name]), f"main parameter {name}"
        assert param.dtype == torch.bfloat16 and torch.equal(param.detach(), saved[name].bfloat16()), name

    from megatron_protein.conversion.to_tape import convert
    out = tmp_path / "tape"
    convert(load3, str(out), table_file=None)  # also verifies the TAPE model's outputs against ours
    tape = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert {str(v.dtype) for v in tape.values() if v.is_floating_point()} == {"torch.float32"}
    assert torch.equal(tape["bert.embeddings.position_embeddings.weight"],
                       saved["language_model.embedding.position_embeddings.weight"])


def test_resuming_a_float32_checkpoint_in_bf16_keeps_its_adam_moments(data_prefix, tmp_path):
    """A float32 (or autocast) run's torch AdamW state resumes under --bf16 (and the distributed optimizer):
    converted by parameter name, every moment and the step count carried over."""
    from megatron_protein.parallel import scg
    from megatron_protein.training.arguments import configs_from_args, parse_args
    from megatron_protein.training.train_loop import Pretrainer

    save = str(tmp_path / "fp32")
    train_run(argv_for(data_prefix, ["--save", save], iterations=3))
    state = torch.load(checkpointing.checkpoint_file(save, 3, 0, 0, 1), weights_only=False)
    config = configs_from_args(parse_args(argv_for(data_prefix, ["--bf16", "--use-distributed-optimizer",
                                                                 "--load", save])))
    trainer = Pretrainer(config, scg.init_process_group(config.parallel.degrees()))
    ours = trainer.optimizer.state_dict()
    names = [n for n, p in trainer.model.named_parameters()]
    order = ([n for n, p in trainer.model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
             + [n for n, p in trainer.model.named_parameters() if p.ndim == 1 or n.endswith(".bias")])
    assert ours["step"] == 3 and sorted(ours["pieces"]) == sorted(names)
    for index, name in enumerate(order):
        (lo, hi, exp_avg, exp_avg_sq), = ours["pieces"][name]
        torch_state = state["optimizer"]["optimizer"]["state"][index]
        assert torch.equal(exp_avg, torch_state["exp_avg"].reshape(-1)), name
        assert torch.equal(exp_avg_sq, torch_state["exp_avg_sq"].reshape(-1)), name


# ------------------------------------------------------------------------------------------ several processes
#: (name, argv extra, tp, pp, poisoned rank) of the runs of the 2-process launch, all 6 iterations, dropout off.
def _launch_runs(data_prefix, saves):
    def run(extra, tp=1, pp=1, poison=None):
        return (argv_for(data_prefix, extra, tp=tp, pp=pp), poison, 3)

    return {
        "tp2_bf16": run(["--bf16"], tp=2),
        "pp2_bf16": run(["--bf16"], pp=2),
        "dp2_fp32": run([]),
        "dp2_fp32_dist": run(["--use-distributed-optimizer", "--save", saves["fp32"], "--save-interval", "3"]),
        "dp2_bf16": run(["--bf16"]),
        "dp2_bf16_dist": run(["--bf16", "--use-distributed-optimizer", "--overlap-grad-reduce", "--save",
                              saves["bf16"], "--save-interval", "3"]),
        "dp2_bf16_poisoned": run(["--bf16"], poison=1),
        "dp2_bf16_dist_poisoned": run(["--bf16", "--use-distributed-optimizer"], poison=1),
    }


def _at_iteration_3(save: str, into: str) -> str:
    """A copy of the checkpoint of iteration 3 of ``save`` as the latest one of ``into``."""
    shutil.copytree(checkpointing.iteration_dir(save, 3), checkpointing.iteration_dir(into, 3))
    checkpointing._write_text_atomically(os.path.join(into, checkpointing.TRACKER_FILENAME), "3")
    return into


@pytest.fixture(scope="module")
def two_process_runs(data_prefix, tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    saves = {"fp32": str(root / "fp32"), "bf16": str(root / "bf16")}
    runs = _launch_runs(data_prefix, saves)
    per_rank = run_distributed(inspected_runs, 2, list(runs.values()), timeout=400)
    return {"runs": {name: [ranks[i] for ranks in per_rank] for i, name in enumerate(runs)}, "saves": saves,
            "root": root, "data_prefix": data_prefix}


@pytest.mark.slow
def test_tp2_and_pp2_bf16_follow_single_process_autocast(two_process_runs, autocast_reference):
    reference = dict(autocast_reference)
    for name in ("tp2_bf16", "pp2_bf16"):
        for rank in two_process_runs["runs"][name]:
            assert rank["param_dtypes"] == ["torch.bfloat16"], name
            assert_close_curves(rank, reference, BF16_LOSS_RTOL, BF16_NORM_RTOL, f"{name} rank {rank['rank']}")


@pytest.mark.slow
def test_dp2_with_the_distributed_optimizer_equals_dp2_without(two_process_runs):
    runs = two_process_runs["runs"]
    for precision in ("fp32", "bf16"):
        plain, sharded = runs[f"dp2_{precision}"], runs[f"dp2_{precision}_dist"]
        for a, b in zip(plain, sharded):
            assert a["losses"][-1] < a["losses"][0]
            assert_close_curves(b, a, LOSS_RTOL, LOSS_RTOL, f"{precision} rank {b['rank']}", loss_atol=LOSS_ATOL)
            # Sharded over 2 ranks: half the AdamW moments (and of the main parameters in bf16) per rank, up to
            # the padding of the buckets.
            full, half = a["state_bytes"]["optimizer_state"], b["state_bytes"]["optimizer_state"]
            assert 0.5 * full <= half <= 0.5 * full + 64 * 12, (precision, full, half)


@pytest.mark.slow
def test_a_nan_on_one_dp_rank_is_skipped_on_every_rank_with_the_distributed_optimizer(two_process_runs):
    """dp rank 1 alone finds a NaN in its gradient chunk at iteration 3: both ranks skip that step, keep finite
    weights, and follow the run without the distributed optimizer that skipped the same step."""
    runs = two_process_runs["runs"]
    for a, b in zip(runs["dp2_bf16_poisoned"], runs["dp2_bf16_dist_poisoned"]):
        assert a["skipped"] == b["skipped"] == [3], (a["skipped"], b["skipped"])
        assert a["finite"] and b["finite"]
        np.testing.assert_allclose(b["losses"], a["losses"], rtol=LOSS_RTOL, atol=LOSS_ATOL, err_msg=f"rank {b['rank']}")


@pytest.mark.slow
def test_the_distributed_optimizer_resumes_exactly_after_a_restart(two_process_runs):
    """The sharded checkpoint of iteration 3 (every dp rank wrote its own shard), resumed by fresh processes at
    the same degrees, continues with exactly the uninterrupted run's losses (fp32 and bf16)."""
    root, saves, runs = two_process_runs["root"], two_process_runs["saves"], two_process_runs["runs"]
    data_prefix = two_process_runs["data_prefix"]
    resumes = {}
    for precision, extra in (("fp32", ["--use-distributed-optimizer"]),
                             ("bf16", ["--bf16", "--use-distributed-optimizer", "--overlap-grad-reduce"])):
        shard_dir = os.path.join(checkpointing.iteration_dir(saves[precision], 3), "mp_rank_00")
        assert sorted(os.listdir(shard_dir)) == ["distrib_optim_dp_rank_000.pt", "distrib_optim_dp_rank_001.pt",
                                                 "model_optim_rng.pt"]
        load = _at_iteration_3(saves[precision], str(root / f"resume_{precision}"))
        resumes[precision] = (argv_for(data_prefix, extra + ["--load", load]), None, 0)
    # And the bf16 one resharded to TP=2 by the converter's reshard tool (the sharded state joined and split by
    # name), resumed at TP=2 x DP=1 on the same curve to bf16 rounding.
    from megatron_protein.conversion.reshard import reshard

    resharded = str(root / "tp2")
    reshard(str(root / "resume_bf16"), resharded, tp=2, pp=1)
    moved = torch.load(checkpointing.checkpoint_file(resharded, 3, 1, 0, 1), weights_only=False)
    assert moved["resharded_from"]["optimizer"] == "resharded"
    resumes["tp2"] = (argv_for(data_prefix, ["--bf16", "--load", resharded, "--no-load-rng"], tp=2), None, 0)
    per_rank = run_distributed(inspected_runs, 2, list(resumes.values()), timeout=300)
    for i, precision in enumerate(("fp32", "bf16")):
        for uninterrupted, ranks in zip(runs[f"dp2_{precision}_dist"], per_rank):
            assert ranks[i]["losses"] == uninterrupted["losses"][3:], precision
            assert ranks[i]["grad_norms"] == uninterrupted["grad_norms"][3:], precision
    for uninterrupted, ranks in zip(runs["dp2_bf16_dist"], per_rank):
        tail = {key: uninterrupted[key][3:] for key in ("losses", "grad_norms")}
        assert_close_curves(ranks[2], tail, BF16_LOSS_RTOL, BF16_NORM_RTOL, "resharded to TP=2")


@pytest.mark.slow
def test_a_distributed_optimizer_checkpoint_resumes_at_another_dp_degree(two_process_runs):
    """The DP=2 sharded checkpoints of iteration 3 resume in one process without the distributed optimizer (the
    two shards read and joined; in fp32 by torch AdamW, in bf16 by the mixed-precision optimizer) on the same
    curve as the DP=2 run."""
    root, saves, runs = two_process_runs["root"], two_process_runs["saves"], two_process_runs["runs"]
    for precision, extra in (("fp32", []), ("bf16", ["--bf16"])):
        load = _at_iteration_3(saves[precision], str(root / f"dp1_{precision}"))
        resumed = train_run(argv_for(two_process_runs["data_prefix"], extra + ["--load", load]))
        reference = runs[f"dp2_{precision}_dist"][0]
        np.testing.assert_allclose(resumed["losses"], reference["losses"][3:], rtol=LOSS_RTOL, atol=LOSS_ATOL,
                                   err_msg=precision)
        np.testing.assert_allclose(resumed["grad_norms"], reference["grad_norms"][3:], rtol=LOSS_RTOL,
                                   atol=LOSS_ATOL, err_msg=precision)


@pytest.mark.slow
def test_the_distributed_optimizer_combines_with_interleaving_and_sequence_parallelism(data_prefix):
    """4 processes, 4 layers, global batch 16, fp32 (where the comparison is tight): the interleaved schedule
    (PP=2 x DP=2, one layer per virtual stage) and sequence parallelism (TP=2 x DP=2, with the overlapped
    reduce-scatter) give the same curve with and without the distributed optimizer, which holds half the state."""
    def run(extra, tp=1, pp=1):
        argv = argv_for(data_prefix, extra, tp=tp, pp=pp)
        argv[argv.index("--num-layers") + 1] = "4"
        argv[argv.index("--global-batch-size") + 1] = "16"
        return (argv, None, 0)

    interleaved, sequence = ["--num-layers-per-virtual-pipeline-stage", "1"], ["--sequence-parallel"]
    runs = [run(interleaved, pp=2), run(interleaved + ["--use-distributed-optimizer"], pp=2),
            run(sequence, tp=2), run(sequence + ["--use-distributed-optimizer", "--overlap-grad-reduce"], tp=2)]
    per_rank = run_distributed(inspected_runs, 4, runs, timeout=400)
    for ranks in per_rank:
        for plain, sharded, what in ((ranks[0], ranks[1], "interleaved"), (ranks[2], ranks[3], "sequence parallel")):
            assert_close_curves(sharded, plain, LOSS_RTOL, LOSS_RTOL, f"{what}, rank {plain['rank']}",
                                loss_atol=LOSS_ATOL)
            full, half = plain["state_bytes"]["optimizer_state"], sharded["state_bytes"]["optimizer_state"]
            assert 0.5 * full <= half <= 0.5 * full + 64 * 8, (what, full, half)
