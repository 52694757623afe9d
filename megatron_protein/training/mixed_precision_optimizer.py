"""Megatron-LM's mixed-precision optimizer and its distributed optimizer, as one class over the flat DP buffers.

``--bf16`` / ``--fp16`` (Micikevicius et al. 2018, arXiv:1710.03740; Megatron-LM's ``Float16OptimizerWith
Float16Params``): the model's parameters are bf16 (fp16), so forward and backward run in that dtype with no cast
inside the step; the optimizer keeps a float32 *main* copy of every parameter, the gradients are accumulated over
micro-batches and averaged over dp in float32 (the ``main_grad`` buffers of
:meth:`~megatron_protein.parallel.fused_params.FusedParameters.cast_params_`), AdamW updates the main copy in
float32, and the result is rounded back into the model's parameters (one copy per bucket). Updates smaller than
bf16's resolution (2^-8 relative) are therefore not lost: they accumulate in the main copy until they show in
the rounded parameter.

``--use-distributed-optimizer`` (Megatron-LM's ``DistributedOptimizer``; ZeRO stage 1, Rajbhandari et al. 2020,
arXiv:1910.02054): the same optimizer, where each dp rank owns one of dp equal chunks of every gradient bucket
(:meth:`~megatron_protein.parallel.dp.DataParallel.shard_bounds`). Gradients are reduce-scattered (each rank gets
the average of its chunks only), the rank keeps main parameters and AdamW moments for its chunks only (1/dp of
the 12 bytes per parameter), steps them, rounds them into its chunk of the model's parameters, and the chunks are
all-gathered. Without the flag every rank owns whole buckets (one chunk per bucket), which is the first case:
one implementation for both, the non-distributed optimizer being the distributed one at one shard. In float32
with the distributed optimizer the main parameters *are* the model's (views of its buffer: nothing is copied).

Gradient norm and non-finite check (one all-reduce over the world, on float64 partial sums): each rank sums the
squares of the gradient elements it owns in the global norm (tensor-parallel shards on every tp rank, replicated
parameters on tp rank 0, the pipeline's second copy of the tied word embedding nowhere, as
:func:`~megatron_protein.training.optimizer.grad_norm`; with the distributed optimizer only its own chunks, without
it only on dp rank 0 since dp replicas then hold equal gradients) and flags a non-finite loss or any non-finite
gradient element it holds. The summed flag skips the step on every rank together (Megatron's
``--check-for-nan-in-loss-and-grad``, and the fp16 overflow check of the loss scaler), so a NaN never reaches the
main parameters, the moments, the model or a checkpoint. Clipping scales the float32 main gradients.

Checkpoints (see ``training/checkpointing.py``): the model's entry holds the float32 main parameters (gathered
over dp with the distributed optimizer), so resuming restores them exactly and every reader of the file (the
converter, ``--finetune``, Megatron-LM's loader) gets float32 weights. The optimizer's state is saved per dp shard
as pieces of each named parameter (:meth:`MixedPrecisionOptimizer.state_dict`); loading copies the overlap of the
saved pieces with this rank's chunks, so a run resumes at the same degrees, at another dp degree, or with the
distributed optimizer switched on or off; a torch AdamW state of the same model (a float32 or autocast run) is
converted by parameter name (:func:`pieces_from_torch_adamw`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_protein.conversion.optimizer_state import (STATE_FORMAT, STATE_VERSION, OptimizerStateError,  # noqa: F401
                                                        merged_ranges, torch_adamw_state_by_order)
from megatron_protein.parallel import scg
from megatron_protein.parallel.dp import DataParallel
from megatron_protein.parallel.fused_params import FlatBuffer
from megatron_protein.training.optimizer import OptimConfig, _owned_by_this_rank, weight_decay_group

@dataclass
class _Piece:
    """Elements ``[param_lo, param_hi)`` of the flattened parameter ``name``, at ``offset`` inside a chunk."""

    name: str
    param: nn.Parameter
    param_lo: int
    param_hi: int
    offset: int

    @property
    def length(self) -> int:
        return self.param_hi - self.param_lo


@dataclass
class _Chunk:
    """The part ``[lo, hi)`` of one bucket of ``buffer`` that this rank steps (the whole padded bucket without the
    distributed optimizer): its float32 main parameters and float32 gradient, and what it holds."""

    buffer: FlatBuffer
    lo: int
    hi: int
    main: torch.Tensor
    grad: torch.Tensor
    pieces: list[_Piece] = field(default_factory=list)
    norm_ranges: list[tuple[int, int]] = field(default_factory=list)    # chunk-local, counted in the norm
    other_ranges: list[tuple[int, int]] = field(default_factory=list)   # chunk-local, checked for finiteness only


class MixedPrecisionOptimizer:
    """AdamW on float32 main parameters of the flat buffers of ``ddp``, sharded over dp when
    ``ddp.use_distributed_optimizer`` (module docstring).

    Args:
        ddp: the model's :class:`~megatron_protein.parallel.dp.DataParallel`, built on a
            :class:`~megatron_protein.parallel.fused_params.FusedParameters` whose buffers each hold one
            weight-decay group (``key=weight_decay_group``) and whose parameters are still float32 (their values
            become the main parameters, so they must already be equal across replicas: broadcast first).
        config: AdamW's hyper-parameters (``lr``, ``weight_decay``, betas, eps).
        params_dtype: the dtype the model's parameters are cast to (bf16, fp16, or float32 for the distributed
            optimizer alone).
        groups: the parallel groups (default: the ones of ``ddp``).

    Use (what :class:`~megatron_protein.training.train_loop.Pretrainer` does each step)::

        optimizer.zero_grad()
        loss = run_pipeline(...)                 # backward accumulates into the float32 main_grad buffers
        ddp.sync_gradients()                     # all-reduce, or reduce-scatter with the distributed optimizer
        all_reduce_tied_gradients(tied, groups)
        norm, finite = optimizer.grad_norm_and_finite(loss)
        if finite:
            optimizer.clip_(max_norm, norm)
            optimizer.step()                     # AdamW on the main chunks, copied back, all-gathered
    """

    def __init__(self, ddp: DataParallel, config: OptimConfig, params_dtype: torch.dtype = torch.float32,
                 groups: Optional[scg.ParallelGroups] = None):
        self.ddp = ddp
        self.groups = groups if groups is not None else ddp.groups
        self.distributed = ddp.use_distributed_optimizer and ddp.group is not None
        self.params_dtype = params_dtype
        fused = ddp.fused
        for buf in fused.buffers:
            if buf.data.dtype != torch.float32:
                raise ValueError(f"MixedPrecisionOptimizer: the model's parameters must be float32 when it is built "
                                 f"(their values become the main parameters); a buffer holds {buf.data.dtype}")
            kinds = {weight_decay_group(name, p) for name, p in zip(buf.names, buf.params)}
            if len(kinds) != 1:
                raise ValueError("MixedPrecisionOptimizer: a flat buffer mixes weight-decay groups; build the "
                                 "FusedParameters with key=weight_decay_group")
        bounds = [[ddp.shard_bounds(bucket) for bucket in buf.buckets] for buf in fused.buffers]
        previous = fused.cast_params_(params_dtype)   # float32 values before the cast, one tensor per buffer
        self.chunks: list[_Chunk] = []
        for buf, fp32, spans in zip(fused.buffers, previous, bounds):
            if params_dtype == torch.float32:
                mains = [buf.data[lo:hi] for lo, hi in spans]          # the model's own values, stepped in place
            elif not self.distributed:
                mains = [fp32[lo:hi] for lo, hi in spans]              # the float32 buffer becomes the main copy
            else:
                store = torch.empty(sum(hi - lo for lo, hi in spans), dtype=torch.float32, device=buf.device)
                mains, at = [], 0
                for lo, hi in spans:
                    mains.append(store[at:at + hi - lo])
                    mains[-1].copy_(fp32[lo:hi])
                    at += hi - lo
            for (lo, hi), main in zip(spans, mains):
                self.chunks.append(self._chunk(buf, lo, hi, main))
        del previous
        self._group_of = {}
        param_groups = []
        for kind, decay in (("decay", config.weight_decay), ("no_decay", 0.0)):
            mains = [c.main for c in self.chunks if weight_decay_group(c.buffer.names[0], c.buffer.params[0]) == kind]
            if mains:
                param_groups.append({"params": mains, "weight_decay": decay, "name": kind})
        for chunk in self.chunks:
            chunk.main.grad = chunk.grad
        self.optimizer = torch.optim.AdamW(param_groups, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                           eps=config.adam_eps, fused=True)
        #: name -> numel of every parameter of this rank's model shard (what a saved state must match).
        self.numels = {name: p.numel() for buf in fused.buffers for name, p in zip(buf.names, buf.params)}

    def _chunk(self, buf: FlatBuffer, lo: int, hi: int, main: torch.Tensor) -> _Chunk:
        chunk = _Chunk(buffer=buf, lo=lo, hi=hi, main=main, grad=buf.grad[lo:hi])
        counted, other = [], []
        for name, param, offset in zip(buf.names, buf.params, buf.offsets):
            a, b = max(lo, offset), min(hi, offset + param.numel())
            if a >= b:
                continue
            chunk.pieces.append(_Piece(name, param, a - offset, b - offset, a - lo))
            (counted if _owned_by_this_rank(param, self.groups) else other).append((a - lo, b - lo))
        chunk.norm_ranges, chunk.other_ranges = merged_ranges(counted), merged_ranges(other)
        return chunk

    # ------------------------------------------------------------------------------------------ what torch sees
    @property
    def param_groups(self) -> list[dict]:
        """The inner AdamW's groups (``decay``, ``no_decay``): the LR schedule sets their ``lr``."""
        return self.optimizer.param_groups

    def main_parameters(self) -> list[torch.Tensor]:
        return [chunk.main for chunk in self.chunks]

    def zero_grad(self) -> None:
        """Zero the float32 gradient buffers (``ddp.zero_grad()``)."""
        self.ddp.zero_grad()

    # ------------------------------------------------------------------------------------------ one step
    def unscale_(self, factor: float) -> None:
        """Multiply this rank's gradient chunks by ``factor`` (1 / loss scale for fp16)."""
        torch._foreach_mul_([chunk.grad for chunk in self.chunks], factor)

    def grad_norm_and_finite(self, loss: Optional[torch.Tensor] = None) -> tuple[float, bool]:
        """(global L2 norm of the gradient, whether the loss and every gradient on every rank are finite); one
        all-reduce over the world. Call after the gradients are reduced (``ddp.sync_gradients()``)."""
        self.ddp.fused.reattach_grads()  # nothing left to do after a sync; without one, the deferred zeroing
        counted = [c.grad[a:b] for c in self.chunks for a, b in c.norm_ranges]
        other = [c.grad[a:b] for c in self.chunks for a, b in c.other_ranges]
        # Norms of float32 slices (one pass each, no float64 copy of the buffer), squared and summed in float64.
        squares = (torch.stack(torch._foreach_norm(counted)).double().pow(2).sum() if counted
                   else torch.zeros((), dtype=torch.float64))
        rest = (torch.stack(torch._foreach_norm(other)).double().pow(2).sum() if other
                else torch.zeros((), dtype=torch.float64))
        bad = not bool(torch.isfinite(squares + rest))
        if loss is not None:
            bad = bad or not bool(torch.isfinite(torch.as_tensor(loss)).all())
        # Without the distributed optimizer dp replicas hold equal gradients: count them once.
        contributes = self.distributed or self.groups.rank_in("dp") == 0
        stats = torch.tensor([float(squares) if contributes else 0.0, float(bad)], dtype=torch.float64,
                             device=self.groups.device)
        world = self.groups.group("world")
        if world is not None:
            dist.all_reduce(stats, group=world)
        norm = math.sqrt(float(stats[0])) if float(stats[0]) >= 0 else float("nan")
        return norm, bool(stats[1] == 0) and math.isfinite(norm)

    def clip_(self, max_norm: float, norm: float) -> None:
        """Scale the gradient chunks by min(1, max_norm / norm) (Megatron's ``clip_grad_norm_fp32``)."""
        if max_norm > 0 and math.isfinite(norm):
            coeff = max_norm / (norm + 1e-6)
            if coeff < 1.0:
                torch._foreach_mul_([chunk.grad for chunk in self.chunks], coeff)

    def step(self) -> None:
        """AdamW on the main chunks, rounded into the model's parameters, all-gathered over dp."""
        for chunk in self.chunks:
            chunk.main.grad = chunk.grad  # in case something cleared it
        self.optimizer.step()
        self._copy_main_to_model()
        self.ddp.gather_parameters()

    def _copy_main_to_model(self) -> None:
        if self.params_dtype == torch.float32:
            return
        for chunk in self.chunks:
            chunk.buffer.data[chunk.lo:chunk.hi].copy_(chunk.main)

    # ------------------------------------------------------------------------------------------ main parameters
    def gather_main_params(self) -> Optional[dict[str, torch.Tensor]]:
        """The float32 main value of every parameter of this rank's model shard, by name, on dp rank 0 (None on
        the other dp ranks). Collective over dp with the distributed optimizer in bf16/fp16 (a gather of every
        chunk to dp rank 0); otherwise views, no communication (copy them before the next step)."""
        fused = self.ddp.fused
        if self.params_dtype == torch.float32:
            return {name: buf.param_view(i) for buf in fused.buffers for i, name in enumerate(buf.names)}
        if not self.distributed:
            full = {}
            for chunk in self.chunks:
                for piece in chunk.pieces:
                    full[piece.name] = chunk.main[piece.offset:piece.offset + piece.length].view(piece.param.shape)
            return full
        group, rank = self.ddp.group, self.ddp.rank
        dst = self.groups.ranks(self.ddp.axis)[0]
        gathered: dict[int, list[torch.Tensor]] = {}
        handles = []
        for index, chunk in enumerate(self.chunks):
            pieces = [torch.empty_like(chunk.main) for _ in range(self.ddp.size)] if rank == 0 else None
            handles.append(dist.gather(chunk.main, gather_list=pieces, dst=dst, group=group, async_op=True))
            gathered[index] = pieces
        for handle in handles:
            handle.wait()
        if rank != 0:
            return None
        full = {}
        per_buffer: dict[int, torch.Tensor] = {}
        for index, chunk in enumerate(self.chunks):
            key = id(chunk.buffer)
            if key not in per_buffer:
                per_buffer[key] = torch.zeros(chunk.buffer.data.numel(), dtype=torch.float32,
                                              device=chunk.buffer.device)
            bucket_start = chunk.lo - self.ddp.rank * chunk.main.numel()
            per_buffer[key][bucket_start:bucket_start + chunk.main.numel() * self.ddp.size].copy_(
                torch.cat(gathered[index]))
        for buf in fused.buffers:
            values = per_buffer[id(buf)]
            for name, p, offset in zip(buf.names, buf.params, buf.offsets):
                full[name] = values[offset:offset + p.numel()].view(p.shape)
        return full

    def load_main_params(self, named: dict[str, torch.Tensor], where: str = "the checkpoint") -> None:
        """Set the main parameters (and the model's rounded copies) from float32 values by parameter name (a
        checkpoint's model entry). Raises :class:`OptimizerStateError` naming a missing or misshapen one."""
        for chunk in self.chunks:
            for piece in chunk.pieces:
                value = named.get(piece.name)
                if value is None:
                    raise OptimizerStateError(f"{where} has no weight {piece.name!r}")
                if value.numel() != piece.param.numel():
                    raise OptimizerStateError(f"{where}: {piece.name!r} has {value.numel()} elements, the model "
                                              f"{piece.param.numel()}")
                chunk.main[piece.offset:piece.offset + piece.length].copy_(
                    value.reshape(-1)[piece.param_lo:piece.param_hi])
        self._copy_main_to_model()

    # ------------------------------------------------------------------------------------------ state
    def _state_of(self, main: torch.Tensor) -> dict:
        state = self.optimizer.state[main]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=main.device)
            state["exp_avg"] = torch.zeros_like(main, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(main, memory_format=torch.preserve_format)
        return state

    @property
    def steps_taken(self) -> int:
        states = [self.optimizer.state[c.main] for c in self.chunks if self.optimizer.state[c.main]]
        return int(states[0]["step"]) if states else 0

    def state_dict(self) -> dict:
        """This rank's optimizer state: AdamW's step and, per parameter name, the pieces
        ``(param_lo, param_hi, exp_avg, exp_avg_sq)`` of its flattened moments that this rank holds (the whole
        parameter without the distributed optimizer). Tensors are copies."""
        pieces: dict[str, list] = {}
        for chunk in self.chunks:
            state = self._state_of(chunk.main)
            for piece in chunk.pieces:
                sl = slice(piece.offset, piece.offset + piece.length)
                pieces.setdefault(piece.name, []).append(
                    (piece.param_lo, piece.param_hi, state["exp_avg"][sl].clone(), state["exp_avg_sq"][sl].clone()))
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "distributed": self.distributed,
                "dp_rank": self.ddp.rank, "dp_size": self.ddp.size, "step": self.steps_taken,
                "numels": dict(self.numels), "pieces": pieces,
                "param_groups": [{key: value for key, value in group.items() if key != "params"}
                                 for group in self.optimizer.param_groups]}

    def check_states(self, states: list[dict], where: str) -> None:
        """Raise :class:`OptimizerStateError` unless ``states`` (the saved shards, any dp degree) are of this
        format, of this model shard's parameters, and together cover every element this rank steps."""
        if not states:
            raise OptimizerStateError(f"{where}: no optimizer state")
        for state in states:
            if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
                raise OptimizerStateError(f"{where}: not a state of this optimizer (format "
                                          f"{state.get('format') if isinstance(state, dict) else type(state)})")
            if int(state.get("version", 0)) > STATE_VERSION:
                raise OptimizerStateError(f"{where}: optimizer state version {state.get('version')} is newer than "
                                          f"this code's {STATE_VERSION}")
            numels = state.get("numels")
            if numels != self.numels:
                theirs, ours = set(numels or ()), set(self.numels)
                detail = (f"missing {sorted(ours - theirs)[:3]}, unexpected {sorted(theirs - ours)[:3]}"
                          if theirs != ours else "parameter sizes differ")
                raise OptimizerStateError(f"{where}: the optimizer state is of another model ({detail})")
        if len({int(s["step"]) for s in states}) > 1:
            raise OptimizerStateError(f"{where}: the optimizer shards were saved at different steps")
        saved: dict[str, list[tuple[int, int]]] = {}
        for state in states:
            for name, entries in state["pieces"].items():
                for lo, hi, exp_avg, exp_avg_sq in entries:
                    if exp_avg.numel() != hi - lo or exp_avg_sq.numel() != hi - lo:
                        raise OptimizerStateError(f"{where}: a piece of {name!r} has the wrong size")
                    saved.setdefault(name, []).append((lo, hi))
        for chunk in self.chunks:
            for piece in chunk.pieces:
                covered = merged_ranges([(max(a, piece.param_lo), min(b, piece.param_hi))
                                   for a, b in saved.get(piece.name, ()) if a < piece.param_hi and b > piece.param_lo])
                if covered != [(piece.param_lo, piece.param_hi)]:
                    raise OptimizerStateError(
                        f"{where}: the saved optimizer shards do not cover elements [{piece.param_lo}, "
                        f"{piece.param_hi}) of {piece.name!r} (a shard file missing?)")

    def load_states(self, states: list[dict]) -> None:
        """Copy the overlap of the saved pieces (from any dp degree, with or without the distributed optimizer)
        into this rank's moments and set AdamW's step. Check first with :meth:`check_states`."""
        step = int(states[0]["step"])
        by_name: dict[str, list] = {}
        for state in states:
            for name, entries in state["pieces"].items():
                by_name.setdefault(name, []).extend(entries)
        for chunk in self.chunks:
            target = self._state_of(chunk.main)
            target["step"].fill_(step)
            for piece in chunk.pieces:
                for lo, hi, exp_avg, exp_avg_sq in by_name.get(piece.name, ()):
                    a, b = max(lo, piece.param_lo), min(hi, piece.param_hi)
                    if a >= b:
                        continue
                    at = piece.offset + a - piece.param_lo
                    target["exp_avg"][at:at + b - a].copy_(exp_avg[a - lo:b - lo])
                    target["exp_avg_sq"][at:at + b - a].copy_(exp_avg_sq[a - lo:b - lo])

    def nonfinite_entries(self, limit: int = 4) -> list[str]:
        """Names of (up to ``limit``) parameters whose main value or AdamW moment on this rank holds NaN or inf."""
        found = []
        for chunk in self.chunks:
            state = self.optimizer.state[chunk.main]
            tensors = [("main value", chunk.main)] + [(f"optimizer {key}", state[key])
                                                      for key in ("exp_avg", "exp_avg_sq") if key in state]
            for what, tensor in tensors:
                if bool(torch.isfinite(tensor).all()):
                    continue
                for piece in chunk.pieces:
                    part = tensor[piece.offset:piece.offset + piece.length]
                    if not bool(torch.isfinite(part).all()):
                        found.append(f"{what} of {piece.name}")
                        if len(found) >= limit:
                            return found
        return found

    def state_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for the optimizer: float32 main parameters (0 when they are the model's own),
        AdamW's two moments, and the float32 gradient buffer (what ``bench/pp_dp.py`` reports)."""
        mains = 0 if self.params_dtype == torch.float32 else sum(c.main.numel() * 4 for c in self.chunks)
        moments = sum(c.main.numel() * 4 * 2 for c in self.chunks)
        grads = sum(buf.grad.numel() * buf.grad.element_size() for buf in self.ddp.fused.buffers)
        return {"main_params": mains, "adam_moments": moments, "grad_buffer": grads,
                "optimizer_state": mains + moments}


def pieces_from_torch_adamw(inner: dict, model_state: dict[str, torch.Tensor], numels: dict[str, int]) -> dict:
    """A ``torch.optim.AdamW`` state of this model (a float32 or autocast run: one state per parameter, groups
    ``decay``/``no_decay`` in the model's order) as one :meth:`MixedPrecisionOptimizer.state_dict` shard holding
    every parameter whole. ``model_state`` is the checkpoint's flat model state (names and shapes).
    Raises :class:`OptimizerStateError` when the state is not of that form."""
    from megatron_protein.conversion.reshard import optimizer_index_keys

    keys = optimizer_index_keys(model_state, inner)
    if keys is None:
        raise OptimizerStateError("the optimizer state is not a per-parameter torch AdamW state of this model")
    pieces, steps = {}, set()
    for index, entry in inner["state"].items():
        name = keys[index]
        if "exp_avg" not in entry or "exp_avg_sq" not in entry:
            raise OptimizerStateError(f"the optimizer state of {name!r} has no Adam moments")
        steps.add(int(entry["step"]))
        pieces[name] = [(0, entry["exp_avg"].numel(), entry["exp_avg"].reshape(-1).float(),
                         entry["exp_avg_sq"].reshape(-1).float())]
    missing = sorted(set(numels) - set(pieces))
    if missing:  # parameters torch had no state for yet (never stepped): zero moments
        for name in missing:
            zero = torch.zeros(numels[name])
            pieces[name] = [(0, numels[name], zero, zero.clone())]
    if len(steps) > 1:
        raise OptimizerStateError(f"the torch AdamW state has parameters at different steps {sorted(steps)}")
    return {"format": STATE_FORMAT, "version": STATE_VERSION, "distributed": False, "dp_rank": 0, "dp_size": 1,
            "step": steps.pop() if steps else 0, "numels": {k: v for k, v in numels.items()}, "pieces": pieces,
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in inner["param_groups"]]}


def torch_adamw_state_from_pieces(states: list[dict], optimizer: torch.optim.Optimizer,
                                  names: dict[int, str]) -> dict:
    """The other way: the saved shards of a :class:`MixedPrecisionOptimizer` as a ``torch.optim.AdamW``
    ``state_dict`` for ``optimizer`` (whose parameter ``id`` -> name is ``names``), to resume them in float32 or
    autocast without the distributed optimizer. Every parameter must be covered whole."""
    by_name: dict[str, list] = {}
    for state in states:
        for name, entries in state["pieces"].items():
            by_name.setdefault(name, []).extend(entries)
    step = int(states[0]["step"])
    torch_state, index = {}, 0
    param_groups = []
    for group in optimizer.param_groups:
        indices = []
        for p in group["params"]:
            name = names[id(p)]
            exp_avg, exp_avg_sq = torch.zeros(p.numel()), torch.zeros(p.numel())
            covered = []
            for lo, hi, a, b in by_name.get(name, ()):
                exp_avg[lo:hi].copy_(a)
                exp_avg_sq[lo:hi].copy_(b)
                covered.append((lo, hi))
            if merged_ranges(covered) != [(0, p.numel())]:
                raise OptimizerStateError(f"the saved optimizer shards do not cover all of {name!r}")
            torch_state[index] = {"step": torch.tensor(float(step)), "exp_avg": exp_avg.view(p.shape).to(p.dtype),
                                  "exp_avg_sq": exp_avg_sq.view(p.shape).to(p.dtype)}
            indices.append(index)
            index += 1
        param_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": indices})
    return {"state": torch_state, "param_groups": param_groups}


def build_data_parallel(model: nn.Module, groups: scg.ParallelGroups, overlap_grad_reduce: bool,
                        use_distributed_optimizer: bool,
                        tied: Iterable[nn.Parameter] = ()) -> DataParallel:
    """The :class:`DataParallel` a :class:`MixedPrecisionOptimizer` needs: one buffer per weight-decay group,
    buckets padded to the dp degree with the distributed optimizer, and the tied word embedding in a bucket of its
    own (so the first and last pipeline stage cut it into the same chunks and the sum of its two gradients over
    the pipeline ends can follow the reduce-scatter, as in Megatron-LM)."""
    from megatron_protein.parallel.fused_params import FusedParameters

    tied_ids = {id(p) for p in tied}
    pad = groups.size("dp") if use_distributed_optimizer else 1
    fused = FusedParameters(model, key=weight_decay_group, pad_buckets_to=pad,
                            own_bucket=lambda name, p: id(p) in tied_ids)
    return DataParallel(model, groups, overlap_grad_reduce=overlap_grad_reduce, fused=fused,
                        use_distributed_optimizer=use_distributed_optimizer)
