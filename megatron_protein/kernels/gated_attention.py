"""Gated self-attention with pair bias as one op: AF2 supplement Algorithm 7 (MSARowAttentionWithPairBias) lines
2-7, the same core as Algorithms 8 (column), 13 and 14 (triangle attention) and OpenFold's ``Attention``.

    q, k, v = LinearNoBias(x)                    [*, Q, c_in] -> [*, H, Q, c] each (q scaled by 1/sqrt(c))
    g = sigmoid(Linear(x))                       [*, Q, H, c]
    a = softmax(q k^T / sqrt(c) + b, masked)     [*, H, Q, Q], b = the pair (or triangle) bias, broadcast
    o = g * (a v)                                [*, Q, H, c]
    out = Linear(concat_h o)                     [*, Q, c_in]

The pair bias b is computed by the caller (Algorithm 7 line 3: LinearNoBias(LN(z))) because its shape decides what
it is shared over: ``[*, 1, H, Q, Q]`` broadcasts over the MSA rows. ``mask`` is bool, True = masked out,
broadcastable to ``[*, H, Q, Q]`` (e.g. ``~msa_mask[..., None, None, :]``).

Implementations of the attention core (softmax(...) v), chosen when the module is built:
* ``fused=False``: matmul, :func:`softmax_unfused`, matmul (the textbook path).
* ``fused=True`` on CPU: matmul, the reference masked softmax (saves only the probabilities), matmul; with
  ``tile_size`` set, :func:`tiled_attention`, which never materialises the ``[*, H, Q, Q]`` logits in forward or
  backward (for long sequences: N_res 512 and up).
* ``fused=True`` on CUDA with triton: the Triton flash-attention kernel with bias and mask (always tiled).

Initialisation follows supplement section 1.11.4: gating weights 0 and bias 1 (the gate starts open at 0.73),
output projection zero ('final'), q/k/v Glorot uniform.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_protein.kernels import dispatch
from megatron_protein.kernels.softmax import softmax_reference, softmax_unfused
from megatron_protein.kernels.tiled_attention import tiled_attention


def attention_core(q, k, v, bias, mask, scale: float, backend: str, tile_size: Optional[int] = None):
    """softmax(scale q k^T + bias, masked) v over ``[*, H, Q, c]`` tensors with the given backend."""
    if backend == "triton":
        from megatron_protein.kernels._triton.flash_attention import flash_attention
        dispatch.check_triton_tensors("GatedSelfAttention", q, k, v, bias)
        return flash_attention(q, k, v, bias, mask, scale)
    if backend == "reference" and tile_size is not None:
        return tiled_attention(q, k, v, bias, mask, scale, q_tile=tile_size, k_tile=tile_size)
    scores = torch.matmul(q, k.transpose(-1, -2))  # [*, H, Q, K]
    if backend == "reference":
        probs = softmax_reference(scores, scale, bias, mask)
    elif backend == "unfused":
        probs = softmax_unfused(scores, scale, bias, mask)
    else:
        raise ValueError(f"attention_core: unknown backend {backend!r}")
    return torch.matmul(probs, v)


class GatedSelfAttention(torch.nn.Module):
    """``(x [*, Q, c_in], bias or None, mask bool or None) -> [*, Q, c_in]``; see the module docstring."""

    def __init__(self, c_in: int, c_hidden: int, num_heads: int, gating: bool = True, fused: bool = True,
                 tile_size: Optional[int] = None):
        super().__init__()
        if min(c_in, c_hidden, num_heads) <= 0:
            raise ValueError(f"GatedSelfAttention: sizes must be positive, got c_in={c_in}, c_hidden={c_hidden}, "
                             f"num_heads={num_heads}")
        if tile_size is not None and tile_size <= 0:
            raise ValueError(f"GatedSelfAttention: tile_size must be positive or None, got {tile_size}")
        self.c_in, self.c_hidden, self.num_heads = int(c_in), int(c_hidden), int(num_heads)
        self.gating, self.fused, self.tile_size = bool(gating), bool(fused), tile_size
        hc = self.c_hidden * self.num_heads
        self.linear_q = torch.nn.Linear(c_in, hc, bias=False)
        self.linear_k = torch.nn.Linear(c_in, hc, bias=False)
        self.linear_v = torch.nn.Linear(c_in, hc, bias=False)
        self.linear_g = torch.nn.Linear(c_in, hc) if gating else None
        self.linear_o = torch.nn.Linear(hc, c_in)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for linear in (self.linear_q, self.linear_k, self.linear_v):
            torch.nn.init.xavier_uniform_(linear.weight)
        if self.linear_g is not None:
            torch.nn.init.zeros_(self.linear_g.weight)
            torch.nn.init.ones_(self.linear_g.bias)
        torch.nn.init.zeros_(self.linear_o.weight)
        torch.nn.init.zeros_(self.linear_o.bias)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        # [*, Q, H * c] -> [*, Q, H, c] -> [*, H, Q, c]
        return t.view(*t.shape[:-1], self.num_heads, self.c_hidden).transpose(-2, -3)

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.shape[-1] != self.c_in:
            raise ValueError(f"GatedSelfAttention: expected x [*, Q, {self.c_in}], got {tuple(x.shape)}")
        if mask is not None and mask.dtype != torch.bool:
            raise TypeError(f"GatedSelfAttention: mask must be bool (True = masked out), got {mask.dtype}")
        q = self._heads(self.linear_q(x))  # [*, H, Q, c]
        k = self._heads(self.linear_k(x))
        v = self._heads(self.linear_v(x))
        backend = dispatch.select_backend("GatedSelfAttention", self.fused, x)
        o = attention_core(q, k, v, bias, mask, 1.0 / math.sqrt(self.c_hidden), backend, self.tile_size)
        o = o.transpose(-2, -3)  # [*, Q, H, c]
        if self.linear_g is not None:
            g = torch.sigmoid(self.linear_g(x)).view(*x.shape[:-1], self.num_heads, self.c_hidden)
            o = o * g
        return self.linear_o(o.reshape(*x.shape[:-1], self.num_heads * self.c_hidden))

    def extra_repr(self) -> str:
        return (f"c_in={self.c_in}, c_hidden={self.c_hidden}, num_heads={self.num_heads}, gating={self.gating}, "
                f"fused={self.fused}, tile_size={self.tile_size}")
