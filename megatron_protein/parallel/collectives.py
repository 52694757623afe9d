"""Autograd-aware collectives: the only place where model code talks to ``torch.distributed``.

Every op is a :class:`torch.autograd.Function` whose backward is the *conjugate* collective, in the pairs of
Megatron-LM's tensor-parallel mappings (Shoeybi et al. 2019, "Megatron-LM", section 3, the f and g operators):

==========================  ==================================  ==========================================
op                          forward                             backward
==========================  ==================================  ==========================================
copy_to_group               identity                            all-reduce (sum)
reduce_from_group           all-reduce (sum)                    identity
reduce_from_group_          all-reduce (sum), in place          identity
scatter_to_group(dim)       keep this rank's chunk of ``dim``   all-gather along ``dim``
gather_from_group(dim)      all-gather, concatenate on ``dim``  keep this rank's chunk of ``dim``
reduce_scatter_to_group     reduce-scatter along ``dim``        all-gather along ``dim``
all_gather(dim)             all-gather, concatenate on ``dim``  reduce-scatter along ``dim``
all_to_all(s, g)            split ``s``, exchange, concat ``g`` all_to_all(g, s)
broadcast(src)              every rank gets ``src``'s tensor    gradients summed onto ``src``, 0 elsewhere
==========================  ==================================  ==========================================

``group`` is a process group from :class:`~megatron_protein.parallel.scg.ParallelGroups` (``pg.group('tp')``).
When it is ``None`` or has one rank every op returns its input unchanged, so a single-process run executes the
same code as the parallel one.

Chunks are taken in group-rank order, chunk ``i`` belonging to the ``i``-th rank of the group (the order of
``pg.ranks(axis)``). A dimension that must be split must divide evenly by the group size: there is no implicit
padding here (an uneven split raises :class:`CollectiveShapeError` naming the dimension, its size and the degree).
Callers that need padding (DAP over ``N_res``) pad exactly once where the parallel region starts.

The async variants (:func:`all_to_all_async`, :func:`all_reduce_async`, :func:`gather_from_group_async`,
:func:`all_gather_async`) start
the communication and return ``(tensor, handle)`` at once, so computation that does not need the result overlaps
with it, as FastFold's Evoformer overlaps the MSA all-to-all with the pair stack. ``handle.wait()`` completes the
op in place on ``tensor`` (and returns it). The backward of ``all_to_all_async`` is asynchronous too: the reverse
exchange is started when autograd reaches the ``wait`` and waited on only when it reaches the start, so the
backward overlaps the same computation in reverse; ``all_gather_async`` does the same with the reduce-scatter of
its gradient (the other two have a local backward).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "CollectiveShapeError", "group_size", "group_rank",
    "copy_to_group", "reduce_from_group", "reduce_from_group_", "scatter_to_group", "gather_from_group",
    "reduce_scatter_to_group",
    "all_gather", "all_to_all", "broadcast",
    "AsyncHandle", "all_to_all_async", "all_reduce_async", "gather_from_group_async", "all_gather_async",
]


class CollectiveShapeError(ValueError):
    """A tensor cannot be split evenly over a group (no implicit padding is done)."""


# ---------------------------------------------------------------------------------------------------------------
# Plain (non-differentiable) helpers. Each returns its input unchanged when the group has one rank.
# ---------------------------------------------------------------------------------------------------------------

def group_size(group) -> int:
    """Number of ranks in ``group``; 1 for ``None`` (no communication)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    """This process's index inside ``group``; 0 for ``None``."""
    return 0 if group is None else dist.get_rank(group)


def _normalize_dim(x: torch.Tensor, dim: int, op: str) -> int:
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise IndexError(f"{op}: dim {dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def _check_divisible(x: torch.Tensor, dim: int, world: int, op: str) -> None:
    if x.shape[dim] % world != 0:
        raise CollectiveShapeError(
            f"{op}: dim {dim} of the tensor of shape {tuple(x.shape)} has size {x.shape[dim]}, which does not "
            f"divide evenly over a group of degree {world}; uneven splits are not supported, pad dim {dim} to a "
            f"multiple of {world} first")


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    # Out of place: the caller's tensor may be saved for its own backward.
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _split(x: torch.Tensor, dim: int, group, op: str) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    _check_divisible(x, dim, world, op)
    return x.chunk(world, dim)[group_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    # all_gather_single concatenates along dim 0: gather into [world * n0, ...], then lay the chunks along ``dim``.
    buffer = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_single(buffer, x, group=group)
    if dim == 0:
        return buffer
    return torch.cat(buffer.chunk(world, 0), dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group, op: str) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    _check_divisible(x, dim, world, op)
    # reduce_scatter_single splits along dim 0: put the chunks of ``dim`` first, [world * chunk_0, ...].
    chunk_shape = list(x.shape)
    chunk_shape[dim] //= world
    if dim == 0:
        stacked = x.contiguous()
    else:
        stacked = torch.cat(x.chunk(world, dim), dim=0)
    out = torch.empty(chunk_shape, dtype=x.dtype, device=x.device)
    dist.reduce_scatter_single(out, stacked, group=group)
    return out


def _all_to_all_start(x: torch.Tensor, scatter_dim: int, gather_dim: int, group, async_op: bool):
    """Start an all-to-all; return (buffer, work, send).

    ``buffer`` is the final result when ``gather_dim == 0``, else ``[world, *chunk]`` for
    :func:`_all_to_all_finish`; ``send`` must stay alive until ``work`` completes.
    """
    world = group_size(group)
    _check_divisible(x, scatter_dim, world, "all_to_all")
    # all_to_all_single sends chunk j of dim 0 to rank j and concatenates what it receives along dim 0.
    send = x.contiguous() if scatter_dim == 0 else torch.stack(x.chunk(world, scatter_dim)).contiguous()
    chunk_shape = list(x.shape)
    chunk_shape[scatter_dim] //= world
    if gather_dim == 0:
        out_shape = [world * chunk_shape[0], *chunk_shape[1:]]   # received chunks concatenated on dim 0: final
    else:
        out_shape = [world, *chunk_shape]                        # chunk j from rank j, laid on gather_dim later
    out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    work = dist.all_to_all_single(out, send, group=group, async_op=async_op)
    return out, work, send


def _all_to_all_finish(buffer: torch.Tensor, gather_dim: int) -> torch.Tensor:
    if gather_dim == 0:
        return buffer
    return torch.cat(buffer.unbind(0), dim=gather_dim)


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    buffer, _, _ = _all_to_all_start(x, scatter_dim, gather_dim, group, async_op=False)
    return _all_to_all_finish(buffer, gather_dim)


def _all_to_all_shape(x: torch.Tensor, scatter_dim: int, gather_dim: int, world: int) -> list[int]:
    shape = list(x.shape)
    shape[scatter_dim] //= world
    shape[gather_dim] *= world
    return shape


# ---------------------------------------------------------------------------------------------------------------
# Autograd functions (conjugate pairs) and their public wrappers.
# ---------------------------------------------------------------------------------------------------------------

class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ReduceFromGroupInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        dist.all_reduce(x, group=group)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _split(x, dim, group, "scatter_to_group")

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.dim, ctx.group, "gather_from_group (backward)"), None, None


class _ReduceScatterToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group, "reduce_scatter_to_group")

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.dim, ctx.group), None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.dim, ctx.group, "all_gather (backward)"), None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group):
        ctx.scatter_dim, ctx.gather_dim, ctx.group = scatter_dim, gather_dim, group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad, ctx.gather_dim, ctx.scatter_dim, ctx.group), None, None, None


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, src, group):
        ctx.src, ctx.group = src, group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.broadcast(out, src=src, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        summed = grad.clone(memory_format=torch.contiguous_format)
        dist.reduce(summed, dst=ctx.src, group=ctx.group)
        if dist.get_rank() != ctx.src:
            summed = torch.zeros_like(grad)  # this rank's input never reached the output
        return summed, None, None


def _trivial(group) -> bool:
    return group is None or group_size(group) == 1


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a parallel region with a replicated tensor (Megatron's f operator).

    Forward: identity. Backward: all-reduce (sum) of the gradient over ``group``, because each rank's branch of
    the region contributed a partial gradient to the same replicated input.
    """
    if _trivial(group):
        return x
    return _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a parallel region by summing partial results (Megatron's g operator, the conjugate of copy).

    Forward: all-reduce (sum) over ``group``. Backward: identity (every rank receives the full gradient).
    """
    if _trivial(group):
        return x
    return _ReduceFromGroup.apply(x, group)


def reduce_from_group_(x: torch.Tensor, group) -> torch.Tensor:
    """In-place :func:`reduce_from_group` for a temporary the caller owns (a row-parallel partial product).

    Saves the copy of the out-of-place op (the TP layers use it, as Megatron does). ``x`` is overwritten by the
    sum and returned; autograd records the in-place update, so if anything had saved ``x`` for its backward,
    that backward fails with a version error instead of using the overwritten values. Falls back to the
    out-of-place op when ``x`` is not contiguous or is a leaf that requires grad.
    """
    if _trivial(group):
        return x
    if not x.is_contiguous() or (x.is_leaf and x.requires_grad):
        return _ReduceFromGroup.apply(x, group)
    return _ReduceFromGroupInPlace.apply(x, group)


def scatter_to_group(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Keep this rank's chunk of a replicated tensor along ``dim``.

    Forward: split ``dim`` into ``group_size`` equal chunks and keep chunk ``group_rank`` (no communication).
    Backward: all-gather the gradient chunks along ``dim``. ``x.shape[dim]`` must divide by the group size.
    """
    if _trivial(group):
        return x
    return _ScatterToGroup.apply(x, _normalize_dim(x, dim, "scatter_to_group"), group)


def gather_from_group(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Assemble the full tensor from every rank's chunk along ``dim`` (conjugate of :func:`scatter_to_group`).

    Forward: all-gather and concatenate along ``dim`` in group-rank order (every chunk must have the same shape).
    Backward: keep this rank's chunk of the gradient (the output is replicated, so each rank's copy of the
    gradient is already the full one).
    """
    if _trivial(group):
        return x
    return _GatherFromGroup.apply(x, _normalize_dim(x, dim, "gather_from_group"), group)


def reduce_scatter_to_group(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum partial tensors over ``group`` and keep this rank's chunk along ``dim``.

    Forward: reduce-scatter (sum) along ``dim``. Backward: all-gather the gradient along ``dim``.
    Conjugate of :func:`all_gather`; the pair used by sequence parallelism (Korthikanti et al. 2022).
    """
    if _trivial(group):
        return x
    return _ReduceScatterToGroup.apply(x, _normalize_dim(x, dim, "reduce_scatter_to_group"), group)


def all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """All-gather whose gradient is reduce-scattered (conjugate of :func:`reduce_scatter_to_group`).

    Forward: all-gather and concatenate along ``dim``. Backward: reduce-scatter (sum) of the gradient along
    ``dim``: use it when every rank computes a *different* function of the gathered tensor (so the gradients of
    the ranks must be summed), unlike :func:`gather_from_group`, whose output feeds a replicated computation.
    """
    if _trivial(group):
        return x
    return _AllGather.apply(x, _normalize_dim(x, dim, "all_gather"), group)


def all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    """Re-shard a tensor from ``gather_dim`` to ``scatter_dim`` (the DAP transposition, FastFold's row_to_col).

    Each rank holds a chunk along ``gather_dim``; afterwards it holds the full ``gather_dim`` and its chunk of
    ``scatter_dim``. Forward: split ``scatter_dim`` into ``group_size`` chunks, send chunk ``j`` to rank ``j``,
    concatenate the received chunks along ``gather_dim`` in group-rank order.
    Backward: ``all_to_all(grad, scatter_dim=gather_dim, gather_dim=scatter_dim)``.
    Shape: ``[..., S, ..., G/p, ...] -> [..., S/p, ..., G, ...]``; ``S`` must divide by ``p``.
    """
    if _trivial(group):
        return x
    scatter_dim = _normalize_dim(x, scatter_dim, "all_to_all")
    gather_dim = _normalize_dim(x, gather_dim, "all_to_all")
    if scatter_dim == gather_dim:
        raise ValueError(f"all_to_all: scatter_dim and gather_dim are both {scatter_dim}; they must differ")
    return _AllToAll.apply(x, scatter_dim, gather_dim, group)


def broadcast(x: torch.Tensor, src: int, group) -> torch.Tensor:
    """Give every rank of ``group`` the tensor of global rank ``src`` (branch parallelism hands results over).

    Forward: broadcast from ``src`` (``x`` on the other ranks only supplies shape and dtype and must match).
    Backward: the gradients of all ranks are summed onto ``src``; the other ranks' inputs get zero gradient,
    since they did not reach the output.
    """
    if _trivial(group):
        return x
    members = dist.get_process_group_ranks(group)
    if src not in members:
        raise ValueError(f"broadcast: src is global rank {src}, which is not in the group (ranks {members})")
    return _Broadcast.apply(x, src, group)


# ---------------------------------------------------------------------------------------------------------------
# Asynchronous variants.
# ---------------------------------------------------------------------------------------------------------------

class _AsyncState:
    """What the start and the wait of one async op share, forward and backward."""

    __slots__ = ("work", "buffer", "keep", "grad_work", "grad_buffer", "grad_keep", "waited")

    def __init__(self):
        self.work = self.buffer = self.keep = None
        self.grad_work = self.grad_buffer = self.grad_keep = None
        self.waited = False


class AsyncHandle:
    """Completes an async collective: ``handle.wait()`` finishes the op in place on its tensor and returns it.

    Until ``wait()`` the tensor returned with the handle holds garbage and must not be read. (An op that saved it
    for backward before ``wait()`` also fails at backward with autograd's in-place version error.) ``wait()`` is
    idempotent: a second call returns the same tensor.
    """

    def __init__(self, tensor: torch.Tensor, finish=None):
        self._tensor = tensor
        self._finish = finish

    def wait(self) -> torch.Tensor:
        if self._finish is not None:
            self._tensor = self._finish(self._tensor)
            self._finish = None
        return self._tensor


class _AllToAllAsyncStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group, state):
        ctx.scatter_dim, ctx.gather_dim, ctx.state = scatter_dim, gather_dim, state
        state.buffer, state.work, state.keep = _all_to_all_start(x, scatter_dim, gather_dim, group, async_op=True)
        if gather_dim == 0:
            return state.buffer  # all_to_all_single writes the final layout directly
        return torch.empty(_all_to_all_shape(x, scatter_dim, gather_dim, group_size(group)),
                           dtype=x.dtype, device=x.device)

    @staticmethod
    def backward(ctx, grad_placeholder):
        state = ctx.state
        if state.grad_work is None:
            raise RuntimeError("all_to_all_async: autograd reached the start of the exchange without passing its "
                               "wait; use the tensor returned by handle.wait(), never the result before wait()")
        state.grad_work.wait()
        grad = _all_to_all_finish(state.grad_buffer, ctx.scatter_dim)
        state.grad_work = state.grad_buffer = state.grad_keep = None
        return grad, None, None, None, None


class _AllToAllAsyncWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, result, scatter_dim, gather_dim, group, state):
        ctx.scatter_dim, ctx.gather_dim, ctx.group, ctx.state = scatter_dim, gather_dim, group, state
        state.work.wait()
        if gather_dim != 0:
            torch.cat(state.buffer.unbind(0), dim=gather_dim, out=result)
        state.work = state.buffer = state.keep = None
        ctx.mark_dirty(result)
        return result

    @staticmethod
    def backward(ctx, grad):
        # Start the reverse exchange now; _AllToAllAsyncStart.backward waits for it, so the backward of whatever
        # ran between start and wait in the forward overlaps with it.
        state = ctx.state
        state.grad_buffer, state.grad_work, state.grad_keep = _all_to_all_start(
            grad, ctx.gather_dim, ctx.scatter_dim, ctx.group, async_op=True)
        return grad, None, None, None, None  # placeholder of the right shape; the real gradient is in state


def all_to_all_async(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> tuple[torch.Tensor, AsyncHandle]:
    """Start :func:`all_to_all` and return ``(result, handle)`` at once; ``handle.wait()`` completes ``result``.

    Forward: the exchange runs while the caller computes; ``handle.wait()`` blocks until it is done and lays the
    received chunks along ``gather_dim`` (in place on ``result``, which it also returns). Backward: the reverse
    all-to-all starts when autograd reaches the wait and is waited on when it reaches the start. Do not modify
    ``x`` in place before ``wait()``.
    """
    if _trivial(group):
        return x, AsyncHandle(x)
    scatter_dim = _normalize_dim(x, scatter_dim, "all_to_all_async")
    gather_dim = _normalize_dim(x, gather_dim, "all_to_all_async")
    if scatter_dim == gather_dim:
        raise ValueError(f"all_to_all_async: scatter_dim and gather_dim are both {scatter_dim}; they must differ")
    state = _AsyncState()
    result = _AllToAllAsyncStart.apply(x, scatter_dim, gather_dim, group, state)
    return result, AsyncHandle(
        result, lambda r: _AllToAllAsyncWait.apply(r, scatter_dim, gather_dim, group, state))


class _AllReduceAsyncStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, state):
        out = x.clone(memory_format=torch.contiguous_format)
        state.work = dist.all_reduce(out, group=group, async_op=True)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _AllReduceAsyncWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, result, state):
        state.work.wait()
        state.work = None
        ctx.mark_dirty(result)
        return result

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_reduce_async(x: torch.Tensor, group) -> tuple[torch.Tensor, AsyncHandle]:
    """Start :func:`reduce_from_group` and return ``(result, handle)`` at once; ``handle.wait()`` completes it.

    Forward: all-reduce (sum) of a copy of ``x``, overlapping with the caller's computation until ``wait()``.
    Backward: identity, as for :func:`reduce_from_group` (nothing to communicate or overlap).
    """
    if _trivial(group):
        return x, AsyncHandle(x)
    state = _AsyncState()
    result = _AllReduceAsyncStart.apply(x, group, state)
    return result, AsyncHandle(result, lambda r: _AllReduceAsyncWait.apply(r, state))


def _start_all_gather(x: torch.Tensor, dim: int, group, state: "_AsyncState") -> torch.Tensor:
    """Start the async all-gather of ``x`` along ``dim`` into ``state``; return the tensor the result will fill."""
    world = group_size(group)
    x = x.contiguous()
    # all_gather_single concatenates along dim 0; for dim 0 that is the final layout, written in place.
    state.buffer = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    state.keep = x
    state.work = dist.all_gather_single(state.buffer, x, group=group, async_op=True)
    if dim == 0:
        return state.buffer
    shape = list(x.shape)
    shape[dim] *= world
    return torch.empty(shape, dtype=x.dtype, device=x.device)


def _finish_all_gather(result: torch.Tensor, dim: int, group, state: "_AsyncState") -> None:
    """Wait for :func:`_start_all_gather` and lay the gathered chunks out along ``dim`` in ``result``."""
    state.work.wait()
    if dim != 0:
        torch.cat(state.buffer.chunk(group_size(group), 0), dim=dim, out=result)
    state.work = state.buffer = state.keep = None


class _GatherAsyncStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, state):
        ctx.dim, ctx.group = dim, group
        return _start_all_gather(x, dim, group, state)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.dim, ctx.group, "gather_from_group_async (backward)"), None, None, None


class _GatherAsyncWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, result, dim, group, state):
        _finish_all_gather(result, dim, group, state)
        ctx.mark_dirty(result)
        return result

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None


def gather_from_group_async(x: torch.Tensor, dim: int, group) -> tuple[torch.Tensor, AsyncHandle]:
    """Start :func:`gather_from_group` and return ``(result, handle)`` at once; ``handle.wait()`` completes it.

    Forward: all-gather along ``dim`` overlapping the caller's computation until ``wait()`` (FastFold gathers the
    left projection of the outer product mean this way). Backward: keep this rank's chunk of the gradient, as
    for :func:`gather_from_group` (local, nothing to overlap).
    """
    if _trivial(group):
        return x, AsyncHandle(x)
    dim = _normalize_dim(x, dim, "gather_from_group_async")
    state = _AsyncState()
    result = _GatherAsyncStart.apply(x, dim, group, state)
    return result, AsyncHandle(result, lambda r: _GatherAsyncWait.apply(r, dim, group, state))


class _AllGatherAsyncStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, state):
        ctx.dim, ctx.state = dim, state
        return _start_all_gather(x, dim, group, state)

    @staticmethod
    def backward(ctx, grad_placeholder):
        state = ctx.state
        if state.grad_work is None:
            raise RuntimeError("all_gather_async: autograd reached the start of the gather without passing its "
                               "wait; use the tensor returned by handle.wait(), never the result before wait()")
        state.grad_work.wait()
        grad = state.grad_buffer
        state.grad_work = state.grad_buffer = state.grad_keep = None
        return grad, None, None, None


class _AllGatherAsyncWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, result, dim, group, state):
        ctx.dim, ctx.group, ctx.state = dim, group, state
        _finish_all_gather(result, dim, group, state)
        ctx.mark_dirty(result)
        return result

    @staticmethod
    def backward(ctx, grad):
        # Start the reduce-scatter of the gradient now; _AllGatherAsyncStart.backward waits for it, so it overlaps
        # the backward of whatever ran between the start and the wait in the forward.
        state, world, dim = ctx.state, group_size(ctx.group), ctx.dim
        _check_divisible(grad, dim, world, "all_gather_async (backward)")
        chunk_shape = list(grad.shape)
        chunk_shape[dim] //= world
        stacked = grad.contiguous() if dim == 0 else torch.cat(grad.chunk(world, dim), dim=0)
        state.grad_buffer = torch.empty(chunk_shape, dtype=grad.dtype, device=grad.device)
        state.grad_keep = stacked
        state.grad_work = dist.reduce_scatter_single(state.grad_buffer, stacked, group=ctx.group, async_op=True)
        return grad, None, None, None  # placeholder of the right shape; the real gradient is in state


def all_gather_async(x: torch.Tensor, dim: int, group) -> tuple[torch.Tensor, AsyncHandle]:
    """Start :func:`all_gather` and return ``(result, handle)`` at once; ``handle.wait()`` completes ``result``.

    Forward: all-gather along ``dim`` overlapping the caller's computation until ``wait()`` (FastFold gathers the
    pair bias of MSA row attention this way, waiting after the QKV projection). Backward: the reduce-scatter (sum)
    of the gradient, as for :func:`all_gather` (every rank used the whole gathered tensor differently), started
    when autograd reaches the wait and waited on when it reaches the start, so it overlaps too.
    """
    if _trivial(group):
        return x, AsyncHandle(x)
    dim = _normalize_dim(x, dim, "all_gather_async")
    state = _AsyncState()
    result = _AllGatherAsyncStart.apply(x, dim, group, state)
    return result, AsyncHandle(result, lambda r: _AllGatherAsyncWait.apply(r, dim, group, state))
