"""MSA attention of the Evoformer and the extra-MSA stack (AlphaFold2 supplement, Algorithms 7, 8 and 19).

* :class:`MSARowAttentionWithPairBias` (Algorithm 7): each MSA row attends along the residues, with a bias from the
  pair representation shared by all rows.
* :class:`MSAColumnAttention` (Algorithm 8): each residue column attends along the sequences.
* :class:`MSAColumnGlobalAttention` (Algorithm 19, extra-MSA stack): one query per column, the masked mean over the
  sequences, against single-head keys and values, gated per sequence; linear instead of quadratic in N_seq.

Each returns the *update* (the residual add and dropout are the block's). The gated attention core comes from
:mod:`megatron_protein.kernels` (``GatedSelfAttention``, chosen when the module is built through a
``FusionConfig``: Triton flash attention with bias on CUDA, the PyTorch reference or the tiled attention on CPU).
Under DAP the row attention runs in MSA row layout ``[*, S/n, R, c_m]`` and its pair bias, computed from the
local pair rows, is all-gathered; column attention runs in column layout ``[*, S, R/n, c_m]``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_protein.kernels import FusionConfig, masked_softmax
from megatron_protein.kernels import dispatch
from megatron_protein.models.folding.chunking import chunk_layer
from megatron_protein.models.folding.primitives import EvoformerAttention, Linear, dap, masked_out, pair_bias_projection


class MSARowAttentionWithPairBias(torch.nn.Module):
    """Algorithm 7: ``(m [*, S, R, c_m], z [*, R, R, c_z], msa_mask [*, S, R]) -> update [*, S, R, c_m]``.

        m' = LayerNorm(m);  b_ij^h = LinearNoBias(LayerNorm(z_ij))
        o_si = sigmoid(g_si) * sum_j softmax_j(q_si . k_sj / sqrt(c) + b_ij^h) v_sj   (per head h)
        update = Linear(concat_h o)
    """

    def __init__(self, c_m: int, c_z: int, c_hidden: int, num_heads: int, fusion: FusionConfig = FusionConfig(),
                 attention_recompute: bool = True):
        super().__init__()
        self.c_m, self.c_z, self.c_hidden, self.num_heads = c_m, c_z, c_hidden, num_heads
        self.layer_norm_m = fusion.layer_norm(c_m)
        self.layer_norm_z = fusion.layer_norm(c_z)
        self.linear_z = Linear(c_z, num_heads, bias=False, init="normal")
        self.attention = EvoformerAttention(c_m, c_hidden, num_heads, fusion, recompute=attention_recompute)

    def pair_bias(self, z: torch.Tensor) -> torch.Tensor:
        """``z [*, R, R, c_z] -> [*, 1, H, R, R]``, shared by every MSA row (DAP: gathered from local pair rows)."""
        b = pair_bias_projection(z, self.layer_norm_z, self.linear_z)  # [*, R(/n), R, H]
        b = dap.all_gather(b, dim=-3)  # [*, R, R, H]
        return b.permute(*range(b.dim() - 3), -1, -3, -2).unsqueeze(-4)  # [*, 1, H, R, R]

    def forward(self, m: torch.Tensor, z: torch.Tensor, msa_mask: Optional[torch.Tensor] = None,
                chunk_size: Optional[int] = None) -> torch.Tensor:
        bias = self.pair_bias(z)
        mask = masked_out(msa_mask)
        mask = None if mask is None else mask[..., :, None, None, :]  # [*, S, 1, 1, R]: keys masked

        def attend(m_chunk, bias_chunk, mask_chunk):
            return self.attention(self.layer_norm_m(m_chunk), bias_chunk, mask_chunk)

        if chunk_size is None:
            return attend(m, bias, mask)
        return chunk_layer(attend, (m, bias, mask), chunk_size, num_batch_dims=m.dim() - 2)  # chunks of MSA rows


class MSAColumnAttention(torch.nn.Module):
    """Algorithm 8: ``(m [*, S, R, c_m], msa_mask [*, S, R]) -> update [*, S, R, c_m]``; gated attention of each
    residue column over the sequences, no bias."""

    def __init__(self, c_m: int, c_hidden: int, num_heads: int, fusion: FusionConfig = FusionConfig(),
                 attention_recompute: bool = True):
        super().__init__()
        self.c_m, self.c_hidden, self.num_heads = c_m, c_hidden, num_heads
        self.layer_norm_m = fusion.layer_norm(c_m)
        self.attention = EvoformerAttention(c_m, c_hidden, num_heads, fusion, recompute=attention_recompute)

    def forward(self, m: torch.Tensor, msa_mask: Optional[torch.Tensor] = None,
                chunk_size: Optional[int] = None) -> torch.Tensor:
        m_t = m.transpose(-2, -3)  # [*, R, S, c_m]
        mask = masked_out(msa_mask)
        mask = None if mask is None else mask.transpose(-1, -2)[..., :, None, None, :]  # [*, R, 1, 1, S]

        def attend(m_chunk, mask_chunk):
            return self.attention(self.layer_norm_m(m_chunk), None, mask_chunk)

        if chunk_size is None:
            out = attend(m_t, mask)
        else:
            out = chunk_layer(attend, (m_t, mask), chunk_size, num_batch_dims=m.dim() - 2)  # chunks of columns
        return out.transpose(-2, -3)  # [*, S, R, c_m]


class MSAColumnGlobalAttention(torch.nn.Module):
    """Algorithm 19: ``(m [*, S, R, c_m], msa_mask [*, S, R]) -> update [*, S, R, c_m]``.

    Per column (residue) i, with m' = LayerNorm(m) and the sequences s:
        q_i = LinearNoBias(sum_s mask_si m'_si / (sum_s mask_si + eps))       [*, R, H, c]   (scaled by 1/sqrt(c))
        k_si, v_si = LinearNoBias(m'_si)                                      [*, R, S, c]   (one head, shared)
        o_i^h = sum_s softmax_s(q_i^h . k_si, masked) v_si
        update_si = Linear(concat_h sigmoid(Linear(m'_si))^h * o_i^h)
    """

    def __init__(self, c_m: int, c_hidden: int, num_heads: int, eps: float = 1e-10,
                 fusion: FusionConfig = FusionConfig()):
        super().__init__()
        self.c_m, self.c_hidden, self.num_heads, self.eps = c_m, c_hidden, num_heads, float(eps)
        self.fused = fusion.masked_softmax_fusion
        self.layer_norm_m = fusion.layer_norm(c_m)
        self.linear_q = Linear(c_m, c_hidden * num_heads, bias=False, init="glorot")
        self.linear_k = Linear(c_m, c_hidden, bias=False, init="glorot")
        self.linear_v = Linear(c_m, c_hidden, bias=False, init="glorot")
        self.linear_g = Linear(c_m, c_hidden * num_heads, init="gating")
        self.linear_o = Linear(c_hidden * num_heads, c_m, init="final")

    def _attend(self, m_t: torch.Tensor, mask_t: torch.Tensor) -> torch.Tensor:
        """``m_t [*, R, S, c_m]`` (columns first), float ``mask_t [*, R, S]`` -> ``[*, R, S, c_m]``."""
        x = self.layer_norm_m(m_t)
        mask_f = mask_t.to(x.dtype).unsqueeze(-1)  # [*, R, S, 1]
        mean = (x * mask_f).sum(dim=-2) / (mask_f.sum(dim=-2) + self.eps)  # [*, R, c_m]
        q = self.linear_q(mean).mul_(1.0 / math.sqrt(self.c_hidden))
        q = q.view(*q.shape[:-1], self.num_heads, self.c_hidden)  # [*, R, H, c]
        k, v = self.linear_k(x), self.linear_v(x)  # [*, R, S, c]
        logits = torch.matmul(q, k.transpose(-1, -2))  # [*, R, H, S]
        backend = dispatch.select_backend("MSAColumnGlobalAttention", self.fused, logits)
        probs = masked_softmax(logits, 1.0, None, (mask_t == 0).unsqueeze(-2), backend)  # keys masked
        o = torch.matmul(probs, v)  # [*, R, H, c]
        g = torch.sigmoid(self.linear_g(x)).view(*x.shape[:-1], self.num_heads, self.c_hidden)  # [*, R, S, H, c]
        o = (g * o.unsqueeze(-3)).flatten(-2)  # [*, R, S, H * c]
        return self.linear_o(o)

    def forward(self, m: torch.Tensor, msa_mask: Optional[torch.Tensor] = None,
                chunk_size: Optional[int] = None) -> torch.Tensor:
        if msa_mask is None:
            msa_mask = m.new_ones(m.shape[:-1])
        m_t, mask_t = m.transpose(-2, -3), msa_mask.transpose(-1, -2)  # [*, R, S, c_m], [*, R, S]
        if chunk_size is None:
            out = self._attend(m_t, mask_t)
        else:
            out = chunk_layer(self._attend, (m_t, mask_t), chunk_size, num_batch_dims=m.dim() - 2)
        return out.transpose(-2, -3)
