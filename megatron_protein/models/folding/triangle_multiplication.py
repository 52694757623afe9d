"""Triangular multiplicative update (AlphaFold2 supplement, Algorithms 11 "outgoing" and 12 "incoming").

    z' = LayerNorm(z);  a_ij = mask_ij sigmoid(Linear(z'_ij)) Linear(z'_ij),  b_ij likewise        [*, R, R, c]
    outgoing (Alg 11):  x_ij = sum_k a_ik b_jk        incoming (Alg 12):  x_ij = sum_k a_ki b_kj
    update_ij = sigmoid(Linear(z'_ij)) * Linear(LayerNorm(x_ij))                                   [*, R, R, c_z]

The five projections of z' (a and b with their gates, and the output gate) are one GEMM over the concatenated
weights; the parameters stay five ``Linear`` layers with OpenFold's names, so weights copy one to one.

DAP: the outgoing update runs in pair row layout (``z [*, R/n, R, c_z]``: i local) and all-gathers ``b`` along
its rows j; the incoming update runs in column layout (``z [*, R, R/n, c_z]``: j local) and all-gathers ``a``
along its columns i. Either way the update lands in the layout it was called in.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_protein.kernels import FusionConfig
from megatron_protein.models.folding.primitives import Linear, dap


class TriangleMultiplicativeUpdate(torch.nn.Module):
    """``(z [*, R, R, c_z], pair_mask [*, R, R]) -> update [*, R, R, c_z]``; ``outgoing`` picks Algorithm 11 or 12."""

    def __init__(self, c_z: int, c_hidden: int = 128, outgoing: bool = True, fusion: FusionConfig = FusionConfig()):
        super().__init__()
        self.c_z, self.c_hidden, self.outgoing = c_z, c_hidden, bool(outgoing)
        self.layer_norm_in = fusion.layer_norm(c_z)
        self.linear_a_p = Linear(c_z, c_hidden)
        self.linear_a_g = Linear(c_z, c_hidden, init="gating")
        self.linear_b_p = Linear(c_z, c_hidden)
        self.linear_b_g = Linear(c_z, c_hidden, init="gating")
        self.linear_g = Linear(c_z, c_z, init="gating")
        self.layer_norm_out = fusion.layer_norm(c_hidden)
        self.linear_z = Linear(c_hidden, c_z, init="final")

    def _projections(self, x: torch.Tensor):
        """``x = LayerNorm(z)`` -> ``a_p, a_g, b_p, b_g [*, R, R, c]``, ``g [*, R, R, c_z]`` from one GEMM."""
        layers = (self.linear_a_p, self.linear_a_g, self.linear_b_p, self.linear_b_g, self.linear_g)
        weight = torch.cat([layer.weight for layer in layers])  # [4c + c_z, c_z]
        bias = torch.cat([layer.bias for layer in layers])
        proj = F.linear(x, weight, bias)  # [*, R, R, 4c + c_z]
        c = self.c_hidden
        return proj.split([c, c, c, c, self.c_z], dim=-1)

    def combine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The triangle sum over k: ``[*, R, R, c]`` x 2 -> ``[*, R, R, c]`` (ikc,jkc->ijc or kic,kjc->ijc)."""
        a_c = a.movedim(-1, -3)  # [*, c, R, R]
        b_c = b.movedim(-1, -3)
        if self.outgoing:
            p = torch.matmul(a_c, b_c.transpose(-1, -2))  # [*, c, I, K] @ [*, c, K, J]
        else:
            p = torch.matmul(a_c.transpose(-1, -2), b_c)  # [*, c, I, K] @ [*, c, K, J]
        return p.movedim(-3, -1)  # [*, I, J, c]

    def forward(self, z: torch.Tensor, pair_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.layer_norm_in(z)
        a_p, a_g, b_p, b_g, g = self._projections(x)
        del x
        a = torch.sigmoid(a_g) * a_p  # [*, R, R, c]
        b = torch.sigmoid(b_g) * b_p
        if pair_mask is not None:
            mask = pair_mask.unsqueeze(-1).to(a.dtype)
            a, b = a * mask, b * mask
        if self.outgoing:
            b = dap.all_gather(b, dim=-3)  # row layout: every row j of b
        else:
            a = dap.all_gather(a, dim=-2)  # column layout: every column i of a
        x = self.combine(a, b)
        del a, b
        return torch.sigmoid(g) * self.linear_z(self.layer_norm_out(x))


class TriangleMultiplicationOutgoing(TriangleMultiplicativeUpdate):
    """Algorithm 11: x_ij = sum_k a_ik b_jk (edges leaving i and j)."""

    def __init__(self, c_z: int, c_hidden: int = 128, fusion: FusionConfig = FusionConfig()):
        super().__init__(c_z, c_hidden, outgoing=True, fusion=fusion)


class TriangleMultiplicationIncoming(TriangleMultiplicativeUpdate):
    """Algorithm 12: x_ij = sum_k a_ki b_kj (edges arriving at i and j)."""

    def __init__(self, c_z: int, c_hidden: int = 128, fusion: FusionConfig = FusionConfig()):
        super().__init__(c_z, c_hidden, outgoing=False, fusion=fusion)
