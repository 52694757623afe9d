"""BERT core attention: context = dropout(softmax(q k^T / sqrt(d) masked)) v (Vaswani et al. 2017).

q, k, v are ``[b, h, s, d]`` (the heads of this tensor-parallel rank); ``mask`` is bool ``[b, 1|h, sq, sk]``, True =
masked out (padding keys, or another packed segment), or None. Query rows whose keys are all masked (padding
queries) give a zero context, never NaN.

* reference (``fused=True`` off CUDA): ``torch.nn.functional.scaled_dot_product_attention``, whose CPU flash kernel
  tiles over keys and never materialises the ``[b, h, sq, sk]`` probabilities; in training on a CPU with dropout
  (where SDPA would fall back to its math path) or in bf16/fp16 (where its flash backward is slow) the written-out,
  head-chunked :func:`attention_written_out`.
* unfused (``fused=False``): the matmul -> :func:`softmax_unfused` -> dropout -> matmul composition that
  Megatron runs with ``--no-masked-softmax-fusion``.
* triton: the tiled flash-attention kernel of :mod:`megatron_protein.kernels._triton.flash_attention` (online
  softmax, Dao et al. 2022), shared with the Evoformer's gated attention, with the attention dropout drawn
  inside the kernel (Philox, regenerated in backward). The three paths draw different dropout masks (each its own
  RNG scheme); with dropout off they compute the same function.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_protein.kernels import dispatch
from megatron_protein.kernels.bias_dropout_add import bernoulli_keep_mask
from megatron_protein.kernels.softmax import softmax_unfused


def attention_unfused(q, k, v, mask, scale: float, dropout_p: float, training: bool) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2))
    probs = softmax_unfused(scores, scale, None, mask)
    probs = F.dropout(probs, dropout_p, training)
    return torch.matmul(probs, v)


def attention_keep_mask(shape, dropout_p: float, device) -> torch.Tensor:
    """Bernoulli(1 - p) keep mask of the attention probabilities, a bool tensor from the default generator
    (one byte per element; see :func:`~megatron_protein.kernels.bias_dropout_add.bernoulli_keep_mask`)."""
    return bernoulli_keep_mask(shape, 1.0 - dropout_p, device)


#: The written-out path runs reduced-precision attention a few heads at a time, so that one chunk's
#: [b, heads, sq, sk] scores (about this many elements) stay in cache between the matmul, the softmax and the next
#: matmul (bench/kernels.py, case core_attention_bf16). Float32 runs in one piece: there the batched sgemm did
#: better on the whole batch than on chunks.
LOW_PRECISION_CHUNK_ELEMENTS = 1 << 21


def _heads_per_chunk(q: torch.Tensor, k: torch.Tensor) -> int:
    b, h, sq, sk = q.shape[0], q.shape[1], q.shape[-2], k.shape[-2]
    if q.dtype == torch.float32 or q.dtype == torch.float64:
        return h
    return max(1, min(h, LOW_PRECISION_CHUNK_ELEMENTS // max(1, b * sq * sk)))


def _heads(t: Optional[torch.Tensor], chunk: slice) -> Optional[torch.Tensor]:
    """The chunk's heads of a [b|1, h|1, ...] mask (a mask shared by all heads is returned whole)."""
    return t if t is None or t.shape[1] == 1 else t[:, chunk]


class _WrittenOutAttention(torch.autograd.Function):
    """Exact attention for CPU training, forward and backward written out: context = dropout(P) v with
    P = softmax(scale q k^T, masked), optional dropout, run a few heads at a time.

    Used where it beats ``scaled_dot_product_attention`` on a CPU:

    * with dropout: SDPA leaves its flash kernel for the math fallback, which scales q and k separately, draws a
      float mask, divides it by 1 - p, multiplies it into the probabilities and keeps the probabilities before and
      after dropout plus that float mask. Here the scale goes on q once ([b, h, s, d], smaller than the scores when
      s > d), the 1 / (1 - p) on the context, and the keep mask is a bool tensor used through ``torch.where``;
    * in bf16/fp16 (autocast): the CPU flash kernel runs its block matmuls in reduced precision at a fraction of
      the machine's bf16 GEMM rate. Here the scores are one bf16 batched matmul per chunk of heads, the softmax reads
      bf16 and accumulates in float32 (ATen's CPU softmax) and writes bf16 probabilities, which the second matmul
      reads: Megatron's numerics (its fused scale-mask-softmax takes and returns fp16/bf16, computing in float32).

    Backward keeps the probabilities (before dropout) and the bool mask and recomputes the rest:
    dP = where(keep, dC v^T, 0) / (1 - p), dS = P * (dP - rowsum(dP * P)) (ATen's softmax backward),
    dq = scale dS k, dk = dS^T (scale q), dv = (where(keep, P, 0) / (1 - p))^T dC. Memory: the [b, h, sq, sk]
    probabilities in the input dtype (and the bool mask), what the unfused path keeps too; SDPA keeps less.
    The probabilities, and q (scaled), k and v, are kept as one contiguous tensor per chunk of heads: a chunk of a
    [b, h, ...] tensor is not contiguous (it strides over b), so every batched matmul, softmax or softmax backward
    that reads or writes one would copy it first (the probabilities four times per chunk, q, k and v twice).
    Autocast is off inside; k and v are brought to q's dtype. q, k, v (and keep) arrive with one shared
    [b, h] (:func:`attention_written_out` expands broadcast ones outside, where autograd sums their gradients).
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, keep, scale: float, keep_scale: float):
        with torch.autocast(device_type=q.device.type, enabled=False):
            k, v = k.to(q.dtype), v.to(q.dtype)
            b, h, sq = q.shape[0], q.shape[1], q.shape[-2]
            per_chunk = _heads_per_chunk(q, k)
            chunks = [slice(first, first + per_chunk) for first in range(0, h, per_chunk)]
            # One contiguous [b, chunk, ...] tensor per chunk of heads (class docstring); q's is written by the scale.
            qs = [q[:, heads] * scale for heads in chunks]
            ks = [k[:, heads].contiguous() for heads in chunks]
            vs = [v[:, heads].contiguous() for heads in chunks]
            probs = []
            context = q.new_empty(b, h, sq, q.shape[-1])
            fully_masked = None
            if mask is not None:
                fully_masked = mask.all(dim=-1, keepdim=True)
                if not bool(fully_masked.any()):
                    fully_masked = None
            for index, heads in enumerate(chunks):
                scores = torch.matmul(qs[index], ks[index].transpose(-1, -2))
                chunk_mask = _heads(mask, heads)
                if chunk_mask is not None:
                    scores.masked_fill_(chunk_mask, float("-inf"))
                chunk_probs = torch.softmax(scores, dim=-1)
                del scores
                if fully_masked is not None:  # softmax of an all -inf row is NaN; the contract is a zero context
                    chunk_probs.masked_fill_(_heads(fully_masked, heads), 0.0)
                probs.append(chunk_probs)
                dropped = chunk_probs if keep is None else torch.where(keep[:, heads], chunk_probs, 0.0)
                torch.matmul(dropped, vs[index], out=context[:, heads])
            if keep_scale != 1.0:
                context.mul_(keep_scale)
        ctx.scale, ctx.keep_scale, ctx.per_chunk, ctx.num_chunks = scale, keep_scale, per_chunk, len(chunks)
        ctx.shapes = (tuple(q.shape), tuple(k.shape), tuple(v.shape))
        ctx.save_for_backward(keep, *qs, *ks, *vs, *probs)
        return context

    @staticmethod
    def backward(ctx, grad_context):
        keep, *saved = ctx.saved_tensors
        n = ctx.num_chunks
        qs, ks, vs, probs = saved[:n], saved[n:2 * n], saved[2 * n:3 * n], saved[3 * n:]
        grad = grad_context.to(probs[0].dtype)
        if ctx.keep_scale != 1.0:
            grad = grad * ctx.keep_scale
        q_shape, k_shape, v_shape = ctx.shapes
        grad_q, grad_k, grad_v = (qs[0].new_empty(shape) for shape in (q_shape, k_shape, v_shape))
        for index, first in enumerate(range(0, q_shape[1], ctx.per_chunk)):
            heads = slice(first, first + ctx.per_chunk)
            p, g = probs[index], grad[:, heads].contiguous()
            chunk_keep = None if keep is None else keep[:, heads]
            dropped = p if chunk_keep is None else torch.where(chunk_keep, p, 0.0)
            torch.matmul(dropped.transpose(-1, -2), g, out=grad_v[:, heads])
            del dropped
            grad_probs = torch.matmul(g, vs[index].transpose(-1, -2))
            if chunk_keep is not None:
                grad_probs = torch.where(chunk_keep, grad_probs, 0.0)
            grad_scores = torch._softmax_backward_data(grad_probs, p, -1, p.dtype)
            del grad_probs
            torch.matmul(grad_scores, ks[index], out=grad_q[:, heads])
            grad_q[:, heads].mul_(ctx.scale)
            torch.matmul(grad_scores.transpose(-1, -2), qs[index], out=grad_k[:, heads])
        return grad_q, grad_k, grad_v, None, None, None, None


def attention_written_out(q, k, v, mask, scale: float, dropout_p: float = 0.0,
                          keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Training-mode attention on a CPU (see :class:`_WrittenOutAttention`), with dropout p on the probabilities
    when p > 0; ``keep`` (bool [b, h, sq, sk]) is drawn from the default generator when not given."""
    batch_heads = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    q, k, v = (t.expand(*batch_heads, *t.shape[-2:]) for t in (q, k, v))
    if dropout_p == 0.0:
        return _WrittenOutAttention.apply(q, k, v, mask, None, float(scale), 1.0)
    shape = (*batch_heads, q.shape[-2], k.shape[-2])
    if keep is None:
        keep = attention_keep_mask(shape, dropout_p, q.device)
    elif keep.shape != shape or keep.dtype != torch.bool:
        raise ValueError(f"attention_written_out: keep must be bool {tuple(shape)}, got {keep.dtype} "
                         f"{tuple(keep.shape)}")
    return _WrittenOutAttention.apply(q, k, v, mask, keep, float(scale), 1.0 / (1.0 - dropout_p))


def attention_reference(q, k, v, mask, scale: float, dropout_p: float, training: bool) -> torch.Tensor:
    if not q.is_cuda and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        if training and dropout_p > 0.0:
            # SDPA's CPU flash kernel has no dropout; its math fallback is slower than this written-out path.
            return attention_written_out(q, k, v, mask, scale, dropout_p)
        if q.dtype in (torch.bfloat16, torch.float16):
            # The CPU flash kernel's reduced-precision backward is about 2x slower than the written-out path.
            return attention_written_out(q, k, v, mask, scale)
    attn_mask = None if mask is None else ~mask  # SDPA's bool mask is True = take part
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=dropout_p if training else 0.0, scale=scale)
    if mask is not None:
        fully_masked = mask.all(dim=-1, keepdim=True)  # [b, 1|h, sq, 1]
        if bool(fully_masked.any()):
            # Backends differ on all-masked rows (NaN on some); the contract is a zero context.
            context = context.masked_fill(fully_masked, 0.0)
    return context


def attention_triton(q, k, v, mask, scale: float, dropout_p: float) -> torch.Tensor:
    from megatron_protein.kernels._triton.flash_attention import flash_attention
    dispatch.check_triton_tensors("CoreAttention", q, k, v)
    return flash_attention(q, k, v, None, mask, scale, dropout_p)


class CoreAttention(torch.nn.Module):
    """``(q, k, v [b, h, s, d], mask bool or None) -> context [b, h, s, d]``; dropout on the probabilities."""

    def __init__(self, head_dim: int, dropout_p: float = 0.0, fused: bool = True):
        super().__init__()
        if head_dim <= 0:
            raise ValueError(f"CoreAttention: head_dim must be positive, got {head_dim}")
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"CoreAttention: dropout_p must be in [0, 1), got {dropout_p}")
        self.head_dim = int(head_dim)
        self.dropout_p = float(dropout_p)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.fused = bool(fused)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if q.dim() != 4 or q.shape[-1] != self.head_dim or k.shape != v.shape or k.shape[-1] != self.head_dim:
            raise ValueError(f"CoreAttention: expected q, k, v [b, h, s, {self.head_dim}], got {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        if mask is not None and mask.dtype != torch.bool:
            raise TypeError(f"CoreAttention: mask must be bool (True = masked out), got {mask.dtype}")
        backend = dispatch.select_backend("CoreAttention", self.fused, q, k, v)
        if backend == "triton":
            return attention_triton(q, k, v, mask, self.scale, self.dropout_p if self.training else 0.0)
        if backend == "reference":
            return attention_reference(q, k, v, mask, self.scale, self.dropout_p, self.training)
        return attention_unfused(q, k, v, mask, self.scale, self.dropout_p, self.training)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, dropout_p={self.dropout_p}, fused={self.fused}"
