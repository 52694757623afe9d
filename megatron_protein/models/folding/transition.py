"""The MSA and pair transitions (AlphaFold2 supplement, Algorithms 9 and 15): a position-wise two-layer MLP.

    x' = LayerNorm(x);  update = Linear_2(ReLU(Linear_1(x'))) * mask      Linear_1: c -> n c, Linear_2: n c -> c

Algorithm 9 acts on the MSA ``[*, S, R, c_m]``, Algorithm 15 on the pair ``[*, R, R, c_z]``; both are the same
module (``n = 4`` in AlphaFold2). The update is multiplied by the mask, as OpenFold does (AlphaFold's own code
leaves the transitions unmasked; it changes only padded positions). Being position-wise, it runs unchanged in any
DAP layout and chunks over any batch-like dimension; chunked, the ``[*, n c]`` hidden exists for one chunk only.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_protein.kernels import FusionConfig
from megatron_protein.models.folding.chunking import chunk_layer
from megatron_protein.models.folding.primitives import Linear


class Transition(torch.nn.Module):
    """``(x [*, N, M, c], mask [*, N, M] or None) -> update [*, N, M, c]`` (Algorithms 9 and 15)."""

    def __init__(self, c: int, n: int = 4, fusion: FusionConfig = FusionConfig()):
        super().__init__()
        if c <= 0 or n <= 0:
            raise ValueError(f"Transition: c and n must be positive, got c={c}, n={n}")
        self.c, self.n = c, n
        self.layer_norm = fusion.layer_norm(c)
        self.linear_1 = Linear(c, n * c, init="relu")
        self.linear_2 = Linear(n * c, c, init="final")

    def _transition(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        h = F.relu(self.linear_1(self.layer_norm(x)), inplace=True)  # [*, N, M, n c]
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
