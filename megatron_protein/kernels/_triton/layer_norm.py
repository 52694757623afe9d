"""Triton LayerNorm: one program per row forward; backward computes dx per row and reduces dgamma/dbeta from
per-program partial sums in a second kernel (the scheme of Apex's and Triton's fused LayerNorm)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_protein.kernels._triton.common import block_size

ROWS_PER_PROGRAM = 16


@triton.jit
def _layer_norm_fwd(X, W, B, Y, Mean, Rstd, n_cols, eps, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    valid = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=valid, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    centered = tl.where(valid, x - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=valid, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=valid, other=0.0).to(tl.float32)
    y = centered * rstd * w + b
    tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=valid)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _layer_norm_bwd_dx(X, W, DY, DX, Mean, Rstd, PartialDW, PartialDB, n_rows, n_cols,
                       ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy*xhat)); accumulate dy*xhat and dy for ROWS rows."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    valid = cols < n_cols
    w = tl.load(W + cols, mask=valid, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i in range(ROWS):
        row = pid * ROWS + i
        if row < n_rows:
            x = tl.load(X + row * n_cols + cols, mask=valid, other=0.0).to(tl.float32)
            dy = tl.load(DY + row * n_cols + cols, mask=valid, other=0.0).to(tl.float32)
            mean = tl.load(Mean + row)
            rstd = tl.load(Rstd + row)
            xhat = tl.where(valid, (x - mean) * rstd, 0.0)
            wdy = w * dy
            c1 = tl.sum(xhat * wdy, axis=0) / n_cols
            c2 = tl.sum(wdy, axis=0) / n_cols
            dx = (wdy - (xhat * c1 + c2)) * rstd
            tl.store(DX + row * n_cols + cols, dx.to(DX.dtype.element_ty), mask=valid)
            dw_acc += dy * xhat
            db_acc += dy
    tl.store(PartialDW + pid * n_cols + cols, dw_acc, mask=valid)
    tl.store(PartialDB + pid * n_cols + cols, db_acc, mask=valid)


@triton.jit
def _column_sum(Partial, Out, n_parts, n_cols, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Out[c] = sum_p Partial[p, c]: the dgamma/dbeta reduction over the partial sums."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, n_parts, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P)
        block = tl.load(Partial + parts[:, None] * n_cols + cols[None, :],
                        mask=(parts[:, None] < n_parts) & (cols[None, :] < n_cols), other=0.0)
        acc += tl.sum(block, axis=0)
    tl.store(Out + cols, acc.to(Out.dtype.element_ty), mask=cols < n_cols)


def _column_sum_launch(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n_parts, n_cols = partial.shape
    out = torch.empty(n_cols, dtype=dtype, device=partial.device)
    block_c = 32
    _column_sum[(triton.cdiv(n_cols, block_c),)](partial, out, n_parts, n_cols, BLOCK_P=16, BLOCK_C=block_c)
    return out


class TritonLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        n_rows, n_cols = x2.shape
        y = torch.empty_like(x2)
        mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        if n_rows > 0:
            _layer_norm_fwd[(n_rows,)](x2, weight.contiguous(), bias.contiguous(), y, mean, rstd, n_cols, eps,
                                       BLOCK_N=block_size(n_cols))
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.shape = shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols).contiguous()
        dx = torch.empty_like(x2)
        n_programs = max(1, triton.cdiv(n_rows, ROWS_PER_PROGRAM))
        partial_dw = torch.zeros(n_programs, n_cols, dtype=torch.float32, device=x2.device)
        partial_db = torch.zeros(n_programs, n_cols, dtype=torch.float32, device=x2.device)
        if n_rows > 0:
            _layer_norm_bwd_dx[(n_programs,)](x2, weight.contiguous(), dy2, dx, mean, rstd, partial_dw, partial_db,
                                              n_rows, n_cols, ROWS=ROWS_PER_PROGRAM, BLOCK_N=block_size(n_cols))
        dw = _column_sum_launch(partial_dw, weight.dtype)
        db = _column_sum_launch(partial_db, weight.dtype)
        return dx.view(ctx.shape), dw, db, None
