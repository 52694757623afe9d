"""Outer product mean (AlphaFold2 supplement, Algorithm 10): the MSA's update of the pair representation.

    m' = LayerNorm(m);  a_si = Linear(m'_si) * mask_si,  b_sj = Linear(m'_sj) * mask_sj      [*, S, R, c]
    o_ij = Linear_out(flatten(sum_s a_si (x) b_sj)) / (eps + sum_s mask_si mask_sj)          [*, R, R, c_z]

The mean over sequences is a masked mean (divided by the number of sequences where both residues are real, plus
``eps = 1e-3``, as AlphaFold). ``linear_out`` starts at zero ('final').

Memory: the outer product ``[*, R, R, c, c]`` (c = 32: 8x the pair representation) is never whole.
:class:`_OuterProductLinear` computes ``Linear_out(sum_s a (x) b)`` for a few rows i at a time, in forward and
again in backward (where it recomputes the rows' outer product for the weight gradient), keeping only a and b;
OpenFold keeps the whole outer product for backward and builds its gradient whole. The extra cost is one
recomputation of the outer product (about 1/3 of the module's GEMM work).

DAP: the module runs in MSA column layout (``m [*, S, R/n, c_m]``); the right projection ``b`` is all-gathered
along the residues, so the result ``[*, R/n, R, c_z]`` lands on the local pair rows.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_protein.kernels import FusionConfig
from megatron_protein.models.folding.chunking import autocast_as, autocast_state
from megatron_protein.models.folding.primitives import Linear, dap

#: Row chunks of the outer product hold about this many elements ([*, rows, R, c * c]).
OUTER_CHUNK_ELEMENTS = 1 << 22


def _rows(n_j: int, c: int, d: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return chunk_size
    return max(1, OUTER_CHUNK_ELEMENTS // max(1, n_j * c * d))


class _OuterProductLinear(torch.autograd.Function):
    """``a [*, S, I, c], b [*, S, J, d]`` -> ``Linear_out(flatten_cd(sum_s a_sic b_sjd))`` ``[*, I, J, c_z]``, in row
    chunks of i; saves only a and b (and the weight), recomputing each chunk's outer product in backward."""

    @staticmethod
    def _outer(a, b, start, end):
        # [*, S, rows * c]^T @ [*, S, J * d] -> [*, rows, c, J, d] -> [*, rows, J, c * d]
        rows, c, n_j, d = end - start, a.shape[-1], b.shape[-2], b.shape[-1]
        a_rows = a[..., start:end, :].flatten(-2)
        p = torch.matmul(a_rows.transpose(-1, -2), b.flatten(-2))
        return p.view(*p.shape[:-2], rows, c, n_j, d).transpose(-3, -2).reshape(*p.shape[:-2], rows, n_j, c * d)

    @staticmethod
    def forward(ctx, a, b, weight, bias, rows):
        n_i, n_j = a.shape[-2], b.shape[-2]
        batch = torch.broadcast_shapes(a.shape[:-3], b.shape[:-3])
        out = a.new_empty(*batch, n_i, n_j, weight.shape[0])
        for start in range(0, n_i, rows):
            end = min(start + rows, n_i)
            out[..., start:end, :, :] = F.linear(_OuterProductLinear._outer(a, b, start, end), weight, bias)
        ctx.rows, ctx.autocast = rows, autocast_state(a)
        ctx.save_for_backward(a, b, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        a, b, weight = ctx.saved_tensors
        rows, n_i, c = ctx.rows, a.shape[-2], a.shape[-1]
        n_j, d = b.shape[-2], b.shape[-1]
        need_a, need_b, need_w, need_bias = ctx.needs_input_grad[:4]
        grad_a = torch.empty_like(a) if need_a else None
        grad_b = torch.zeros_like(b) if need_b else None
        grad_w = torch.zeros_like(weight) if need_w else None
        b_flat = b.flatten(-2)  # [*, S, J * d]
        with autocast_as(ctx.autocast):
            for start in range(0, n_i, rows):
                end = min(start + rows, n_i)
                g = grad[..., start:end, :, :]  # [*, rows, J, c_z]
                if need_w:
                    outer = _OuterProductLinear._outer(a, b, start, end)  # recomputed
                    grad_w.add_(torch.matmul(g.reshape(-1, g.shape[-1]).t(), outer.reshape(-1, outer.shape[-1])))
                    del outer
                if need_a or need_b:
                    # d outer [*, rows, J, c, d] -> [*, rows * c, J * d]
                    d_outer = torch.matmul(g, weight).view(*g.shape[:-1], c, d).transpose(-3, -2)
                    d_outer = d_outer.reshape(*g.shape[:-3], (end - start) * c, n_j * d)
                    if need_a:  # [*, rows * c, J * d] @ [*, J * d, S] -> [*, rows * c, S] -> [*, S, rows, c]
                        ga = torch.matmul(d_outer, b_flat.transpose(-1, -2))
                        grad_a[..., start:end, :] = ga.transpose(-1, -2).reshape(*ga.shape[:-2], -1, end - start, c)
                    if need_b:  # [*, S, rows * c] @ [*, rows * c, J * d]
                        grad_b.add_(torch.matmul(a[..., start:end, :].flatten(-2), d_outer).view(grad_b.shape))
                    del d_outer
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if need_bias else None
        if need_a:
            grad_a = grad_a.sum_to_size(a.shape)
        if need_b:
            grad_b = grad_b.sum_to_size(b.shape)
        return grad_a, grad_b, grad_w, grad_bias, None


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

    def _projections(self, m, msa_mask):
        if msa_mask is None:
            msa_mask = m.new_ones(m.shape[:-1])
        mask = msa_mask.unsqueeze(-1).to(m.dtype)  # [*, S, R(/n), 1]
        x = self.layer_norm(m)
        a = self.linear_1(x) * mask  # [*, S, R(/n), c]
        b = self.linear_2(x) * mask
        b = dap.all_gather(b, dim=-2)  # [*, S, R, c]: every residue j
        mask_b = dap.all_gather(mask, dim=-2)
        # [*, R(/n), R, 1]: the number of sequences in which both residues are real, plus eps
        norm = torch.matmul(mask.squeeze(-1).transpose(-1, -2), mask_b.squeeze(-1)).unsqueeze(-1).add_(self.eps)
        return a, b, norm

    def forward(self, m: torch.Tensor, msa_mask: Optional[torch.Tensor] = None,
                chunk_size: Optional[int] = None) -> torch.Tensor:
        a, b, norm = self._projections(m, msa_mask)
        rows = _rows(b.shape[-2], a.shape[-1], b.shape[-1], chunk_size)
        out = _OuterProductLinear.apply(a, b, self.linear_out.weight, self.linear_out.bias, rows)
        return out.div_(norm) if not torch.is_grad_enabled() else out / norm

    @torch.no_grad()
    def add_into(self, z: torch.Tensor, m: torch.Tensor, msa_mask: Optional[torch.Tensor] = None,
                 chunk_size: Optional[int] = None) -> torch.Tensor:
        """Inference: ``z += OuterProductMean(m)`` in place, a few rows i at a time; returns z."""
        a, b, norm = self._projections(m, msa_mask)
        n_i = a.shape[-2]
        rows = _rows(b.shape[-2], a.shape[-1], b.shape[-1], chunk_size)
        w, bias = self.linear_out.weight, self.linear_out.bias
        for start in range(0, n_i, rows):
            end = min(start + rows, n_i)
            piece = F.linear(_OuterProductLinear._outer(a, b, start, end), w, bias)
            z[..., start:end, :, :].add_(piece.div_(norm[..., start:end, :, :]))
        return z
