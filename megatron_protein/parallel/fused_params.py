"""Flat parameter and gradient buffers (tensor fusion), so that one collective covers many parameters.

A model has hundreds of small tensors (LayerNorm weights, biases); one all-reduce per tensor pays the collective's
latency hundreds of times. :class:`FusedParameters` packs the parameters of a module into one contiguous buffer per
``(dtype, device, key)`` and the gradients into a twin buffer of the same layout, then points every parameter's
``.data`` and ``.grad`` at views of those buffers. The parameters stay the same ``nn.Parameter`` objects, so an
optimizer built before or after fusing keeps working: its in-place updates write into the flat buffer. This is the
"contiguous grad buffer" of Megatron-LM's ``DistributedDataParallel`` (``main_grad``) and Horovod's tensor fusion,
written for our DP, DAP and BP gradient syncs.

``key`` separates parameters that must be reduced over different groups (for the folding model: replicated over
``dap`` or not), or that belong to different optimizer groups; the default puts every parameter of a dtype in one
buffer. Each buffer is cut into buckets of at most ``bucket_numel`` elements (never splitting a parameter, except
one larger than the bucket, which gets a bucket of its own) so that a collective on one bucket can overlap with
the backward pass of the layers that come before it.

Gradient accumulation: autograd accumulates into an existing ``.grad`` in place (``AccumulateGrad`` adds into the
defined grad when no graph is being built), so the views stay views across micro-batches. Clearing gradients must
keep the views: call :meth:`FusedParameters.zero_grad` (or ``optimizer.zero_grad(set_to_none=False)``). If
something replaced or dropped a ``.grad`` anyway (``optimizer.zero_grad()`` sets grads to ``None`` by default),
:meth:`FusedParameters.reattach_grads` copies the stray gradient back into its view; the DP sync calls it first, so
correctness never depends on the caller remembering.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Iterator, Optional, Union

import torch
from torch import nn

#: Default bucket size in elements (fp32: 16 MiB), of the order Megatron-LM and DDP use (DDP: 25 MiB).
DEFAULT_BUCKET_NUMEL = 4 * 1024 * 1024


@dataclass
class Bucket:
    """A contiguous slice ``[start, end)`` of one :class:`FlatBuffer` and the parameters that live in it."""

    buffer: "FlatBuffer"
    index: int
    start: int
    end: int
    params: list[nn.Parameter]

    @property
    def grad(self) -> torch.Tensor:
        """The gradients of this bucket's parameters, one flat view (what a collective reduces)."""
        return self.buffer.grad[self.start:self.end]

    @property
    def data(self) -> torch.Tensor:
        """The values of this bucket's parameters, one flat view (what a broadcast sends)."""
        return self.buffer.data[self.start:self.end]

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass
class FlatBuffer:
    """One dtype/device/key worth of parameters packed into ``data`` and their gradients into ``grad``."""

    key: Hashable
    dtype: torch.dtype
    device: torch.device
    data: torch.Tensor
    grad: torch.Tensor
    params: list[nn.Parameter]
    names: list[str]
    offsets: list[int]
    buckets: list[Bucket] = field(default_factory=list)

    def param_view(self, i: int) -> torch.Tensor:
        p = self.params[i]
        return self.data[self.offsets[i]:self.offsets[i] + p.numel()].view_as(p)

    def grad_view(self, i: int) -> torch.Tensor:
        p = self.params[i]
        return self.grad[self.offsets[i]:self.offsets[i] + p.numel()].view_as(p)


def _is_view_of(tensor: Optional[torch.Tensor], view: torch.Tensor) -> bool:
    return (tensor is not None and tensor.data_ptr() == view.data_ptr() and tensor.shape == view.shape
            and tensor.stride() == view.stride())


class FusedParameters:
    """Pack the trainable parameters of ``module`` (or of an iterable of ``(name, param)``) into flat buffers.

    Args:
        named_parameters: a module, or ``(name, parameter)`` pairs. Parameters with ``requires_grad=False`` and
            parameters seen twice (tied weights inside one module) are packed once / not at all respectively.
        key: ``key(name, param) -> hashable``; parameters with different keys go to different buffers (e.g. the
            axis they are replicated over, or weight decay on/off). Default: one buffer per dtype and device.
        bucket_numel: maximal elements per bucket (see the module docstring).

    After construction ``buffers`` lists the :class:`FlatBuffer` objects and ``buckets`` every bucket in the order
    the backward pass produces them (last parameters first), which is the order to reduce them in.
    """

    def __init__(self, named_parameters: Union[nn.Module, Iterable[tuple[str, nn.Parameter]]],
                 key: Optional[Callable[[str, nn.Parameter], Hashable]] = None,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL):
        if bucket_numel < 1:
            raise ValueError(f"bucket_numel must be a positive number of elements, got {bucket_numel}")
        if isinstance(named_parameters, nn.Module):
            named_parameters = named_parameters.named_parameters()
        groups: dict[tuple, list[tuple[str, nn.Parameter]]] = {}
        seen: set[int] = set()
        for name, p in named_parameters:
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            group_key = (p.dtype, p.device, key(name, p) if key is not None else None)
            groups.setdefault(group_key, []).append((name, p))
        self.buffers: list[FlatBuffer] = []
        for (dtype, device, user_key), members in groups.items():
            self.buffers.append(self._pack(user_key, dtype, device, members, bucket_numel))
        # Backward produces gradients roughly in reverse parameter order: reduce the last buckets first.
        self.buckets: list[Bucket] = [b for buf in self.buffers for b in reversed(buf.buckets)]

    @staticmethod
    def _pack(user_key, dtype, device, members, bucket_numel) -> FlatBuffer:
        offsets, total = [], 0
        for _, p in members:
            offsets.append(total)
            total += p.numel()
        data = torch.empty(total, dtype=dtype, device=device)
        grad = torch.zeros(total, dtype=dtype, device=device)
        buf = FlatBuffer(key=user_key, dtype=dtype, device=device, data=data, grad=grad,
                         params=[p for _, p in members], names=[n for n, _ in members], offsets=offsets)
        for i, (_, p) in enumerate(members):
            view = buf.param_view(i)
            view.copy_(p.detach())
            p.data = view
            if p.grad is not None:
                buf.grad_view(i).copy_(p.grad)
            p.grad = buf.grad_view(i)
        # Buckets: consecutive parameters until the next one would overflow bucket_numel.
        start, bucket_params = 0, []
        for i, (_, p) in enumerate(members):
            end = offsets[i] + p.numel()
            if bucket_params and end - start > bucket_numel:
                buf.buckets.append(Bucket(buf, len(buf.buckets), start, offsets[i], bucket_params))
                start, bucket_params = offsets[i], []
            bucket_params.append(p)
        if bucket_params:
            buf.buckets.append(Bucket(buf, len(buf.buckets), start, total, bucket_params))
        return buf

    def parameters(self) -> Iterator[nn.Parameter]:
        for buf in self.buffers:
            yield from buf.params

    def zero_grad(self) -> None:
        """Zero every gradient buffer in place (one kernel per buffer) and make sure ``.grad`` are its views."""
        for buf in self.buffers:
            buf.grad.zero_()
            for i, p in enumerate(buf.params):
                if not _is_view_of(p.grad, buf.grad_view(i)):
                    p.grad = buf.grad_view(i)

    def reattach_grads(self) -> int:
        """Put back every ``.grad`` that is no longer a view of its buffer; returns how many were repaired.

        A ``None`` grad becomes a zero view; a grad tensor allocated elsewhere is copied into its view first, so no
        accumulated gradient is lost. Also re-points ``.data`` if something replaced it (e.g. ``load_state_dict``
        with ``assign=True``), copying the new values into the buffer.
        """
        repaired = 0
        for buf in self.buffers:
            for i, p in enumerate(buf.params):
                data_view = buf.param_view(i)
                if not _is_view_of(p.data, data_view):
                    data_view.copy_(p.data)
                    p.data = data_view
                    repaired += 1
                view = buf.grad_view(i)
                if _is_view_of(p.grad, view):
                    continue
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(p.grad)
                p.grad = view
                repaired += 1
        return repaired

    def numel(self) -> int:
        return sum(buf.data.numel() for buf in self.buffers)

    def __repr__(self) -> str:
        parts = ", ".join(f"{buf.dtype}/{buf.key}: {len(buf.params)} params, {buf.data.numel()} elements, "
                          f"{len(buf.buckets)} buckets" for buf in self.buffers)
        return f"FusedParameters({parts})"


# ---------------------------------------------------------------------------------------------------------------
# Optimizer parameter groups, one flat buffer each (the folding model's bp / dap / dp syncs).
# ---------------------------------------------------------------------------------------------------------------

#: id(parameter) -> (weak reference to the parameter, the FlatBuffer holding it). Lets a sync that is handed only
#: an optimizer's ``param_groups`` (the seeds' ``bp.grad_sync(optimizer.param_groups)``) find the flat gradient
#: of a group and reduce it with one collective. Weak references: a dropped model does not stay alive here.
_GROUP_BUFFERS: dict[int, tuple["weakref.ref", FlatBuffer]] = {}


def fuse_param_groups(param_groups: list[dict]) -> FusedParameters:
    """Pack every optimizer parameter group into one flat buffer of its own (HelixFold's tensor fusion).

    ``param_groups`` is a list of dicts with a ``'params'`` list (what ``torch.optim`` takes, or its
    ``optimizer.param_groups``). Each group becomes one :class:`FlatBuffer` with a single bucket, so a sync of a
    group is one collective whatever its size. A parameter in two groups, or a group mixing dtypes or devices, is
    an error naming the group. Returns the :class:`FusedParameters` (its ``zero_grad()`` clears every group).
    """
    seen: dict[int, int] = {}
    named = []
    for index, group in enumerate(param_groups):
        params = list(group["params"])
        kinds = {(p.dtype, p.device) for p in params}
        if len(kinds) > 1:
            raise ValueError(f"parameter group {index} mixes dtypes/devices {sorted(map(str, kinds))}; one flat "
                             "buffer per group needs one dtype and device")
        for p in params:
            if id(p) in seen:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} is in parameter groups {seen[id(p)]} and "
                                 f"{index}; every parameter must be in exactly one group")
            seen[id(p)] = index
            named.append((f"group{index}", p))
    index_of = {id(p): seen[id(p)] for _, p in named}
    fused = FusedParameters(named, key=lambda name, p: index_of[id(p)], bucket_numel=max(1, sum(
        p.numel() for _, p in named)))
    for buf in fused.buffers:
        for p in buf.params:
            _GROUP_BUFFERS[id(p)] = (weakref.ref(p), buf)
    return fused


def group_flat_grad(params: list[nn.Parameter]) -> Optional[torch.Tensor]:
    """The flat gradient buffer that holds exactly ``params`` (packed by :func:`fuse_param_groups`), else None.

    Gradients that something detached from the buffer are put back first (see
    :meth:`FusedParameters.reattach_grads`), so the returned buffer is current.
    """
    if not params:
        return None
    entry = _GROUP_BUFFERS.get(id(params[0]))
    if entry is None or entry[0]() is not params[0]:
        return None
    buf = entry[1]
    if len(buf.params) != len(params) or {id(p) for p in buf.params} != {id(p) for p in params}:
        return None
    for i, p in enumerate(buf.params):
        view = buf.grad_view(i)
        if not _is_view_of(p.grad, view):
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(p.grad)
            p.grad = view
    return buf.grad
