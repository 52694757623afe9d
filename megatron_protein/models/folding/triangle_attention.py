"""Triangular gated self-attention (AlphaFold2 supplement, Algorithms 13 "starting node" and 14 "ending node").

Starting node (Alg 13), for each row i, query j, key k, head h, with z' = LayerNorm(z):
    o_ij = sigmoid(g_ij) * sum_k softmax_k(q_ij . k_ik / sqrt(c) + b_jk^h, masked where pair_mask_ik = 0) v_ik
    b_jk^h = LinearNoBias(z'_jk),  update = Linear(concat_h o)
Ending node (Alg 14) is the same on the transposed pair (attention along columns: keys z_kj, bias b_ki); it is
computed as the starting node of ``z^T`` and transposed back.

The gated attention core is the kernels' ``GatedSelfAttention`` with the triangle bias ``[*, 1, H, R, R]``
broadcast over the rows. DAP: the starting node runs in pair row layout and the ending node in column layout (whose
transpose is the row layout of ``z^T``); in both the triangle bias is computed from the local rows and
all-gathered. Chunked inference splits the rows (``[*, chunk, H, R, R]`` logits at a time).
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_protein.kernels import FusionConfig
from megatron_protein.models.folding.chunking import chunk_layer
from megatron_protein.models.folding.primitives import (EvoformerAttention, Linear, dap, masked_out,
                                                        pair_bias_projection)


class TriangleAttention(torch.nn.Module):
    """``(z [*, R, R, c_z], pair_mask [*, R, R]) -> update [*, R, R, c_z]``; ``starting`` picks Algorithm 13 or 14."""

    def __init__(self, c_z: int, c_hidden: int = 32, num_heads: int = 4, starting: bool = True,
                 fusion: FusionConfig = FusionConfig(), attention_recompute: bool = True):
        super().__init__()
        self.c_z, self.c_hidden, self.num_heads, self.starting = c_z, c_hidden, num_heads, bool(starting)
        self.layer_norm = fusion.layer_norm(c_z)
        self.linear = Linear(c_z, num_heads, bias=False, init="normal")
        self.attention = EvoformerAttention(c_z, c_hidden, num_heads, fusion, recompute=attention_recompute)

    @staticmethod
    def _gathered_bias(b: torch.Tensor) -> torch.Tensor:
        """The local rows' ``[*, J(/n), K, H]`` -> the whole triangle bias ``[*, 1, H, J, K]``."""
        b = dap.all_gather(b, dim=-3)  # [*, J, K, H]
        return b.permute(*range(b.dim() - 3), -1, -3, -2).unsqueeze(-4)

    def _oriented(self, z, pair_mask):
        """Ending node: the starting node of ``z^T`` (views). Returns z, the key mask ``[*, I, 1, 1, K]``."""
        if not self.starting:
            z = z.transpose(-2, -3)
            pair_mask = None if pair_mask is None else pair_mask.transpose(-1, -2)
        mask = masked_out(pair_mask)
        return z, (None if mask is None else mask[..., :, None, None, :])

    @torch.no_grad()
    def add_into(self, z: torch.Tensor, pair_mask: Optional[torch.Tensor] = None,
                 chunk_size: Optional[int] = None) -> torch.Tensor:
        """Inference: ``z += update`` in place, ``chunk_size`` rows (starting node) or columns (ending node) at a
        time. Each slice's update reads only that slice of z and the triangle bias, which is computed first."""
        zt, mask = self._oriented(z, pair_mask)
        bias = self._gathered_bias(pair_bias_projection(zt, self.layer_norm, self.linear))
        n = zt.shape[-3]
        step = chunk_size or n
        for start in range(0, n, step):
            rows = zt.narrow(-3, start, min(step, n - start))
            mask_rows = None if mask is None else mask.narrow(-4, start, rows.shape[-3])
            rows.add_(self.attention(self.layer_norm(rows), bias, mask_rows))
        return z

    def forward(self, z: torch.Tensor, pair_mask: Optional[torch.Tensor] = None,
                chunk_size: Optional[int] = None) -> torch.Tensor:
        z, mask = self._oriented(z, pair_mask)
        x = self.layer_norm(z)  # [*, I(/n), J, c_z]
        bias = self._gathered_bias(self.linear(x))  # [*, 1, H, J, K]

        if chunk_size is None:
            out = self.attention(x, bias, mask)
        else:  # chunks of rows i; the bias is shared by all rows
            out = chunk_layer(self.attention, (x, bias, mask), chunk_size, num_batch_dims=x.dim() - 2)
        return out if self.starting else out.transpose(-2, -3)


class TriangleAttentionStartingNode(TriangleAttention):
    """Algorithm 13: attention along each row i, keys z_ik, bias from z_jk."""

    def __init__(self, c_z: int, c_hidden: int = 32, num_heads: int = 4, fusion: FusionConfig = FusionConfig()):
        super().__init__(c_z, c_hidden, num_heads, starting=True, fusion=fusion)


class TriangleAttentionEndingNode(TriangleAttention):
    """Algorithm 14: attention along each column j, keys z_kj, bias from z_ki."""

    def __init__(self, c_z: int, c_hidden: int = 32, num_heads: int = 4, fusion: FusionConfig = FusionConfig()):
        super().__init__(c_z, c_hidden, num_heads, starting=False, fusion=fusion)
