"""Attention with an additive bias for training on CPU: PyTorch's fused flash kernel forward, a recomputing backward.

    out = softmax(scale q k^T + bias, masked) v        q [*, B, H, Q, c], k, v [*, B, H, K, c]

The Evoformer's attentions (AF2 supplement Algorithms 7, 8, 13, 14) all have this form, with a bias (the pair or
triangle bias, ``[*, 1, H, Q, K]``, shared over B) that needs its gradient, so
``torch.nn.functional.scaled_dot_product_attention`` cannot train them on CPU: with a bias that requires grad it
falls back to its unfused math path. This function calls its fused CPU kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``, the online softmax of FlashAttention, Dao et al. 2022, in
one pass over the logits) for the forward, keeps only the output and the log-sum-exp, and in backward recomputes
the probabilities from the log-sum-exp (FlashAttention's Algorithm 2 with one tile over all keys)::

    x = bias - lse;  x += (scale q) k^T  (one GEMM accumulating into x);  p = exp(x)
    dv = p^T do;  ds = p * (do v^T - rowsum(do * o));  dq = scale ds k;  dk = ds^T (scale q);  dbias = sum ds

The backward's passes over the ``[B, H, Q, K]`` logits are one broadcast add (bias - lse), the GEMM accumulating
into it (the scale is folded into q) and the exp, against a matmul, scale, bias add, subtraction and exp in
:func:`~megatron_protein.kernels.tiled_attention`'s. (Folding the log-sum-exp into the GEMM as an extra column
measured no faster on this CPU.) Memory: the batch dim B is processed in chunks of about ``chunk_elements``
logits, so backward holds two ``[chunk, H, Q, K]`` tensors at a time and the forward none (the mask, when there is
one, is added to the bias chunk by chunk).

``bias`` broadcasts to ``[*, B, H, Q, K]`` (size-1 dims allowed); ``mask`` is bool, True = masked out, broadcastable
to the same. A query row whose keys are all masked gives zeros (output and gradients), as the kernels' reference.
float32 and float64 only (the callers keep their tiled path for half precision).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

#: Logits per chunk of B (the backward's two full-size temporaries): 32 MiB each in float32.
DEFAULT_CHUNK_ELEMENTS = 1 << 23
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def available(q: torch.Tensor) -> bool:
    """True when this path can run: a CPU tensor of a supported dtype and the fused kernel in this torch."""
    return (q.device.type == "cpu" and q.dtype in SUPPORTED_DTYPES
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"))


def _as5d(t: Optional[torch.Tensor], lead_shape: torch.Size) -> Optional[torch.Tensor]:
    """``t [*, B|1, H|1, Q|1, K|1]`` -> ``[L|1, B|1, H|1, Q|1, K|1]``, L the flattened leading dims ``lead_shape``
    of q (a view unless t's leading dims are a partial broadcast of them, which is expanded)."""
    if t is None:
        return None
    while t.dim() < 4:
        t = t.unsqueeze(0)
    front = t.shape[:-4]
    if math.prod(front) == 1:
        return t.reshape(1, *t.shape[-4:])
    if front != lead_shape:
        t = t.expand(*lead_shape, *t.shape[-4:])
    return t.reshape(-1, *t.shape[-4:])


def _pick(t: Optional[torch.Tensor], index: int, start: int, end: int) -> Optional[torch.Tensor]:
    """Row ``index`` of the flattened leading dims and B-chunk ``start:end`` of a ``[L|1, B|1, ...]`` tensor."""
    if t is None:
        return None
    t = t[index if t.shape[0] != 1 else 0]
    return t if t.shape[0] == 1 else t[start:end]


def additive_mask(bias: Optional[torch.Tensor], mask: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    """What the fused CPU kernel takes as ``attn_mask``: the bias, plus the dtype's minimum at masked logits (bool
    ``mask``, True = masked out; the two broadcast together). None when there is neither."""
    if mask is None:
        return bias
    masked = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, torch.finfo(dtype).min)
    return masked if bias is None else bias + masked


class _FlashAttentionCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, mask, scale, chunk_elements):
        lead_shape = q.shape[:-4]
        n_lead, n_b, n_h, n_q, n_k = math.prod(lead_shape), q.shape[-4], q.shape[-3], q.shape[-2], k.shape[-2]
        q5, k5, v5 = (t.reshape(n_lead, n_b, n_h, t.shape[-2], t.shape[-1]) for t in (q, k, v))
        bias5, mask5 = _as5d(bias, lead_shape), _as5d(mask, lead_shape)
        rows = max(1, chunk_elements // max(1, n_h * n_q * n_k))
        out = q.new_empty(n_lead, n_b, n_h, n_q, v.shape[-1])
        lse = q.new_empty(n_lead, n_b, n_h, n_q)
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        for index in range(n_lead):
            for start in range(0, n_b, rows):
                end = min(start + rows, n_b)
                additive = additive_mask(_pick(bias5, index, start, end), _pick(mask5, index, start, end), q.dtype)
                o, l = flash(q5[index, start:end], k5[index, start:end], v5[index, start:end], 0.0, False,
                             attn_mask=additive, scale=scale)
                out[index, start:end] = o
                lse[index, start:end] = l
        fully_masked = None
        if mask is not None:
            fully_masked = mask.all(dim=-1)  # [*, B|1, H|1, Q|1]
            if bool(fully_masked.any()):
                out.view(*lead_shape, n_b, n_h, n_q, -1).masked_fill_(fully_masked.unsqueeze(-1), 0.0)
                # Their log-sum-exp is about the dtype's minimum; 0 instead keeps the recomputed logits at that
                # minimum (probabilities 0) rather than a difference of two huge numbers.
                lse.view(*lead_shape, n_b, n_h, n_q).masked_fill_(fully_masked, 0.0)
            else:
                fully_masked = None
        ctx.scale, ctx.rows, ctx.lead_shape = scale, rows, lead_shape
        ctx.save_for_backward(q, k, v, bias, mask, out, lse, fully_masked)
        return out.view(*lead_shape, n_b, n_h, n_q, v.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, mask, out, lse, fully_masked = ctx.saved_tensors
        scale, rows, lead_shape = ctx.scale, ctx.rows, ctx.lead_shape
        n_lead, n_b, n_h, n_q, n_k = out.shape[0], out.shape[1], out.shape[2], out.shape[3], k.shape[-2]
        do = grad_out
        if fully_masked is not None:  # rows with every key masked had a zero output: no gradient through them
            do = do.masked_fill(fully_masked.unsqueeze(-1), 0.0)
        do = do.reshape(n_lead, n_b, n_h, n_q, -1)
        q5, k5, v5 = (t.reshape(n_lead, n_b, n_h, t.shape[-2], t.shape[-1]) for t in (q, k, v))
        bias5, mask5 = _as5d(bias, lead_shape), _as5d(mask, lead_shape)
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
        need_bias = need_bias and bias is not None
        dq = torch.empty_like(q5) if need_q else None
        dk = torch.empty_like(k5) if need_k else None
        dv = torch.empty_like(v5) if need_v else None
        dbias5 = torch.zeros_like(bias5) if need_bias else None
        delta = (do * out).sum(dim=-1, keepdim=True)  # rowsum(do * o): [L, B, H, Q, 1]
        for index in range(n_lead):
            for start in range(0, n_b, rows):
                end = min(start + rows, n_b)
                nb = end - start
                q_c, k_c, v_c = q5[index, start:end], k5[index, start:end], v5[index, start:end]
                do_c = do[index, start:end]
                q_scaled = q_c * scale
                additive = additive_mask(_pick(bias5, index, start, end), _pick(mask5, index, start, end), q.dtype)
                x = -lse[index, start:end].unsqueeze(-1)  # [nb, H, Q, 1]
                if additive is not None:
                    x = x + additive
                x = x.expand(nb, n_h, n_q, n_k).contiguous()
                x3 = x.view(nb * n_h, n_q, n_k)
                x3.baddbmm_(q_scaled.reshape(nb * n_h, n_q, -1), k_c.reshape(nb * n_h, n_k, -1).transpose(1, 2))
                p = x.exp_()  # the probabilities, recomputed
                if need_v:
                    dv[index, start:end] = torch.matmul(p.transpose(-1, -2), do_c)
                ds = torch.matmul(do_c, v_c.transpose(-1, -2)).sub_(delta[index, start:end]).mul_(p)
                del p, x, x3
                if need_bias:
                    bias_view = _pick(dbias5, index, start, end)
                    bias_view += ds.sum_to_size(bias_view.shape)
                if need_q:
                    dq[index, start:end] = torch.matmul(ds, k_c).mul_(scale)
                if need_k:
                    dk[index, start:end] = torch.matmul(ds.transpose(-1, -2), q_scaled)
                del ds
        dbias = None
        if need_bias:
            dbias = dbias5.reshape(bias.shape) if dbias5.numel() == bias.numel() else dbias5.sum_to_size(bias.shape)
        return (None if dq is None else dq.view(q.shape), None if dk is None else dk.view(k.shape),
                None if dv is None else dv.view(v.shape), dbias, None, None, None)


def flash_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor] = None,
                        mask: Optional[torch.Tensor] = None, scale: float = 1.0,
                        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """``softmax(scale q k^T + bias, masked) v`` for ``q, k, v [*, B, H, Q|K, c]`` (at least 4-D); see the module
    docstring."""
    if q.dim() < 4 or k.shape[:-2] != q.shape[:-2] or v.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"flash_attention_cpu: q, k, v must be [*, B, H, Q|K, c] with the same leading dims, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not available(q):
        raise ValueError(f"flash_attention_cpu: needs float32/float64 CPU tensors and torch's fused CPU kernel, got "
                         f"{q.dtype} on {q.device}")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"flash_attention_cpu: mask must be bool (True = masked out), got {mask.dtype}")
    if chunk_elements <= 0:
        raise ValueError(f"flash_attention_cpu: chunk_elements must be positive, got {chunk_elements}")
    if bias is not None:
        bias = bias.to(q.dtype)
    return _FlashAttentionCPU.apply(q, k, v, bias, mask, float(scale), int(chunk_elements))
