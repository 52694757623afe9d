"""Data parallelism over the ``dp`` axis: bucketed gradient all-reduce on flat buffers, parameter broadcast.

Every dp rank holds a full replica of its model shard (its tp/pp/dap slice) and sees a different part of the global
batch. After the backward passes of all of its micro-batches, a rank's ``.grad`` holds the gradient of its local
mean loss; :meth:`DataParallel.sync_gradients` averages the gradients over the dp group, so every replica ends with
the gradient of the mean loss over the global batch and takes the same optimizer step.

Usage (engineer F's pretraining loop, engineer G's folding loop)::

    pg = scg.init_process_group([('dp', None), ('pp', 2), ('tp', 2)])
    model = build_stage(...)                       # this rank's shard of the model
    ddp = DataParallel(model, groups=pg)           # packs params/grads into flat buffers (fused_params)
    ddp.broadcast_parameters()                     # replicas start equal (from dp rank 0)
    optimizer = torch.optim.AdamW(model.parameters(), ...)
    for batch in loader:
        ddp.zero_grad()
        loss = run_pipeline(...)                   # or: for mb in micro_batches: loss_fn(model(mb)).backward()
        ddp.sync_gradients()                       # one bucketed all-reduce, after the whole accumulation
        optimizer.step()

Why not ``torch.nn.parallel.DistributedDataParallel``: DDP syncs inside ``backward()`` and must be told, through
``no_sync()``, which of the pipeline schedule's backward calls is the last; it assumes it owns every parameter of the
wrapped module, while here the tied word embeddings are also reduced over the pipeline ends and the folding model
reduces some gradients over ``bp`` and ``dap`` before ``dp``. Syncing explicitly, once, after the accumulation keeps
the order of these reductions in one place (``grad_sync``: bp, then dap, then dp) and works the same for every
schedule. The all-reduce works on the flat buffers of :mod:`~megatron_protein.parallel.fused_params` (one
collective per bucket, not per tensor). ``overlap_grad_reduce=True`` additionally starts a bucket's all-reduce from
gradient hooks as soon as the last backward pass has produced all of that bucket's gradients, as Megatron-LM's and
PyTorch's DDP do; wrap every backward but the last in :meth:`DataParallel.no_sync` (``run_pipeline`` takes it as
``no_sync=ddp.no_sync``).

Averaging: gloo has no ``ReduceOp.AVG``, so each bucket is divided by the dp size and then summed (dividing first
also keeps low-precision gradients in range, as Megatron-LM does).

Distributed optimizer (``use_distributed_optimizer=True``, Megatron-LM's ``--use-distributed-optimizer``, ZeRO
stage 1 of Rajbhandari et al. 2020, arXiv:1910.02054): the buckets are padded to a multiple of the dp size and
each dp rank owns one of the dp equal chunks of every bucket (:meth:`DataParallel.shard_bounds`).
:meth:`DataParallel.sync_gradients` then reduce-scatters each bucket instead of all-reducing it (each rank gets
the averaged gradient of its own chunk only: half the traffic of an all-reduce), the optimizer steps its chunks
(:class:`~megatron_protein.training.mixed_precision_optimizer.MixedPrecisionOptimizer`), and
:meth:`DataParallel.gather_parameters` all-gathers the updated chunks into every replica's parameters. The rest
of a chunk's gradient buffer holds partial sums afterwards and must not be read.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_protein.parallel import scg
from megatron_protein.parallel.fused_params import DEFAULT_BUCKET_NUMEL, Bucket, FusedParameters, group_flat_grad


def all_reduce_buckets(buckets: list[Bucket], group, group_size: int, average: bool = True) -> None:
    """All-reduce (sum, or mean when ``average``) the gradient of every bucket over ``group``, one collective each.

    All collectives are started before any is waited on, so gloo/NCCL can pipeline them. ``group=None`` (degree 1)
    does nothing. Buckets must be given in the same order on every rank of the group.
    """
    if group is None or group_size == 1:
        return
    handles = []
    for bucket in buckets:
        if average:
            bucket.grad.div_(group_size)
        handles.append(dist.all_reduce(bucket.grad, group=group, async_op=True))
    for handle in handles:
        handle.wait()


def reduce_scatter_buckets(buckets: list[Bucket], group, group_size: int, group_rank: int,
                           average: bool = True) -> None:
    """Reduce-scatter (sum, or mean when ``average``) the padded gradient of every bucket over ``group``: rank r
    of the group ends with the reduced values of chunk r of each bucket, in place (the other chunks keep partial
    sums). All collectives are started before any is waited on; ``group=None`` does nothing."""
    if group is None or group_size == 1:
        return
    handles = [_start_reduce_scatter(bucket, group, group_size, group_rank, average) for bucket in buckets]
    for handle in handles:
        handle.wait()


def _chunk(tensor: torch.Tensor, group_size: int, group_rank: int) -> torch.Tensor:
    size = tensor.numel() // group_size
    return tensor[group_rank * size:(group_rank + 1) * size]


def _start_reduce_scatter(bucket: Bucket, group, group_size: int, group_rank: int, average: bool):
    grad = bucket.padded_grad
    if grad.numel() % group_size:
        raise ValueError(f"bucket {bucket.index} has {grad.numel()} padded elements, not a multiple of the group "
                         f"size {group_size}: build its FusedParameters with pad_buckets_to={group_size}")
    if average:
        grad.div_(group_size)
    return dist.reduce_scatter_tensor(_chunk(grad, group_size, group_rank), grad, group=group, async_op=True)


def all_gather_buckets(buckets: list[Bucket], group, group_size: int, group_rank: int) -> None:
    """All-gather the parameter chunks of every bucket over ``group`` (rank r contributes chunk r of the padded
    values; afterwards every rank holds all chunks), in place; ``group=None`` does nothing."""
    if group is None or group_size == 1:
        return
    handles = []
    for bucket in buckets:
        data = bucket.padded_data
        handles.append(dist.all_gather_into_tensor(data, _chunk(data, group_size, group_rank), group=group,
                                                   async_op=True))
    for handle in handles:
        handle.wait()


def broadcast_buckets(buckets: list[Bucket], src: int, group) -> None:
    """Broadcast the parameter values of every bucket from global rank ``src`` over ``group`` (None: nothing)."""
    if group is None:
        return
    handles = [dist.broadcast(bucket.data, src=src, group=group, async_op=True) for bucket in buckets]
    for handle in handles:
        handle.wait()


class DataParallel:
    """Gradient averaging and parameter broadcast over one axis (default ``'dp'``) of ``groups``.

    Args:
        module: the model shard this rank trains. Its trainable parameters are packed into flat buffers (their
            ``.data`` and ``.grad`` become views; build the optimizer before or after, either works).
        groups: the :class:`~megatron_protein.parallel.scg.ParallelGroups` (None: ``scg.current()``).
        axis: the axis to average over; ``'dp'`` for data parallelism.
        bucket_numel: maximal elements per all-reduce bucket.
        overlap_grad_reduce: start each bucket's all-reduce from gradient hooks during the last backward pass.
        fused: reuse existing flat buffers instead of packing ``module`` again (e.g. shared with a DAP sync).
        use_distributed_optimizer: reduce-scatter gradients instead of all-reducing them, for an optimizer that
            steps only this rank's chunk of each bucket and then calls :meth:`gather_parameters` (module
            docstring). The buckets must be padded to a multiple of the dp size (done here unless ``fused`` is
            given).
    """

    def __init__(self, module: nn.Module, groups: Optional[scg.ParallelGroups] = None, axis: str = "dp",
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL, overlap_grad_reduce: bool = False,
                 fused: Optional[FusedParameters] = None, use_distributed_optimizer: bool = False):
        self.module = module
        self.groups = groups if groups is not None else scg.current()
        self.axis = axis
        self.group = self.groups.group(axis)
        self.size = self.groups.size(axis)
        self.rank = self.groups.rank_in(axis)
        self.use_distributed_optimizer = use_distributed_optimizer
        self.fused = fused if fused is not None else FusedParameters(
            module, bucket_numel=bucket_numel, pad_buckets_to=self.size if use_distributed_optimizer else 1)
        if use_distributed_optimizer:
            for bucket in self.fused.buckets:
                if bucket.padded_numel % self.size:
                    raise ValueError(f"use_distributed_optimizer: bucket {bucket.index} of {bucket.padded_numel} "
                                     f"elements does not split into {self.size} equal chunks; build the "
                                     f"FusedParameters with pad_buckets_to={self.size}")
        self.overlap_grad_reduce = overlap_grad_reduce
        self._sync_enabled = True
        self._hooks = []
        self._pending: list = []           # (bucket, work) launched by hooks, in launch order
        self._next_bucket = 0              # buckets are launched strictly in self.fused.buckets order
        self._ready: dict[int, set] = {}   # bucket position -> ids of params whose grad is complete
        if overlap_grad_reduce and self.group is not None:
            self._install_hooks()

    # ---------------------------------------------------------------- parameters
    def broadcast_parameters(self) -> None:
        """Make every replica equal to dp rank 0's parameters and buffers (call once, before training)."""
        if self.group is None:
            return
        src = self.groups.ranks(self.axis)[0]
        broadcast_buckets(self.fused.buckets, src, self.group)
        for buf in self.module.buffers():
            dist.broadcast(buf.data, src=src, group=self.group)

    # ---------------------------------------------------------------- gradients
    def zero_grad(self) -> None:
        """Zero the flat gradient buffers (keeps ``.grad`` as views; use instead of ``optimizer.zero_grad()``)."""
        self.fused.zero_grad()
        self._reset_overlap_state()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate locally without starting any all-reduce (all micro-batches but the
        last). Without ``overlap_grad_reduce`` nothing starts during backward anyway; the context is then free."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def sync_gradients(self) -> None:
        """Average every gradient over the dp group (waits for all of it to finish).

        Gradients that an optimizer's ``zero_grad()`` detached from the flat buffer are put back first (by the hooks
        or here), so the result is right whatever cleared them. With ``overlap_grad_reduce`` the buckets already
        started by hooks are only waited on; the others (e.g. holding unused parameters) are started now, in order.
        """
        if self.group is None:
            return
        self.fused.reattach_grads()
        if self.overlap_grad_reduce:
            self._launch_ready_buckets(force=True)
            for _, work in self._pending:
                work.wait()
        elif self.use_distributed_optimizer:
            reduce_scatter_buckets(self.fused.buckets, self.group, self.size, self.rank, average=True)
        else:
            all_reduce_buckets(self.fused.buckets, self.group, self.size, average=True)
        self._reset_overlap_state()

    # ---------------------------------------------------------------- distributed optimizer
    def shard_bounds(self, bucket: Bucket) -> tuple[int, int]:
        """``[lo, hi)``, in the coordinates of ``bucket``'s flat buffer, of the chunk of ``bucket`` this rank owns
        with the distributed optimizer (the whole padded bucket without it, or at dp degree 1)."""
        if not self.use_distributed_optimizer or self.group is None:
            return bucket.start, bucket.padded_end
        size = bucket.padded_numel // self.size
        return bucket.start + self.rank * size, bucket.start + (self.rank + 1) * size

    def gather_parameters(self) -> None:
        """Distributed optimizer: all-gather every bucket's updated parameter chunks, so every replica holds the
        whole model again (after each optimizer step). Nothing to do without it."""
        if self.use_distributed_optimizer:
            all_gather_buckets(self.fused.buckets, self.group, self.size, self.rank)

    # ---------------------------------------------------------------- overlap
    def _install_hooks(self) -> None:
        position_of = {}
        for pos, bucket in enumerate(self.fused.buckets):
            for p in bucket.params:
                position_of[id(p)] = pos
        for buf in self.fused.buffers:
            for i, p in enumerate(buf.params):
                self._hooks.append(p.register_post_accumulate_grad_hook(
                    lambda param, pos=position_of[id(p)], view=buf.grad_view(i): self._on_grad_ready(param, pos, view)))

    def _on_grad_ready(self, param: nn.Parameter, pos: int, view: torch.Tensor) -> None:
        # Something (optimizer.zero_grad() with set_to_none) detached .grad: move it back into the buffer; in
        # main_grad mode add it into the float32 buffer (whichever of this hook and the buffer's own runs first).
        self.fused.absorb_grad(param)
        if not self._sync_enabled:
            return
        if pos < self._next_bucket:
            raise RuntimeError(
                "DataParallel(overlap_grad_reduce=True): a gradient was accumulated into a bucket whose all-reduce "
                "had already started; run every backward pass but the last of a step inside ddp.no_sync() "
                "(run_pipeline(..., no_sync=ddp.no_sync) does this), and call ddp.sync_gradients() once per step")
        self._ready.setdefault(pos, set()).add(id(param))
        self._launch_ready_buckets(force=False)

    def _launch_ready_buckets(self, force: bool) -> None:
        buckets = self.fused.buckets
        while self._next_bucket < len(buckets):
            bucket = buckets[self._next_bucket]
            if not force and len(self._ready.get(self._next_bucket, ())) < len(bucket.params):
                return
            if self.use_distributed_optimizer:
                work = _start_reduce_scatter(bucket, self.group, self.size, self.rank, average=True)
            else:
                bucket.grad.div_(self.size)
                work = dist.all_reduce(bucket.grad, group=self.group, async_op=True)
            self._pending.append((bucket, work))
            self._next_bucket += 1

    def _reset_overlap_state(self) -> None:
        for _, work in self._pending:
            work.wait()
        self._pending, self._next_bucket, self._ready = [], 0, {}

    @property
    def buckets_started(self) -> int:
        """How many buckets' all-reduces the hooks have started since the last sync (for tests and logging)."""
        return len(self._pending)

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


#: Axes that split a model (each rank holds a different shard): parameters are replicated only over the others.
MODEL_SPLITTING_AXES = ("tp", "pp")


def get_world_size(groups: Optional[scg.ParallelGroups] = None) -> int:
    """Degree of the data-parallel axis (the seeds' ``dp.get_world_size()``)."""
    return (groups if groups is not None else scg.current()).size("dp")


def get_rank_in_group(groups: Optional[scg.ParallelGroups] = None) -> int:
    """This process's index along the data-parallel axis (the seeds' ``dp.get_rank_in_group()``)."""
    return (groups if groups is not None else scg.current()).rank_in("dp")


def _replica_axis(groups: scg.ParallelGroups) -> str:
    # With no tp/pp split every rank holds the whole model (the folding model: dp x dap x bp), so the parameters
    # are replicated over the world; otherwise only over dp.
    if any(groups.size(a) > 1 for a in MODEL_SPLITTING_AXES):
        return "dp"
    return "world"


def param_sync(module: nn.Module, groups: Optional[scg.ParallelGroups] = None, axis: Optional[str] = None,
               src_rank: int = 0) -> None:
    """Broadcast ``module``'s parameters and buffers from one rank to every rank that holds a replica of them.

    The seeds' ``dp.param_sync(model, src_rank=0)``. ``axis`` (default: every rank when no axis splits the
    model, i.e. no tp/pp of degree > 1, as for the folding model over dp x dap x bp; else ``'dp'``) is the group
    to broadcast over and ``src_rank`` the index *within that group* of the source (0: its first rank, which for
    the whole world is global rank 0). Call once after building the model and before the first step, so every
    dp, dap and bp rank starts from the same weights even if their generators disagreed.
    """
    groups = groups if groups is not None else scg.current()
    axis = axis if axis is not None else _replica_axis(groups)
    group = groups.group(axis)
    if group is None:
        return
    members = groups.ranks(axis)
    if not 0 <= src_rank < len(members):
        raise ValueError(f"param_sync: src_rank {src_rank} is not an index into the {len(members)} ranks of "
                         f"axis '{axis}'")
    src = members[src_rank]
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=src, group=group)


def all_reduce_param_groups(param_groups: list[dict], group, group_size: int, average: bool,
                            select=lambda param_group: True) -> int:
    """All-reduce (sum, or mean when ``average``) the gradients of the selected optimizer parameter groups.

    One collective per selected group: a group packed by :func:`fused_params.fuse_param_groups` is reduced on
    its flat gradient buffer in place; any other group is flattened into a temporary, reduced and copied back
    (a parameter whose ``.grad`` is None counts as a zero gradient and gets one, so every rank sends the same
    layout). All collectives are started before any is waited on. Returns the number of collectives issued.
    ``group=None`` (degree 1) does nothing.
    """
    if group is None or group_size == 1:
        return 0
    pending = []
    for param_group in param_groups:
        if not select(param_group):
            continue
        params = [p for p in param_group["params"] if p.requires_grad]
        if not params:
            continue
        flat = group_flat_grad(params)
        unpack = None
        if flat is None:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad for p in params]
            flat = torch._utils._flatten_dense_tensors(grads)
            unpack = grads
        if average:
            flat.div_(group_size)
        pending.append((dist.all_reduce(flat, group=group, async_op=True), flat, unpack))
    for work, flat, unpack in pending:
        work.wait()
        if unpack is not None:
            for grad, synced in zip(unpack, torch._utils._unflatten_dense_tensors(flat, unpack)):
                grad.copy_(synced)
    return len(pending)


def grad_sync(fused_or_param_groups, groups: Optional[scg.ParallelGroups] = None, axis: str = "dp",
              average: bool = True) -> None:
    """Average (or sum) gradients over ``axis``: the dp step of the folding model's bp -> dap -> dp sync.

    ``fused_or_param_groups`` is a :class:`FusedParameters` (reduced bucket by bucket) or an optimizer's
    ``param_groups`` (the seeds' ``dp.grad_sync(optimizer.param_groups)``; every group is reduced, one collective
    per group, see :func:`all_reduce_param_groups`). Averaging is right over dp because each dp rank's gradient is
    that of its own shard of the batch's mean loss.
    """
    groups = groups if groups is not None else scg.current()
    if isinstance(fused_or_param_groups, FusedParameters):
        fused_or_param_groups.reattach_grads()
        all_reduce_buckets(fused_or_param_groups.buckets, groups.group(axis), groups.size(axis), average=average)
        return
    all_reduce_param_groups(list(fused_or_param_groups), groups.group(axis), groups.size(axis), average=average)
