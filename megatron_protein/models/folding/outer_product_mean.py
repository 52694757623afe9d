"""Outer product mean (AlphaFold2 supplement, Algorithm 10): the MSA's update of the pair representation.

    m' = LayerNorm(m);  a_si = Linear(m'_si) * mask_si,  b_sj = Linear(m'_sj) * mask_sj      [*, S, R, c]
    o_ij = Linear_out(flatten(sum_s a_si (x) b_sj)) / (eps + sum_s mask_si mask_sj)          [*, R, R, c_z]

The mean over sequences is a masked mean (divided by the number of sequences where both residues are real, plus
``eps = 1e-3``, as AlphaFold). ``linear_out`` starts at zero ('final').

DAP: the module runs in MSA column layout (``m [*, S, R/n, c_m]``); the right projection ``b`` is all-gathered
along the residues, so the result ``[*, R/n, R, c_z]`` lands on the local pair rows. Chunked inference computes
the outer product for ``chunk_size`` rows i at a time, so ``[chunk, R, c, c]`` replaces ``[R, R, c, c]``.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_protein.kernels import FusionConfig
from megatron_protein.models.folding.primitives import Linear, dap


class OuterProductMean(torch.nn.Module):
    """``(m [*, S, R, c_m], msa_mask [*, S, R]) -> update [*, R, R, c_z]`` (Algorithm 10)."""

    def __init__(self, c_m: int, c_z: int, c_hidden: int = 32, eps: float = 1e-3,
                 fusion: FusionConfig = FusionConfig()):
        super().__init__()
        self.c_m, self.c_z, self.c_hidden, self.eps = c_m, c_z, c_hidden, float(eps)
        self.layer_norm = fusion.layer_norm(c_m)
        self.linear_1 = Linear(c_m, c_hidden)
        self.linear_2 = Linear(c_m, c_hidden)
        self.linear_out = Linear(c_hidden * c_hidden, c_z, init="final")

    def _outer(self, a_t: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
        """``a_t [*, I, S, c]``, ``b_t [*, J, S, c]`` -> ``linear_out(sum_s a (x) b)`` ``[*, I, J, c_z]``."""
        outer = torch.einsum("...isc,...jsd->...ijcd", a_t, b_t)  # [*, I, J, c, c]
        return self.linear_out(outer.flatten(-2))

    def forward(self, m: torch.Tensor, msa_mask: Optional[torch.Tensor] = None,
                chunk_size: Optional[int] = None) -> torch.Tensor:
        if msa_mask is None:
            msa_mask = m.new_ones(m.shape[:-1])
        mask = msa_mask.unsqueeze(-1).to(m.dtype)  # [*, S, R(/n), 1]
        x = self.layer_norm(m)
        a = self.linear_1(x) * mask  # [*, S, R(/n), c]
        b = self.linear_2(x) * mask
        del x
        b = dap.all_gather(b, dim=-2)  # [*, S, R, c]
        mask_b = dap.all_gather(mask, dim=-2)  # [*, S, R, 1]
        a_t, b_t = a.transpose(-2, -3), b.transpose(-2, -3)  # [*, R, S, c]
        if chunk_size is None:
            out = self._outer(a_t, b_t)
        else:
            n_i = a_t.shape[-3]
            out = None
            for start in range(0, n_i, chunk_size):
                piece = self._outer(a_t[..., start:start + chunk_size, :, :], b_t)  # [*, chunk, R, c_z]
                if out is None:
                    out = piece.new_empty((*piece.shape[:-3], n_i, *piece.shape[-2:]))
                out[..., start:start + piece.shape[-3], :, :].copy_(piece)
                del piece
        # [*, R(/n), R, 1]: how many sequences have both residues real
        norm = torch.einsum("...si,...sj->...ij", mask.squeeze(-1), mask_b.squeeze(-1)).unsqueeze(-1)
        if torch.is_grad_enabled():
            return out / (norm + self.eps)
        return out.div_(norm.add_(self.eps))
