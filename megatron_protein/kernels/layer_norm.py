"""LayerNorm (Ba et al. 2016) with a fused Triton kernel, PyTorch's native kernel, and the textbook formula.

y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias over the last dimension, with the biased variance, exactly
as ``torch.nn.LayerNorm``. The module keeps ``torch.nn.LayerNorm``'s state-dict layout (``weight``, ``bias``), so a
checkpoint moves between fused and unfused models and to TAPE without renaming.

The Triton kernel (``_triton/layer_norm.py``) computes mean, variance and the affine map in one pass per row and
saves only the per-row mean and reciprocal standard deviation; its backward computes dx row by row and reduces
dgamma/dbeta with per-program partial sums, as Apex's and Triton's tutorial fused LayerNorm do.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_protein.kernels import dispatch


def layer_norm_unfused(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The textbook composition: mean, biased variance, normalise, scale, shift (what ``fused=False`` runs)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = (x - mean).pow(2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """PyTorch's native fused layer_norm (one kernel forward, one backward; saves mean and rstd only)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The Triton kernel pair (CUDA, or CPU under TRITON_INTERPRET=1)."""
    from megatron_protein.kernels._triton.layer_norm import TritonLayerNormFunction
    dispatch.check_triton_tensors("LayerNorm", x, weight, bias)
    return TritonLayerNormFunction.apply(x, weight, bias, eps)


class LayerNorm(torch.nn.Module):
    """Drop-in ``torch.nn.LayerNorm`` over the last dimension whose implementation is chosen at build time.

    ``fused=True``: the Triton kernel on CUDA when triton is installed, else PyTorch's native layer_norm.
    ``fused=False``: the unfused composition of torch ops.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, fused: bool = True, device=None, dtype=None):
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"LayerNorm: hidden_size must be positive, got {hidden_size}")
        self.hidden_size = int(hidden_size)
        self.normalized_shape = (self.hidden_size,)
        self.eps = float(eps)
        self.fused = bool(fused)
        self.weight = torch.nn.Parameter(torch.ones(self.hidden_size, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(self.hidden_size, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        torch.nn.init.ones_(self.weight)
        torch.nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"LayerNorm: expected last dimension {self.hidden_size}, got input of shape "
                             f"{tuple(x.shape)}")
        backend = dispatch.select_backend("LayerNorm", self.fused, x)
        if backend == "triton":
            return layer_norm_triton(x, self.weight, self.bias, self.eps)
        if backend == "reference":
            return layer_norm_reference(x, self.weight, self.bias, self.eps)
        return layer_norm_unfused(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, fused={self.fused}"
