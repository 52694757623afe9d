"""Triton masked softmax with scale, additive bias and boolean mask, one program per row of keys.

The bias and the mask are read through their own (stride-0 where broadcast) strides, so a pair bias shared by
every MSA row or a padding mask shared by every head and query is never expanded in memory. Fully masked rows give
zeros. Backward writes d_logits = p * (g - sum(g p)); the wrapper scales it for the scores and sums it over the
bias's broadcast dims for the bias.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_protein.kernels._triton.common import block_size, broadcast_offset_5d, broadcast_strides_5d, pad_shape_5d


@triton.jit
def _masked_softmax_fwd(S, Bias, Mask, P, n_cols, scale,
                        d1, d2, d3,
                        bs0, bs1, bs2, bs3, bs4, ms0, ms1, ms2, ms3, ms4,
                        HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    valid = cols < n_cols
    x = tl.load(S + row * n_cols + cols, mask=valid, other=0.0).to(tl.float32) * scale
    flat = row * n_cols + cols
    if HAS_BIAS:
        b_offs = broadcast_offset_5d(flat, d1, d2, d3, n_cols, bs0, bs1, bs2, bs3, bs4)
        x += tl.load(Bias + b_offs, mask=valid, other=0.0).to(tl.float32)
    keep = valid
    if HAS_MASK:
        m_offs = broadcast_offset_5d(flat, d1, d2, d3, n_cols, ms0, ms1, ms2, ms3, ms4)
        masked = tl.load(Mask + m_offs, mask=valid, other=1)
        keep = keep & (masked == 0)
    x = tl.where(keep, x, float("-inf"))
    row_max = tl.max(x, axis=0)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    e = tl.where(keep, tl.exp(x - row_max), 0.0)
    denom = tl.sum(e, axis=0)
    denom = tl.where(denom == 0.0, 1.0, denom)
    tl.store(P + row * n_cols + cols, (e / denom).to(P.dtype.element_ty), mask=valid)


@triton.jit
def _masked_softmax_bwd(P, G, DL, n_cols, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    valid = cols < n_cols
    p = tl.load(P + row * n_cols + cols, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(G + row * n_cols + cols, mask=valid, other=0.0).to(tl.float32)
    dot = tl.sum(p * g, axis=0)
    tl.store(DL + row * n_cols + cols, (p * (g - dot)).to(DL.dtype.element_ty), mask=valid)


class TritonMaskedSoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, scale, bias, mask):
        shape = scores.shape
        if scores.dim() > 5:
            raise ValueError(f"Triton masked softmax takes at most 5-dim scores, got shape {tuple(shape)}")
        sc = scores.contiguous()
        probs = torch.empty_like(sc)
        n_cols = shape[-1]
        n_rows = sc.numel() // max(n_cols, 1)
        dims = pad_shape_5d(shape)
        bias_strides = broadcast_strides_5d(bias, shape) if bias is not None else [0] * 5
        mask_strides = broadcast_strides_5d(mask, shape) if mask is not None else [0] * 5
        if n_rows > 0 and n_cols > 0:
            _masked_softmax_fwd[(n_rows,)](
                sc, bias if bias is not None else sc, mask.view(torch.int8) if mask is not None else sc, probs,
                n_cols, scale, dims[1], dims[2], dims[3], *bias_strides, *mask_strides,
                HAS_BIAS=bias is not None, HAS_MASK=mask is not None, BLOCK_K=block_size(n_cols))
        ctx.scale = scale
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad):
        (probs,) = ctx.saved_tensors
        n_cols = probs.shape[-1]
        n_rows = probs.numel() // max(n_cols, 1)
        needs_bias_grad = ctx.bias_shape is not None and ctx.needs_input_grad[2]
        # d_logits in fp32 when the bias needs its (reduced) gradient, so the sum does not lose precision.
        d_logits = torch.empty(probs.shape, device=probs.device,
                               dtype=torch.float32 if needs_bias_grad else probs.dtype)
        if n_rows > 0 and n_cols > 0:
            _masked_softmax_bwd[(n_rows,)](probs, grad.contiguous(), d_logits, n_cols, BLOCK_K=block_size(n_cols))
        d_bias = d_logits.sum_to_size(ctx.bias_shape).to(ctx.bias_dtype) if needs_bias_grad else None
        d_scores = None
        if ctx.needs_input_grad[0]:
            d_scores = (d_logits * ctx.scale).to(probs.dtype) if ctx.scale != 1.0 else d_logits.to(probs.dtype)
        return d_scores, None, d_bias, None
