"""Triangular multiplicative update (AlphaFold2 supplement, Algorithms 11 "outgoing" and 12 "incoming").

    z' = LayerNorm(z);  a_ij = mask_ij sigmoid(Linear(z'_ij)) Linear(z'_ij),  b_ij likewise        [*, R, R, c]
    outgoing (Alg 11):  x_ij = sum_k a_ik b_jk        incoming (Alg 12):  x_ij = sum_k a_ki b_kj
    update_ij = sigmoid(Linear(z'_ij)) * Linear(LayerNorm(x_ij))                                   [*, R, R, c_z]

How it is computed (same function as the formula; checked against OpenFold's module weight for weight):

* ``a`` and ``b`` are produced channel-first, ``[*, c, R, R]`` contiguous, so the triangle sum is one batched GEMM
  per channel on unit-stride matrices. (OpenFold permutes ``[*, R, R, c]`` to ``[*, c, R, R]`` views, whose
  strides send ``bmm`` down a slow path on CPU: about a third of its block's training step at N_res 128.)
* The four projections of z' behind a and b are one GEMM, computed in row chunks by :class:`_GatedProjection`,
  which keeps neither the ``[*, R, R, 4c]`` projection nor the sigmoids for backward: it saves z' (which the
  output gate's Linear saves anyway) and recomputes the projection chunk by chunk in backward. Training memory of
  the module: about 7 ``[*, R, R, 128]`` tensors instead of about 15.
* Inference with the block owning z (:meth:`TriangleMultiplicativeUpdate.add_into`): the projection that every
  output needs (b for outgoing, a for incoming) is computed whole, then z is updated in place chunk by chunk (row
  chunks for outgoing, column chunks for incoming), each chunk's update depending only on its own slice of z.
  Peak: z plus one ``[*, c, R, R]`` projection plus a chunk (OpenFold's in-place path: 2.5 z).

Parameters stay five ``Linear`` layers with OpenFold's names (``linear_a_p``, ``linear_a_g``, ``linear_b_p``,
``linear_b_g``, ``linear_g``; ``linear_z``, ``layer_norm_in``, ``layer_norm_out``), so weights copy one to one.

DAP: outgoing runs in pair row layout (``z [*, R/n, R, c_z]``, i local) and all-gathers ``b`` along its rows j;
incoming runs in column layout (``z [*, R, R/n, c_z]``, j local) and all-gathers ``a`` along its columns i. In
the channel-first layout those are dims -2 of ``b [*, c, J, K]`` and -1 of ``a [*, c, K, I]``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_protein.kernels import FusionConfig
from megatron_protein.models.folding.chunking import autocast_as, autocast_state
from megatron_protein.models.folding.primitives import Linear, dap

#: Row chunks of the gated projection hold about this many elements of the [*, rows, R, 4c] projection.
PROJECTION_CHUNK_ELEMENTS = 1 << 22
#: In-place inference never uses fewer rows (or columns) per chunk than this.
MIN_SLICES_PER_CHUNK = 64


def _rows_per_chunk(x: torch.Tensor, width: int, dim: int) -> int:
    """Number of slices along ``dim`` of ``x [*, R, R, c_z]`` whose ``width``-wide projection fits the budget."""
    per_slice = max(1, x.numel() // x.shape[-1] // x.shape[dim] * width)
    return max(1, PROJECTION_CHUNK_ELEMENTS // per_slice)


def _gate(proj: torch.Tensor, c: int, mask: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """``proj [*, n, R, 2k c]`` (pairs p, g) -> k tensors ``mask * sigmoid(g) * p``, channel-first ``[*, c, n, R]``."""
    outs = []
    for first in range(0, proj.shape[-1], 2 * c):
        p, g = proj[..., first:first + c], proj[..., first + c:first + 2 * c]
        t = torch.sigmoid(g).mul_(p)
        if mask is not None:
            t.mul_(mask)
        outs.append(t.movedim(-1, -3))
    return outs


class _GatedProjection(torch.autograd.Function):
    """``x [*, R, R, c_z]`` -> ``a, b [*, c, R, R]``: ``a = mask sigmoid(x W_ag + b_ag) (x W_ap + b_ap)``, ``b``
    likewise, in row chunks; backward recomputes each chunk's projection from ``x`` instead of keeping it."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, c):
        batch, n_i, n_j = x.shape[:-3], x.shape[-3], x.shape[-2]
        a = x.new_empty(*batch, c, n_i, n_j)
        b = x.new_empty(*batch, c, n_i, n_j)
        rows = _rows_per_chunk(x, weight.shape[0], -3)
        for start in range(0, n_i, rows):
            end = min(start + rows, n_i)
            proj = F.linear(x[..., start:end, :, :], weight, bias)  # [*, rows, R, 4c]
            mask_rows = None if mask is None else mask[..., start:end, :, None]
            a_rows, b_rows = _gate(proj, c, mask_rows)
            a[..., start:end, :].copy_(a_rows)
            b[..., start:end, :].copy_(b_rows)
            del proj, a_rows, b_rows
        ctx.c, ctx.rows, ctx.autocast = c, rows, autocast_state(x)
        ctx.save_for_backward(x, weight, bias, mask)
        return a, b

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        x, weight, bias, mask = ctx.saved_tensors
        c, rows, n_i = ctx.c, ctx.rows, x.shape[-3]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_bias = torch.zeros_like(bias) if need_b else None
        with autocast_as(ctx.autocast):
            for start in range(0, n_i, rows):
                end = min(start + rows, n_i)
                x_rows = x[..., start:end, :, :]
                proj = F.linear(x_rows, weight, bias)  # recomputed [*, rows, R, 4c]
                grad_proj = torch.empty_like(proj)
                for k, grad in enumerate((grad_a, grad_b)):
                    p, g = proj[..., 2 * k * c:(2 * k + 1) * c], proj[..., (2 * k + 1) * c:(2 * k + 2) * c]
                    grad_t = grad[..., start:end, :].movedim(-3, -1)  # [*, rows, R, c]
                    if mask is not None:
                        grad_t = grad_t * mask[..., start:end, :, None]
                    sig = torch.sigmoid(g)
                    grad_proj[..., 2 * k * c:(2 * k + 1) * c] = grad_t * sig  # d p
                    # d g = grad * p * sig * (1 - sig)
                    grad_proj[..., (2 * k + 1) * c:(2 * k + 2) * c] = (grad_t * p).mul_(sig * (1.0 - sig))
                    del sig, grad_t
                flat = grad_proj.reshape(-1, grad_proj.shape[-1])
                if need_x:
                    grad_x[..., start:end, :, :] = torch.matmul(grad_proj, weight)
                if need_w:
                    grad_w.add_(torch.matmul(flat.t(), x_rows.reshape(-1, x.shape[-1])))
                if need_b:
                    grad_bias.add_(flat.sum(0))
                del proj, grad_proj, flat
        return grad_x, grad_w, grad_bias, None, None


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

    def _weights(self, *names: str):
        layers = [getattr(self, f"linear_{n}") for n in names]
        return torch.cat([layer.weight for layer in layers]), torch.cat([layer.bias for layer in layers])

    def combine(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The triangle sum over k, channel-first: ``a, b [*, c, R, R]`` -> ``x [*, c, I, J]``."""
        if self.outgoing:
            return torch.matmul(a, b.transpose(-1, -2))  # a [*, c, I, K] @ b^T [*, c, K, J]
        return torch.matmul(a.transpose(-1, -2), b)  # a^T [*, c, I, K] @ b [*, c, K, J]

    def _finish(self, x_cf: torch.Tensor, z_ln: torch.Tensor) -> torch.Tensor:
        """``sigmoid(Linear(z')) * Linear(LayerNorm(x))`` with ``x [*, c, I, J]`` channel-first."""
        y = self.linear_z(self.layer_norm_out(x_cf.movedim(-3, -1)))  # [*, I, J, c_z]
        return y.mul_(torch.sigmoid(self.linear_g(z_ln))) if not torch.is_grad_enabled() else \
            y * torch.sigmoid(self.linear_g(z_ln))

    def forward(self, z: torch.Tensor, pair_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        z_ln = self.layer_norm_in(z)
        weight, bias = self._weights("a_p", "a_g", "b_p", "b_g")
        mask = None if pair_mask is None else pair_mask.to(z_ln.dtype)
        a, b = _GatedProjection.apply(z_ln, weight, bias, mask, self.c_hidden)  # [*, c, R, R]
        if self.outgoing:
            b = dap.all_gather(b, dim=-2)  # row layout: every row j of b
        else:
            a = dap.all_gather(a, dim=-1)  # column layout: every column i of a
        x = self.combine(a, b)
        del a, b
        return self._finish(x, z_ln)

    @torch.no_grad()
    def add_into(self, z: torch.Tensor, pair_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Inference: ``z += update`` in place, in chunks (see the module docstring); returns z.

        Chunks hold about :data:`PROJECTION_CHUNK_ELEMENTS` projection elements but at least
        :data:`MIN_SLICES_PER_CHUNK` slices, so the triangle GEMM of each chunk stays compute-bound (it reads the
        whole ``[*, c, R, R]`` projection once per chunk)."""
        slice_dim = -3 if self.outgoing else -2  # outgoing: rows i of the output; incoming: columns j
        whole = ("b_p", "b_g") if self.outgoing else ("a_p", "a_g")  # the projection every slice needs
        own = ("a_p", "a_g") if self.outgoing else ("b_p", "b_g")
        w_whole, b_whole = self._weights(*whole)
        w_own, b_own = self._weights(*own)
        mask = None if pair_mask is None else pair_mask.to(z.dtype)
        n = z.shape[slice_dim]
        step = max(MIN_SLICES_PER_CHUNK, _rows_per_chunk(z, 2 * self.c_hidden + self.c_z, slice_dim))

        def gated(start, end, weight, bias):
            z_ln = self.layer_norm_in(z.narrow(slice_dim, start, end - start))
            mask_s = None if mask is None else mask.narrow(slice_dim + 1, start, end - start).unsqueeze(-1)
            (proj,) = _gate(F.linear(z_ln, weight, bias), self.c_hidden, mask_s)
            return proj, z_ln

        full = z.new_empty(*z.shape[:-3], self.c_hidden, *z.shape[-3:-1])  # [*, c, R, R]
        for start in range(0, n, step):
            end = min(start + step, n)
            proj, _ = gated(start, end, w_whole, b_whole)
            full.narrow(slice_dim + 1, start, end - start).copy_(proj)
            del proj
        full = dap.all_gather(full, dim=-2 if self.outgoing else -1)
        for start in range(0, n, step):
            end = min(start + step, n)
            proj, z_ln = gated(start, end, w_own, b_own)
            x = self.combine(proj, full) if self.outgoing else self.combine(full, proj)
            z.narrow(slice_dim, start, end - start).add_(self._finish(x, z_ln))
            del proj, z_ln, x
        return z


class TriangleMultiplicationOutgoing(TriangleMultiplicativeUpdate):
    """Algorithm 11: x_ij = sum_k a_ik b_jk (edges leaving i and j)."""

    def __init__(self, c_z: int, c_hidden: int = 128, fusion: FusionConfig = FusionConfig()):
        super().__init__(c_z, c_hidden, outgoing=True, fusion=fusion)


class TriangleMultiplicationIncoming(TriangleMultiplicativeUpdate):
    """Algorithm 12: x_ij = sum_k a_ki b_kj (edges arriving at i and j)."""

    def __init__(self, c_z: int, c_hidden: int = 128, fusion: FusionConfig = FusionConfig()):
        super().__init__(c_z, c_hidden, outgoing=False, fusion=fusion)
