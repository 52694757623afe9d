"""Bias-dropout-add: residual + dropout(x + bias), the end of every BERT sublayer and Evoformer update.

Training: out = residual + keep * (x + bias) / (1 - p) with keep ~ Bernoulli(1 - p).
Inference (module in eval mode, or p == 0): out = residual + x + bias, no mask drawn.

``broadcast_dim`` shares the dropout mask along one axis (or several), which is the AF2 supplement's
DropoutRowwise / DropoutColumnwise (section 1.11.6): for MSA activations ``[*, N_seq, N_res, c_m]`` the row-wise
dropout of Algorithm 6 shares the mask over rows (``broadcast_dim=-3``), the column-wise one over columns
(``broadcast_dim=-2``).

The keep mask is drawn the same way on every path (:func:`bernoulli_keep_mask` on the mask's own shape), so fused
and unfused runs with the same seed drop the same units. The fused paths save the mask as bool (one byte per
element, or fewer when shared) instead of a full-precision scaled mask.
"""
from __future__ import annotations

import concurrent.futures
import math
import os
from typing import Optional, Sequence, Union

import torch

from megatron_protein.kernels import dispatch


def dropout_keep_mask(shape: torch.Size, p: float, broadcast_dims: Sequence[int], device) -> torch.Tensor:
    """Bernoulli(1 - p) bool keep mask of ``shape`` with size 1 along ``broadcast_dims`` (shared there)."""
    mask_shape = list(shape)
    for d in broadcast_dims:
        mask_shape[d] = 1
    return bernoulli_keep_mask(mask_shape, 1.0 - p, device)


#: A large CPU mask is drawn in this many fixed chunks, each from its own generator seeded from the default one.
KEEP_MASK_CHUNKS = 4
#: Masks with fewer elements are drawn in one piece with ``torch.rand``.
KEEP_MASK_CHUNKED_MIN_NUMEL = 1 << 20
_chunk_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None


def _forget_chunk_pool() -> None:
    # A forked child has none of the parent's worker threads: it must build its own pool.
    global _chunk_pool
    _chunk_pool = None


os.register_at_fork(after_in_child=_forget_chunk_pool)


def _uniform_chunked(numel: int) -> torch.Tensor:
    """``numel`` uniform floats in [0, 1) on CPU, drawn in :data:`KEEP_MASK_CHUNKS` chunks on up to two threads.

    PyTorch's CPU generator (one Mersenne Twister) fills a tensor serially, so a dropout mask of a
    [b, h, s, s] attention tensor keeps one core busy while the other waits. Here the default generator
    draws one 62-bit seed per chunk, and each chunk is filled by its own generator on a worker thread (tensor ops
    release the GIL). The chunking is fixed, not tied to the thread count, so the result is a function of the
    default generator's state alone: same seed, same mask, on any machine, and a resumed run redraws it exactly.
    """
    global _chunk_pool
    seeds = torch.randint(0, 2 ** 62, (KEEP_MASK_CHUNKS,)).tolist()
    uniform = torch.empty(numel)
    bounds = [numel * i // KEEP_MASK_CHUNKS for i in range(KEEP_MASK_CHUNKS + 1)]

    def fill(chunk: int) -> None:
        generator = torch.Generator().manual_seed(seeds[chunk])
        uniform[bounds[chunk]:bounds[chunk + 1]].uniform_(generator=generator)

    if torch.get_num_threads() < 2:
        for chunk in range(KEEP_MASK_CHUNKS):
            fill(chunk)
    else:
        if _chunk_pool is None:
            _chunk_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="keep-mask")
        list(_chunk_pool.map(fill, range(KEEP_MASK_CHUNKS)))
    return uniform


def bernoulli_keep_mask(shape, keep_prob: float, device) -> torch.Tensor:
    """bool mask, True with probability ``keep_prob``, from the default generator: ``uniform < keep_prob``.

    On CPU ``rand`` is about twice as fast as ``bernoulli_(keep_prob)``, which draws element by element through a
    slower path (torch 2.13, AVX-512 build: 6 vs 12 ms for 2M elements), and large masks are drawn on two threads
    (:func:`_uniform_chunked`). Both compare a uniform float with the probability: same distribution.
    """
    shape = tuple(shape)
    numel = math.prod(shape)
    if torch.device(device).type == "cpu" and numel >= KEEP_MASK_CHUNKED_MIN_NUMEL:
        return (_uniform_chunked(numel) < keep_prob).view(shape)
    return torch.rand(shape, device=device) < keep_prob


def bias_dropout_add_unfused(x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor,
                             keep: Optional[torch.Tensor], p: float) -> torch.Tensor:
    """Plain composition; ``keep=None`` means inference (no dropout)."""
    y = x + bias if bias is not None else x
    if keep is not None:
        y = y * keep.to(y.dtype) / (1.0 - p)
    return residual + y


def _train_math(x, bias, residual, keep, scale):
    # torch.where takes the bool mask as it is; multiplying by it would first copy it to x's dtype.
    y = x + bias if bias is not None else x
    return torch.add(residual, torch.where(keep, y, 0.0), alpha=scale)


_compiled: dict[str, object] = {}


class _ReferenceBiasDropoutAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, residual, keep, p, compiled):
        scale = 1.0 / (1.0 - p)
        fn = _train_math
        if compiled:
            fn = _compiled.setdefault("train", torch.compile(_train_math, dynamic=True))
        out = fn(x, bias, residual, keep, scale)
        ctx.scale = scale
        ctx.x_shape = x.shape
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.save_for_backward(keep)
        return out

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        dx = torch.where(keep, grad, 0.0).mul_(ctx.scale)
        dbias = dx.sum_to_size(ctx.bias_shape) if ctx.bias_shape is not None and ctx.needs_input_grad[1] else None
        return dx, dbias, grad, None, None, None


def bias_dropout_add_reference(x, bias, residual, keep, p, compiled: bool = False) -> torch.Tensor:
    if keep is None:
        out = residual + x
        return out + bias if bias is not None else out
    return _ReferenceBiasDropoutAdd.apply(x, bias, residual, keep, float(p), compiled)


def bias_dropout_add_triton(x, bias, residual, keep, p) -> torch.Tensor:
    from megatron_protein.kernels._triton.bias_dropout_add import TritonBiasDropoutAddFunction
    dispatch.check_triton_tensors("BiasDropoutAdd", x, bias, residual)
    return TritonBiasDropoutAddFunction.apply(x, bias, residual, keep, float(p))


class BiasDropoutAdd(torch.nn.Module):
    """``(x, bias or None, residual) -> residual + dropout(x + bias)``; train/eval follows ``self.training``.

    ``fused=False`` is Megatron's ``--no-bias-dropout-fusion``. ``broadcast_dim`` (int or tuple of ints) shares
    the dropout mask along those dimensions of ``x`` (AF2's row-/column-wise dropout). ``compiled=True`` runs the
    reference's training math through ``torch.compile``.
    """

    def __init__(self, p: float, fused: bool = True, broadcast_dim: Union[int, Sequence[int], None] = None,
                 compiled: bool = False):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"BiasDropoutAdd: dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self.fused = bool(fused)
        if broadcast_dim is None:
            self.broadcast_dims: tuple[int, ...] = ()
        elif isinstance(broadcast_dim, int):
            self.broadcast_dims = (broadcast_dim,)
        else:
            self.broadcast_dims = tuple(int(d) for d in broadcast_dim)
        self.compiled = bool(compiled)

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor) -> torch.Tensor:
        if residual.shape != x.shape:
            raise ValueError(f"BiasDropoutAdd: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        if bias is not None and bias.shape != x.shape[-1:]:
            raise ValueError(f"BiasDropoutAdd: bias must have shape [{x.shape[-1]}], got {tuple(bias.shape)}")
        for d in self.broadcast_dims:
            if not -x.dim() <= d < x.dim():
                raise ValueError(f"BiasDropoutAdd: broadcast_dim {d} out of range for x of shape {tuple(x.shape)}")
        keep = None
        if self.training and self.p > 0.0:
            keep = dropout_keep_mask(x.shape, self.p, self.broadcast_dims, x.device)
        backend = dispatch.select_backend("BiasDropoutAdd", self.fused, x, bias, residual)
        if backend == "triton":
            return bias_dropout_add_triton(x, bias, residual, keep, self.p)
        if backend == "reference":
            return bias_dropout_add_reference(x, bias, residual, keep, self.p, self.compiled)
        return bias_dropout_add_unfused(x, bias, residual, keep, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, fused={self.fused}, broadcast_dims={self.broadcast_dims}, compiled={self.compiled}"
