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

Mixed precision (Megatron-LM's ``main_grad``): :meth:`FusedParameters.cast_params_` turns the parameter buffers
into bf16 or fp16 while the gradient buffers stay float32. A ``.grad`` can then no longer be a view (torch requires
it to have its parameter's dtype), so each parameter gets ``.main_grad``, the float32 view, and a hook that adds
every gradient autograd produces into it and drops the ``.grad`` (:meth:`FusedParameters.absorb_grad`): gradients
are accumulated over micro-batches and reduced over dp in float32, as Megatron-LM's ``--bf16`` does
(``accumulate_allreduce_grads_in_fp32``).

Sharding (the distributed optimizer): ``pad_buckets_to=dp`` pads each bucket with zeros to a multiple of the dp
degree, so that a bucket splits into dp equal chunks for a reduce-scatter of its gradient and an all-gather of its
parameters; ``own_bucket`` gives chosen parameters a bucket of their own (the tied word embedding, so that the
first and the last pipeline stage cut it into the same chunks). Padding never holds a parameter, stays zero, and
``Bucket.grad``/``Bucket.data`` cover the parameters only (``padded_grad``/``padded_data`` include it).
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
    #: End of the bucket's zero padding (``end`` without padding); ``padded_end - start`` divides by the padding.
    padded_end: Optional[int] = None

    def __post_init__(self):
        if self.padded_end is None:
            self.padded_end = self.end

    @property
    def grad(self) -> torch.Tensor:
        """The gradients of this bucket's parameters, one flat view (what a collective reduces)."""
        return self.buffer.grad[self.start:self.end]

    @property
    def data(self) -> torch.Tensor:
        """The values of this bucket's parameters, one flat view (what a broadcast sends)."""
        return self.buffer.data[self.start:self.end]

    @property
    def padded_grad(self) -> torch.Tensor:
        """The gradients with the bucket's zero padding (what a reduce-scatter splits into equal chunks)."""
        return self.buffer.grad[self.start:self.padded_end]

    @property
    def padded_data(self) -> torch.Tensor:
        """The values with the bucket's zero padding (what an all-gather of equal chunks fills)."""
        return self.buffer.data[self.start:self.padded_end]

    @property
    def numel(self) -> int:
        return self.end - self.start

    @property
    def padded_numel(self) -> int:
        return self.padded_end - self.start


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
        return self.grad[self.offsets[i]:self.offsets[i] + p.numel()].view(p.shape)

    @property
    def split_dtypes(self) -> bool:
        """True when the gradients are kept in another dtype than the parameters (``main_grad`` mode)."""
        return self.grad.dtype != self.data.dtype


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
        pad_buckets_to: pad every bucket with zeros to a multiple of this many elements (the dp degree of a
            reduce-scatter); 1, the default, packs the parameters without gaps.
        own_bucket: ``own_bucket(name, param) -> bool``; True gives the parameter a bucket of its own.

    After construction ``buffers`` lists the :class:`FlatBuffer` objects and ``buckets`` every bucket in the order
    the backward pass produces them (last parameters first), which is the order to reduce them in.
    """

    def __init__(self, named_parameters: Union[nn.Module, Iterable[tuple[str, nn.Parameter]]],
                 key: Optional[Callable[[str, nn.Parameter], Hashable]] = None,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL, pad_buckets_to: int = 1,
                 own_bucket: Optional[Callable[[str, nn.Parameter], bool]] = None):
        if bucket_numel < 1:
            raise ValueError(f"bucket_numel must be a positive number of elements, got {bucket_numel}")
        if pad_buckets_to < 1:
            raise ValueError(f"pad_buckets_to must be a positive number of elements, got {pad_buckets_to}")
        self.pad_buckets_to = pad_buckets_to
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
            self.buffers.append(self._pack(user_key, dtype, device, members, bucket_numel, pad_buckets_to,
                                           own_bucket))
        # Backward produces gradients roughly in reverse parameter order: reduce the last buckets first.
        self.buckets: list[Bucket] = [b for buf in self.buffers for b in reversed(buf.buckets)]
        self._location = {id(p): (buf, i) for buf in self.buffers for i, p in enumerate(buf.params)}
        self._hooks: list = []
        #: main_grad mode: parameters whose float32 gradient view holds no gradient since zero_grad (deferred).
        self._unwritten: set[int] = set()

    @staticmethod
    def _pack(user_key, dtype, device, members, bucket_numel, pad_buckets_to=1, own_bucket=None) -> FlatBuffer:
        # Buckets: consecutive parameters until the next one would overflow bucket_numel; a parameter that
        # own_bucket selects closes the bucket before it and the one it opens.
        groups_of_members: list[list[int]] = []
        current, current_numel, current_alone = [], 0, False
        for i, (name, p) in enumerate(members):
            alone = bool(own_bucket(name, p)) if own_bucket is not None else False
            if current and (alone or current_alone or current_numel + p.numel() > bucket_numel):
                groups_of_members.append(current)
                current, current_numel = [], 0
            current.append(i)
            current_numel += p.numel()
            current_alone = alone
        if current:
            groups_of_members.append(current)
        offsets, spans, total = [0] * len(members), [], 0
        for indices in groups_of_members:
            start = total
            for i in indices:
                offsets[i] = total
                total += members[i][1].numel()
            end = total
            total = start + -(-(end - start) // pad_buckets_to) * pad_buckets_to
            spans.append((start, end, total))
        # Padding must hold zeros (it is reduced, gathered and stepped with the parameters); without it every
        # element is overwritten by a parameter below.
        data = (torch.zeros if pad_buckets_to > 1 else torch.empty)(total, dtype=dtype, device=device)
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
        for indices, (start, end, padded_end) in zip(groups_of_members, spans):
            buf.buckets.append(Bucket(buf, len(buf.buckets), start, end, [members[i][1] for i in indices],
                                      padded_end))
        return buf

    def parameters(self) -> Iterator[nn.Parameter]:
        for buf in self.buffers:
            yield from buf.params

    def zero_grad(self) -> None:
        """Zero every gradient buffer in place (one kernel per buffer) and make sure ``.grad`` are its views.

        In ``main_grad`` mode (``.grad`` is ``None``, the views are ``.main_grad``) the zeroing is deferred: the
        first gradient a parameter receives afterwards is cast into its float32 view (one pass, instead of zeroing
        the buffer and then adding), and :meth:`reattach_grads`, which the DP sync runs first, zeroes the views of
        the parameters that received none. Read ``.main_grad`` after a sync (or a :meth:`reattach_grads`)."""
        for buf in self.buffers:
            split = buf.split_dtypes
            if not split:
                buf.grad.zero_()
            for i, p in enumerate(buf.params):
                if split:
                    p.grad = None
                    self._unwritten.add(id(p))
                elif not _is_view_of(p.grad, buf.grad_view(i)):
                    p.grad = buf.grad_view(i)

    # ------------------------------------------------------------------------------------------ mixed precision
    def cast_params_(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """Keep the parameters in ``dtype`` (bf16 or fp16) and the gradients in their current dtype (float32).

        Every buffer's ``data`` is replaced by a ``dtype`` copy and the parameters' ``.data`` re-pointed to it;
        each parameter gets ``.main_grad`` (its view of the unchanged gradient buffer) and a post-accumulate-grad
        hook that moves each gradient autograd produces into it (:meth:`absorb_grad`). Returns the previous
        ``data`` tensors, one per buffer, so a mixed-precision optimizer can keep them as its float32 main
        parameters without another copy."""
        previous = []
        for buf in self.buffers:
            previous.append(buf.data)
            if dtype == buf.data.dtype:
                continue
            buf.data = buf.data.to(dtype)
            buf.dtype = dtype
            for i, p in enumerate(buf.params):
                p.data = buf.param_view(i)
                if buf.split_dtypes:
                    p.main_grad = buf.grad_view(i)
                    p.grad = None
        if not self._hooks:
            for buf in self.buffers:
                if buf.split_dtypes:
                    for p in buf.params:
                        self._hooks.append(p.register_post_accumulate_grad_hook(self.absorb_grad))
        return previous

    def absorb_grad(self, param: nn.Parameter) -> None:
        """Make ``param.grad`` part of its flat gradient buffer: in ``main_grad`` mode add it into the float32 view
        and drop it; otherwise, if something detached ``.grad`` from the buffer, copy it back into its view and
        point ``.grad`` there again. Idempotent (a second call finds nothing to do), so gradient hooks of several
        owners may all call it."""
        if param.grad is None:
            return
        buf, i = self._location[id(param)]
        view = buf.grad_view(i)
        if buf.split_dtypes:
            if id(param) in self._unwritten:  # the first gradient since zero_grad: cast it in (no zeroing pass)
                view.copy_(param.grad)
                self._unwritten.discard(id(param))
            else:
                view.add_(param.grad)
            param.grad = None
        elif param.grad.data_ptr() != view.data_ptr():
            view.copy_(param.grad)
            param.grad = view

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
                if buf.split_dtypes:  # main_grad mode: a .grad left over is added in, never kept
                    if p.grad is not None:
                        self.absorb_grad(p)
                        repaired += 1
                    if id(p) in self._unwritten:  # no gradient since zero_grad: the deferred zeroing
                        buf.grad_view(i).zero_()
                        self._unwritten.discard(id(p))
                    continue
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
        """Elements of the parameters (the padding of buckets not counted)."""
        return sum(p.numel() for buf in self.buffers for p in buf.params)

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
