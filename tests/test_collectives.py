"""Every collective, forward and backward, against a one-process simulation of the same math.

The simulation holds the tensors of all ranks in one process: a tensor that is *replicated* over the group is one
tensor there (and its loss counted once), a tensor that differs per rank is a list. Autograd on the simulation gives
the gradient each rank must see. Each rank of a spawned run derives every rank's inputs from fixed seeds, so it
can run the simulation itself and compare with what the collective gave it.

Groups tested: the world group at world size 2 and 4, and at world size 4 also the strided sub-groups
([0, 2], [1, 3]), where a rank's index in its group differs from its global rank. Tolerance: float32, atol = rtol = 1e-6 (sums of at most four terms).
"""
import pytest
import torch

from harness import run_distributed
from megatron_protein.parallel import collectives as C
from megatron_protein.parallel import scg

ATOL = RTOL = 1e-6
SHAPE = (4, 8, 12)  # every dim divides by 2 and by 4


def _rand(seed, shape=SHAPE):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _chunk(t, dim, world, index):
    return t.chunk(world, dim)[index]


# Simulations: (inputs of all ranks) -> (outputs of all ranks). A replicated tensor is passed as a single tensor.
def _sim_copy(x, world):                                 # x replicated -> W outputs (identity)
    return [x for _ in range(world)]


def _sim_reduce(xs, world):                              # W partials -> one replicated sum
    return sum(xs)


def _sim_scatter(x, dim, world):                         # x replicated -> chunk r on rank r
    return [_chunk(x, dim, world, r) for r in range(world)]


def _sim_gather(xs, dim, world):                         # W chunks -> one replicated concatenation
    return torch.cat(xs, dim)


def _sim_reduce_scatter(xs, dim, world):                 # W partials -> chunk r of their sum on rank r
    total = sum(xs)
    return [_chunk(total, dim, world, r) for r in range(world)]


def _sim_all_gather(xs, dim, world):                     # W chunks -> the concatenation on every rank (distinct uses)
    full = torch.cat(xs, dim)
    return [full for _ in range(world)]


def _sim_all_to_all(xs, s, g, world):                    # rank r gets chunk r of every rank's s, laid along g
    return [torch.cat([_chunk(xs[j], s, world, r) for j in range(world)], g) for r in range(world)]


def _sim_broadcast(xs, src_index, world):
    return [xs[src_index] for _ in range(world)]


class _Checker:
    """Runs one op on this rank and its simulation, and records forward/backward mismatches."""

    def __init__(self, group, label):
        self.group, self.label = group, label
        self.world, self.rank = C.group_size(group), C.group_rank(group)
        self.failures = []
        self.checked = 0

    def check(self, name, op, sim, replicated_in, replicated_out, shape=SHAPE, seed=0):
        world, rank = self.world, self.rank
        # Inputs: one replicated tensor, or one per rank.
        if replicated_in:
            sim_in = _rand(seed, shape).requires_grad_()
            mine = sim_in.detach().clone().requires_grad_()
        else:
            sim_in = [_rand(seed + 1 + j, shape).requires_grad_() for j in range(world)]
            mine = sim_in[rank].detach().clone().requires_grad_()
        sim_out = sim(sim_in if replicated_in else sim_in, world)
        # Upstream gradients: one replicated weight for a replicated output (loss counted once), else one per rank.
        if replicated_out:
            weight = _rand(seed + 100, sim_out.shape)
            sim_loss = (sim_out * weight).sum()
            expected_out, my_weight = sim_out, weight
        else:
            weights = [_rand(seed + 100 + j, sim_out[j].shape) for j in range(world)]
            sim_loss = sum((o * w).sum() for o, w in zip(sim_out, weights))
            expected_out, my_weight = sim_out[rank], weights[rank]
        leaves = [sim_in] if replicated_in else sim_in
        grads = torch.autograd.grad(sim_loss, leaves, allow_unused=True)
        expected_grad = grads[0] if replicated_in else grads[rank]
        if expected_grad is None:
            expected_grad = torch.zeros(shape)

        out = op(mine)
        (out * my_weight).sum().backward()
        self.checked += 1
        if out.shape != expected_out.shape or not torch.allclose(out, expected_out, atol=ATOL, rtol=RTOL):
            self.failures.append(f"{self.label} {name}: forward differs (shape {tuple(out.shape)} vs "
                                 f"{tuple(expected_out.shape)})")
        elif not torch.allclose(mine.grad, expected_grad, atol=ATOL, rtol=RTOL):
            err = (mine.grad - expected_grad).abs().max().item()
            self.failures.append(f"{self.label} {name}: backward differs by {err:.3g}")


def _check_group(group, label, src_global):
    ck = _Checker(group, label)
    w = ck.world
    ck.check("copy_to_group", lambda x: C.copy_to_group(x, group), _sim_copy, True, False)
    ck.check("reduce_from_group", lambda x: C.reduce_from_group(x, group), _sim_reduce, False, True)
    ck.check("reduce_from_group_ (in place)", lambda x: C.reduce_from_group_(x * 1.0, group), _sim_reduce, False, True)
    # In place on a tensor that autograd saved: the backward must refuse, not use the overwritten values.
    saved = torch.ones(3, requires_grad=True).tanh()    # tanh saves its output
    C.reduce_from_group_(saved, group)
    try:
        saved.sum().backward()
        ck.failures.append(f"{label} reduce_from_group_: in-place update of a saved tensor went unnoticed")
    except RuntimeError as e:
        if "modified by an inplace operation" not in str(e):
            raise
    for dim in (0, -1):
        ck.check(f"scatter_to_group dim {dim}", lambda x: C.scatter_to_group(x, dim, group),
                 lambda x, n: _sim_scatter(x, dim, n), True, False)
        ck.check(f"gather_from_group dim {dim}", lambda x: C.gather_from_group(x, dim, group),
                 lambda xs, n: _sim_gather(xs, dim, n), False, True)
        ck.check(f"reduce_scatter_to_group dim {dim}", lambda x: C.reduce_scatter_to_group(x, dim, group),
                 lambda xs, n: _sim_reduce_scatter(xs, dim, n), False, False)
        ck.check(f"all_gather dim {dim}", lambda x: C.all_gather(x, dim, group),
                 lambda xs, n: _sim_all_gather(xs, dim, n), False, False)
    for s, g in ((0, 1), (1, 0), (1, 2), (-1, -2)):
        ck.check(f"all_to_all {s}->{g}", lambda x: C.all_to_all(x, s, g, group),
                 lambda xs, n: _sim_all_to_all(xs, s, g, n), False, False)
    src_index = C.dist.get_process_group_ranks(group).index(src_global)
    ck.check(f"broadcast src {src_global}", lambda x: C.broadcast(x, src_global, group),
             lambda xs, n: _sim_broadcast(xs, src_index, n), False, False)

    # Async variants: other work runs between start and wait, forward and backward; results equal the sync op.
    other = _rand(999, (6, 6)).requires_grad_()

    def a2a_async(x, s, g):
        result, handle = C.all_to_all_async(x, s, g, group)
        overlap = (other @ other).tanh()          # computation that overlaps the exchange
        result = handle.wait()
        assert handle.wait() is result            # idempotent
        return result + overlap.sum() * 0.0

    for s, g in ((0, 1), (2, 0)):
        ck.check(f"all_to_all_async {s}->{g}", lambda x: a2a_async(x, s, g),
                 lambda xs, n: _sim_all_to_all(xs, s, g, n), False, False)

    def reduce_async(x):
        result, handle = C.all_reduce_async(x, group)
        overlap = (other @ other).tanh()
        handle.wait()                             # completes ``result`` in place
        return result + overlap.sum() * 0.0

    ck.check("all_reduce_async", reduce_async, _sim_reduce, False, True)

    def gather_async(x, dim):
        result, handle = C.gather_from_group_async(x, dim, group)
        overlap = (other @ other).tanh()
        return handle.wait() + overlap.sum() * 0.0

    for dim in (0, 2):
        ck.check(f"gather_from_group_async dim {dim}", lambda x: gather_async(x, dim),
                 lambda xs, n: _sim_gather(xs, dim, n), False, True)

    # The reverse exchange of all_to_all_async is started before, and waited on after, the backward of the
    # computation that overlapped it in the forward.
    x = _rand(5).requires_grad_()
    order = []
    result, handle = C.all_to_all_async(x, 0, 1, group)
    start_node = result.grad_fn
    overlap = other @ other
    overlap.grad_fn.register_hook(lambda *_: order.append("overlap"))
    result = handle.wait()
    result.grad_fn.register_hook(lambda *_: order.append("wait (reverse exchange started)"))
    start_node.register_prehook(lambda *_: order.append("start (reverse exchange waited)"))
    (result.sum() + overlap.sum()).backward()
    if order != ["wait (reverse exchange started)", "overlap", "start (reverse exchange waited)"]:
        ck.failures.append(f"{label} all_to_all_async: backward does not overlap, order {order}")

    # Uneven splits raise before any communication (on every rank, so nothing hangs).
    uneven = torch.zeros(4, 2 * w + 1, 3)
    for name, op in [("scatter_to_group", lambda: C.scatter_to_group(uneven, 1, group)),
                     ("reduce_scatter_to_group", lambda: C.reduce_scatter_to_group(uneven, 1, group)),
                     ("all_to_all", lambda: C.all_to_all(uneven, 1, 0, group)),
                     ("all_to_all_async", lambda: C.all_to_all_async(uneven, 1, 0, group))]:
        try:
            op()
            ck.failures.append(f"{label} {name}: uneven split did not raise")
        except C.CollectiveShapeError as e:
            msg = str(e)
            if not ("dim 1" in msg and f"size {2 * w + 1}" in msg and f"degree {w}" in msg):
                ck.failures.append(f"{label} {name}: unclear error message: {msg}")
    return ck.checked, ck.failures


def _run_all(world):
    results = {}
    pg = scg.init_process_group([("world", None)])
    results["world"] = _check_group(pg.group("world"), f"world({world})", src_global=world - 1)
    if world == 4:
        # Strided sub-groups [0, 2] and [1, 3]: a rank's index in its group differs from its global rank. (The
        # contiguous kind, [0, 1] [2, 3], is what world size 2 and test_tensor_parallel's tp x dp run cover.)
        sub = scg.init_process_group([("outer", 2), ("inner", 2)])
        results["outer"] = _check_group(sub.group("outer"), "outer(2)", src_global=sub.ranks("outer")[1])
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_collectives_match_the_math(world):
    per_rank = run_distributed(_run_all, world, world)
    for rank, results in enumerate(per_rank):
        for label, (checked, failures) in results.items():
            assert checked >= 20, f"rank {rank} {label}: only {checked} checks ran"
            assert not failures, f"rank {rank}: " + "\n".join(failures)


def test_single_process_is_identity():
    x = torch.randn(4, 6, requires_grad=True)
    for op in (lambda t: C.copy_to_group(t, None), lambda t: C.reduce_from_group(t, None),
               lambda t: C.reduce_from_group_(t, None),
               lambda t: C.scatter_to_group(t, 1, None), lambda t: C.gather_from_group(t, 1, None),
               lambda t: C.reduce_scatter_to_group(t, 0, None), lambda t: C.all_gather(t, 0, None),
               lambda t: C.all_to_all(t, 0, 1, None), lambda t: C.broadcast(t, 0, None)):
        assert op(x) is x
    result, handle = C.all_to_all_async(x, 0, 1, None)
    assert result is x and handle.wait() is x
    result, handle = C.all_reduce_async(x, None)
    assert result is x and handle.wait() is x
    result, handle = C.gather_from_group_async(x, 1, None)
    assert result is x and handle.wait() is x
    assert C.group_size(None) == 1 and C.group_rank(None) == 0
