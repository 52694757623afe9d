"""Branch parallelism (BP) for the Parallel Evoformer block, as HelixFold (Wang et al. 2022, "HelixFold: An
Efficient Implementation of AlphaFold2 using PaddlePaddle", and Wang et al. 2022, "Efficient AlphaFold2 Training
using Parallel Evoformer and Branch Parallelism") introduced it.

With the outer product mean moved to the end of the block (``outer_product_mean_position='end'``), an Evoformer
block is two independent branches of one input ``(m, z)``:

* the **MSA branch** ``msa_branch(m, z) -> (m_new, opm_update)``: row attention with pair bias (reads ``z``),
  column attention (global for the extra MSA), MSA transition, then the outer product mean of ``m_new``;
* the **pair branch** ``pair_branch(z) -> z_new_without_opm``: the two triangle multiplications, the two triangle
  attentions and the pair transition;

and the block's result is ``(m_new, z_new_without_opm + opm_update)``. :func:`run_branches` runs both here at bp
degree 1; at bp = 2 bp rank 0 runs the MSA branch and bp rank 1 the pair branch at the same time.

Data flow at bp = 2 (per block; with DAP on, every tensor is this rank's dap slice and the branches' own DAP
collectives run inside the dap group of the ranks that run the same branch):

* entry: ``z`` passes an op whose backward all-reduces (sums) its gradient over the bp group: rank 0's row
  attention used ``z`` for its bias, rank 1's pair stack used it whole, and the true gradient is the sum;
* exchange: one all-reduce (sum) over bp of ``opm_update`` (rank 0) and ``z_new_without_opm`` (rank 1) gives both
  ranks ``z_out`` (the sum of two numbers is the same in either order, so both ranks and the one-process block
  hold identical bits); its backward is the identity, because what follows ``z_out`` on each rank hands back the
  whole gradient of ``z_out`` (the two ranks' views of it are equal, see the next point);
* the MSA stays on rank 0 during the stack: rank 1 never reads it (its branch is pair-only), so it is not sent
  per block. :func:`exit_stack` hands rank 0's MSA to rank 1 once at the end of the stack, and
  :func:`enter_stack` all-reduces the MSA-input gradient once at the start, so the embedders before the stack get
  the whole gradient on both ranks. Inside the stack the MSA that :func:`run_branches` returns on rank 1 is its
  input, unchanged: only the trunk (``DistEmbeddingsAndEvoformer``) may call the blocks at bp = 2, between
  ``enter_stack`` and ``exit_stack``.

Invariant that makes this right: outside the branches every tensor carries its *whole* gradient on every bp rank
(the computation after the stack is the same on both). The branches' parameters get their gradient only on the
rank that ran them (zero on the other), hence :func:`grad_sync`'s SUM over bp.

Random numbers: each branch runs on a generator seeded from two numbers drawn from the default generator before
the branches (on every rank, at every degree), so the default generators of the bp ranks stay in step (they do
the same draws outside the branches, e.g. the structure module's dropout) and a branch draws the same dropout
masks whichever rank runs it: bp = 2 is the same function as bp = 1, with dropout on as well.

bp > 2: refused by ``scg.init_process_group`` (``scg.MAX_DEGREE``): a block has two branches. For more ranks, use
dap inside each branch (dap x bp) and dp.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch

from megatron_protein.parallel import collectives as C
from megatron_protein.parallel import scg
from megatron_protein.parallel.dp import all_reduce_param_groups

__all__ = [
    "AXIS", "MSA_BRANCH_RANK", "PAIR_BRANCH_RANK", "get_world_size", "get_rank_in_group", "is_enabled",
    "run_branches", "enter_stack", "exit_stack", "grad_sync",
]

#: The name of the axis in ``scg.init_process_group(parallel_degree=[..., ('bp', 2)])``.
AXIS = "bp"
#: The bp rank that runs the MSA branch (and holds the MSA inside the stack).
MSA_BRANCH_RANK = 0
#: The bp rank that runs the pair branch.
PAIR_BRANCH_RANK = 1


def _pg(groups: Optional[scg.ParallelGroups]) -> scg.ParallelGroups:
    return groups if groups is not None else scg.current()


def get_world_size(groups: Optional[scg.ParallelGroups] = None) -> int:
    """The bp degree (1 or 2)."""
    return _pg(groups).size(AXIS)


def get_rank_in_group(groups: Optional[scg.ParallelGroups] = None) -> int:
    """0 on the rank that runs the MSA branch, 1 on the one that runs the pair branch."""
    return _pg(groups).rank_in(AXIS)


def is_enabled(groups: Optional[scg.ParallelGroups] = None) -> bool:
    return get_world_size(groups) > 1


class _Entry(torch.autograd.Function):
    """Identity forward on ``(m, z)``; backward all-reduces (sums) the gradients selected over the bp group.

    One node for both tensors, so every bp rank reaches it in backward as long as it used either of them (rank 1
    never uses the MSA; a separate node for it would never run there and rank 0 would wait for it forever).
    """

    @staticmethod
    def forward(ctx, m, z, group, reduce_m, reduce_z):
        ctx.group, ctx.reduce_m, ctx.reduce_z = group, reduce_m, reduce_z
        return m.view_as(m), z.view_as(z)

    @staticmethod
    def backward(ctx, grad_m, grad_z):
        if ctx.reduce_m:
            grad_m = C._all_reduce(grad_m, ctx.group)
        if ctx.reduce_z:
            grad_z = C._all_reduce(grad_z, ctx.group)
        return grad_m, grad_z, None, None, None


def _branch_seeds() -> tuple[int, int]:
    # Two draws from the default CPU generator, on every rank and at every degree (keeps the ranks in step).
    seeds = torch.randint(0, 2 ** 62, (2,), dtype=torch.int64)
    return int(seeds[0]), int(seeds[1])


@contextlib.contextmanager
def _branch_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block on the default generator(s) seeded with ``seed``; restore them afterwards."""
    cpu_state = torch.get_rng_state()
    cuda = device.type == "cuda"
    if cuda:
        cuda_state = torch.cuda.get_rng_state(device)
    torch.default_generator.manual_seed(seed)
    if cuda:
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        if cuda:
            torch.cuda.set_rng_state(cuda_state, device)


def run_branches(msa_branch: Callable, pair_branch: Callable, m: torch.Tensor, z: torch.Tensor,
                 groups: Optional[scg.ParallelGroups] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One Parallel Evoformer block: ``m_new, opm = msa_branch(m, z)``, ``z_new = pair_branch(z)``, and return
    ``(m_new, z_new + opm)``.

    bp degree 1: both branches here. bp = 2: the MSA branch on bp rank 0, the pair branch on bp rank 1, joined by
    one all-reduce of the pair (see the module docstring); on rank 1 the returned MSA is ``m`` unchanged (call the
    blocks between :func:`enter_stack` and :func:`exit_stack`).
    """
    pg = _pg(groups)
    msa_seed, pair_seed = _branch_seeds()
    if pg.size(AXIS) == 1:
        with _branch_rng(msa_seed, m.device):
            m_new, opm_update = msa_branch(m, z)
        with _branch_rng(pair_seed, z.device):
            z_new = pair_branch(z)
        return m_new, z_new + opm_update
    group = pg.group(AXIS)
    m, z = _Entry.apply(m, z, group, False, True)
    if pg.rank_in(AXIS) == MSA_BRANCH_RANK:
        with _branch_rng(msa_seed, m.device):
            m_new, partial = msa_branch(m, z)
    else:
        with _branch_rng(pair_seed, z.device):
            partial = pair_branch(z)
        m_new = m
    return m_new, C.reduce_from_group(partial.contiguous(), group)


def enter_stack(m: torch.Tensor, z: torch.Tensor,
                groups: Optional[scg.ParallelGroups] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Before the first block of a stack run with :func:`run_branches`: identity forward; backward sums the
    MSA-input gradient over bp (rank 0 computed all of it, rank 1 none), so both ranks' embedders see it whole."""
    pg = _pg(groups)
    if pg.size(AXIS) == 1:
        return m, z
    return _Entry.apply(m, z, pg.group(AXIS), True, False)


def exit_stack(m: torch.Tensor, groups: Optional[scg.ParallelGroups] = None) -> torch.Tensor:
    """After the last block: every bp rank gets the MSA of the MSA-branch rank (one all-reduce of it and zeros).

    Backward: identity on rank 0, nothing on rank 1 (whose input MSA is stale and must not receive a gradient):
    what follows the stack runs the same on both ranks, so rank 0's gradient is already the whole one.
    """
    pg = _pg(groups)
    if pg.size(AXIS) == 1:
        return m
    if pg.rank_in(AXIS) == MSA_BRANCH_RANK:
        contribution = m.contiguous()
    else:
        contribution = torch.zeros_like(m, memory_format=torch.contiguous_format)
    return C.reduce_from_group(contribution, pg.group(AXIS))


def grad_sync(param_groups, groups: Optional[scg.ParallelGroups] = None) -> int:
    """All-reduce (SUM) over the bp group the gradients of the parameter groups tagged ``'bp': True``.

    SUM: a branch's parameters got their whole (per dap slice) gradient on the rank that ran the branch and zero
    on the other. Call first, before :func:`dap.grad_sync` and :func:`dp.grad_sync`. Returns the number of
    collectives (one per tagged group).
    """
    pg = _pg(groups)
    return all_reduce_param_groups(list(param_groups), pg.group(AXIS), pg.size(AXIS), average=False,
                                   select=lambda g: bool(g.get("bp", False)))
