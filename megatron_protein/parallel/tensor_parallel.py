"""Tensor (intra-layer) model parallelism: Megatron-LM's parallel linear layers, embedding and cross-entropy.

Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model Parallelism",
section 3. A transformer MLP ``Y = GeLU(X A) B`` is split as A = [A_1 ... A_p] by columns (each rank computes
GeLU(X A_i) with no communication) and B by rows (each rank computes GeLU(X A_i) B_i, and one all-reduce sums
them); self-attention is split the same way by heads. The vocabulary of the embedding and of the output logits
is split in contiguous ranges, and the cross-entropy is computed from the logit shards with three scalar-per-token
all-reduces, never gathering the ``[b, s, V]`` logits.

Weights follow ``torch.nn.functional.linear``: a ``[out, in]`` matrix, ``Y = X W^T + b``. Every rank builds the
FULL weight with ``init_method`` on the default generator (seeded identically on every rank, see
:mod:`~megatron_protein.parallel.random`) and keeps its slice, so a model built at TP=N under
``torch.manual_seed(s)`` holds exactly the slices of the TP=1 model built under the same seed, and every rank's
generator stays in step. Sharded parameters carry ``tensor_model_parallel = True`` and ``partition_dim``;
parameters replicated across tp ranks carry ``tensor_model_parallel = False`` (the gradient-norm code counts those
once per model replica, see :func:`param_is_not_tensor_parallel_duplicate`).

Sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
section 4.2.2; Megatron-LM's ``--sequence-parallel``): between a row-parallel layer and the next column-parallel
one (LayerNorm, dropout, the residual add) the activations are replicated over tp, so each rank may keep only its
1/tp slice of the sequence. With ``sequence_parallel=True`` a :class:`ColumnParallelLinear` takes its input as that
slice ``[..., s/tp, in]`` and all-gathers it along the sequence (dim -2) instead of entering through the identity
(backward: reduce-scatter of the input gradient instead of an all-reduce), and a :class:`RowParallelLinear`
reduce-scatters its partial sums along the sequence instead of all-reducing them (backward: all-gather). The same
bytes travel (an all-reduce is a reduce-scatter plus an all-gather), and LayerNorm, dropout and residual
activations take 1/tp of the memory. The column-parallel product keeps only the slice of its input for backward and
all-gathers it again there (:func:`all_gather_linear`, Megatron-LM's ``linear_with_grad_accumulation_and_async_
allreduce`` with ``sequence_parallel``), so the gathered ``[b, s, h]`` input is never stored either. Parameters that act on the slices (LayerNorm weights and biases, the
row-parallel biases) see only their slice's part of the gradient; they carry ``sequence_parallel = True`` and
:func:`all_reduce_sequence_parallel_gradients` sums their gradients over tp after the backward passes.

Uneven splits are an error, not padded: an ``out_features``, ``in_features`` or vocabulary size that the
tensor-parallel degree does not divide raises :class:`~megatron_protein.parallel.scg.ParallelConfigError` naming
the layer and the sizes. The vocabulary is the exception that callers pad on purpose, with :func:`pad_vocab_size`
(Megatron's ``--make-vocab-size-divisible-by``); the padding rows are never a target and are dropped on conversion.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import scg
from .collectives import (_all_gather, _reduce_scatter, all_gather, copy_to_group, gather_from_group, group_size,
                          reduce_from_group_, reduce_scatter_to_group, scatter_to_group)
from .random import (MODEL_PARALLEL_RNG, ParallelSeeds, RNGStatesTracker, get_rng_tracker,  # noqa: F401
                     model_parallel_seed)
from .scg import ParallelConfigError

__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
    "vocab_parallel_logits", "pad_vocab_size", "divide", "init_method_normal", "scaled_init_method_normal",
    "set_tensor_model_parallel_attributes", "param_is_not_tensor_parallel_duplicate",
    "mark_sequence_parallel", "sequence_parallel_parameters", "all_reduce_sequence_parallel_gradients",
    "RNGStatesTracker", "get_rng_tracker", "model_parallel_seed", "MODEL_PARALLEL_RNG", "ParallelSeeds",
    "ParallelConfigError",
]

InitMethod = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Sizes, initialisers, parameter attributes
# ---------------------------------------------------------------------------------------------------------------

def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator // denominator``, or a :class:`ParallelConfigError` naming ``what`` when it does not divide.

    ``what`` describes the quantity, e.g. ``"ColumnParallelLinear out_features"`` or ``"num_attention_heads"``.
    """
    if numerator % denominator != 0:
        raise ParallelConfigError(
            f"{what} = {numerator} is not divisible by the tensor-parallel degree {denominator}; uneven splits "
            f"are not supported: choose a degree that divides {numerator}")
    return numerator // denominator


def pad_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Smallest multiple of ``divisible_by * tp_size`` that is >= ``vocab_size`` (Megatron's padded vocab).

    Each tp rank then holds a whole multiple of ``divisible_by`` rows (8 keeps GEMMs aligned on tensor cores).
    With the 30 TAPE ids: divisible_by 8 gives 32 at tp 1 and 2, 32 at tp 4, 64 at tp 8.
    """
    if vocab_size < 1 or divisible_by < 1 or tp_size < 1:
        raise ValueError(f"pad_vocab_size: sizes must be positive, got vocab_size={vocab_size}, "
                         f"divisible_by={divisible_by}, tp_size={tp_size}")
    multiple = divisible_by * tp_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def init_method_normal(sigma: float) -> InitMethod:
    """N(0, sigma^2) initialiser (Megatron/BERT use sigma = 0.02)."""
    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(tensor, mean=0.0, std=sigma)
    return init_


def scaled_init_method_normal(sigma: float, num_layers: int) -> InitMethod:
    """N(0, (sigma / sqrt(2 num_layers))^2) for the layers that write into the residual stream (GPT-2, Megatron).

    Each layer adds two such outputs to the residual, so this keeps its variance independent of depth.
    """
    return init_method_normal(sigma / math.sqrt(2.0 * num_layers))


def set_tensor_model_parallel_attributes(param: torch.Tensor, is_parallel: bool, partition_dim: int = -1) -> None:
    """Mark ``param`` as split over tp along ``partition_dim`` (or as replicated when ``is_parallel`` is False)."""
    param.tensor_model_parallel = is_parallel
    param.partition_dim = partition_dim if is_parallel else -1
    param.partition_stride = 1


def param_is_not_tensor_parallel_duplicate(param: torch.Tensor, groups: Optional[scg.ParallelGroups] = None) -> bool:
    """True for a tp shard or for tp rank 0's copy of a replicated parameter: sum a norm only over those."""
    pg = groups if groups is not None else scg.current()
    return bool(getattr(param, "tensor_model_parallel", False)) or pg.rank_in("tp") == 0


def mark_sequence_parallel(*params: torch.Tensor) -> None:
    """Mark replicated parameters that act on sequence slices: their gradients are partial over tp."""
    for param in params:
        param.sequence_parallel = True


def sequence_parallel_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` marked by :func:`mark_sequence_parallel`, in registration order."""
    return [p for p in module.parameters() if getattr(p, "sequence_parallel", False) and p.requires_grad]


def all_reduce_sequence_parallel_gradients(params, groups: Optional[scg.ParallelGroups] = None) -> None:
    """Sum the gradients of sequence-parallel parameters over tp (Megatron-LM's ``_allreduce_layernorm_grads``).

    Each tp rank computed its sequence slice's part; after the sum every rank holds the gradient of the whole
    sequence, as without sequence parallelism. One all-reduce over a flat copy of all of them (they are small:
    LayerNorm parameters and biases). Call after the data-parallel gradient sync (with ``overlap_grad_reduce`` a
    bucket's dp all-reduce may be in flight until then), before clipping and the optimizer step; the two sums
    commute. A parameter with a float32 ``main_grad`` (mixed-precision parameters) has that summed; after a
    reduce-scatter over dp (distributed optimizer) only this rank's chunk of it is meaningful, and the sum is right
    there because every tp rank lays out its buckets alike. A missing ``.grad`` counts as zero.
    """
    pg = _groups(groups)
    group = pg.group("tp")
    params = list(params)
    if group is None or not params:
        return
    grads = []
    for p in params:
        grad = getattr(p, "main_grad", None)
        if grad is None:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = p.grad
        grads.append(grad)
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


class _AllGatherLinear(torch.autograd.Function):
    """``y = all_gather(x, dim) @ W^T + b`` that saves the slice ``x``, not the gathered input: backward gathers it
    again for the weight gradient and reduce-scatters the input gradient. Under autocast the product runs in the
    autocast dtype, as ``F.linear`` would, and the gradients come back in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, x, weight, bias, dim, group):
        device = x.device.type
        dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            out = F.linear(_all_gather(x, dim, group), weight, bias)
        ctx.save_for_backward(x, weight)
        ctx.dim, ctx.group, ctx.dtypes, ctx.has_bias = dim, group, dtypes, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        full = _all_gather(x, ctx.dim, ctx.group)   # the gathered input again (never stored)
        grad_input = _reduce_scatter(grad.matmul(weight), ctx.dim, ctx.group, "all_gather_linear (backward)")
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_weight = grad_2d.t().matmul(full.reshape(-1, full.shape[-1]))
        grad_bias = grad_2d.sum(0) if ctx.has_bias else None
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        return (grad_input.to(x_dtype), grad_weight.to(w_dtype),
                None if grad_bias is None else grad_bias.to(b_dtype), None, None)


def all_gather_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], group,
                      dim: int = -2) -> torch.Tensor:
    """``F.linear(all_gather(x, dim), weight, bias)`` keeping only ``x`` (this rank's slice of the sequence) for
    backward; the input of sequence-parallel column-parallel layers (the plain composition at tp = 1)."""
    if group is None or group_size(group) == 1:
        return F.linear(x, weight, bias)
    return _AllGatherLinear.apply(x, weight, bias, dim % x.dim(), group)


def _groups(groups: Optional[scg.ParallelGroups]) -> scg.ParallelGroups:
    return groups if groups is not None else scg.current()


class _SharedGroups:
    """Holds a layer's ParallelGroups so that ``copy.deepcopy`` of a model shares it instead of failing.

    Process groups are process-wide communication handles, not model state: a deep copy of a layer (an EMA
    model, for instance) must talk over the same groups, and torch's ProcessGroup cannot be copied anyway.
    """

    __slots__ = ("groups",)

    def __init__(self, groups: scg.ParallelGroups):
        self.groups = groups

    def __deepcopy__(self, memo):
        return self


class _TensorParallelModule(nn.Module):
    """Base of the layers here: remembers the groups the layer was built for (``None`` -> ``scg.current()``)."""

    def __init__(self, groups: Optional[scg.ParallelGroups]):
        super().__init__()
        self._shared_groups = _SharedGroups(_groups(groups))

    @property
    def groups(self) -> scg.ParallelGroups:
        return self._shared_groups.groups


def _sharded_weight(full_shape: tuple[int, ...], partition_dim: int, init_method: InitMethod,
                    pg: scg.ParallelGroups) -> nn.Parameter:
    """Build the full weight on CPU with ``init_method`` (default generator, default dtype) and keep this rank's
    slice."""
    full = torch.empty(full_shape, device="cpu")
    with torch.no_grad():
        init_method(full)
    shard = full.chunk(pg.size("tp"), dim=partition_dim)[pg.rank_in("tp")]
    param = nn.Parameter(shard.to(pg.device).clone(memory_format=torch.contiguous_format))
    set_tensor_model_parallel_attributes(param, True, partition_dim)
    return param


def _zeros(shape: tuple[int, ...], pg: scg.ParallelGroups, is_parallel: bool) -> nn.Parameter:
    param = nn.Parameter(torch.zeros(shape, device=pg.device))
    set_tensor_model_parallel_attributes(param, is_parallel, 0)
    return param


def _check_last_dim(x: torch.Tensor, expected: int, layer: str, what: str) -> None:
    if x.shape[-1] != expected:
        raise ValueError(f"{layer}: the input's last dim is {x.shape[-1]} but {what} is {expected} "
                         f"(input shape {tuple(x.shape)})")


# ---------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------

class ColumnParallelLinear(_TensorParallelModule):
    """Y = X A^T + b with A split by output features (rows of the ``[out, in]`` weight, i.e. columns of X A).

    Rank i holds ``A_i`` of shape ``[out/p, in]`` and ``b_i`` of ``[out/p]`` and computes ``Y_i = X A_i^T + b_i``.
    The input enters through :func:`copy_to_group` (its gradient is all-reduced over tp). With
    ``gather_output=True`` the ``[..., out/p]`` shards are all-gathered into ``[..., out]``; with False each rank
    keeps its ``[..., out/p]`` shard, ready for a :class:`RowParallelLinear` with ``input_is_parallel=True``.
    With ``skip_bias_add=True`` the layer returns ``(Y without bias, b)`` so the caller can fuse the bias add
    with the next op (bias-GeLU); the returned bias is the shard, or the full bias when ``gather_output``.
    With ``sequence_parallel=True`` the input is this rank's slice of the sequence (dim -2), all-gathered before
    the product (module docstring). Bias starts at zero.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = True,
                 init_method: Optional[InitMethod] = None, groups: Optional[scg.ParallelGroups] = None,
                 skip_bias_add: bool = False, sequence_parallel: bool = False):
        super().__init__(groups)
        pg = self.groups
        self.in_features, self.out_features = in_features, out_features
        self.gather_output, self.skip_bias_add = gather_output, skip_bias_add
        self.sequence_parallel = sequence_parallel
        self.output_size_per_partition = divide(out_features, pg.size("tp"),
                                                "ColumnParallelLinear out_features")
        self.weight = _sharded_weight((out_features, in_features), 0, init_method or init_method_normal(0.02), pg)
        self.bias = _zeros((self.output_size_per_partition,), pg, True) if bias else None

    def forward(self, x: torch.Tensor):
        _check_last_dim(x, self.in_features, "ColumnParallelLinear", "in_features")
        group = self.groups.group("tp")
        bias = None if self.skip_bias_add else self.bias
        if self.sequence_parallel:
            # [..., s/p, in] gathered to [..., s, in] for the product; only the slice is kept for backward.
            y = all_gather_linear(x, self.weight, bias, group)
        else:
            y = F.linear(copy_to_group(x, group), self.weight, bias)
        if self.gather_output:
            y = gather_from_group(y, -1, group)  # [..., out/p] -> [..., out]
        if not self.skip_bias_add:
            return y
        bias = self.bias
        if bias is not None and self.gather_output:
            bias = gather_from_group(bias, 0, group)
        return y, bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features} "
                f"({self.output_size_per_partition} on this rank), bias={self.bias is not None}, "
                f"gather_output={self.gather_output}, skip_bias_add={self.skip_bias_add}, "
                f"sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(_TensorParallelModule):
    """Y = X A^T + b with A split by input features (columns of the ``[out, in]`` weight, i.e. rows of X A).

    Rank i holds ``A_i`` of shape ``[out, in/p]`` and computes the partial product ``X_i A_i^T``; one all-reduce
    (:func:`reduce_from_group_`, in place) sums the partials, then the replicated bias ``b`` (``[out]``, not split)
    is added.
    With ``input_is_parallel=True`` the input is already this rank's ``[..., in/p]`` shard (the output of a
    :class:`ColumnParallelLinear` with ``gather_output=False``); otherwise the full ``[..., in]`` input is split
    with :func:`scatter_to_group`. With ``skip_bias_add=True`` the layer returns ``(X A^T, b)`` so the caller can
    fuse the bias with dropout and the residual add. With ``sequence_parallel=True`` the partial sums are
    reduce-scattered along the sequence (dim -2): the output is this rank's slice, and the bias, which then acts
    on a slice, is marked ``sequence_parallel`` (module docstring). Bias starts at zero.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = False,
                 init_method: Optional[InitMethod] = None, groups: Optional[scg.ParallelGroups] = None,
                 skip_bias_add: bool = False, sequence_parallel: bool = False):
        super().__init__(groups)
        pg = self.groups
        self.in_features, self.out_features = in_features, out_features
        self.input_is_parallel, self.skip_bias_add = input_is_parallel, skip_bias_add
        self.sequence_parallel = sequence_parallel
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear(sequence_parallel=True) needs input_is_parallel=True (its input is "
                             "a column-parallel layer's output)")
        self.input_size_per_partition = divide(in_features, pg.size("tp"), "RowParallelLinear in_features")
        self.weight = _sharded_weight((out_features, in_features), 1, init_method or init_method_normal(0.02), pg)
        self.bias = _zeros((out_features,), pg, False) if bias else None
        if self.bias is not None and sequence_parallel:
            mark_sequence_parallel(self.bias)

    def forward(self, x: torch.Tensor):
        group = self.groups.group("tp")
        if self.input_is_parallel:
            _check_last_dim(x, self.input_size_per_partition, "RowParallelLinear (input_is_parallel)",
                            "in_features / tp")
        else:
            _check_last_dim(x, self.in_features, "RowParallelLinear", "in_features")
            x = scatter_to_group(x, -1, group)  # [..., in] -> [..., in/p]
        if self.sequence_parallel:
            y = reduce_scatter_to_group(F.linear(x, self.weight), -2, group)  # [..., s, out] partials -> [..., s/p, out]
        else:
            y = reduce_from_group_(F.linear(x, self.weight), group)  # sum of partials, in place
        if self.skip_bias_add:
            return y, self.bias
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} ({self.input_size_per_partition} on this rank), "
                f"out_features={self.out_features}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}, skip_bias_add={self.skip_bias_add}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(_TensorParallelModule):
    """Embedding table split over tp by contiguous vocabulary ranges.

    Rank i holds rows ``[i V/p, (i+1) V/p)``. Ids outside this range look up row 0 and are zeroed, so after the
    all-reduce (:func:`reduce_from_group`) every rank has the full ``[..., D]`` embedding; each rank's gradient
    lands only in its own rows. ``num_embeddings`` must divide by tp: pad it with :func:`pad_vocab_size`.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, init_method: Optional[InitMethod] = None,
                 groups: Optional[scg.ParallelGroups] = None):
        super().__init__(groups)
        pg = self.groups
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        per_partition = divide(num_embeddings, pg.size("tp"),
                               "VocabParallelEmbedding num_embeddings (pad it with pad_vocab_size)")
        self.vocab_start_index = pg.rank_in("tp") * per_partition
        self.vocab_end_index = self.vocab_start_index + per_partition
        self.weight = _sharded_weight((num_embeddings, embedding_dim), 0, init_method or init_method_normal(0.02),
                                      pg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        group = self.groups.group("tp")
        if group is None:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)
        local_ids = (ids - self.vocab_start_index).masked_fill(outside, 0)
        local = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_group_(local, group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim} (rows [{self.vocab_start_index}, "
                f"{self.vocab_end_index}) on this rank)")


def vocab_parallel_logits(hidden: torch.Tensor, embedding_weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                          groups: Optional[scg.ParallelGroups] = None, gather_output: bool = False,
                          sequence_parallel: bool = False) -> torch.Tensor:
    """Logits of a decoder tied to a :class:`VocabParallelEmbedding`: ``hidden @ W_i^T + b_i`` on each rank.

    ``hidden`` is replicated over tp and enters through :func:`copy_to_group` (with ``sequence_parallel``: it is
    this rank's slice of dim -2, all-gathered first); the result is this rank's ``[..., V/p]`` shard of every
    position (feed it to :func:`vocab_parallel_cross_entropy`), or the full ``[..., V]`` when ``gather_output``
    (for inference).
    """
    group = _groups(groups).group("tp")
    if sequence_parallel:
        logits = all_gather_linear(hidden, embedding_weight, bias, group)
    else:
        logits = F.linear(copy_to_group(hidden, group), embedding_weight, bias)
    return gather_from_group(logits, -1, group) if gather_output else logits


# ---------------------------------------------------------------------------------------------------------------
# Cross-entropy over vocabulary shards
# ---------------------------------------------------------------------------------------------------------------

class _VocabParallelCrossEntropy(torch.autograd.Function):
    """loss = log sum_v exp(z_v - m) - (z_t - m), with m, the sum and z_t each assembled by an all-reduce."""

    @staticmethod
    def forward(ctx, logits_shard, target, group, ignore_index):
        world, rank = group_size(group), (0 if group is None else dist.get_rank(group))
        logits = logits_shard.float()
        per_partition = logits.shape[-1]
        vocab_start = rank * per_partition
        # Global max over the vocabulary, for a numerically stable log-sum-exp (no gradient flows through it).
        logits_max = logits.amax(dim=-1)
        if world > 1:
            dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)

        ignored = target == ignore_index
        in_shard = (target >= vocab_start) & (target < vocab_start + per_partition) & ~ignored
        local_target = (target - vocab_start).masked_fill(~in_shard, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(~in_shard, 0.0)
        exp_logits = shifted.exp()
        sum_exp = exp_logits.sum(dim=-1)
        if world > 1:
            # One all-reduce for both per-token sums: the target's logit lives on exactly one rank.
            both = torch.stack([target_logit, sum_exp])
            dist.all_reduce(both, group=group)
            target_logit, sum_exp = both[0], both[1]
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, in_shard, local_target, ignored)
        ctx.input_dtype = logits_shard.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, in_shard, local_target, ignored = ctx.saved_tensors
        # d loss / d z_v = softmax_v - [v == target]; zero for ignored tokens.
        grad = softmax.clone()
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -in_shard.to(grad.dtype).unsqueeze(-1))
        grad.mul_(grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1).to(grad.dtype))
        return grad.to(ctx.input_dtype), None, None, None


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, target: torch.Tensor,
                                 groups: Optional[scg.ParallelGroups] = None,
                                 ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross-entropy from this rank's ``[..., V/p]`` logit shard, without gathering the logits.

    Equals ``F.cross_entropy(full_logits.flatten(0, -2), target.flatten(), reduction='none')`` reshaped to
    ``target.shape``, with the loss and gradient 0 where ``target == ignore_index``. Computed in float32 whatever
    the logits' dtype; the gradient comes back in the logits' dtype. Three tiny all-reduces per call: the max
    (MAX), then the target logit and the sum of exponentials together (SUM).
    """
    pg = _groups(groups)
    group = pg.group("tp")
    if logits_shard.shape[:-1] != target.shape:
        raise ValueError(f"vocab_parallel_cross_entropy: logits shape {tuple(logits_shard.shape)} does not match "
                         f"target shape {tuple(target.shape)} (expected logits [*target.shape, V/tp])")
    vocab_size = logits_shard.shape[-1] * pg.size("tp")
    invalid = ((target < 0) | (target >= vocab_size)) & (target != ignore_index)
    if bool(invalid.any()):
        bad = target[invalid][0].item()
        raise ValueError(f"vocab_parallel_cross_entropy: target id {bad} is outside the vocabulary "
                         f"[0, {vocab_size}) and is not the ignore index {ignore_index}")
    return _VocabParallelCrossEntropy.apply(logits_shard, target, group, ignore_index)
