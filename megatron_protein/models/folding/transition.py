"""The MSA and pair transitions (AlphaFold2 supplement, Algorithms 9 and 15): a position-wise two-layer MLP.

    x' = LayerNorm(x);  update = Linear_2(ReLU(Linear_1(x'))) * mask      Linear_1: c -> n c, Linear_2: n c -> c

Algorithm 9 acts on the MSA ``[*, S, R, c_m]``, Algorithm 15 on the pair ``[*, R, R, c_z]``; both are the same
module (``n = 4`` in AlphaFold2). The update is multiplied by the mask, as OpenFold does (AlphaFold's own code
leaves the transitions unmasked; it changes only padded positions). Being position-wise, it runs unchanged in any
DAP layout and chunks over any batch-like dimension; chunked, the ``[*, n c]`` hidden exists for one chunk only.

Training memory: with ``recompute=True`` (the default) the MLP is :class:`_RecomputedMLP`, which keeps only its
input (the LayerNorm output) and recomputes the ``[*, n c]`` hidden chunk by chunk in backward: for the pair
transition at N_res 256 that is 128 MiB not kept and as much not allocated for its gradient, for one more GEMM.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_protein.kernels import FusionConfig
from megatron_protein.models.folding.chunking import autocast_as, autocast_state, chunk_layer
from megatron_protein.models.folding.primitives import Linear


#: Row chunks of the recomputed MLP hold about this many hidden elements.
HIDDEN_CHUNK_ELEMENTS = 1 << 22


class _RecomputedMLP(torch.autograd.Function):
    """``(Linear_2(ReLU(Linear_1(x))) * mask`` for ``x [*, N, M, c]``, in chunks of N; saves x (not the hidden)."""

    @staticmethod
    def _rows(x, hidden):
        return max(1, HIDDEN_CHUNK_ELEMENTS // max(1, x[..., :1, :, :].numel() // x.shape[-1] * hidden))

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, mask):
        rows, n = _RecomputedMLP._rows(x, w1.shape[0]), x.shape[-3]
        out = x.new_empty(*x.shape[:-1], w2.shape[0])
        for start in range(0, n, rows):
            h = F.relu(F.linear(x[..., start:start + rows, :, :], w1, b1), inplace=True)
            y = F.linear(h, w2, b2)
            if mask is not None:
                y.mul_(mask[..., start:start + rows, :, None])
            out[..., start:start + rows, :, :] = y
            del h, y
        ctx.rows, ctx.autocast = rows, autocast_state(x)
        ctx.save_for_backward(x, w1, b1, w2, mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w1, b1, w2, mask = ctx.saved_tensors
        rows, n = ctx.rows, x.shape[-3]
        grad_x = torch.empty_like(x)
        grad_w1, grad_b1 = torch.zeros_like(w1), torch.zeros_like(b1)
        grad_w2, grad_b2 = torch.zeros_like(w2), torch.zeros(w2.shape[0], dtype=w2.dtype, device=w2.device)
        with autocast_as(ctx.autocast):
            for start in range(0, n, rows):
                x_rows = x[..., start:start + rows, :, :]
                h = F.relu(F.linear(x_rows, w1, b1), inplace=True)  # recomputed [*, rows, M, n c]
                g = grad[..., start:start + rows, :, :]
                if mask is not None:
                    g = g * mask[..., start:start + rows, :, None]
                g_flat, h_flat = g.reshape(-1, g.shape[-1]), h.reshape(-1, h.shape[-1])
                grad_w2.add_(torch.matmul(g_flat.t(), h_flat))
                grad_b2.add_(g_flat.sum(0))
                # ReLU backward in one pass (a bool mask and a multiply are two, and 5x slower on CPU)
                dh = torch.ops.aten.threshold_backward(torch.matmul(g, w2), h, 0.0)
                del h, h_flat
                dh_flat = dh.reshape(-1, dh.shape[-1])
                grad_w1.add_(torch.matmul(dh_flat.t(), x_rows.reshape(-1, x.shape[-1])))
                grad_b1.add_(dh_flat.sum(0))
                grad_x[..., start:start + rows, :, :] = torch.matmul(dh, w1)
                del dh, dh_flat
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None


class Transition(torch.nn.Module):
    """``(x [*, N, M, c], mask [*, N, M] or None) -> update [*, N, M, c]`` (Algorithms 9 and 15)."""

    def __init__(self, c: int, n: int = 4, fusion: FusionConfig = FusionConfig(), recompute: bool = True):
        super().__init__()
        if c <= 0 or n <= 0:
            raise ValueError(f"Transition: c and n must be positive, got c={c}, n={n}")
        self.c, self.n, self.recompute = c, n, bool(recompute)
        self.layer_norm = fusion.layer_norm(c)
        self.linear_1 = Linear(c, n * c, init="relu")
        self.linear_2 = Linear(n * c, c, init="final")

    def _transition(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = self.layer_norm(x)
        if self.recompute and torch.is_grad_enabled() and (x.requires_grad or self.linear_1.weight.requires_grad):
            mask = None if mask is None else mask.to(x.dtype)
            return _RecomputedMLP.apply(x, self.linear_1.weight, self.linear_1.bias, self.linear_2.weight,
                                        self.linear_2.bias, mask)
        h = F.relu(self.linear_1(x), inplace=True)  # [*, N, M, n c]
        out = self.linear_2(h)
        if mask is not None:
            out = out * mask.unsqueeze(-1).to(out.dtype)
        return out

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                chunk_size: Optional[int] = None) -> torch.Tensor:
        if chunk_size is None:
            return self._transition(x, mask)
        if mask is None:
            return chunk_layer(lambda t: self._transition(t, None), (x,), chunk_size, num_batch_dims=x.dim() - 2)
        return chunk_layer(self._transition, (x, mask), chunk_size, num_batch_dims=x.dim() - 2)


    @torch.no_grad()
    def add_into(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                 chunk_size: Optional[int] = None) -> torch.Tensor:
        """Inference: ``x += update`` in place, ``chunk_size`` rows (dim -3) at a time (all at once if None)."""
        n = x.shape[-3]
        step = chunk_size or n
        for start in range(0, n, step):
            rows = x.narrow(-3, start, min(step, n - start))
            rows.add_(self._transition(rows, None if mask is None else mask.narrow(-2, start, rows.shape[-3])))
        return x


#: Algorithm 9 (MSA transition) and Algorithm 15 (pair transition) are the same module.
MSATransition = Transition
PairTransition = Transition
