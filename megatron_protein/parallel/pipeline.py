"""Pipeline parallelism over the ``pp`` axis: stage splitting, GPipe and 1F1B schedules, tied first/last weights.

A model of L layers is cut into ``pp`` contiguous stages (:func:`stage_layer_range`); each rank of a pipeline
builds only its stage. A global batch is split into M micro-batches that flow through the stages: stage s receives
the activation of micro-batch i from stage s-1, runs its layers and sends the result to stage s+1; the last stage
computes the loss. The backward pass runs the other way, sending the gradient of each received activation back.

Schedules (:func:`run_pipeline`, ``schedule=``):

* ``'gpipe'`` (Huang et al. 2019, GPipe): all M forwards, then all M backwards. Simple, but every stage holds the
  activations of all M micro-batches at once.
* ``'1f1b'`` (one-forward-one-backward of PipeDream, Narayanan et al. 2019, with a flush after every batch:
  PipeDream-Flush, Narayanan et al. 2021 "Memory-Efficient Pipeline-Parallel DNN Training"; Megatron-LM's default
  non-interleaved schedule, Narayanan et al. 2021 "Efficient Large-Scale Language Model Training on GPU Clusters",
  section 2.2.1): stage s runs ``min(pp - s - 1, M)`` warm-up forwards, then alternates one forward and one
  backward, then drains the remaining backwards. A stage holds at most ``pp - s`` micro-batches of activations
  instead of M, for the same bubble ``(pp - 1) / M`` as GPipe.

Both give the same gradients: every micro-batch loss is scaled by 1/M before its backward pass and autograd
accumulates into ``.grad``, so after the schedule ``.grad`` is the gradient of the mean micro-batch loss (the mean
loss over the global batch when micro-batches are of equal weight); with data parallelism
:meth:`~megatron_protein.parallel.dp.DataParallel.sync_gradients` then averages over the dp replicas.

The stage contract: ``forward_step(stage_input, micro_batch) -> output``. ``stage_input`` is ``None`` on the first
stage (it reads its input from the micro-batch dict, e.g. ``micro_batch['tokens']``) and the activation received
from the previous stage elsewhere. Every stage gets the whole micro-batch dict, so per-micro-batch inputs that all
stages need (attention mask, position ids) are read locally and never sent. On the last stage the output goes to
``loss_fn(output, micro_batch) -> scalar loss``.

Activation shapes: give ``activation_shape`` (the shape of the tensor every stage sends, e.g.
``(micro_batch_size, seq_length, hidden)``) when it is fixed, as it is for BERT pretraining; this costs nothing.
With ``activation_shape=None`` each forward send is preceded by a small header with the shape, for inputs whose
shape varies between micro-batches (one extra message per micro-batch and stage boundary). Gradients need no header:
the gradient of an activation has the activation's shape, which both neighbours know.

Communication is our own point-to-point layer (:class:`P2PCommunicator`) on ``torch.distributed`` isend/irecv over
the pp group, which gloo and NCCL both support. Each exchange posts all its sends and receives before waiting on any
(like Megatron-LM's ``_communicate``), so the paired steady-state exchanges of adjacent stages cannot deadlock. We do
not use ``torch.distributed.pipelining``: its stages own the loss scaling and hand gradient sync to DDP/FSDP through
``no_sync`` wrappers, whereas our gradients must stay in the flat buffers that our own DP, the tied-embedding sum
over the pipeline ends and the folding model's bp/dap/dp syncs reduce after the schedule; and a 200-line schedule
whose order of sends can be read is easier to debug than a tracer.

Tied weights: BERT's MLM head reuses the word embeddings of the first stage. With pp > 1 the last stage keeps its own
copy (``word_embeddings_for_head`` in Megatron checkpoints); :func:`sync_tied_parameters` makes the copies equal at
start (broadcast from the first stage) and :func:`all_reduce_tied_gradients` sums their gradients over the
``'pp_ends'`` group after the schedule, so both copies get the gradient of the single tied weight of the unsplit
model and stay equal after identical optimizer steps. With data parallelism the step reads::

    loss = run_pipeline(stage, micro_batches, loss_fn, activation_shape, no_sync=ddp.no_sync)
    ddp.sync_gradients()                          # average over dp (waits for overlapped buckets)
    all_reduce_tied_gradients(tied_params)        # then sum the tied copies over the pipeline ends
    optimizer.step()
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_protein.parallel import scg

SCHEDULES = ("gpipe", "1f1b")
_MAX_HEADER_DIMS = 8


def stage_layer_range(num_layers: int, pp_size: int, pp_rank: int) -> range:
    """The contiguous range of global layer indices that pipeline stage ``pp_rank`` of ``pp_size`` holds.

    Layers are split as evenly as possible; when ``pp_size`` does not divide ``num_layers`` the last
    ``num_layers % pp_size`` stages get one layer more. The later stages are the cheaper place for it: under 1F1B,
    stage s keeps up to ``pp - s`` micro-batches of activations alive, so the first stage is the memory-bound one,
    and BERT's first stage also holds the embedding. Example: 10 layers on 4 stages -> 2, 2, 3, 3.
    """
    if pp_size < 1:
        raise ValueError(f"pp_size must be >= 1, got {pp_size}")
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank must be in [0, {pp_size}), got {pp_rank}")
    if num_layers < pp_size:
        raise ValueError(f"cannot split {num_layers} layers into {pp_size} pipeline stages: every stage needs at "
                         f"least one layer; use pp <= {num_layers} or more layers")
    base, extra = divmod(num_layers, pp_size)
    first_long = pp_size - extra   # stages [first_long, pp_size) hold base + 1 layers
    start = pp_rank * base + max(0, pp_rank - first_long)
    count = base + (1 if pp_rank >= first_long else 0)
    return range(start, start + count)


class P2PCommunicator:
    """Sends activations to the next stage and gradients to the previous one, over the pp group.

    ``exchange`` posts every send and receive of one step (``batch_isend_irecv``) before waiting on any, so two
    neighbours that each send to and receive from the other in the same step cannot block each other. Between one
    pair of ranks, messages in one direction are matched in order, so no tags are needed.
    """

    def __init__(self, groups: scg.ParallelGroups, activation_shape: Optional[Sequence[int]],
                 dtype: torch.dtype):
        self.group = groups.group("pp")
        ranks = groups.ranks("pp")
        me = groups.rank_in("pp")
        self.prev_rank = ranks[me - 1] if me > 0 else None
        self.next_rank = ranks[me + 1] if me < len(ranks) - 1 else None
        self.activation_shape = tuple(activation_shape) if activation_shape is not None else None
        self.dtype = dtype
        self.device = groups.device

    def _header_exchange(self, send_next: Optional[torch.Tensor], recv_prev: bool) -> Optional[tuple[int, ...]]:
        ops = []
        if send_next is not None:
            if send_next.dim() > _MAX_HEADER_DIMS:
                raise ValueError(f"pipeline activations may have at most {_MAX_HEADER_DIMS} dims, got shape "
                                 f"{tuple(send_next.shape)}")
            header = torch.zeros(_MAX_HEADER_DIMS + 1, dtype=torch.int64, device=self.device)
            header[0] = send_next.dim()
            header[1:1 + send_next.dim()] = torch.tensor(send_next.shape, dtype=torch.int64)
            ops.append(dist.P2POp(dist.isend, header, self.next_rank, self.group))
        received = None
        if recv_prev:
            received = torch.empty(_MAX_HEADER_DIMS + 1, dtype=torch.int64, device=self.device)
            ops.append(dist.P2POp(dist.irecv, received, self.prev_rank, self.group))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        if received is None:
            return None
        ndim = int(received[0])
        return tuple(int(d) for d in received[1:1 + ndim])

    def exchange(self, send_next: Optional[torch.Tensor] = None, send_prev: Optional[torch.Tensor] = None,
                 recv_prev: bool = False, recv_next_shape: Optional[Sequence[int]] = None,
                 ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """One communication step; returns ``(from_prev, from_next)``.

        ``send_next``: activation for the next stage. ``send_prev``: gradient for the previous stage.
        ``recv_prev``: receive an activation from the previous stage. ``recv_next_shape``: receive a gradient of
        this shape from the next stage. Ignored directions at the pipeline ends (no neighbour) are no-ops.
        """
        if self.next_rank is None:
            send_next, recv_next_shape = None, None
        if self.prev_rank is None:
            send_prev, recv_prev = None, False
        if self.group is None:
            return None, None
        prev_shape = self.activation_shape
        if prev_shape is None and (send_next is not None or recv_prev):
            prev_shape = self._header_exchange(send_next, recv_prev)
        elif send_next is not None and tuple(send_next.shape) != prev_shape:
            raise ValueError(f"stage output has shape {tuple(send_next.shape)} but activation_shape is "
                             f"{prev_shape}; pass the right activation_shape or None to send shapes")
        ops, from_prev, from_next = [], None, None
        if send_next is not None:
            ops.append(dist.P2POp(dist.isend, send_next.detach().to(self.dtype).contiguous(), self.next_rank,
                                  self.group))
        if send_prev is not None:
            ops.append(dist.P2POp(dist.isend, send_prev.detach().to(self.dtype).contiguous(), self.prev_rank,
                                  self.group))
        if recv_prev:
            from_prev = torch.empty(prev_shape, dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, from_prev, self.prev_rank, self.group))
        if recv_next_shape is not None:
            from_next = torch.empty(tuple(recv_next_shape), dtype=self.dtype, device=self.device)
            ops.append(dist.P2POp(dist.irecv, from_next, self.next_rank, self.group))
        if ops:
            # One batch: NCCL runs the sends and receives of a step as one group (no ordering deadlock between
            # neighbours sending to each other); gloo posts them one by one. Either way all are posted first.
            for request in dist.batch_isend_irecv(ops):
                request.wait()
        if from_prev is not None:
            from_prev.requires_grad_(True)
        return from_prev, from_next


class _Schedule:
    """The state both schedules share: one stage's forward and backward steps and its in-flight micro-batches."""

    def __init__(self, forward_step, loss_fn, micro_batches, comm: P2PCommunicator, groups: scg.ParallelGroups,
                 no_sync: Optional[Callable[[], ContextManager]]):
        self.forward_step = forward_step
        self.loss_fn = loss_fn
        self.micro_batches = micro_batches
        self.comm = comm
        self.is_first = groups.is_first("pp")
        self.is_last = groups.is_last("pp")
        self.num_micro_batches = len(micro_batches)
        self.no_sync = no_sync
        self.losses: list[torch.Tensor] = []
        self.backwards_done = 0
        self.in_flight = 0        # micro-batches whose activations this stage holds (forward done, backward not)
        self.max_in_flight = 0

    def forward(self, index: int, stage_input: Optional[torch.Tensor]) -> torch.Tensor:
        output = self.forward_step(stage_input, self.micro_batches[index])
        if self.is_last:
            loss = self.loss_fn(output, self.micro_batches[index])
            if loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
            self.losses.append(loss.detach())
            output = loss / self.num_micro_batches
        if torch.is_grad_enabled():
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return output

    def backward(self, stage_input: Optional[torch.Tensor], output: torch.Tensor,
                 output_grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        self.backwards_done += 1
        last = self.backwards_done == self.num_micro_batches
        context = self.no_sync() if (self.no_sync is not None and not last) else contextlib.nullcontext()
        if output_grad is not None:
            output_grad = output_grad.to(output.dtype)  # the wire dtype may differ from the compute dtype
        with context:
            torch.autograd.backward(output, grad_tensors=output_grad)
        self.in_flight -= 1
        if stage_input is None:
            return None
        if stage_input.grad is None:
            raise RuntimeError("the stage output does not depend on the activation received from the previous "
                               "stage, so there is no gradient to send back; forward_step must use stage_input")
        return stage_input.grad


def run_pipeline(forward_step: Callable[[Optional[torch.Tensor], dict], torch.Tensor],
                 micro_batches: Sequence[dict],
                 loss_fn: Callable[[torch.Tensor, dict], torch.Tensor],
                 activation_shape: Optional[Sequence[int]],
                 dtype: torch.dtype = torch.float32,
                 schedule: str = "1f1b",
                 groups: Optional[scg.ParallelGroups] = None,
                 forward_only: bool = False,
                 no_sync: Optional[Callable[[], ContextManager]] = None,
                 stats: Optional[dict] = None) -> torch.Tensor:
    """Run forward and backward of every micro-batch through this rank's pipeline stage; return the mean loss.

    Args:
        forward_step: this stage: ``(stage_input or None on the first stage, micro_batch) -> output``.
        micro_batches: the M micro-batch dicts, the same on every stage of a pipeline (each stage reads what it
            needs; only activations travel between stages).
        loss_fn: ``(last stage output, micro_batch) -> scalar loss``; called on the last stage only.
        activation_shape: shape of the tensor sent between stages, or None to send it with every micro-batch.
        dtype: dtype of the activations on the wire (and of their gradients).
        schedule: ``'1f1b'`` or ``'gpipe'``; the same gradients, different activation memory (module docstring).
        groups: the parallel groups (None: ``scg.current()``); with pp = 1 this is plain gradient accumulation.
        forward_only: evaluation: no backward, no stored graphs (runs under ``torch.no_grad``).
        no_sync: a context manager factory entered around every backward but the last one, e.g.
            ``DataParallel.no_sync`` with ``overlap_grad_reduce``.
        stats: if a dict is given, ``'max_in_flight'`` is set to the largest number of micro-batches whose
            activations this stage held at once (GPipe: M; 1F1B: ``min(pp - stage, M)``).

    Returns:
        The mean of the M micro-batch losses (detached, float32) on every stage of the pipeline: the last stage
        computes it and broadcasts it over the pp group so that any rank can log it.

    Gradients are accumulated into ``.grad`` (not zeroed first) and equal the gradient of the mean loss. Tied
    first/last-stage weights and data-parallel replicas are synced afterwards by the caller
    (:func:`all_reduce_tied_gradients`, :meth:`DataParallel.sync_gradients`).
    """
    groups = groups if groups is not None else scg.current()
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; expected one of {SCHEDULES}")
    if len(micro_batches) == 0:
        raise ValueError("run_pipeline needs at least one micro-batch")
    comm = P2PCommunicator(groups, activation_shape, dtype)
    state = _Schedule(forward_step, loss_fn, micro_batches, comm, groups, no_sync)
    if forward_only:
        with torch.no_grad():
            _forward_only(state)
    elif schedule == "gpipe":
        _gpipe(state)
    else:
        _one_f_one_b(state, groups)
    if stats is not None:
        stats["max_in_flight"] = state.max_in_flight
    return _mean_loss_on_all_stages(state, groups)


def _forward_only(state: _Schedule) -> None:
    comm = state.comm
    for i in range(state.num_micro_batches):
        stage_input, _ = comm.exchange(recv_prev=True)
        output = state.forward(i, stage_input)
        comm.exchange(send_next=output)


def _gpipe(state: _Schedule) -> None:
    """All forwards, then all backwards, last micro-batch first (its activations were produced last)."""
    comm = state.comm
    in_flight = []
    for i in range(state.num_micro_batches):
        stage_input, _ = comm.exchange(recv_prev=True)
        output = state.forward(i, stage_input)
        comm.exchange(send_next=output)
        in_flight.append((stage_input, output))
    for _ in range(state.num_micro_batches):
        stage_input, output = in_flight.pop()
        _, output_grad = comm.exchange(recv_next_shape=None if state.is_last else output.shape)
        input_grad = state.backward(stage_input, output, output_grad)
        comm.exchange(send_prev=input_grad)


def _one_f_one_b(state: _Schedule, groups: scg.ParallelGroups) -> None:
    """PipeDream-Flush: warm-up forwards, steady one-forward-one-backward, cool-down backwards (oldest first)."""
    comm = state.comm
    m = state.num_micro_batches
    warmup = min(groups.size("pp") - groups.rank_in("pp") - 1, m)
    steady = m - warmup
    in_flight = []   # (stage_input, output), oldest first

    def grad_shape(output):
        return None if state.is_last else output.shape

    for i in range(warmup):
        stage_input, _ = comm.exchange(recv_prev=True)
        output = state.forward(i, stage_input)
        comm.exchange(send_next=output)
        in_flight.append((stage_input, output))

    stage_input = None
    if steady > 0:
        stage_input, _ = comm.exchange(recv_prev=True)
    for j in range(steady):
        output = state.forward(warmup + j, stage_input)
        in_flight.append((stage_input, output))
        # Send this forward's output and receive the gradient of the oldest in-flight micro-batch in one step.
        oldest_input, oldest_output = in_flight.pop(0)
        _, output_grad = comm.exchange(send_next=output, recv_next_shape=grad_shape(oldest_output))
        input_grad = state.backward(oldest_input, oldest_output, output_grad)
        if j == steady - 1:
            comm.exchange(send_prev=input_grad)
        else:
            stage_input, _ = comm.exchange(send_prev=input_grad, recv_prev=True)

    for _ in range(warmup):
        oldest_input, oldest_output = in_flight.pop(0)
        _, output_grad = comm.exchange(recv_next_shape=grad_shape(oldest_output))
        input_grad = state.backward(oldest_input, oldest_output, output_grad)
        comm.exchange(send_prev=input_grad)


def _mean_loss_on_all_stages(state: _Schedule, groups: scg.ParallelGroups) -> torch.Tensor:
    if state.is_last:
        mean = torch.stack(state.losses).float().mean().to(groups.device)
    else:
        mean = torch.zeros((), dtype=torch.float32, device=groups.device)
    group = groups.group("pp")
    if group is not None:
        dist.broadcast(mean, src=groups.ranks("pp")[-1], group=group)
    return mean


def sync_tied_parameters(params: Iterable[torch.nn.Parameter], groups: Optional[scg.ParallelGroups] = None) -> None:
    """Copy the first stage's values of tied parameters to the last stage (call once after building the model).

    ``params`` are this rank's copies (the word embeddings on the first stage, the head's copy on the last; an
    empty list on middle stages, which do not take part). No-op when pp = 1 (the model shares one Parameter).
    """
    groups = groups if groups is not None else scg.current()
    group = groups.group("pp_ends")
    if group is None or not (groups.is_first("pp") or groups.is_last("pp")):
        return
    src = groups.ranks("pp_ends")[0]
    for p in params:
        dist.broadcast(p.data, src=src, group=group)


def all_reduce_tied_gradients(params: Iterable[torch.nn.Parameter],
                              groups: Optional[scg.ParallelGroups] = None) -> None:
    """Sum the gradients of tied parameters over the first and last pipeline stage (after the schedule).

    The unsplit model's gradient of a weight used twice is the sum of both uses' gradients; each stage's copy
    holds one of them, so after the sum both copies hold the full gradient. Call on the first and last stage with
    their copies, in the same order; middle stages return at once. A missing ``.grad`` counts as zero.

    With data parallelism call it after :meth:`DataParallel.sync_gradients`: with ``overlap_grad_reduce`` the dp
    all-reduce of the bucket holding the embedding may still be in flight until ``sync_gradients`` returns
    (the two reductions commute, so this order costs nothing; Megatron-LM's ``finalize_model_grads`` uses it too).

    A parameter with a ``main_grad`` (bf16/fp16 parameters with float32 gradient buffers, see
    ``fused_params.FusedParameters.cast_params_``) has that summed instead. After a reduce-scatter (distributed
    optimizer) only this dp rank's chunk of it is meaningful; the sum is still right there because the tied weight
    sits in a bucket of its own on both stages, so both cut it into the same chunks (Megatron-LM's rule).
    """
    groups = groups if groups is not None else scg.current()
    group = groups.group("pp_ends")
    if group is None or not (groups.is_first("pp") or groups.is_last("pp")):
        return
    for p in params:
        main_grad = getattr(p, "main_grad", None)
        if main_grad is not None:
            dist.all_reduce(main_grad, group=group)
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=group)
