"""A non-finite loss or gradient never reaches the weights or a checkpoint (fp32, bf16, fp16; every rank).

NaN is injected for real into a training run of the tiny protein BERT on Pfam sequences: the loss of chosen
iterations is multiplied by NaN (so backward fills every gradient with NaN), or, in the multi-rank case, one
tensor-parallel rank's gradient shard is poisoned after the gradient reduction (a fault only that rank sees).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from harness import run_distributed
from test_pretrain_parallel import LOSS_ATOL, LOSS_RTOL, make_tiny_data, tiny_argv, train_run

from megatron_protein.training import checkpointing, train_loop
from megatron_protein.models.megatron_layout import flatten_state_dict


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return make_tiny_data(str(tmp_path_factory.mktemp("pfam")))


def inject_nan_loss(monkeypatch, iterations):
    """Multiply the loss of every micro-batch of the given (1-based) iterations by NaN."""
    original = train_loop.Pretrainer.loss_fn

    def loss_fn(self, logits_shard, batch):
        loss = original(self, logits_shard, batch)
        return loss * float("nan") if self.iteration + 1 in iterations else loss

    monkeypatch.setattr(train_loop.Pretrainer, "loss_fn", loss_fn)


def _argv(data_prefix, save, extra=()):
    argv = tiny_argv(data_prefix, extra=["--save", save, "--save-interval", "2", *extra])
    argv[argv.index("--train-iters") + 1] = "6"
    return argv


def _weights(save, iteration):
    state = torch.load(checkpointing.checkpoint_file(save, iteration, 0, 0, 1), weights_only=False)
    return state


def adam_steps(optimizer_entry: dict) -> int:
    """AdamW's step count in a checkpoint's optimizer entry: torch's per-parameter state (fp32, --autocast) or
    the mixed-precision optimizer's (bf16/fp16 parameters, the distributed optimizer)."""
    inner = optimizer_entry["optimizer"]
    return int(inner["step"]) if "format" in inner else int(inner["state"][0]["step"])


PRECISION_FLAGS = {"fp32": [], "bf16": ["--bf16"], "bf16-autocast": ["--bf16", "--autocast"],
                   "bf16-distributed-optimizer": ["--bf16", "--use-distributed-optimizer"]}


@pytest.mark.parametrize("precision", list(PRECISION_FLAGS))
def test_a_nan_step_is_skipped_and_never_reaches_the_weights(data_prefix, tmp_path, monkeypatch, precision):
    inject_nan_loss(monkeypatch, {3})
    save = str(tmp_path / "ckpt")
    result = train_run(_argv(data_prefix, save, PRECISION_FLAGS[precision]))
    losses = np.array(result["losses"])
    assert np.isnan(losses[2]) and np.all(np.isfinite(np.delete(losses, 2))), losses
    state = _weights(save, 6)
    for name, tensor in flatten_state_dict(state["model"]).items():
        assert torch.isfinite(tensor).all(), f"{name} is not finite after a skipped NaN step"
    # The skipped step moved neither the weights nor the schedule: 5 optimizer steps in 6 iterations.
    assert state["opt_param_scheduler"]["num_steps"] == 5 * state["args"].global_batch_size  # counted in samples
    assert adam_steps(state["optimizer"]) == 5


def test_persistent_nan_stops_the_run_after_the_limit_without_a_nan_checkpoint(data_prefix, tmp_path, monkeypatch):
    inject_nan_loss(monkeypatch, {3, 4, 5, 6})
    save = str(tmp_path / "ckpt")
    expected = (r"iteration 4: 2 consecutive steps had a non-finite loss or gradient.*"
                r"--max-consecutive-skipped-iterations 2")
    with pytest.raises(train_loop.NonFiniteLossError, match=expected):
        train_run(_argv(data_prefix, save, ["--bf16", "--max-consecutive-skipped-iterations", "2"]))
    assert checkpointing.read_tracker(save) == 2
    assert sorted(os.listdir(save)) == ["iter_0000002", checkpointing.TRACKER_FILENAME]
    assert all(torch.isfinite(t).all() for t in flatten_state_dict(_weights(save, 2)["model"]).values())


def test_without_the_check_the_save_still_refuses_nan_weights(data_prefix, tmp_path, monkeypatch):
    """--no-check-for-nan-in-loss-and-grad steps the NaN into the weights (the old behaviour); the checkpoint
    writer then refuses them and the tracker keeps naming the last finite checkpoint."""
    inject_nan_loss(monkeypatch, {3})
    save = str(tmp_path / "ckpt")
    with pytest.raises(checkpointing.CheckpointError, match=r"iter_0000004: refusing to save a checkpoint with "
                                                            r"non-finite values \(rank 0: language_model"):
        train_run(_argv(data_prefix, save, ["--no-check-for-nan-in-loss-and-grad"]))
    assert checkpointing.read_tracker(save) == 2
    assert not any(name.startswith("iter_0000004") for name in os.listdir(save))


def test_fp16_skips_count_only_at_the_minimum_loss_scale(data_prefix, tmp_path, monkeypatch):
    inject_nan_loss(monkeypatch, {2, 3, 4, 5, 6})
    save = str(tmp_path / "ckpt")
    # Dynamic scale 2^4 with hysteresis 1: iterations 2..6 back off 16 -> 8 -> 4 -> 2 -> 1 -> 1; only the skips
    # at the minimum (1) count, so a limit of 2 is reached at iteration 7 and never in 6 iterations.
    argv = _argv(data_prefix, save, ["--fp16", "--initial-loss-scale", "16", "--hysteresis", "1",
                                     "--max-consecutive-skipped-iterations", "2"])
    result = train_run(argv)
    assert np.all(np.isnan(result["losses"][1:]))
    assert checkpointing.read_tracker(save) == 6
    assert all(torch.isfinite(t).all() for t in flatten_state_dict(_weights(save, 6)["model"]).values())


# ---------------------------------------------------------------------------------------- every rank skips together
def _poison_one_tp_rank(argv, poisoned_rank, iteration):
    """A training run in which, at ``iteration``, one tensor-parallel shard's gradient turns NaN on
    ``poisoned_rank`` only, after the gradient reduction (what a fault on one device looks like)."""
    original = train_loop.all_reduce_tied_gradients
    state = {"calls": 0}

    def poisoned(params, groups):
        original(params, groups)
        state["calls"] += 1
        if state["calls"] == iteration and groups.rank == poisoned_rank:
            sharded = [p for p in scg_params[0] if getattr(p, "tensor_model_parallel", False)] or scg_params[0]
            sharded[0].grad.view(-1)[0] = float("nan")

    scg_params = []
    original_init = train_loop.Pretrainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        scg_params.append(list(self.model.parameters()))

    train_loop.all_reduce_tied_gradients = poisoned
    train_loop.Pretrainer.__init__ = init
    try:
        result = train_run(argv)
    finally:
        train_loop.all_reduce_tied_gradients = original
        train_loop.Pretrainer.__init__ = original_init
    params = scg_params[0]
    result["finite"] = all(bool(torch.isfinite(p).all()) for p in params)
    result["skipped"] = [i + 1 for i, norm in enumerate(result["grad_norms"]) if not np.isfinite(norm)]
    return result


@pytest.mark.slow
def test_a_nan_on_one_tensor_parallel_rank_is_skipped_on_every_rank(data_prefix):
    """TP=2, a NaN in one shard's gradient on tp rank 1 only at iteration 3: both ranks skip that step and then
    follow the single-process run that skipped the same step (loss curve within float32 rounding)."""
    argv2 = tiny_argv(data_prefix, tp=2)
    argv1 = tiny_argv(data_prefix)
    reference = _poison_one_tp_rank(argv1, 0, 3)
    ranks = run_distributed(_poison_one_tp_rank, 2, argv2, 1, 3, timeout=240)
    assert reference["skipped"] == [3] and reference["finite"]
    for r in ranks:
        assert r["skipped"] == [3], f"rank {r['rank']} skipped {r['skipped']}"
        assert r["finite"], f"rank {r['rank']} has non-finite weights"
        np.testing.assert_allclose(r["losses"], reference["losses"], rtol=LOSS_RTOL, atol=LOSS_ATOL,
                                   err_msg=f"rank {r['rank']}")
