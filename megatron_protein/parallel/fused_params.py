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
