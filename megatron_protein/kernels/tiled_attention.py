"""Memory-efficient attention with additive bias and boolean mask, in tiles, forward and backward.

softmax(scale * q k^T + bias, masked) v computed over query tiles of ``q_tile`` rows and key tiles of ``k_tile``
columns with the online softmax of Milakov & Gimelshein (2018), as in Rabe & Staats, "Self-attention does not need
O(n^2) memory" (2021), and FlashAttention (Dao et al. 2022). Forward keeps, per query row, only the running
maximum, the running normaliser and the output accumulator; it saves the output and the log-sum-exp. Backward
recomputes each tile's probabilities from the log-sum-exp (FlashAttention's Algorithm 2):

    p = exp(s - lse);  dv += p^T do;  dp = do v^T;  ds = p * (dp - rowsum(do * o));
    dq += scale * ds k;  dk += scale * ds^T q;  dbias += ds summed over the dimensions bias is broadcast along.

So neither pass materialises the ``[*, H, Q, K]`` logits: peak extra memory is one ``[*, H, q_tile, k_tile]`` tile
(plus the bias itself and its gradient, which the caller already holds). For MSA row attention
(``[*, N_seq, H, N_res, N_res]`` logits) that is the difference between O(N_seq N_res^2) and O(N_seq q_tile k_tile).

Shapes: q ``[*, H, Q, D]``, k ``[*, H, K, D]``, v ``[*, H, K, Dv]``; bias broadcastable to ``[*, H, Q, K]`` (any
size-1 dimensions, including Q or K); mask bool broadcastable to the same, True = masked out. A query row with
every key masked gives zeros.
"""
from __future__ import annotations

from typing import Optional

import torch


def _tile(t: Optional[torch.Tensor], qs: int, qe: int, ks: int, ke: int) -> Optional[torch.Tensor]:
    """Slice rows qs:qe and columns ks:ke of a broadcastable [..., Q|1, K|1] tensor (size-1 dims stay whole)."""
    if t is None:
        return None
    if t.shape[-2] != 1:
        t = t[..., qs:qe, :]
    if t.shape[-1] != 1:
        t = t[..., ks:ke]
    return t


def _tile_logits(q_tile, k_tile, bias_tile, mask_tile, scale):
    s = torch.matmul(q_tile, k_tile.transpose(-1, -2)).mul_(scale)
    if bias_tile is not None:
        s.add_(bias_tile)
    if mask_tile is not None:
        s.masked_fill_(mask_tile, float("-inf"))
    return s


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, mask, scale, q_tile, k_tile):
        compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        n_q, n_k = q.shape[-2], k.shape[-2]
        batch_shape = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        out = torch.empty(*batch_shape, n_q, v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(*batch_shape, n_q, dtype=compute_dtype, device=q.device)
        kc, vc = k.to(compute_dtype), v.to(compute_dtype)
        bc = None if bias is None else bias.to(compute_dtype)
        for qs in range(0, n_q, q_tile):
            qe = min(qs + q_tile, n_q)
            q_blk = q[..., qs:qe, :].to(compute_dtype)
            row_max = torch.full((*batch_shape, qe - qs), float("-inf"), dtype=compute_dtype, device=q.device)
            row_sum = torch.zeros_like(row_max)
            acc = torch.zeros(*batch_shape, qe - qs, v.shape[-1], dtype=compute_dtype, device=q.device)
            for ks in range(0, n_k, k_tile):
                ke = min(ks + k_tile, n_k)
                s = _tile_logits(q_blk, kc[..., ks:ke, :], _tile(bc, qs, qe, ks, ke), _tile(mask, qs, qe, ks, ke),
                                 scale)
                new_max = torch.maximum(row_max, s.amax(dim=-1))
                safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
                p = s.sub_(safe_max.unsqueeze(-1)).exp_()  # masked logits: exp(-inf) = 0
                correction = torch.exp(row_max - safe_max)     # first tile: exp(-inf) = 0
                row_sum = row_sum * correction + p.sum(dim=-1)
                acc = acc * correction.unsqueeze(-1) + torch.matmul(p, vc[..., ks:ke, :])
                row_max = new_max
                del s, p
            empty = row_sum == 0  # every key of the row masked
            out[..., qs:qe, :] = (acc / torch.where(empty, torch.ones_like(row_sum), row_sum).unsqueeze(-1)).to(
                q.dtype)
            safe_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
            lse[..., qs:qe] = torch.where(empty, torch.full_like(row_sum, float("inf")),
                                          safe_max + torch.log(row_sum))
        ctx.save_for_backward(q, k, v, bias, mask, out, lse)
        ctx.scale, ctx.q_tile, ctx.k_tile = scale, q_tile, k_tile
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, mask, out, lse = ctx.saved_tensors
        scale, q_tile, k_tile = ctx.scale, ctx.q_tile, ctx.k_tile
        compute_dtype = lse.dtype
        n_q, n_k = q.shape[-2], k.shape[-2]
        batch_shape = out.shape[:-2]
        do = grad_out.to(compute_dtype)
        delta = (do * out.to(compute_dtype)).sum(dim=-1)  # rowsum(do * o): [*, H, Q]
        qc, kc, vc = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
        bc = None if bias is None else bias.to(compute_dtype)
        dq = torch.zeros(*batch_shape, n_q, q.shape[-1], dtype=compute_dtype, device=q.device)
        dk = torch.zeros(*batch_shape, n_k, k.shape[-1], dtype=compute_dtype, device=q.device)
        dv = torch.zeros(*batch_shape, n_k, v.shape[-1], dtype=compute_dtype, device=q.device)
        need_dbias = bias is not None and ctx.needs_input_grad[3]
        dbias = torch.zeros(bias.shape, dtype=compute_dtype, device=q.device) if need_dbias else None
        for qs in range(0, n_q, q_tile):
            qe = min(qs + q_tile, n_q)
            q_blk, do_blk = qc[..., qs:qe, :], do[..., qs:qe, :]
            lse_blk, delta_blk = lse[..., qs:qe].unsqueeze(-1), delta[..., qs:qe].unsqueeze(-1)
            for ks in range(0, n_k, k_tile):
                ke = min(ks + k_tile, n_k)
                k_blk, v_blk = kc[..., ks:ke, :], vc[..., ks:ke, :]
                s = _tile_logits(q_blk, k_blk, _tile(bc, qs, qe, ks, ke), _tile(mask, qs, qe, ks, ke), scale)
                p = s.sub_(lse_blk).exp_()
                dv[..., ks:ke, :] += torch.matmul(p.transpose(-1, -2), do_blk)
                ds = p.mul_(torch.matmul(do_blk, v_blk.transpose(-1, -2)).sub_(delta_blk))
                if need_dbias:
                    bias_view = _tile(dbias, qs, qe, ks, ke)
                    bias_view += ds.sum_to_size(bias_view.shape)
                dq[..., qs:qe, :] += torch.matmul(ds, k_blk).mul_(scale)
                dk[..., ks:ke, :] += torch.matmul(ds.transpose(-1, -2), q_blk).mul_(scale)
                del s, p, ds
        dq = dq.to(q.dtype).sum_to_size(q.shape)
        dk = dk.to(k.dtype).sum_to_size(k.shape)
        dv = dv.to(v.dtype).sum_to_size(v.shape)
        return dq, dk, dv, (dbias.to(bias.dtype) if need_dbias else None), None, None, None, None


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    mask: Optional[torch.Tensor] = None, scale: float = 1.0, q_tile: int = 128,
                    k_tile: int = 128) -> torch.Tensor:
    """softmax(scale q k^T + bias, masked) v without materialising the logits; see the module docstring."""
    if q_tile <= 0 or k_tile <= 0:
        raise ValueError(f"tiled_attention: tile sizes must be positive, got q_tile={q_tile}, k_tile={k_tile}")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"tiled_attention: mask must be bool (True = masked out), got {mask.dtype}")
    return _TiledAttention.apply(q, k, v, bias, mask, float(scale), int(q_tile), int(k_tile))
