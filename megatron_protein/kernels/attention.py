"""BERT core attention: context = dropout(softmax(q k^T / sqrt(d) masked)) v (Vaswani et al. 2017).

q, k, v are ``[b, h, s, d]`` (the heads of this tensor-parallel rank); ``mask`` is bool ``[b, 1|h, sq, sk]``, True =
masked out (padding keys, or another packed segment), or None. Query rows whose keys are all masked (padding
queries) give a zero context, never NaN.

* reference (``fused=True`` off CUDA): ``torch.nn.functional.scaled_dot_product_attention``, whose CPU flash kernel
  tiles over keys and never materialises the ``[b, h, sq, sk]`` probabilities; in training with dropout on a CPU
  (where SDPA would fall back to its math path) the written-out :func:`attention_dropout_cpu`.
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


class _DropoutAttentionFunction(torch.autograd.Function):
    """Exact attention with dropout on the probabilities, forward and backward written out for CPU training.

    ``scaled_dot_product_attention`` with ``dropout_p > 0`` leaves the CPU flash kernel for its math fallback, which
    scales q and k separately ([b, h, s, d] twice), draws a float dropout mask, divides it by 1 - p and multiplies
    it into the [b, h, s, s] probabilities, and autograd keeps the probabilities before and after dropout plus the
    float mask. This function computes the same function in fewer passes over [b, h, s, s] tensors:

    * the softmax scale goes on q once ([b, h, s, d], smaller than the scores when s > d), and the dropout
      rescaling 1 / (1 - p) on the context ([b, h, s, d]) instead of on the probabilities;
    * the keep mask is a bool tensor used through ``torch.where`` (no float mask, no type-promotion copy);
    * backward keeps only the probabilities (before dropout) and the bool mask, recomputes the dropped
      probabilities with one ``where`` and uses ATen's softmax backward:
      dP = where(keep, dC v^T, 0) / (1 - p), dS = P * (dP - rowsum(dP * P)), dq = scale dS k, dk = dS^T (scale q),
      dv = (where(keep, P, 0) / (1 - p))^T dC.

    Runs in the inputs' dtype with autocast switched off inside (under bf16 autocast q, k, v arrive in bf16 from
    the projection); the softmax of half/bf16 scores is computed in fp32 and rounded once.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, keep, scale: float, keep_scale: float):
        with torch.autocast(device_type=q.device.type, enabled=False):
            k, v = k.to(q.dtype), v.to(q.dtype)
            q_scaled = q * scale
            scores = torch.matmul(q_scaled, k.transpose(-1, -2))
            if mask is not None:
                scores.masked_fill_(mask, float("-inf"))
            softmax_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
            probs = torch.softmax(scores, dim=-1, dtype=softmax_dtype).to(q.dtype)
            del scores
            if mask is not None:
                fully_masked = mask.all(dim=-1, keepdim=True)
                if bool(fully_masked.any()):  # softmax of an all -inf row is NaN; the contract is a zero context
                    probs.masked_fill_(fully_masked, 0.0)
            context = torch.matmul(torch.where(keep, probs, 0.0), v).mul_(keep_scale)
        ctx.scale, ctx.keep_scale = scale, keep_scale
        ctx.save_for_backward(q_scaled, k, v, probs, keep)
        return context

    @staticmethod
    def backward(ctx, grad_context):
        q_scaled, k, v, probs, keep = ctx.saved_tensors
        grad = grad_context.to(probs.dtype) * ctx.keep_scale
        grad_v = torch.matmul(torch.where(keep, probs, 0.0).transpose(-1, -2), grad)
        grad_probs = torch.where(keep, torch.matmul(grad, v.transpose(-1, -2)), 0.0)
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        del grad_probs
        grad_q = torch.matmul(grad_scores, k).mul_(ctx.scale)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q_scaled)
        return grad_q, grad_k, grad_v, None, None, None, None


def attention_dropout_cpu(q, k, v, mask, scale: float, dropout_p: float,
                          keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Training-mode attention with dropout p on the probabilities (see :class:`_DropoutAttentionFunction`).
    ``keep`` (bool [b, h, sq, sk]) is drawn from the default generator when not given."""
    shape = (*torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]), q.shape[-2], k.shape[-2])
    if keep is None:
        keep = attention_keep_mask(shape, dropout_p, q.device)
    elif keep.shape != shape or keep.dtype != torch.bool:
        raise ValueError(f"attention_dropout_cpu: keep must be bool {tuple(shape)}, got {keep.dtype} "
                         f"{tuple(keep.shape)}")
    return _DropoutAttentionFunction.apply(q, k, v, mask, keep, float(scale), 1.0 / (1.0 - dropout_p))


def attention_reference(q, k, v, mask, scale: float, dropout_p: float, training: bool) -> torch.Tensor:
    if training and dropout_p > 0.0 and not q.is_cuda:
        # SDPA's CPU flash kernel has no dropout; its math fallback is slower than this written-out path.
        return attention_dropout_cpu(q, k, v, mask, scale, dropout_p)
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
