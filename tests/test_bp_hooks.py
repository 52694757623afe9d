"""Branch parallelism (parallel/bp.py) against one process, and the seeds' API (groups, seeds, syncs).

A small trunk in the shape of the folding model's: replicated "embedders" make ``(m, z)``; a stack of Parallel
Evoformer-like blocks runs through ``bp.run_branches`` between ``bp.enter_stack`` and ``bp.exit_stack`` (an MSA
branch that reads ``z`` for a bias and returns an outer-product update, a pair branch that only reads ``z``, both
with dropout); a replicated "head" computes the loss from both. At bp = 2 and at degree 1 (``scg.as_single_process``
on the same rank, same inputs, same seed) the loss, the gradients of the inputs and of every parameter (after
``bp.grad_sync`` over the optimizer's groups, tagged as the trunk tags them) must agree, with dropout on: the
branches' generators make bp = 2 the same function. float32, atol = rtol = 1e-5.
"""
import pytest
import torch
import torch.nn.functional as F

from harness import run_distributed
from megatron_protein.parallel import bp, dap, dp, fused_params, scg

S, R, C = 3, 4, 5
P_DROP = 0.3


def _rand(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def make_params(blocks=2):
    names = {"emb_m": (6, C), "emb_z": (6, C), "head": (C, 1)}
    for b in range(blocks):
        names.update({f"b{b}_bias": (C, 1), f"b{b}_msa": (C, C), f"b{b}_opm": (C, C), f"b{b}_pair": (C, C)})
    return {k: (_rand(i, *shape) * 0.5).requires_grad_() for i, (k, shape) in enumerate(names.items())}


def branch_params(p):
    return [v for k, v in p.items() if k.startswith("b")]


def trunk(x_m, x_z, p, blocks=2, training=True):
    m = x_m @ p["emb_m"]                                  # [S, R, C] replicated embedders
    z = x_z @ p["emb_z"]                                  # [R, R, C]
    m, z = bp.enter_stack(m, z)
    for b in range(blocks):
        def msa_branch(m, z, b=b):
            bias = (z @ p[f"b{b}_bias"]).squeeze(-1)      # [R, R]
            att = torch.softmax(torch.einsum("sic,sjc->sij", m, m) + bias, -1)
            m = m + F.dropout(torch.einsum("sij,sjc->sic", att, m) @ p[f"b{b}_msa"], P_DROP, training)
            opm = torch.einsum("sic,sjc->ijc", m, m) @ p[f"b{b}_opm"] / S
            return m, opm

        def pair_branch(z, b=b):
            return z + F.dropout(torch.tanh(torch.einsum("ikc,jkc->ijc", z, z) @ p[f"b{b}_pair"]), P_DROP, training)

        m, z = bp.run_branches(msa_branch, pair_branch, m, z)
    m = bp.exit_stack(m)
    head_in = F.dropout(m[0] + z.mean(0), P_DROP, training)   # replicated after the stack, dropout too
    return (head_in @ p["head"]).pow(2).sum()


def param_groups(p):
    return [{"params": branch_params(p), "dap": True, "bp": True},
            {"params": [p["emb_m"], p["emb_z"], p["head"]]}]


def _step(p, x_m, x_z, seed, fused=None):
    torch.manual_seed(seed)
    if fused is not None:
        fused.zero_grad()                                 # keeps .grad as views of the flat buffers
    else:
        for v in p.values():
            v.grad = None
    x_m = x_m.clone().requires_grad_()
    loss = trunk(x_m, x_z, p)
    loss.backward()
    return loss.detach(), x_m.grad


def _check_bp():
    pg = scg.init_process_group(parallel_degree=[("dp", None), ("dap", 1), ("bp", 2)], seed=3)
    assert (dp.get_world_size(), dap.get_world_size(), bp.get_world_size()) == (1, 1, 2)
    assert bp.get_rank_in_group() == pg.rank and dp.get_rank_in_group() == 0 and dap.get_rank_in_group() == 0
    x_m, x_z = _rand(100, S, R, 6), _rand(101, R, R, 6)
    p = make_params()
    with scg.as_single_process():
        ref_loss, ref_grad_x = _step(p, x_m, x_z, seed=7)
        reference = {k: v.grad.clone() for k, v in p.items()}
    groups = param_groups(p)
    fused = fused_params.fuse_param_groups(groups)
    loss, grad_x = _step(p, x_m, x_z, seed=7, fused=fused)
    before = {k: v.grad.clone() for k, v in p.items()}
    collectives = bp.grad_sync(groups), dap.grad_sync(groups)
    dp.grad_sync(groups)
    after = {k: v.grad.clone() for k, v in p.items()}
    # The same without flat buffers: each group is flattened into one temporary for its one collective.
    p_unfused = make_params()
    _step(p_unfused, x_m, x_z, seed=7)
    unfused_collectives = bp.grad_sync(param_groups(p_unfused))
    unfused = {k: v.grad.clone() for k, v in p_unfused.items()}
    return {"unfused": unfused, "unfused_collectives": unfused_collectives, "ref_loss": ref_loss, "loss": loss,
            "ref_grad_x": ref_grad_x, "grad_x": grad_x, "reference": reference, "before": before, "after": after,
            "collectives": collectives}


@pytest.mark.slow
def test_bp2_matches_one_process_with_dropout():
    results = run_distributed(_check_bp, 2)
    for rank, out in enumerate(results):
        torch.testing.assert_close(out["loss"], out["ref_loss"], atol=1e-5, rtol=1e-5)
        # The MSA-input gradient reaches the (replicated) embedder whole on both ranks, through enter_stack.
        torch.testing.assert_close(out["grad_x"], out["ref_grad_x"], atol=1e-5, rtol=1e-5)
        for k, expected in out["reference"].items():
            torch.testing.assert_close(out["after"][k], expected, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"rank {rank} {k}: {m}")
            torch.testing.assert_close(out["unfused"][k], expected, atol=1e-5, rtol=1e-5)
        # One collective for the bp-tagged group (fused buffer or flattened temporary), none for dap (degree 1).
        assert out["collectives"] == (1, 0) and out["unfused_collectives"] == 1
    # Before the sync each branch's parameters had a gradient only on the rank that ran the branch.
    msa_only = [k for k in results[0]["before"] if k.endswith(("_msa", "_opm", "_bias"))]
    assert all(results[1]["before"][k].abs().max() == 0 for k in msa_only)
    assert all(results[0]["before"][k].abs().max() > 0 for k in msa_only)
    pair_only = [k for k in results[0]["before"] if k.endswith("_pair")]
    assert all(results[0]["before"][k].abs().max() == 0 for k in pair_only)


def test_bp_degree_one_runs_both_branches_here():
    with scg.as_single_process():
        p = make_params()
        x_m, x_z = _rand(100, S, R, 6), _rand(101, R, R, 6)
        torch.manual_seed(1)
        a = trunk(x_m, x_z, p, training=False)
        torch.manual_seed(2)
        b = trunk(x_m, x_z, p, training=False)
        assert torch.equal(a, b) and bp.get_world_size() == 1 and bp.get_rank_in_group() == 0


# ------------------------------------------------------------------------------------------------ seeds' API errors

def _init(parallel_degree, seed):
    # Each rank reports its own error (a rank that entered a collective instead would hang: the harness times out).
    try:
        scg.init_process_group(parallel_degree=parallel_degree, seed=seed)
    except scg.ParallelConfigError as exc:
        return f"ParallelConfigError: {exc}"
    return "initialised"


@pytest.mark.parametrize("degrees, seed, message", [
    ([("dp", None), ("dap", 2), ("bp", 1)], None, "a seed is required when dap or bp > 1"),
    ([("dp", None), ("dap", 1), ("bp", 2)], None, "a seed is required"),
    ([("dp", None), ("dap", 3), ("bp", 1)], 0, "does not divide the world size 2"),
])
@pytest.mark.slow
def test_bad_layouts_fail_on_every_rank_before_any_collective(degrees, seed, message):
    for rank, outcome in enumerate(run_distributed(_init, 2, degrees, seed, timeout=60)):
        assert outcome.startswith("ParallelConfigError") and message in outcome, f"rank {rank}: {outcome}"


def test_bp_above_two_is_refused_before_any_collective(monkeypatch):
    # A world of 4 that was never started: the check runs before torch.distributed is touched.
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(scg.ParallelConfigError, match="at most 2"):
        scg.init_process_group(parallel_degree=[("dp", None), ("dap", 1), ("bp", 4)], seed=0)
    with pytest.raises(scg.ParallelConfigError, match="seed is required"):
        scg.init_process_group(parallel_degree=[("dp", None), ("dap", 2), ("bp", 2)])


def test_param_groups_fuse_one_buffer_per_group():
    with scg.as_single_process():
        p = make_params()
        groups = param_groups(p)
        assert bp.grad_sync(groups) == 0 and dap.grad_sync(groups) == 0
        fused = fused_params.fuse_param_groups(groups)
        assert len(fused.buffers) == 2 and all(len(b.buckets) == 1 for b in fused.buffers)
        assert fused_params.group_flat_grad(groups[0]["params"]) is fused.buffers[0].grad
        assert fused_params.group_flat_grad(groups[0]["params"][:-1]) is None
        with pytest.raises(ValueError, match="exactly one group"):
            fused_params.fuse_param_groups([{"params": [p["head"]]}, {"params": [p["head"]]}])
