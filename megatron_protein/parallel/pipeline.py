"""Pipeline parallelism over the ``pp`` axis: stage splitting, GPipe, 1F1B and interleaved 1F1B, tied weights.

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
* interleaved 1F1B (the same paper, section 2.2.2; Megatron-LM's schedule under
  ``--num-layers-per-virtual-pipeline-stage``): ``forward_step`` is a list of v *model chunks*; chunk c of rank r
  is virtual stage ``c * pp + r`` of ``v * pp`` (:func:`virtual_stage_layer_range`), so a micro-batch goes round
  the ring of ranks v times. Every rank works through its chunks in groups of ``pp`` micro-batches (Megatron's
  ``get_model_chunk_id``): ``(pp - r - 1) * 2 + (v - 1) * pp`` warm-up forwards, steady 1F1B, cool-down. The
  bubble shrinks to ``(pp - 1) / (v M)`` of the ideal time, for v times as many point-to-point messages, and the
  first stage holds more activations at its peak: ``(pp - 1) * 2 + (v - 1) * pp + 1`` chunk-micro-batches of
  ``1 / v`` of a stage each (1F1B: ``pp`` whole-stage micro-batches). M must be a multiple of pp (as in
  Megatron-LM); with ``M == pp`` every rank runs all its forwards first.

Schedules are *plans*: :func:`schedule_plan` lists, for one rank, its forwards, backwards and exchanges (each
message named by the model chunk and micro-batch it belongs to), and :func:`run_pipeline` executes the plan.
:func:`check_plans` replays the plans of all ranks of a pipeline without any process: every message must be
received as the chunk and micro-batch it was sent for, in the order of its channel, every forward and backward
must find its input, and the exchanges must complete under rendezvous semantics (a send completes only when its
receive is posted, NCCL's worst case), i.e. the schedule cannot deadlock. :func:`run_pipeline` runs this check
once per configuration before the first step. :func:`simulate_plans` times the same replay with given forward and
backward durations: the pipeline bubble of each rank with one device per stage (``bench/pp_dp.py``).

All schedules give the same gradients: every micro-batch loss is scaled by 1/M before its backward pass and
autograd accumulates into ``.grad``, so after the schedule ``.grad`` is the gradient of the mean micro-batch loss
(the mean loss over the global batch when micro-batches are of equal weight); with data parallelism
:meth:`~megatron_protein.parallel.dp.DataParallel.sync_gradients` then averages over the dp replicas.

The stage contract: ``forward_step(stage_input, micro_batch) -> output`` (one per model chunk for the interleaved
schedule). ``stage_input`` is ``None`` on the first (virtual) stage (it reads its input from the micro-batch dict,
e.g. ``micro_batch['tokens']``) and the activation received from the previous stage elsewhere. Every stage gets
the whole micro-batch dict, so per-micro-batch inputs that all stages need (attention mask, position ids) are read
locally and never sent. On the last (virtual) stage the output goes to ``loss_fn(output, micro_batch) -> scalar
loss``.

Activation shapes: give ``activation_shape`` (the shape of the tensor every stage sends, e.g.
``(micro_batch_size, seq_length, hidden)``) when it is fixed, as it is for BERT pretraining; this costs nothing.
With ``activation_shape=None`` each forward send is preceded by a small header with the shape, for inputs whose
shape varies between micro-batches (one extra message per micro-batch and stage boundary; not with model chunks).
Gradients need no header: the gradient of an activation has the activation's shape, which both neighbours know.

Communication is our own point-to-point layer (:class:`P2PCommunicator`) on ``torch.distributed`` isend/irecv over
the pp group, which gloo and NCCL both support. Each exchange posts all its sends and receives before waiting on any
(like Megatron-LM's ``_communicate``), so the paired steady-state exchanges of adjacent stages cannot deadlock.
Between two ranks, the messages of one process group are matched in the order they were posted (NCCL ignores tags,
and ours are all 0), so a message must never be told apart by its kind: under the interleaved schedule with pp = 2
the previous and the next rank are the same peer, and a step that posts its gradient before its activation to that
peer while the peer posts its receives the other way round would swap them, silently (they have the same shape).
Gradients therefore travel on a second process group (``'pp_ends'``, which holds the same two ranks) whenever the
previous and the next rank coincide, so the two kinds can never meet in one queue; and every exchange posts
activations before gradients.

We do not use ``torch.distributed.pipelining``: its stages own the loss scaling and hand gradient sync to DDP/FSDP
through ``no_sync`` wrappers, whereas our gradients must stay in the flat buffers that our own DP, the
tied-embedding sum over the pipeline ends and the folding model's bp/dap/dp syncs reduce after the schedule; and a
schedule whose order of sends can be read (and checked, :func:`check_plans`) is easier to debug than a tracer.

Tied weights: BERT's MLM head reuses the word embeddings of the first stage. With pp > 1 the last stage keeps its own
copy (``word_embeddings_for_head`` in Megatron checkpoints; under the interleaved schedule in the last chunk of the
last rank); :func:`sync_tied_parameters` makes the copies equal at start (broadcast from the first stage) and
:func:`all_reduce_tied_gradients` sums their gradients over the ``'pp_ends'`` group after the schedule, so both
copies get the gradient of the single tied weight of the unsplit model and stay equal after identical optimizer
steps. With data parallelism the step reads::

    loss = run_pipeline(stage, micro_batches, loss_fn, activation_shape, no_sync=ddp.no_sync)
    ddp.sync_gradients()                          # average over dp (waits for overlapped buckets)
    all_reduce_tied_gradients(tied_params)        # then sum the tied copies over the pipeline ends
    optimizer.step()
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Optional, Sequence, Union

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


def virtual_stage_layer_range(num_layers: int, pp_size: int, num_chunks: int, pp_rank: int, chunk: int) -> range:
    """The global layer indices of model chunk ``chunk`` on pipeline rank ``pp_rank`` (interleaved schedule).

    Chunk c of rank r is virtual stage ``v = c * pp + r`` of ``num_chunks * pp`` equal stages, holding layers
    ``[v L / (num_chunks pp), (v + 1) L / (num_chunks pp))`` (Megatron-LM's layout: with 8 layers, pp = 2 and two
    chunks, rank 0 holds layers 0-1 and 4-5, rank 1 layers 2-3 and 6-7). The stages must be equal, as Megatron-LM
    requires (``--num-layers-per-virtual-pipeline-stage`` must divide the layers per pipeline stage).
    """
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    if not 0 <= chunk < num_chunks:
        raise ValueError(f"chunk must be in [0, {num_chunks}), got {chunk}")
    if num_chunks == 1:
        return stage_layer_range(num_layers, pp_size, pp_rank)
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank must be in [0, {pp_size}), got {pp_rank}")
    stages = num_chunks * pp_size
    if num_layers % stages:
        raise ValueError(f"{num_layers} layers do not split into {num_chunks} model chunks x {pp_size} pipeline "
                         f"stages = {stages} equal virtual stages; --num-layers-per-virtual-pipeline-stage must "
                         f"divide the {num_layers} / {pp_size} layers of a pipeline stage")
    per_stage = num_layers // stages
    start = (chunk * pp_size + pp_rank) * per_stage
    return range(start, start + per_stage)


#: The order in which one exchange posts its operations: activations before gradients on both sides of a pair.
EXCHANGE_ORDER = ("send_next", "recv_prev", "send_prev", "recv_next")


class P2PCommunicator:
    """Sends activations to the next stage and gradients to the previous one, over the pp group.

    ``exchange`` posts every send and receive of one step (``batch_isend_irecv``) before waiting on any, so two
    neighbours that each send to and receive from the other in the same step cannot block each other. Between one
    pair of ranks, messages of one process group are matched in order, so no tags are needed: activations are
    posted before gradients, and when the previous and the next rank are one peer (``ring=True`` with pp = 2)
    gradients go over the ``'pp_ends'`` group, a second channel between the same two ranks, so an activation and a
    gradient can never be matched with each other whatever the order of the steps.

    ``ring=True`` (the interleaved schedule) connects the last stage to the first: its next rank is the first
    stage's and the first stage's previous rank is the last's.
    """

    def __init__(self, groups: scg.ParallelGroups, activation_shape: Optional[Sequence[int]],
                 dtype: torch.dtype, ring: bool = False):
        self.group = groups.group("pp")
        ranks = groups.ranks("pp")
        me = groups.rank_in("pp")
        n = len(ranks)
        if ring and n > 1:
            self.prev_rank, self.next_rank = ranks[(me - 1) % n], ranks[(me + 1) % n]
        else:
            self.prev_rank = ranks[me - 1] if me > 0 else None
            self.next_rank = ranks[me + 1] if me < n - 1 else None
        self.gradient_group = self.group
        if self.prev_rank is not None and self.prev_rank == self.next_rank:
            self.gradient_group = groups.group("pp_ends")
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
        ops, from_prev, from_next = {}, None, None
        if send_next is not None:
            ops["send_next"] = dist.P2POp(dist.isend, send_next.detach().to(self.dtype).contiguous(), self.next_rank,
                                          self.group)
        if recv_prev:
            from_prev = torch.empty(prev_shape, dtype=self.dtype, device=self.device)
            ops["recv_prev"] = dist.P2POp(dist.irecv, from_prev, self.prev_rank, self.group)
        if send_prev is not None:
            ops["send_prev"] = dist.P2POp(dist.isend, send_prev.detach().to(self.dtype).contiguous(),
                                          self.prev_rank, self.gradient_group)
        if recv_next_shape is not None:
            from_next = torch.empty(tuple(recv_next_shape), dtype=self.dtype, device=self.device)
            ops["recv_next"] = dist.P2POp(dist.irecv, from_next, self.next_rank, self.gradient_group)
        ops = [ops[name] for name in EXCHANGE_ORDER if name in ops]  # activations first (class docstring)
        # One batch per channel (batch_isend_irecv takes one group), every batch posted before any is waited on:
        # NCCL runs the sends and receives of a batch as one group (no ordering deadlock between neighbours sending
        # to each other); gloo posts them one by one.
        requests = []
        for group in dict.fromkeys(op.group for op in ops):
            requests += dist.batch_isend_irecv([op for op in ops if op.group is group])
        for request in requests:
            request.wait()
        if from_prev is not None:
            from_prev.requires_grad_(True)
        return from_prev, from_next


# ---------------------------------------------------------------------------------------------------------------
# Plans: what one rank does, step by step
# ---------------------------------------------------------------------------------------------------------------

#: (model chunk, micro-batch): what a forward, a backward or a message belongs to.
Key = tuple[int, int]


@dataclass(frozen=True)
class Forward:
    chunk: int
    micro_batch: int


@dataclass(frozen=True)
class Backward:
    chunk: int
    micro_batch: int


@dataclass(frozen=True)
class Exchange:
    """One communication step. ``send_next``: the output of this rank's forward of (chunk, micro-batch);
    ``send_prev``: the gradient of the input of its backward of (chunk, micro-batch); ``recv_prev``: the input of a
    later forward of (chunk, micro-batch); ``recv_next``: the output gradient of a later backward."""

    send_next: Optional[Key] = None
    send_prev: Optional[Key] = None
    recv_prev: Optional[Key] = None
    recv_next: Optional[Key] = None

    def is_empty(self) -> bool:
        return self.send_next is None and self.send_prev is None and self.recv_prev is None \
            and self.recv_next is None


Step = Union[Forward, Backward, Exchange]


def _append(plan: list, step: Step) -> None:
    if not (isinstance(step, Exchange) and step.is_empty()):
        plan.append(step)


def _gpipe_plan(pp: int, rank: int, m: int, forward_only: bool) -> list[Step]:
    """All forwards, then all backwards, last micro-batch first (its activations were produced last)."""
    first, last = rank == 0, rank == pp - 1
    plan: list[Step] = []
    for i in range(m):
        _append(plan, Exchange(recv_prev=None if first else (0, i)))
        plan.append(Forward(0, i))
        _append(plan, Exchange(send_next=None if last else (0, i)))
    if forward_only:
        return plan
    for i in reversed(range(m)):
        _append(plan, Exchange(recv_next=None if last else (0, i)))
        plan.append(Backward(0, i))
        _append(plan, Exchange(send_prev=None if first else (0, i)))
    return plan


def _one_f_one_b_plan(pp: int, rank: int, m: int) -> list[Step]:
    """PipeDream-Flush: warm-up forwards, steady one-forward-one-backward, cool-down backwards (oldest first)."""
    first, last = rank == 0, rank == pp - 1
    warmup = min(pp - rank - 1, m)
    steady = m - warmup

    def prev(i):
        return None if first else (0, i)

    def nxt(i):
        return None if last else (0, i)

    plan: list[Step] = []
    for i in range(warmup):
        _append(plan, Exchange(recv_prev=prev(i)))
        plan.append(Forward(0, i))
        _append(plan, Exchange(send_next=nxt(i)))
    if steady > 0:
        _append(plan, Exchange(recv_prev=prev(warmup)))
    for j in range(steady):
        plan.append(Forward(0, warmup + j))
        # Send this forward's output and receive the gradient of the oldest in-flight micro-batch in one step.
        _append(plan, Exchange(send_next=nxt(warmup + j), recv_next=nxt(j)))
        plan.append(Backward(0, j))
        _append(plan, Exchange(send_prev=prev(j), recv_prev=prev(warmup + j + 1) if j < steady - 1 else None))
    for i in range(steady, m):
        _append(plan, Exchange(recv_next=nxt(i)))
        plan.append(Backward(0, i))
        _append(plan, Exchange(send_prev=prev(i)))
    return plan


def _interleaved_plan(pp: int, rank: int, m: int, vp: int, forward_only: bool) -> list[Step]:
    """Megatron-LM's ``forward_backward_pipelining_with_interleaving`` (which tensor arrives when), with every
    message named by the chunk and micro-batch it belongs to.

    Virtual micro-batch k (of ``m * vp``) is micro-batch ``(k // (pp vp)) pp + k % pp`` of chunk
    ``(k % (pp vp)) // pp`` in forward order and of chunk ``vp - 1 -`` that in backward order. Receipts are
    counted per chunk: the n-th activation (gradient) a chunk receives is its micro-batch n, because every stage
    runs a chunk's micro-batches in increasing order, forward and backward.
    """
    if m % pp:
        raise ValueError(f"the interleaved schedule needs the number of micro-batches ({m}) to be a multiple of the "
                         f"pipeline-parallel size {pp} (as Megatron-LM requires)")
    total = m * vp
    first, last = rank == 0, rank == pp - 1

    def chunk_of(k: int, forward: bool) -> int:
        c = (k % (pp * vp)) // pp
        return c if forward else vp - 1 - c

    def key(k: int, forward: bool) -> Key:
        return chunk_of(k, forward), (k // (pp * vp)) * pp + k % pp

    received_inputs, received_grads = [0] * vp, [0] * vp

    def recv_input(c: int) -> Key:
        received_inputs[c] += 1
        return c, received_inputs[c] - 1

    def recv_grad(c: int) -> Key:
        received_grads[c] += 1
        return c, received_grads[c] - 1

    def sent_forward(k: Key) -> Optional[Key]:    # the last virtual stage computes the loss and sends nothing
        return None if (last and k[0] == vp - 1) else k

    def sent_backward(k: Key) -> Optional[Key]:   # the first virtual stage has no input gradient
        return None if (first and k[0] == 0) else k

    all_warmup = False
    if forward_only:
        warmup = total
    elif m == pp:
        warmup, all_warmup = total, True
    else:
        warmup = min((pp - rank - 1) * 2 + (vp - 1) * pp, total)
    steady = total - warmup
    plan: list[Step] = []
    if not first:   # chunk 0 of the first rank reads the micro-batch; every other first forward receives
        plan.append(Exchange(recv_prev=recv_input(0)))
    for k in range(warmup):
        forward = key(k, True)
        plan.append(Forward(*forward))
        next_chunk = chunk_of(k + 1, True)
        receive = not (first and next_chunk == 0) and k != total - 1
        grad = None
        if k == warmup - 1 and not forward_only and not all_warmup and not last:
            grad = recv_grad(vp - 1)
        _append(plan, Exchange(send_next=sent_forward(forward), recv_prev=recv_input(next_chunk) if receive else None,
                               recv_next=grad))
    for j in range(steady):
        k = j + warmup
        forward, backward = key(k, True), key(j, False)
        plan.append(Forward(*forward))
        plan.append(Backward(*backward))
        if first:   # the first stage is ahead of the last by pp - 1 forwards
            next_chunk = chunk_of(k - (pp - 1), True)
            receive = next_chunk != vp - 1
            next_chunk += 1
        else:
            receive, next_chunk = True, chunk_of(k + 1, True)
        if last:    # and the last ahead of the first by pp - 1 backwards
            next_back = chunk_of(j - (pp - 1), False)
            receive_grad = next_back != 0
            next_back -= 1
        else:
            receive_grad, next_back = True, chunk_of(j + 1, False)
        if j == steady - 1:
            receive = False
        _append(plan, Exchange(send_next=sent_forward(forward), send_prev=sent_backward(backward),
                               recv_prev=recv_input(next_chunk) if receive else None,
                               recv_next=recv_grad(next_back) if receive_grad else None))
    if forward_only:
        return plan
    if all_warmup and not last:
        plan.append(Exchange(recv_next=recv_grad(vp - 1)))
    for k in range(steady, total):
        backward = key(k, False)
        plan.append(Backward(*backward))
        next_back = chunk_of(k + 1, False)
        receive_grad = not (last and next_back == vp - 1) and k != total - 1
        _append(plan, Exchange(send_prev=sent_backward(backward),
                               recv_next=recv_grad(next_back) if receive_grad else None))
    return plan


@functools.lru_cache(maxsize=64)
def _cached_plan(schedule: str, pp: int, rank: int, m: int, vp: int, forward_only: bool) -> tuple[Step, ...]:
    if vp > 1:
        return tuple(_interleaved_plan(pp, rank, m, vp, forward_only))
    if schedule == "gpipe" or forward_only:
        return tuple(_gpipe_plan(pp, rank, m, forward_only))
    return tuple(_one_f_one_b_plan(pp, rank, m))


def schedule_plan(schedule: str, pp: int, rank: int, num_micro_batches: int, num_chunks: int = 1,
                  forward_only: bool = False) -> list[Step]:
    """The steps of pipeline rank ``rank`` of ``pp`` for ``num_micro_batches`` micro-batches (``num_chunks``
    model chunks per rank: the interleaved 1F1B schedule; ``schedule`` must then be ``'1f1b'``)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; expected one of {SCHEDULES}")
    if num_micro_batches < 1:
        raise ValueError("run_pipeline needs at least one micro-batch")
    if num_chunks > 1 and schedule != "1f1b":
        raise ValueError(f"model chunks (virtual pipeline stages) run with the interleaved 1F1B schedule "
                         f"(schedule='1f1b'), not {schedule!r}")
    if num_chunks > 1 and pp < 2:
        raise ValueError(f"{num_chunks} model chunks need a pipeline of at least 2 ranks (the interleaved schedule "
                         f"sends between neighbouring ranks); with pp = 1 use one chunk")
    return list(_cached_plan(schedule, pp, rank, num_micro_batches, num_chunks, forward_only))


class PlanError(AssertionError):
    """The plans of a pipeline do not fit together (a message would reach the wrong chunk or micro-batch, a step
    would miss its input, or the exchanges would deadlock)."""


def _destination(kind: str, rank: int, key: Key, pp: int) -> tuple[int, Key]:
    chunk, micro_batch = key
    if kind == "act":
        return (rank + 1, key) if rank < pp - 1 else (0, (chunk + 1, micro_batch))
    return (rank - 1, key) if rank > 0 else (pp - 1, (chunk - 1, micro_batch))


_KIND = {"send_next": ("act", "send"), "recv_prev": ("act", "recv"), "send_prev": ("grad", "send"),
         "recv_next": ("grad", "recv")}


def _replay(plans: Sequence[Sequence[Step]], num_chunks: int, forward_only: bool,
            forward_time=None, backward_time=None, one_queue_per_pair: bool = False,
            order: Sequence[str] = EXCHANGE_ORDER) -> list[dict]:
    """Run the plans of all ranks together under rendezvous semantics; check everything :func:`check_plans`
    promises; with durations, time every rank (message transfers take no time). Messages are matched in order
    per (kind, source, destination), what :class:`P2PCommunicator` guarantees; ``one_queue_per_pair`` models a
    communicator that sends both kinds between two ranks over one queue, posting each exchange's operations in
    ``order``."""
    pp = len(plans)
    messages: dict[tuple, list] = {}     # (kind, src, dst) -> destination keys in send order
    receipts: dict[tuple, list] = {}     # (kind, src, dst) -> keys in receive order
    posted: dict[tuple, dict] = {}       # (kind, src, dst, side) -> {index: time posted}
    ranks = [{"pc": 0, "clock": 0.0, "busy": 0.0, "forwards": set(), "backwards": set(), "inputs": set(),
              "grads": set(), "posted": None} for _ in range(pp)]

    def fail(rank, step, why):
        raise PlanError(f"pipeline rank {rank}, step {ranks[rank]['pc']} ({step}): {why}")

    def ops_of(rank: int, step: Exchange):
        ops = []   # (channel, side, kind, payload key, destination key)
        for field_ in order:
            kind, side = _KIND[field_]
            k = getattr(step, field_)
            if k is None:
                continue
            if side == "send":
                src, (dst, dst_key) = rank, _destination(kind, rank, k, pp)
            else:
                src, dst, dst_key = (rank - 1) % pp if kind == "act" else (rank + 1) % pp, rank, k
            ops.append((("any" if one_queue_per_pair else kind, src, dst), side, kind, k, dst_key))
        return ops

    done = [False] * pp
    while not all(done):
        progressed = False
        for r in range(pp):
            state = ranks[r]
            while not done[r]:
                if state["pc"] == len(plans[r]):
                    done[r] = True
                    progressed = True
                    break
                step = plans[r][state["pc"]]
                last_virtual = lambda c: r == pp - 1 and c == num_chunks - 1   # noqa: E731
                if isinstance(step, Forward):
                    k = (step.chunk, step.micro_batch)
                    if k in state["forwards"]:
                        fail(r, step, "second forward of the same chunk and micro-batch")
                    if not (r == 0 and step.chunk == 0) and k not in state["inputs"]:
                        fail(r, step, "its input was not received before")
                    state["forwards"].add(k)
                    if forward_time is not None:
                        state["clock"] += forward_time(r, step.chunk)
                        state["busy"] += forward_time(r, step.chunk)
                elif isinstance(step, Backward):
                    k = (step.chunk, step.micro_batch)
                    if k not in state["forwards"] or k in state["backwards"]:
                        fail(r, step, "backward without its forward, or twice")
                    if not last_virtual(step.chunk) and k not in state["grads"]:
                        fail(r, step, "its output gradient was not received before")
                    state["backwards"].add(k)
                    if backward_time is not None:
                        state["clock"] += backward_time(r, step.chunk)
                        state["busy"] += backward_time(r, step.chunk)
                else:
                    ops = ops_of(r, step)
                    if state["posted"] is None:   # post every op of the step, in order
                        state["posted"] = []
                        progressed = True
                        for channel, side, kind, k, dst_key in ops:
                            if side == "send":
                                if kind == "act" and k not in state["forwards"]:
                                    fail(r, step, "sends the output of a forward not yet run")
                                if kind == "act" and last_virtual(k[0]):
                                    fail(r, step, "the last virtual stage has no output to send")
                                if kind == "grad" and k not in state["backwards"]:
                                    fail(r, step, "sends the input gradient of a backward not yet run")
                                log = messages.setdefault(channel, [])
                                log.append((kind, dst_key))
                            else:
                                if kind == "grad" and k not in state["forwards"]:
                                    fail(r, step, "receives the gradient of an output not yet computed")
                                log = receipts.setdefault(channel, [])
                                log.append((kind, k))
                            index = len(log) - 1
                            posted.setdefault(channel + (side,), {})[index] = state["clock"]
                            state["posted"].append((channel, side, index))
                    ready_at = state["clock"]
                    blocked = False
                    for channel, side, index in state["posted"]:
                        other = posted.get(channel + ("recv" if side == "send" else "send",), {})
                        if index not in other:
                            blocked = True
                            break
                        ready_at = max(ready_at, other[index])
                    if blocked:
                        break
                    for channel, side, index in state["posted"]:
                        if side == "recv":
                            kind, k = receipts[channel][index]
                            sent_kind, sent_for = messages[channel][index]
                            if (sent_kind, sent_for) != (kind, k):
                                what = {"act": "activation", "grad": "gradient"}
                                fail(r, step, f"receives message {index} from rank {channel[1]}, the "
                                              f"{what[sent_kind]} sent for (chunk, micro-batch) {sent_for}, as the "
                                              f"{what[kind]} of {k}")
                            state["inputs" if kind == "act" else "grads"].add(k)
                    state["clock"] = ready_at
                    state["posted"] = None
                state["pc"] += 1
                progressed = True
        if not progressed:
            stuck = {r: plans[r][ranks[r]["pc"]] for r in range(pp) if not done[r]}
            raise PlanError(f"the exchanges deadlock: ranks wait at {stuck}")
    for r, state in enumerate(ranks):
        if not forward_only and state["forwards"] != state["backwards"]:
            raise PlanError(f"pipeline rank {r}: forwards without backwards: "
                            f"{sorted(state['forwards'] - state['backwards'])}")
    for channel in set(messages) | set(receipts):
        if len(messages.get(channel, ())) != len(receipts.get(channel, ())):
            raise PlanError(f"{channel}: {len(messages.get(channel, ()))} messages sent, "
                            f"{len(receipts.get(channel, ()))} received")
    return [{"busy": s["busy"], "finish": s["clock"], "forwards": len(s["forwards"])} for s in ranks]


def check_plans(schedule: str, pp: int, num_micro_batches: int, num_chunks: int = 1,
                forward_only: bool = False, one_queue_per_pair: bool = False,
                order: Sequence[str] = EXCHANGE_ORDER) -> None:
    """Raise :class:`PlanError` unless the plans of all ``pp`` ranks fit together (module docstring): run before
    a configuration is first used and in the tests, in pure Python (no processes). ``one_queue_per_pair`` and
    ``order`` check a communicator other than ours (both kinds of message between two ranks in one queue, each
    exchange posting its operations in ``order``), to show what the second channel is for."""
    plans = [schedule_plan(schedule, pp, r, num_micro_batches, num_chunks, forward_only) for r in range(pp)]
    results = _replay(plans, num_chunks, forward_only, one_queue_per_pair=one_queue_per_pair, order=order)
    for r, result in enumerate(results):
        if result["forwards"] != num_micro_batches * num_chunks:
            raise PlanError(f"pipeline rank {r} runs {result['forwards']} forwards, not "
                            f"{num_micro_batches} x {num_chunks}")


def simulate_plans(schedule: str, pp: int, num_micro_batches: int, num_chunks: int = 1,
                   forward_time: Callable[[int, int], float] = lambda rank, chunk: 1.0,
                   backward_time: Callable[[int, int], float] = lambda rank, chunk: 2.0) -> list[dict]:
    """Time the schedule with one device per stage: ``forward_time(rank, chunk)`` and ``backward_time(rank,
    chunk)`` per micro-batch, messages free. Returns per rank ``busy`` (compute time), ``step`` (the time of the
    whole step: the last rank to finish) and ``idle_fraction`` = 1 - busy / step, the rank's pipeline bubble."""
    plans = [schedule_plan(schedule, pp, r, num_micro_batches, num_chunks) for r in range(pp)]
    results = _replay(plans, num_chunks, False, forward_time, backward_time)
    step = max(r["finish"] for r in results)
    return [{"busy": r["busy"], "step": step, "idle_fraction": 1.0 - r["busy"] / step if step else 0.0}
            for r in results]


# ---------------------------------------------------------------------------------------------------------------
# Running a plan
# ---------------------------------------------------------------------------------------------------------------

class _Schedule:
    """One rank's model chunks, their forward and backward steps and the in-flight micro-batches."""

    def __init__(self, forward_steps, loss_fn, micro_batches, comm: P2PCommunicator, groups: scg.ParallelGroups,
                 no_sync: Optional[Callable[[], ContextManager]]):
        self.forward_steps = list(forward_steps)
        self.num_chunks = len(self.forward_steps)
        self.loss_fn = loss_fn
        self.micro_batches = micro_batches
        self.comm = comm
        self.is_first = groups.is_first("pp")
        self.is_last = groups.is_last("pp")
        self.num_micro_batches = len(micro_batches)
        self.no_sync = no_sync
        self.losses: list[torch.Tensor] = []
        self.backwards_done = [0] * self.num_chunks
        self.in_flight = 0        # micro-batches x chunks whose activations this rank holds (forward done only)
        self.max_in_flight = 0
        self.forward_seconds = 0.0
        self.backward_seconds = 0.0

    def is_last_virtual(self, chunk: int) -> bool:
        return self.is_last and chunk == self.num_chunks - 1

    def forward(self, chunk: int, index: int, stage_input: Optional[torch.Tensor]) -> torch.Tensor:
        started = time.perf_counter()
        output = self.forward_steps[chunk](stage_input, self.micro_batches[index])
        if self.is_last_virtual(chunk):
            loss = self.loss_fn(output, self.micro_batches[index])
            if loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
            self.losses.append(loss.detach())
            output = loss / self.num_micro_batches
        if torch.is_grad_enabled():
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.forward_seconds += time.perf_counter() - started
        return output

    def backward(self, chunk: int, stage_input: Optional[torch.Tensor], output: torch.Tensor,
                 output_grad: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        started = time.perf_counter()
        self.backwards_done[chunk] += 1
        # The last backward of each chunk runs outside no_sync: with overlap_grad_reduce the buckets of a chunk
        # start their all-reduce as soon as that chunk is done, while the other chunks still run backward.
        last = self.backwards_done[chunk] == self.num_micro_batches
        context = self.no_sync() if (self.no_sync is not None and not last) else contextlib.nullcontext()
        if output_grad is not None:
            output_grad = output_grad.to(output.dtype)  # the wire dtype may differ from the compute dtype
        with context:
            torch.autograd.backward(output, grad_tensors=output_grad)
        self.in_flight -= 1
        self.backward_seconds += time.perf_counter() - started
        if stage_input is None:
            return None
        if stage_input.grad is None:
            raise RuntimeError("the stage output does not depend on the activation received from the previous "
                               "stage, so there is no gradient to send back; forward_step must use stage_input")
        return stage_input.grad


def _execute(plan: Sequence[Step], state: _Schedule) -> None:
    comm = state.comm
    inputs: dict[Key, torch.Tensor] = {}        # received activations, until their forward
    outputs: dict[Key, torch.Tensor] = {}       # forward outputs, until sent
    held: dict[Key, tuple] = {}                 # (input, output) until the backward
    grads: dict[Key, torch.Tensor] = {}         # received output gradients, until their backward
    input_grads: dict[Key, torch.Tensor] = {}   # gradients to send back
    for step in plan:
        if isinstance(step, Forward):
            k = (step.chunk, step.micro_batch)
            stage_input = inputs.pop(k, None)
            output = state.forward(step.chunk, step.micro_batch, stage_input)
            if not state.is_last_virtual(step.chunk):
                outputs[k] = output
            if torch.is_grad_enabled():
                held[k] = (stage_input, output)
        elif isinstance(step, Backward):
            k = (step.chunk, step.micro_batch)
            stage_input, output = held.pop(k)
            input_grad = state.backward(step.chunk, stage_input, output, grads.pop(k, None))
            if input_grad is not None:
                input_grads[k] = input_grad
        else:
            recv_shape = None
            if step.recv_next is not None:
                recv_shape = held[step.recv_next][1].shape
            from_prev, from_next = comm.exchange(
                send_next=outputs.pop(step.send_next) if step.send_next is not None else None,
                send_prev=input_grads.pop(step.send_prev) if step.send_prev is not None else None,
                recv_prev=step.recv_prev is not None, recv_next_shape=recv_shape)
            if step.recv_prev is not None and from_prev is not None:
                inputs[step.recv_prev] = from_prev
            if step.recv_next is not None and from_next is not None:
                grads[step.recv_next] = from_next


_CHECKED: set = set()


def run_pipeline(forward_step: Union[Callable[[Optional[torch.Tensor], dict], torch.Tensor],
                                     Sequence[Callable[[Optional[torch.Tensor], dict], torch.Tensor]]],
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
        forward_step: this stage: ``(stage_input or None on the first stage, micro_batch) -> output``; or a list
            of them, one per model chunk (virtual pipeline stage ``chunk * pp + pp_rank``): the interleaved 1F1B
            schedule (see the module docstring; needs ``activation_shape`` and M a multiple of pp).
        micro_batches: the M micro-batch dicts, the same on every stage of a pipeline (each stage reads what it
            needs; only activations travel between stages).
        loss_fn: ``(last stage output, micro_batch) -> scalar loss``; called on the last stage only.
        activation_shape: shape of the tensor sent between stages, or None to send it with every micro-batch.
        dtype: dtype of the activations on the wire (and of their gradients).
        schedule: ``'1f1b'`` or ``'gpipe'``; the same gradients, different activation memory (module docstring).
        groups: the parallel groups (None: ``scg.current()``); with pp = 1 this is plain gradient accumulation.
        forward_only: evaluation: no backward, no stored graphs (runs under ``torch.no_grad``).
        no_sync: a context manager factory entered around every backward but the last one of each model chunk,
            e.g. ``DataParallel.no_sync`` with ``overlap_grad_reduce``.
        stats: if a dict is given, ``'max_in_flight'`` is set to the largest number of (chunk, micro-batch)
            activations this rank held at once (GPipe: M; 1F1B: ``min(pp - stage, M)``), ``'forward_seconds'``
            and ``'backward_seconds'`` to the time spent in this rank's forward and backward steps, and
            ``'seconds'`` to the whole call (so ``1 - compute / seconds`` is the rank's idle fraction).

    Returns:
        The mean of the M micro-batch losses (detached, float32) on every stage of the pipeline: the last stage
        computes it and broadcasts it over the pp group so that any rank can log it.

    Gradients are accumulated into ``.grad`` (not zeroed first) and equal the gradient of the mean loss. Tied
    first/last-stage weights and data-parallel replicas are synced afterwards by the caller
    (:func:`all_reduce_tied_gradients`, :meth:`DataParallel.sync_gradients`).
    """
    started = time.perf_counter()
    groups = groups if groups is not None else scg.current()
    forward_steps = list(forward_step) if isinstance(forward_step, (list, tuple)) else [forward_step]
    num_chunks = len(forward_steps)
    if num_chunks == 0:
        raise ValueError("run_pipeline needs at least one model chunk")
    pp, rank = groups.size("pp"), groups.rank_in("pp")
    plan = schedule_plan(schedule, pp, rank, len(micro_batches), num_chunks, forward_only)
    if num_chunks > 1 and activation_shape is None:
        raise ValueError("the interleaved schedule (several model chunks) needs a fixed activation_shape")
    config = (schedule, pp, len(micro_batches), num_chunks, forward_only)
    if config not in _CHECKED:   # pure Python, once per configuration: a wrong plan fails here, not as a hang
        check_plans(*config)
        _CHECKED.add(config)
    comm = P2PCommunicator(groups, activation_shape, dtype, ring=num_chunks > 1)
    state = _Schedule(forward_steps, loss_fn, micro_batches, comm, groups, no_sync)
    if forward_only:
        with torch.no_grad():
            _execute(plan, state)
    else:
        _execute(plan, state)
    loss = _mean_loss_on_all_stages(state, groups)
    if stats is not None:
        stats["max_in_flight"] = state.max_in_flight
        stats["forward_seconds"] = state.forward_seconds
        stats["backward_seconds"] = state.backward_seconds
        stats["seconds"] = time.perf_counter() - started
    return loss


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
