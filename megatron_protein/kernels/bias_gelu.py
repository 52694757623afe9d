"""Bias-GeLU: gelu(x + bias) with the exact erf GeLU (Hendrycks & Gimpel 2016), as in the BERT MLP.

gelu(y) = y * Phi(y) = 0.5 * y * (1 + erf(y / sqrt(2)));  gelu'(y) = Phi(y) + y * phi(y),
phi(y) = exp(-y^2 / 2) / sqrt(2 pi).

This is the exact form, not the tanh approximation that Megatron's ``fused_bias_gelu`` uses: the protein BERT and
its TAPE twin use ``torch.nn.functional.gelu``'s default everywhere, so every path here must compute it too.

The fused paths save only the pre-bias input (the bias is a parameter, already kept) and recompute y = x + bias
in backward, so the op costs one activation of memory; the unfused composition keeps several intermediates.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_protein.kernels import dispatch

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def bias_gelu_unfused(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The formula written out with elementary ops (what ``--no-bias-gelu-fusion`` runs)."""
    y = x + bias if bias is not None else x
    return 0.5 * y * (1.0 + torch.erf(y * _INV_SQRT2))


def _gelu_grad(y: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1.0 + torch.erf(y * _INV_SQRT2))
    pdf = torch.exp(-0.5 * y * y) * _INV_SQRT_2PI
    return cdf + y * pdf


def _forward_math(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return F.gelu(x + bias if bias is not None else x)


def _backward_math(grad: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    y = x + bias if bias is not None else x
    return grad * _gelu_grad(y)


def _backward_native(grad: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """ATen's one-pass exact-GeLU backward on the recomputed y = x + bias (two temporaries: y and dx)."""
    return torch.ops.aten.gelu_backward(grad, x + bias if bias is not None else x, approximate="none")


_compiled: dict[str, object] = {}


def _maybe_compiled(name: str, fn, compiled: bool):
    if not compiled:
        return fn
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True)
    return _compiled[name]


class _ReferenceBiasGeLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, compiled):
        ctx.compiled = compiled
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, bias)
        return _maybe_compiled("bias_gelu_fwd", _forward_math, compiled)(x, bias)

    @staticmethod
    def backward(ctx, grad):
        x, bias = ctx.saved_tensors
        if ctx.compiled:
            dx = _maybe_compiled("bias_gelu_bwd", _backward_math, True)(grad, x, bias)
        else:
            dx = _backward_native(grad, x, bias)
        dbias = None
        if ctx.has_bias and ctx.needs_input_grad[1]:
            dbias = dx.sum_to_size(bias.shape)
        return dx, dbias, None


def bias_gelu_reference(x: torch.Tensor, bias: Optional[torch.Tensor], compiled: bool = False) -> torch.Tensor:
    """Native gelu on x + bias in a memory-lean autograd function; ``compiled`` runs the math via torch.compile."""
    return _ReferenceBiasGeLU.apply(x, bias, compiled)


def bias_gelu_triton(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    from megatron_protein.kernels._triton.bias_gelu import TritonBiasGeLUFunction
    dispatch.check_triton_tensors("BiasGeLU", x, bias)
    return TritonBiasGeLUFunction.apply(x, bias)


class BiasGeLU(torch.nn.Module):
    """``(x [..., n], bias [n] or None) -> gelu(x + bias)`` with exact erf GeLU.

    ``fused=False`` is Megatron's ``--no-bias-gelu-fusion``. ``compiled=True`` puts the reference's elementwise
    math through ``torch.compile`` (one generated loop instead of several passes; pays on CPU for large
    activations, costs a compile on first call; see ``bench/kernels.py``).
    """

    def __init__(self, fused: bool = True, compiled: bool = False):
        super().__init__()
        self.fused = bool(fused)
        self.compiled = bool(compiled)

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if bias is not None and bias.shape != x.shape[-1:]:
            raise ValueError(f"BiasGeLU: bias must have shape [{x.shape[-1]}] (last dim of x {tuple(x.shape)}), "
                             f"got {tuple(bias.shape)}")
        if bias is not None and bias.dtype != x.dtype:
            # Under autocast x comes from a bf16/fp16 matmul while the bias parameter is fp32: add it in x's dtype,
            # as autocast does with a linear layer's own bias. Promoting instead would run the GeLU, its backward
            # and the next matmul's input cast on a float32 copy of the widest activation of the layer.
            bias = bias.to(x.dtype)
        backend = dispatch.select_backend("BiasGeLU", self.fused, x, bias)
        if backend == "triton":
            return bias_gelu_triton(x, bias)
        if backend == "reference":
            return bias_gelu_reference(x, bias, self.compiled)
        return bias_gelu_unfused(x, bias)

    def extra_repr(self) -> str:
        return f"fused={self.fused}, compiled={self.compiled}"
