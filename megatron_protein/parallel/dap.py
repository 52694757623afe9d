"""Dynamic axial parallelism (DAP) for the Evoformer: activations split over the ``dap`` axis, weights replicated.

FastFold (Cheng et al. 2022, "FastFold: Reducing AlphaFold Training Time from 11 Days to 67 Hours", section 4)
splits the MSA ``[*, S, R, c_m]`` and the pair ``[*, R, R, c_z]`` over the n ranks of a group along one axis and
switches the axis with an all-to-all whenever a module needs the other one. Two layouts, one per tensor:

* **row layout**: split along dim -3 (sequences ``S/n`` of the MSA, first residue ``i`` of the pair);
* **column layout**: split along dim -2 (residues ``R/n`` of the MSA, second residue ``j`` of the pair).

The Evoformer stack is entered in row layout. The hooks below are what the model code calls; each is the identity
(or plain local computation) when the dap degree is 1, so the single-process model runs the same lines:

* ``row_to_col(x)``: all_to_all ``[*, A/n, B, c] -> [*, A, B/n, c]``; backward: ``col_to_row`` of the gradient.
* ``col_to_row(x)``: all_to_all ``[*, A, B/n, c] -> [*, A/n, B, c]``; backward: ``row_to_col`` of the gradient.
* ``row_to_col_async(x)`` / ``col_to_row_async(x)``: the same, started; return ``(y, handle)``, read
  ``y = handle.wait()``; the reverse exchange in backward overlaps too.
* ``all_gather(x, dim)`` / ``all_gather_async(x, dim)``: all-gather along ``dim``; backward: reduce-scatter (sum).
* ``scatter(x, dim)`` (stack entry): keep this rank's chunk; backward: all-gather of the gradient.
* ``gather(x, dim)`` (stack exit): all-gather; backward: keep this rank's chunk of the gradient.
* ``local_slice(t, dim)``: this rank's chunk of a tensor every rank holds whole (a mask); no communication.

Why ``all_gather`` reduces its gradient: each rank uses the *whole* gathered tensor (a pair bias, a projection of
the outer product mean or of triangle multiplication) in a computation on its own slice, so each rank's gradient
of it is a partial sum and the true gradient of a rank's chunk is the sum over ranks (tested against one process
in ``tests/test_dap*.py``; FastFold's asynchronous gather keeps only the local slice with no reduction, which
gives a different gradient). The exit ``gather`` is the opposite case: what follows it (structure module, heads,
loss) runs identically on every rank, so each rank's gradient is already complete.

All of them work on the collectives of :mod:`megatron_protein.parallel.collectives`; nothing here talks to
``torch.distributed`` except through them. ``groups`` defaults to ``scg.current()``.

Uneven sizes: the collectives split only evenly. :func:`padded_size` / :func:`pad` make ``N_seq`` and ``N_res``
multiples of the degree (only when they are not), the padding is masked out by zero masks, and the exit removes it.

Dropout shared along rows or columns (AlphaFold2 supplement 1.11.6): :func:`shared_dropout` draws the mask at the
full, unsplit shape on every rank and keeps the local slice, so every rank (and the one-process model) uses the
same numbers; that needs the ranks' generators in step, which ``scg.init_process_group(..., seed=S)`` arranges.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from megatron_protein.parallel import collectives as C
from megatron_protein.parallel import scg
from megatron_protein.parallel.dp import all_reduce_param_groups

__all__ = [
    "AXIS", "ROW_DIM", "COL_DIM", "DAPHookError",
    "get_world_size", "get_rank_in_group", "is_enabled",
    "row_to_col", "col_to_row", "row_to_col_async", "col_to_row_async",
    "all_gather", "all_gather_async", "scatter", "gather", "local_slice",
    "padded_size", "pad", "shared_dropout", "require_hooks", "grad_sync", "set_async", "synchronous",
]

#: The name of the axis in ``scg.init_process_group(parallel_degree=[..., ('dap', n), ...])``.
AXIS = "dap"
#: The split dimension of the row layout (sequences of the MSA, first residue of the pair).
ROW_DIM = -3
#: The split dimension of the column layout (residues of the MSA, second residue of the pair).
COL_DIM = -2


class DAPHookError(RuntimeError):
    """A module that does not call the DAP/BP hooks was asked to run with dap or bp > 1."""


def _pg(groups: Optional[scg.ParallelGroups]) -> scg.ParallelGroups:
    return groups if groups is not None else scg.current()


def _group(groups: Optional[scg.ParallelGroups]):
    return _pg(groups).group(AXIS)


def get_world_size(groups: Optional[scg.ParallelGroups] = None) -> int:
    """The dap degree n (1 when there is no dap axis)."""
    return _pg(groups).size(AXIS)


def get_rank_in_group(groups: Optional[scg.ParallelGroups] = None) -> int:
    """This process's index in its dap group: which chunk of the split axis it holds."""
    return _pg(groups).rank_in(AXIS)


def is_enabled(groups: Optional[scg.ParallelGroups] = None) -> bool:
    """True when activations are split (dap degree > 1)."""
    return get_world_size(groups) > 1


# ------------------------------------------------------------------------------------------------ layout switches

def row_to_col(x: torch.Tensor, groups: Optional[scg.ParallelGroups] = None) -> torch.Tensor:
    """``[*, A/n, B, c]`` (row layout) -> ``[*, A, B/n, c]`` (column layout); backward: :func:`col_to_row`."""
    return C.all_to_all(x, scatter_dim=COL_DIM, gather_dim=ROW_DIM, group=_group(groups))


def col_to_row(x: torch.Tensor, groups: Optional[scg.ParallelGroups] = None) -> torch.Tensor:
    """``[*, A, B/n, c]`` (column layout) -> ``[*, A/n, B, c]`` (row layout); backward: :func:`row_to_col`."""
    return C.all_to_all(x, scatter_dim=ROW_DIM, gather_dim=COL_DIM, group=_group(groups))


_ASYNC = True


def set_async(enabled: bool) -> bool:
    """Make the ``*_async`` hooks start their collective and return at once (True, the default) or complete it
    before returning (False: the sync mode, for comparison and debugging). Returns the previous setting. The
    values are the same either way; only the overlap differs."""
    global _ASYNC
    previous, _ASYNC = _ASYNC, bool(enabled)
    return previous


@contextlib.contextmanager
def synchronous() -> Iterator[None]:
    """``with dap.synchronous():`` runs every ``*_async`` hook as its synchronous twin (see :func:`set_async`)."""
    previous = set_async(False)
    try:
        yield
    finally:
        set_async(previous)


def _completed(y: torch.Tensor):
    return y, C.AsyncHandle(y)


def row_to_col_async(x: torch.Tensor, groups: Optional[scg.ParallelGroups] = None):
    """Start :func:`row_to_col`; returns ``(y, handle)``. Read ``y`` only through ``y = handle.wait()``.

    FastFold's Duality Async Operation: computation placed between the start and the wait (the pair stack while
    the MSA is re-laid out) overlaps the exchange, in forward and in backward.
    """
    if not _ASYNC:
        return _completed(row_to_col(x, groups))
    return C.all_to_all_async(x, scatter_dim=COL_DIM, gather_dim=ROW_DIM, group=_group(groups))


def col_to_row_async(x: torch.Tensor, groups: Optional[scg.ParallelGroups] = None):
    """Start :func:`col_to_row`; returns ``(y, handle)``. Read ``y`` only through ``y = handle.wait()``."""
    if not _ASYNC:
        return _completed(col_to_row(x, groups))
    return C.all_to_all_async(x, scatter_dim=ROW_DIM, gather_dim=COL_DIM, group=_group(groups))


# ------------------------------------------------------------------------------------------------ gathers

def all_gather(x: torch.Tensor, dim: int, groups: Optional[scg.ParallelGroups] = None) -> torch.Tensor:
    """Every rank's chunk along ``dim`` concatenated; backward: reduce-scatter (sum) of the gradient.

    For tensors every rank then uses whole in its own computation: the pair bias of MSA row attention
    (``dim=-3`` of ``[*, R/n, R, H]``), the triangle biases, the right projection of the outer product mean
    (``dim=-2`` of the column-layout ``[*, S, R/n, c]``), the projections of triangle multiplication.
    """
    return C.all_gather(x, dim, _group(groups))


def all_gather_async(x: torch.Tensor, dim: int, groups: Optional[scg.ParallelGroups] = None):
    """Start :func:`all_gather`; returns ``(y, handle)``; ``y = handle.wait()`` before reading it (FastFold
    starts the pair-bias gather of row attention this way and waits after the QKV projection)."""
    if not _ASYNC:
        return _completed(all_gather(x, dim, groups))
    return C.all_gather_async(x, dim, _group(groups))


def scatter(x: torch.Tensor, dim: int, groups: Optional[scg.ParallelGroups] = None) -> torch.Tensor:
    """Stack entry: keep this rank's chunk of a replicated tensor along ``dim`` (``ROW_DIM`` for MSA and pair).

    Backward: all-gather of the gradient, so the (replicated) embedders before the stack see the whole gradient
    on every rank. ``x.shape[dim]`` must be a multiple of the degree: :func:`pad` first.
    """
    return C.scatter_to_group(x, dim, _group(groups))


def gather(x: torch.Tensor, dim: int, groups: Optional[scg.ParallelGroups] = None) -> torch.Tensor:
    """Stack exit: the whole tensor from every rank's chunk along ``dim``; backward keeps the local chunk (the
    computation after the exit is the same on every rank, so each rank's gradient is already the whole one)."""
    return C.gather_from_group(x, dim, _group(groups))


def local_slice(t: torch.Tensor, dim: int, groups: Optional[scg.ParallelGroups] = None) -> torch.Tensor:
    """This rank's chunk along ``dim`` of a tensor every rank holds whole (a mask); no communication.

    Row layout: ``local_slice(msa_mask, -2)`` of ``[*, S, R]`` gives ``[*, S/n, R]``; column layout:
    ``local_slice(msa_mask, -1)`` gives ``[*, S, R/n]``; the pair mask likewise with -2 (rows) and -1 (columns).
    The chunk is a view (``narrow``); gradients, if any, flow to that part of ``t`` only.
    """
    n = get_world_size(groups)
    if n == 1:
        return t
    if not -t.dim() <= dim < t.dim():
        raise IndexError(f"local_slice: dim {dim} is out of range for a tensor of shape {tuple(t.shape)}")
    dim = dim % t.dim()
    size = t.shape[dim]
    if size % n != 0:
        raise C.CollectiveShapeError(
            f"local_slice: dim {dim} of the tensor of shape {tuple(t.shape)} has size {size}, which does not divide "
            f"over the dap degree {n}; the trunk pads N_seq and N_res to a multiple of {n} (dap.pad) first")
    chunk = size // n
    return t.narrow(dim, get_rank_in_group(groups) * chunk, chunk)


# ------------------------------------------------------------------------------------------------ padding

def padded_size(n: int, groups: Optional[scg.ParallelGroups] = None) -> int:
    """``n`` rounded up to a multiple of the dap degree (``n`` itself at degree 1 or when it already divides)."""
    degree = get_world_size(groups)
    return -(-n // degree) * degree


def pad(x: torch.Tensor, sizes: dict[int, int], value: float = 0.0) -> torch.Tensor:
    """Pad ``x`` at the end of each dim in ``sizes`` (``{dim: new_size}``) with ``value``; no copy when no dim
    grows. Masks padded with 0 make attention, the outer product mean and triangle multiplication ignore the
    padded sequences and residues; the exit slices them off again."""
    widths = [0] * (2 * x.dim())
    grow = False
    for dim, size in sizes.items():
        d = dim % x.dim()
        extra = size - x.shape[d]
        if extra < 0:
            raise ValueError(f"pad: dim {dim} of shape {tuple(x.shape)} is already larger than {size}")
        if extra:
            grow = True
            widths[2 * (x.dim() - 1 - d) + 1] = extra  # F.pad lists (left, right) from the last dim backwards
    if not grow:
        return x
    return F.pad(x, widths, value=value)


# ------------------------------------------------------------------------------------------------ dropout

def shared_dropout(x: torch.Tensor, p: float, shared_dim: int, training: bool, split_dim: Optional[int] = None,
                   groups: Optional[scg.ParallelGroups] = None) -> torch.Tensor:
    """Dropout whose mask is shared along ``shared_dim`` (AlphaFold2's row-/column-wise dropout) under DAP.

    ``split_dim`` is the dim of ``x`` that is split over the dap ranks in the current layout (``ROW_DIM`` or
    ``COL_DIM``), or None. When it is not the shared dim, the mask is drawn at the full (unsplit) size of that dim
    and this rank keeps its chunk: otherwise every rank would draw the same small mask and the columns of
    different ranks would share their dropout pattern (e.g. triangle multiplication "incoming", which runs in
    column layout with a mask shared along rows). At degree 1 this is ``x * dropout(ones(mask_shape))``.
    """
    if not training or p == 0.0:
        return x
    shape = list(x.shape)
    shared = shared_dim % x.dim()
    shape[shared] = 1
    split = None if split_dim is None else split_dim % x.dim()
    n = get_world_size(groups)
    if split is not None and split != shared and n > 1:
        shape[split] *= n
    mask = F.dropout(x.new_ones(shape), p=p, training=True)
    if split is not None and split != shared and n > 1:
        mask = local_slice(mask, split, groups)
    return x * mask


# ------------------------------------------------------------------------------------------------ checks, sync

#: Class attribute that a module sets to True when its forward calls the dap/bp hooks (so it can run on split
#: activations). ``require_hooks`` refuses dap/bp > 1 for any other block.
HOOKS_ATTRIBUTE = "parallel_hooks"


def require_hooks(modules, what: str) -> None:
    """Raise :class:`DAPHookError` (locally, before any collective) unless every module declares
    ``parallel_hooks = True``. ``what`` names the stack for the message."""
    missing = sorted({type(m).__name__ for m in modules if not getattr(m, HOOKS_ATTRIBUTE, False)})
    if missing:
        raise DAPHookError(
            f"{what}: dap or bp degree > 1 needs blocks that call the parallel hooks (megatron_protein.parallel."
            f"dap / bp) and declare {HOOKS_ATTRIBUTE} = True; {', '.join(missing)} does not. Build the model "
            f"with megatron_protein.models.folding's Evoformer blocks, or run with --dap_degree 1 --bp_degree 1")


def grad_sync(param_groups, groups: Optional[scg.ParallelGroups] = None) -> int:
    """All-reduce (SUM) over the dap group the gradients of the parameter groups tagged ``'dap': True``.

    SUM, not mean: each dap rank ran the tagged modules on its slice of the same example's activations, so its
    gradient is that slice's part of the one gradient and the parts add up (the loss itself is computed whole
    on every rank after the exit gather). Call after :func:`bp.grad_sync` and before :func:`dp.grad_sync`.
    Returns the number of collectives (one per tagged group).
    """
    pg = _pg(groups)
    return all_reduce_param_groups(list(param_groups), pg.group(AXIS), pg.size(AXIS), average=False,
                                   select=lambda g: bool(g.get("dap", False)))
