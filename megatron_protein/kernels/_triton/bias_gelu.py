"""Triton bias-GeLU (exact erf form): elementwise forward and backward; saves only x (the bias is a parameter)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _bias_gelu_fwd(X, B, Y, n_elements, n_cols, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n_elements
    y = tl.load(X + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + offs % n_cols, mask=valid, other=0.0).to(tl.float32)
    out = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    tl.store(Y + offs, out.to(Y.dtype.element_ty), mask=valid)


@triton.jit
def _bias_gelu_bwd(X, B, DY, DX, n_elements, n_cols, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n_elements
    y = tl.load(X + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + offs % n_cols, mask=valid, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.math.erf(y * 0.7071067811865476))
    pdf = tl.exp(-0.5 * y * y) * 0.3989422804014327
    dy = tl.load(DY + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(DX + offs, (dy * (cdf + y * pdf)).to(DX.dtype.element_ty), mask=valid)


class TritonBiasGeLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        xc = x.contiguous()
        out = torch.empty_like(xc)
        n = xc.numel()
        has_bias = bias is not None
        b = bias.contiguous() if has_bias else xc
        if n > 0:
            _bias_gelu_fwd[(triton.cdiv(n, BLOCK),)](xc, b, out, n, x.shape[-1], HAS_BIAS=has_bias, BLOCK=BLOCK)
        ctx.has_bias = has_bias
        ctx.save_for_backward(xc, bias)
        return out

    @staticmethod
    def backward(ctx, dy):
        xc, bias = ctx.saved_tensors
        dyc = dy.contiguous()
        dx = torch.empty_like(xc)
        n = xc.numel()
        b = bias.contiguous() if ctx.has_bias else xc
        if n > 0:
            _bias_gelu_bwd[(triton.cdiv(n, BLOCK),)](xc, b, dyc, dx, n, xc.shape[-1], HAS_BIAS=ctx.has_bias,
                                                     BLOCK=BLOCK)
        dbias = dx.reshape(-1, xc.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype) if ctx.has_bias else None
        return dx, dbias
