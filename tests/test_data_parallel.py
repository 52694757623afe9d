"""Fused parameter buffers and data parallelism (alone and with tensor parallelism) against one process.

Multi-process runs train on shards of a global batch and are compared with one process training on the whole
batch: gradients after the bucketed all-reduce and parameters after AdamW steps. Tolerance: fp32, atol 1e-6 /
rtol 1e-5 (the dp ranks sum partial means in a different order than one process; nothing else differs).
"""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import run_distributed
from megatron_protein.parallel import scg
from megatron_protein.parallel.dp import DataParallel, grad_sync, param_sync
from megatron_protein.parallel.fused_params import FusedParameters

ATOL, RTOL = 1e-6, 1e-5
IN, HIDDEN, OUT, GLOBAL_BATCH = 6, 16, 3, 8


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(IN, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, OUT)

    def forward(self, x):
        return self.fc2(self.norm(F.gelu(self.fc1(x))))


def batch(step, width=IN):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, width, generator=g), torch.randn(GLOBAL_BATCH, OUT, generator=g)


# ----------------------------------------------------------------------------- fused buffers, one process
def test_parameters_and_gradients_become_views_of_flat_buffers():
    torch.manual_seed(0)
    model = MLP()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = {n: id(p) for n, p in model.named_parameters()}
    model.fc1.weight.partition_dim = 0  # attributes such as TP's partition_dim must survive
    fused = FusedParameters(model)
    assert len(fused.buffers) == 1
    buf = fused.buffers[0]
    assert buf.data.numel() == sum(v.numel() for v in before.values()) == fused.numel()
    base, size = buf.data.data_ptr(), buf.data.element_size()
    offset = 0
    for (name, p), stored_name in zip(model.named_parameters(), buf.names):
        assert name == stored_name and id(p) == ids[name] and isinstance(p, nn.Parameter)
        assert p.data_ptr() == base + offset * size, name            # packed in order, no gaps
        assert p.grad.data_ptr() == buf.grad.data_ptr() + offset * size, name
        torch.testing.assert_close(p.detach(), before[name], atol=0, rtol=0)
        offset += p.numel()
    assert model.fc1.weight.partition_dim == 0
    # Writing through the flat buffer changes the parameters (they share storage).
    buf.data.fill_(0.5)
    assert torch.all(model.fc2.bias == 0.5)
    # Accumulated gradients land in the flat gradient buffer.
    x, y = batch(0)
    F.mse_loss(model(x), y).backward()
    F.mse_loss(model(x), y).backward()
    assert buf.grad.abs().sum() > 0
    assert fused.reattach_grads() == 0


def test_buckets_partition_each_buffer_and_respect_the_size_cap():
    torch.manual_seed(0)
    model = MLP()
    cap = 40
    fused = FusedParameters(model, key=lambda name, p: "no_decay" if p.dim() == 1 else "decay", bucket_numel=cap)
    assert sorted(buf.key for buf in fused.buffers) == ["decay", "no_decay"]
    for buf in fused.buffers:
        assert all(p.dim() == 1 for p in buf.params) == (buf.key == "no_decay")
        spans = [(b.start, b.end) for b in buf.buckets]
        assert spans[0][0] == 0 and spans[-1][1] == buf.data.numel()
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))            # contiguous, no overlap
        for b in buf.buckets:
            assert b.numel <= cap or len(b.params) == 1                        # only a big param overflows
    # Reduction order: the last buffer's buckets first within each buffer (backward produces them first).
    assert [b.index for b in fused.buckets if b.buffer is fused.buffers[0]] == \
        list(reversed(range(len(fused.buffers[0].buckets))))
    with pytest.raises(ValueError, match="bucket_numel must be a positive"):
        FusedParameters(MLP(), bucket_numel=0)


def test_mixed_dtypes_get_separate_buffers():
    model = MLP()
    model.fc2.double()
    fused = FusedParameters(model)
    assert sorted(str(buf.dtype) for buf in fused.buffers) == ["torch.float32", "torch.float64"]


@pytest.mark.parametrize("clear", ["fused", "optimizer_set_to_none"])
def test_optimizer_step_through_fused_buffers_equals_unfused_step(clear):
    torch.manual_seed(0)
    plain = MLP()
    fused_model = copy.deepcopy(plain)
    fused = FusedParameters(fused_model, bucket_numel=50)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=0.05, weight_decay=0.1)
    opt_fused = torch.optim.AdamW(fused_model.parameters(), lr=0.05, weight_decay=0.1)
    for step in range(3):
        opt_plain.zero_grad()
        if clear == "fused":
            fused.zero_grad()
        else:
            opt_fused.zero_grad()  # sets .grad to None: the views must be restored before use
        x, y = batch(step)
        for half in (slice(0, 4), slice(4, 8)):  # two accumulated micro-batches
            F.mse_loss(plain(x[half]), y[half]).div(2).backward()
            F.mse_loss(fused_model(x[half]), y[half]).div(2).backward()
        repaired = fused.reattach_grads()
        assert repaired == (0 if clear == "fused" else 6)
        opt_plain.step()
        opt_fused.step()
        for (name, p), q in zip(plain.named_parameters(), fused_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=0, rtol=0, msg=lambda m: f"step {step} {name}: {m}")
            torch.testing.assert_close(q.detach(), p.detach(), atol=0, rtol=0,
                                       msg=lambda m: f"step {step} {name}: {m}")
    # After the steps the parameters are still views of the buffer (in-place optimizer updates).
    assert fused.reattach_grads() == 0
    buf = fused.buffers[0]
    assert all(buf.data.data_ptr() <= p.data_ptr() < buf.data.data_ptr() + buf.data.numel() * 4
               for p in fused_model.parameters())


def test_data_parallel_at_world_size_one_is_plain_accumulation():
    torch.manual_seed(0)
    model = MLP()
    reference = copy.deepcopy(model)
    pg = scg._single_process(("dp",), {"dp": 1})
    ddp = DataParallel(model, groups=pg, overlap_grad_reduce=True)
    ddp.broadcast_parameters()
    x, y = batch(0)
    with ddp.no_sync():
        F.mse_loss(model(x), y).backward()
    ddp.sync_gradients()
    F.mse_loss(reference(x), y).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=0, rtol=0)


# ----------------------------------------------------------------------------- data parallel, N processes
STEPS, MICRO_PER_RANK = 2, 2


def _dp_worker():
    """Each dp rank starts from a different init (broadcast must fix it), trains on its shard of every global
    batch with MICRO_PER_RANK accumulated micro-batches, in three variants of the gradient sync."""
    pg = scg.init_process_group([("dp", None)])
    dp, rank = pg.size("dp"), pg.rank_in("dp")
    results = {}
    for variant in ("after", "overlap", "functional"):
        torch.manual_seed(100 + rank)
        model = MLP()
        if variant == "functional":
            # The folding model's path: param_sync / grad_sync on flat buffers, no DataParallel object.
            param_sync(model, pg)
            fused = FusedParameters(model, bucket_numel=40)
        else:
            ddp = DataParallel(model, groups=pg, bucket_numel=40, overlap_grad_reduce=(variant == "overlap"))
            ddp.broadcast_parameters()
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        grads = []
        for step in range(STEPS):
            if variant == "functional":
                fused.zero_grad()
            elif step == 0:
                ddp.zero_grad()
            else:
                opt.zero_grad()  # set_to_none: DataParallel must restore its views
            x, y = batch(step)
            shard = GLOBAL_BATCH // dp
            xs, ys = x[rank * shard:(rank + 1) * shard], y[rank * shard:(rank + 1) * shard]
            micro = shard // MICRO_PER_RANK
            for i in range(MICRO_PER_RANK):
                last = i == MICRO_PER_RANK - 1
                ctx = ddp.no_sync() if (variant != "functional" and not last) else contextlib.nullcontext()
                with ctx:
                    sl = slice(i * micro, (i + 1) * micro)
                    F.mse_loss(model(xs[sl]), ys[sl]).div(MICRO_PER_RANK).backward()
            if variant == "functional":
                grad_sync(fused, pg)
            else:
                # With overlap every bucket's all-reduce was already started by the last backward pass.
                started = ddp.buckets_started
                assert started == (len(ddp.fused.buckets) if variant == "overlap" else 0), (variant, started)
                ddp.sync_gradients()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.step()
        results[variant] = {"grads": grads, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}
        if variant == "overlap":
            # Forgetting no_sync around an earlier micro-batch is caught, not silently averaged twice.
            ddp.zero_grad()
            x, y = batch(0)
            F.mse_loss(model(x), y).backward()
            try:
                F.mse_loss(model(x), y).backward()
            except RuntimeError as error:
                results["forgot_no_sync"] = str(error)
            ddp.zero_grad()
    return results


def _dp_reference():
    torch.manual_seed(100)  # dp rank 0's init, which the broadcast gives every replica
    model = MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    grads = []
    for step in range(STEPS):
        opt.zero_grad()
        x, y = batch(step)
        F.mse_loss(model(x), y).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def _four_process_worker():
    """DP=4, then TP=2 x DP=2 in the same four processes (one spawn: process start-up dominates these tests)."""
    return {"dp": _dp_worker(), "tp_dp": _tp_dp_worker()}


@pytest.fixture(scope="module")
def four_process_results():
    return run_distributed(_four_process_worker, 4)


@pytest.mark.parametrize("world", [2, 4])
def test_data_parallel_matches_one_process_on_the_whole_batch(world, request):
    if world == 4:
        results = [res["dp"] for res in request.getfixturevalue("four_process_results")]
    else:
        results = run_distributed(_dp_worker, world)
    ref_grads, ref_params = _dp_reference()
    for rank, res in enumerate(results):
        assert "whose all-reduce had already started" in res.pop("forgot_no_sync")
        for variant, out in res.items():
            for step in range(STEPS):
                for name, grad in out["grads"][step].items():
                    torch.testing.assert_close(grad, ref_grads[step][name], atol=ATOL, rtol=RTOL,
                                               msg=lambda m: f"rank {rank} {variant} step {step} grad {name}: {m}")
            for name, value in out["params"].items():
                torch.testing.assert_close(value, ref_params[name], atol=ATOL, rtol=RTOL,
                                           msg=lambda m: f"rank {rank} {variant} param {name}: {m}")


# ----------------------------------------------------------------------------- TP=2 x DP=2
def _tp_mlp(groups):
    from megatron_protein.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    torch.manual_seed(5)
    fc1 = ColumnParallelLinear(IN, HIDDEN, gather_output=False, groups=groups)
    fc2 = RowParallelLinear(HIDDEN, OUT, input_is_parallel=True, groups=groups)
    return nn.ModuleDict({"fc1": fc1, "fc2": fc2})


def _tp_forward(model, x):
    return model["fc2"](F.gelu(model["fc1"](x)))


def _tp_dp_worker():
    pg = scg.init_process_group([("dp", None), ("tp", 2)])
    model = _tp_mlp(pg)
    ddp = DataParallel(model, groups=pg, bucket_numel=32, overlap_grad_reduce=True)
    ddp.broadcast_parameters()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    shard = GLOBAL_BATCH // pg.size("dp")
    losses, grads = [], []
    for step in range(STEPS):
        ddp.zero_grad()
        x, y = batch(step)
        lo = pg.rank_in("dp") * shard
        loss = F.mse_loss(_tp_forward(model, x[lo:lo + shard]), y[lo:lo + shard])
        loss.backward()
        ddp.sync_gradients()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    partition = {n: (getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None)
                 for n, p in model.named_parameters()}
    return {"tp_rank": pg.rank_in("tp"), "losses": losses, "grads": grads, "partition": partition,
            "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def test_tp2_x_dp2_matches_one_process(four_process_results):
    results = [res["tp_dp"] for res in four_process_results]
    # Reference: the full weights (the TP=1 layers built under the same seed), trained with plain torch ops.
    full = {n: p.detach().clone().requires_grad_(True)
            for n, p in _tp_mlp(scg._single_process(("dp",), {"dp": 1})).named_parameters()}
    opt = torch.optim.AdamW(list(full.values()), lr=0.05, weight_decay=0.1)
    ref_losses, ref_grads = [], []
    for step in range(STEPS):
        opt.zero_grad()
        x, y = batch(step)
        hidden = F.gelu(F.linear(x, full["fc1.weight"], full["fc1.bias"]))
        loss = F.mse_loss(F.linear(hidden, full["fc2.weight"], full["fc2.bias"]), y)
        loss.backward()
        ref_losses.append(loss.item())
        ref_grads.append({n: t.grad.clone() for n, t in full.items()})
        opt.step()

    def shard(tensor, name, res):
        dim = res["partition"][name]
        return tensor if dim is None else tensor.chunk(2, dim=dim)[res["tp_rank"]]

    assert results[0]["partition"] == {"fc1.weight": 0, "fc1.bias": 0, "fc2.weight": 1, "fc2.bias": None}
    for rank, res in enumerate(results):
        dp_rank = rank // 2
        for step in range(STEPS):
            for name, grad in res["grads"][step].items():
                torch.testing.assert_close(grad, shard(ref_grads[step][name], name, res), atol=ATOL, rtol=RTOL,
                                           msg=lambda m: f"rank {rank} step {step} grad {name}: {m}")
        for name, value in res["params"].items():
            torch.testing.assert_close(value, shard(full[name].detach(), name, res), atol=ATOL, rtol=RTOL,
                                       msg=lambda m: f"rank {rank} param {name}: {m}")
    # The mean over dp replicas of the local losses is the global-batch loss (each tp rank sees the full output).
    for step in range(STEPS):
        assert (results[0]["losses"][step] + results[2]["losses"][step]) / 2 == \
            pytest.approx(ref_losses[step], rel=RTOL, abs=ATOL)
        assert results[0]["losses"][step] == results[1]["losses"][step]  # tp ranks agree
