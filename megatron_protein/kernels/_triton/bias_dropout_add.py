"""Triton bias-dropout-add: out = residual + keep * (x + bias) * scale, with the keep mask broadcast along any
dims (AF2 row-/column-wise dropout) read through stride-0 offsets, never expanded in memory."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_protein.kernels._triton.common import broadcast_offset_5d, broadcast_strides_5d, pad_shape_5d

BLOCK = 1024


@triton.jit
def _bias_dropout_add(X, B, R, Keep, Out, n_elements, n_cols, scale,
                      d1, d2, d3, d4, s0, s1, s2, s3, s4,
                      HAS_BIAS: tl.constexpr, HAS_KEEP: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Forward (HAS_RESIDUAL): residual + keep*scale*(x+b). Backward (no residual, no bias): keep*scale*grad."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < n_elements
    y = tl.load(X + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + offs % n_cols, mask=valid, other=0.0).to(tl.float32)
    if HAS_KEEP:
        keep_offs = broadcast_offset_5d(offs, d1, d2, d3, d4, s0, s1, s2, s3, s4)
        keep = tl.load(Keep + keep_offs, mask=valid, other=0).to(tl.float32)
        y = y * keep * scale
    if HAS_RESIDUAL:
        y += tl.load(R + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(Out + offs, y.to(Out.dtype.element_ty), mask=valid)


def _launch(x, bias, residual, keep, scale):
    xc = x.contiguous()
    out = torch.empty_like(xc)
    n = xc.numel()
    if n == 0:
        return out
    shape = pad_shape_5d(xc.shape)
    strides = broadcast_strides_5d(keep, xc.shape) if keep is not None else [0] * 5
    keep_arg = keep.view(torch.int8) if keep is not None else xc
    _bias_dropout_add[(triton.cdiv(n, BLOCK),)](
        xc, bias.contiguous() if bias is not None else xc, residual.contiguous() if residual is not None else xc,
        keep_arg, out, n, xc.shape[-1], scale, shape[1], shape[2], shape[3], shape[4], *strides,
        HAS_BIAS=bias is not None, HAS_KEEP=keep is not None, HAS_RESIDUAL=residual is not None, BLOCK=BLOCK)
    return out


class TritonBiasDropoutAddFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, residual, keep, p):
        scale = 1.0 / (1.0 - p) if keep is not None else 1.0
        out = _launch(x, bias, residual, keep, scale)
        ctx.scale = scale
        ctx.has_bias = bias is not None
        ctx.save_for_backward(keep)
        return out

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        dx = _launch(grad, None, None, keep, ctx.scale) if keep is not None else grad
        dbias = dx.reshape(-1, dx.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return dx, dbias, grad, None, None
