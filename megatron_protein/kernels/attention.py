"""BERT core attention: context = dropout(softmax(q k^T / sqrt(d) masked)) v (Vaswani et al. 2017).

q, k, v are ``[b, h, s, d]`` (the heads of this tensor-parallel rank); ``mask`` is bool ``[b, 1|h, sq, sk]``, True =
masked out (padding keys, or another packed segment), or None. Query rows whose keys are all masked (padding
queries) give a zero context, never NaN.

* reference (``fused=True`` off CUDA): ``torch.nn.functional.scaled_dot_product_attention``, whose CPU flash kernel
  tiles over keys and never materialises the ``[b, h, sq, sk]`` probabilities.
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
from megatron_protein.kernels.softmax import softmax_unfused


def attention_unfused(q, k, v, mask, scale: float, dropout_p: float, training: bool) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2))
    probs = softmax_unfused(scores, scale, None, mask)
    probs = F.dropout(probs, dropout_p, training)
    return torch.matmul(probs, v)


def attention_reference(q, k, v, mask, scale: float, dropout_p: float, training: bool) -> torch.Tensor:
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
