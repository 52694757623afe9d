"""Triton flash attention with additive bias and boolean mask (Dao et al. 2022, FlashAttention-2's loop order).

softmax(scale q k^T + bias, masked) v for q ``[*, H, Q, D]``, k ``[*, H, K, D]``, v ``[*, H, K, D]`` with up to two
leading batch dims (``[B, N_seq, H, Q, D]`` for MSA row attention). bias and mask broadcast to ``[*, H, Q, K]`` and
are read through their own strides (0 where broadcast), so a pair bias shared over MSA rows or heads is never
expanded. Forward: one program per (query block, batch*head) with the online softmax; saves o and the
log-sum-exp. Backward: one kernel per key block accumulates dk, dv over query blocks, one per query block
accumulates dq over key blocks and adds the tile's ds into d_bias with atomics (stride-0 dims make the atomics
sum over the broadcast). Rows whose keys are all masked give zeros.

Attention dropout (BERT's ``attention_dropout``) is applied to the normalised probabilities inside the kernel: the
keep decisions come from Philox (``tl.rand``) keyed by (seed, batch*head, row, col), so the backward kernels
regenerate the mask instead of storing it. With D the scaled keep mask, O = (P * D) V, and the backward identity
rowsum(dP * P) = rowsum(dO * O) still holds, so the same delta serves.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_protein.kernels._triton.common import block_size, broadcast_strides_5d, pad_shape_5d

BLOCK_M = 16
BLOCK_N = 16


@triton.jit
def _tile_logits(q, k, Bias, Mask, z0, z1, h, rows, cols, n_q, n_k, scale,
                 bs0, bs1, bs2, bs3, bs4, ms0, ms1, ms2, ms3, ms4,
                 HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """Logits of one [BLOCK_M, BLOCK_N] tile and the boolean 'takes part' tile."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    inside = (rows[:, None] < n_q) & (cols[None, :] < n_k)
    if HAS_BIAS:
        b_ptr = Bias + z0 * bs0 + z1 * bs1 + h * bs2 + rows[:, None] * bs3 + cols[None, :] * bs4
        s += tl.load(b_ptr, mask=inside, other=0.0).to(tl.float32)
    keep = inside
    if HAS_MASK:
        m_ptr = Mask + z0 * ms0 + z1 * ms1 + h * ms2 + rows[:, None] * ms3 + cols[None, :] * ms4
        keep = keep & (tl.load(m_ptr, mask=inside, other=1) == 0)
    return tl.where(keep, s, float("-inf")), keep


@triton.jit
def _keep_tile(seed, pid_b, rows, cols, n_q, n_k, dropout_p):
    """Dropout keep decisions of one tile from Philox (tl.rand), keyed by (batch*head, row, col): forward and both
    backward kernels regenerate the same mask instead of storing it."""
    offsets = (pid_b.to(tl.int64) * n_q + rows[:, None]) * n_k + cols[None, :]
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _dropout_keep_mask(Keep, seed, dropout_p, n_q, n_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Materialise the attention kernels' keep mask [batch*heads, Q, K] (tests only)."""
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    for start_n in range(0, n_k, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _keep_tile(seed, pid_b, rows, cols, n_q, n_k, dropout_p)
        tl.store(Keep + (pid_b.to(tl.int64) * n_q + rows[:, None]) * n_k + cols[None, :], keep.to(tl.int8),
                 mask=(rows[:, None] < n_q) & (cols[None, :] < n_k))


@triton.jit
def _flash_fwd(Q, K, V, Bias, Mask, O, LSE, scale, seed, dropout_p, n_q, n_k, head_dim, Z1, H,
               qs0, qs1, qs2, qs3, qs4, ks0, ks1, ks2, ks3, ks4, vs0, vs1, vs2, vs3, vs4,
               bs0, bs1, bs2, bs3, bs4, ms0, ms1, ms2, ms3, ms4,
               HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    h = pid_b % H
    z1 = (pid_b // H) % Z1
    z0 = pid_b // (H * Z1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = tl.arange(0, BLOCK_D)
    d_ok = dcols[None, :] < head_dim
    q = tl.load(Q + z0 * qs0 + z1 * qs1 + h * qs2 + rows[:, None] * qs3 + dcols[None, :] * qs4,
                mask=(rows[:, None] < n_q) & d_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, n_k, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (cols[:, None] < n_k) & d_ok
        k = tl.load(K + z0 * ks0 + z1 * ks1 + h * ks2 + cols[:, None] * ks3 + dcols[None, :] * ks4,
                    mask=kv_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        v = tl.load(V + z0 * vs0 + z1 * vs1 + h * vs2 + cols[:, None] * vs3 + dcols[None, :] * vs4,
                    mask=kv_ok, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        s, keep = _tile_logits(q, k, Bias, Mask, z0, z1, h, rows, cols, n_q, n_k, scale,
                               bs0, bs1, bs2, bs3, bs4, ms0, ms1, ms2, ms3, ms4, HAS_BIAS, HAS_MASK,
                               PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.where(keep, tl.exp(s - m_safe[:, None]), 0.0)
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)  # the normaliser counts every key, dropped or not
        if HAS_DROPOUT:
            keep_d = _keep_tile(seed, pid_b, rows, cols, n_q, n_k, dropout_p)
            p = tl.where(keep_d, p / (1.0 - dropout_p), 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), tl.where(m_i == float("-inf"), 0.0, m_i) + tl.log(tl.where(empty, 1.0, l_i)))
    row_ok = rows < n_q
    tl.store(O + pid_b * n_q * head_dim + rows[:, None] * head_dim + dcols[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok)
    tl.store(LSE + pid_b * n_q + rows, lse, mask=row_ok)


@triton.jit
def _flash_bwd_dkdv(Q, K, V, Bias, Mask, DO, LSE, Delta, DK, DV, scale, seed, dropout_p, n_q, n_k, head_dim, Z1, H,
                    qs0, qs1, qs2, qs3, qs4, ks0, ks1, ks2, ks3, ks4, vs0, vs1, vs2, vs3, vs4,
                    bs0, bs1, bs2, bs3, bs4, ms0, ms1, ms2, ms3, ms4,
                    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
               PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    h = pid_b % H
    z1 = (pid_b // H) % Z1
    z0 = pid_b // (H * Z1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dcols = tl.arange(0, BLOCK_D)
    d_ok = dcols[None, :] < head_dim
    kv_ok = (cols[:, None] < n_k) & d_ok
    k = tl.load(K + z0 * ks0 + z1 * ks1 + h * ks2 + cols[:, None] * ks3 + dcols[None, :] * ks4,
                mask=kv_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
    v = tl.load(V + z0 * vs0 + z1 * vs1 + h * vs2 + cols[:, None] * vs3 + dcols[None, :] * vs4,
                mask=kv_ok, other=0.0)
    if UPCAST:
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, n_q, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q_ok = (rows[:, None] < n_q) & d_ok
        q = tl.load(Q + z0 * qs0 + z1 * qs1 + h * qs2 + rows[:, None] * qs3 + dcols[None, :] * qs4,
                    mask=q_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        do = tl.load(DO + pid_b * n_q * head_dim + rows[:, None] * head_dim + dcols[None, :], mask=q_ok,
                     other=0.0)
        if UPCAST:
            do = do.to(tl.float32)
        lse = tl.load(LSE + pid_b * n_q + rows, mask=rows < n_q, other=float("inf"))
        delta = tl.load(Delta + pid_b * n_q + rows, mask=rows < n_q, other=0.0)
        s, keep = _tile_logits(q, k, Bias, Mask, z0, z1, h, rows, cols, n_q, n_k, scale,
                               bs0, bs1, bs2, bs3, bs4, ms0, ms1, ms2, ms3, ms4, HAS_BIAS, HAS_MASK,
                               PRECISION)
        p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if HAS_DROPOUT:
            keep_d = _keep_tile(seed, pid_b, rows, cols, n_q, n_k, dropout_p)
            dv += tl.dot(tl.trans(tl.where(keep_d, p / (1.0 - dropout_p), 0.0)).to(do.dtype), do,
                         input_precision=PRECISION)
            dp = tl.where(keep_d, dp / (1.0 - dropout_p), 0.0)
        else:
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION) * scale
    out_off = pid_b * n_k * head_dim + cols[:, None] * head_dim + dcols[None, :]
    tl.store(DK + out_off, dk, mask=kv_ok)
    tl.store(DV + out_off, dv, mask=kv_ok)


@triton.jit
def _flash_bwd_dq(Q, K, V, Bias, Mask, DO, LSE, Delta, DQ, DBias, scale, seed, dropout_p, n_q, n_k, head_dim, Z1, H,
                  qs0, qs1, qs2, qs3, qs4, ks0, ks1, ks2, ks3, ks4, vs0, vs1, vs2, vs3, vs4,
                  bs0, bs1, bs2, bs3, bs4, ms0, ms1, ms2, ms3, ms4, dbs0, dbs1, dbs2, dbs3, dbs4,
                  HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BIAS_GRAD: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1)
    h = pid_b % H
    z1 = (pid_b // H) % Z1
    z0 = pid_b // (H * Z1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = tl.arange(0, BLOCK_D)
    d_ok = dcols[None, :] < head_dim
    q_ok = (rows[:, None] < n_q) & d_ok
    q = tl.load(Q + z0 * qs0 + z1 * qs1 + h * qs2 + rows[:, None] * qs3 + dcols[None, :] * qs4,
                mask=q_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    do = tl.load(DO + pid_b * n_q * head_dim + rows[:, None] * head_dim + dcols[None, :], mask=q_ok,
                 other=0.0)
    if UPCAST:
        do = do.to(tl.float32)
    lse = tl.load(LSE + pid_b * n_q + rows, mask=rows < n_q, other=float("inf"))
    delta = tl.load(Delta + pid_b * n_q + rows, mask=rows < n_q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, n_k, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kv_ok = (cols[:, None] < n_k) & d_ok
        k = tl.load(K + z0 * ks0 + z1 * ks1 + h * ks2 + cols[:, None] * ks3 + dcols[None, :] * ks4,
                    mask=kv_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        v = tl.load(V + z0 * vs0 + z1 * vs1 + h * vs2 + cols[:, None] * vs3 + dcols[None, :] * vs4,
                    mask=kv_ok, other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        s, keep = _tile_logits(q, k, Bias, Mask, z0, z1, h, rows, cols, n_q, n_k, scale,
                               bs0, bs1, bs2, bs3, bs4, ms0, ms1, ms2, ms3, ms4, HAS_BIAS, HAS_MASK,
                               PRECISION)
        p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        if HAS_DROPOUT:
            keep_d = _keep_tile(seed, pid_b, rows, cols, n_q, n_k, dropout_p)
            dp = tl.where(keep_d, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
        if BIAS_GRAD:
            inside = (rows[:, None] < n_q) & (cols[None, :] < n_k)
            db_ptr = DBias + z0 * dbs0 + z1 * dbs1 + h * dbs2 + rows[:, None] * dbs3 + cols[None, :] * dbs4
            tl.atomic_add(db_ptr, ds, mask=inside)
    tl.store(DQ + pid_b * n_q * head_dim + rows[:, None] * head_dim + dcols[None, :], dq, mask=q_ok)


def _precision(q: torch.Tensor) -> str:
    """fp32 operands: exact IEEE products (no silent TF32), matching the fp32 reference; bf16/fp16 operands go to
    the tensor cores as they are, with fp32 accumulation (the setting is ignored for them)."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _upcast(q: torch.Tensor) -> bool:
    """Compute the dots in fp32 from fp32 operands. On CUDA, bf16/fp16 operands stay as they are (tensor cores,
    fp32 accumulation); Triton's CPU interpreter has no bf16 dot, so there they are upcast after loading."""
    return q.dtype == torch.float32 or not q.is_cuda


def _strides_or_zero(t, shape):
    return broadcast_strides_5d(t, shape) if t is not None else [0] * 5


class TritonFlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, mask, scale, dropout_p, seed):
        batch_shape = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        if len(batch_shape) < 1 or len(batch_shape) > 3:
            raise ValueError("Triton flash attention takes q, k, v of shape [*, H, S, D] with at most two leading "
                             f"batch dims, got {tuple(q.shape)}")
        n_q, head_dim = q.shape[-2], q.shape[-1]
        n_k = k.shape[-2]
        if k.shape[-1] != head_dim or v.shape[-1] != head_dim or v.shape[-2] != n_k:
            raise ValueError(f"Triton flash attention needs q, k, v with one head dim and k, v with one length, got "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        full_q = (*batch_shape, n_q, head_dim)
        full_k = (*batch_shape, n_k, head_dim)
        logits_shape = torch.Size((*batch_shape, n_q, n_k))
        dims = pad_shape_5d(logits_shape)
        z1, heads = dims[1], dims[2]
        n_batch = dims[0] * dims[1] * dims[2]
        out = torch.empty(full_q, dtype=q.dtype, device=q.device)
        lse = torch.empty((*batch_shape, n_q), dtype=torch.float32, device=q.device)
        mask_i8 = mask.view(torch.int8) if mask is not None else None
        strides = (*broadcast_strides_5d(q, full_q), *broadcast_strides_5d(k, full_k),
                   *broadcast_strides_5d(v, full_k), *_strides_or_zero(bias, logits_shape),
                   *_strides_or_zero(mask_i8, logits_shape))
        if n_q > 0 and n_k > 0 and n_batch > 0:
            grid = (triton.cdiv(n_q, BLOCK_M), n_batch)
            _flash_fwd[grid](q, k, v, bias if bias is not None else q, mask_i8 if mask is not None else q, out, lse,
                             scale, seed, dropout_p, n_q, n_k, head_dim, z1, heads, *strides,
                             HAS_BIAS=bias is not None, HAS_MASK=mask is not None, PRECISION=_precision(q),
                             UPCAST=_upcast(q), HAS_DROPOUT=dropout_p > 0.0, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                             BLOCK_D=block_size(head_dim))
        ctx.save_for_backward(q, k, v, bias, mask, out, lse)
        ctx.scale, ctx.dropout_p, ctx.seed = scale, dropout_p, seed
        ctx.meta = (batch_shape, logits_shape, z1, heads, n_batch, strides)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, bias, mask, out, lse = ctx.saved_tensors
        batch_shape, logits_shape, z1, heads, n_batch, strides = ctx.meta
        n_q, head_dim, n_k = q.shape[-2], q.shape[-1], k.shape[-2]
        do = grad_out.contiguous()
        delta = (do.float() * out.float()).sum(-1).contiguous()  # rowsum(do * o): [*, Q]
        dq = torch.zeros((*batch_shape, n_q, head_dim), dtype=torch.float32, device=q.device)
        dk = torch.zeros((*batch_shape, n_k, head_dim), dtype=torch.float32, device=q.device)
        dv = torch.zeros_like(dk)
        bias_grad = bias is not None and ctx.needs_input_grad[3]
        dbias = torch.zeros(bias.shape, dtype=torch.float32, device=q.device) if bias_grad else None
        mask_i8 = mask.view(torch.int8) if mask is not None else q
        bias_arg = bias if bias is not None else q
        common = dict(HAS_BIAS=bias is not None, HAS_MASK=mask is not None, PRECISION=_precision(q),
                      UPCAST=_upcast(q), HAS_DROPOUT=ctx.dropout_p > 0.0, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                      BLOCK_D=block_size(head_dim))
        if n_q > 0 and n_k > 0 and n_batch > 0:
            _flash_bwd_dkdv[(triton.cdiv(n_k, BLOCK_N), n_batch)](
                q, k, v, bias_arg, mask_i8, do, lse, delta, dk, dv, ctx.scale, ctx.seed, ctx.dropout_p, n_q, n_k,
                head_dim, z1, heads, *strides, **common)
            db_strides = _strides_or_zero(dbias, logits_shape)
            _flash_bwd_dq[(triton.cdiv(n_q, BLOCK_M), n_batch)](
                q, k, v, bias_arg, mask_i8, do, lse, delta, dq, dbias if bias_grad else q, ctx.scale, ctx.seed,
                ctx.dropout_p, n_q, n_k, head_dim, z1, heads, *strides, *db_strides, BIAS_GRAD=bias_grad, **common)
        dq = dq.sum_to_size(q.shape).to(q.dtype)
        dk = dk.sum_to_size(k.shape).to(k.dtype)
        dv = dv.sum_to_size(v.shape).to(v.dtype)
        return dq, dk, dv, (dbias.to(bias.dtype) if bias_grad else None), None, None, None, None


def draw_dropout_seed(device: torch.device) -> int:
    """The Philox seed of one attention call, drawn from torch's generator on ``device`` (so the tensor-parallel
    RNG tracker's fork and torch.manual_seed govern the Triton dropout like any other dropout)."""
    return int(torch.randint(0, 2 ** 31 - 1, (1,), device=device).item())


def flash_attention(q, k, v, bias, mask, scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(scale q k^T + bias, masked), dropout(p) on the probabilities, times v; see the module docstring."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"flash_attention: q, k, v must share one of float32, bfloat16, float16, got {q.dtype}, "
                        f"{k.dtype}, {v.dtype}")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"flash_attention: mask must be bool (True = masked out), got {mask.dtype}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"flash_attention: dropout_p must be in [0, 1), got {dropout_p}")
    seed = draw_dropout_seed(q.device) if dropout_p > 0.0 else 0
    return TritonFlashAttentionFunction.apply(q, k, v, bias, mask, float(scale), float(dropout_p), seed)


def attention_dropout_keep_mask(seed: int, dropout_p: float, n_batch: int, n_q: int, n_k: int,
                                device: torch.device) -> torch.Tensor:
    """The keep mask [n_batch (= batch * heads), n_q, n_k] that the kernels draw for ``seed`` (tests only)."""
    keep = torch.empty(n_batch, n_q, n_k, dtype=torch.int8, device=device)
    _dropout_keep_mask[(triton.cdiv(n_q, BLOCK_M), n_batch)](keep, seed, dropout_p, n_q, n_k, BLOCK_M=BLOCK_M,
                                                            BLOCK_N=BLOCK_N)
    return keep.bool()
