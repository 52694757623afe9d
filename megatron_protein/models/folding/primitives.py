"""Shared pieces of the Evoformer: the Linear layer with AlphaFold2's named initialisers (supplement 1.11.4), mask
conversions, pair-bias projections, residual updates, the Evoformer's gated attention, and the DAP/BP hooks
(``dap``, ``bp`` from :mod:`megatron_protein.parallel`, re-exported for the modules).

Initialisers (supplement section 1.11.4; OpenFold's names, so its configs and ours read alike):

    'default'  LeCun: truncated normal, std = sqrt(1 / fan_in) / 0.8796 (truncation at 2 std), bias 0
    'relu'     He: truncated normal with scale 2 (the layer before a ReLU), bias 0
    'glorot'   Glorot (fan-average) uniform, bias 0 (attention q/k/v)
    'gating'   weights 0, bias 1 (the gate starts at sigmoid(1) = 0.73)
    'normal'   normal with std = 1 / sqrt(fan_in) (the pair-bias projections, as AlphaFold's code)
    'final'    weights 0, bias 0 (the last layer of every residual update, so a fresh block is the identity)

Masks: the model's masks are float ``1 = real, 0 = padding`` (``msa_mask [*, S, R]``, ``pair_mask [*, R, R]``),
as the features carry them; the attention kernels take bool ``True = masked out``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_protein.kernels import FusionConfig, GatedSelfAttention, dispatch
from megatron_protein.kernels.flash_attention_cpu import additive_mask
from megatron_protein.kernels.gated_attention import attention_core
# The DAP/BP hooks (CONTRACTS.md): the modules of the Evoformer import them from here.
from megatron_protein.parallel import bp, dap  # noqa: F401

INITS = ("default", "relu", "glorot", "gating", "normal", "final")

#: Standard deviation of a standard normal truncated to [-2, 2]; dividing by it keeps the variance of the
#: truncated draw at the target (AlphaFold's and Haiku's ``TruncatedNormal``).
TRUNCATED_NORMAL_STD = 0.87962566103423978


def truncated_normal_(weight: torch.Tensor, scale: float) -> torch.Tensor:
    """Truncated normal (at +-2 std) with variance ``scale / fan_in`` after truncation."""
    fan_in = weight.shape[1]
    std = math.sqrt(scale / max(1, fan_in)) / TRUNCATED_NORMAL_STD
    with torch.no_grad():
        return torch.nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


class Linear(torch.nn.Linear):
    """``torch.nn.Linear`` with one of the named initialisers of supplement 1.11.4 (see the module docstring).

    ``[*, in_dim] -> [*, out_dim]``. The state-dict layout is ``torch.nn.Linear``'s (``weight [out, in]``,
    ``bias [out]``), the same as OpenFold's ``Linear``, so weights copy one to one.
    """

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True, init: str = "default"):
        if init not in INITS:
            raise ValueError(f"Linear: init must be one of {INITS}, got {init!r}")
        if init == "gating" and not bias:
            raise ValueError("Linear: the 'gating' initialiser sets the bias to 1 and needs bias=True")
        self.init = init
        super().__init__(in_dim, out_dim, bias=bias)

    def reset_parameters(self) -> None:
        init = getattr(self, "init", "default")  # nn.Linear.__init__ calls this before self.init is set
        with torch.no_grad():
            if init == "default":
                truncated_normal_(self.weight, 1.0)
            elif init == "relu":
                truncated_normal_(self.weight, 2.0)
            elif init == "glorot":
                torch.nn.init.xavier_uniform_(self.weight, gain=1.0)
            elif init == "normal":
                torch.nn.init.normal_(self.weight, std=1.0 / math.sqrt(max(1, self.in_features)))
            else:  # 'gating', 'final'
                self.weight.zero_()
            if self.bias is not None:
                self.bias.fill_(1.0 if init == "gating" else 0.0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, init={self.init!r}"


class EvoformerAttention(GatedSelfAttention):
    """The kernels' gated self-attention with bias (Algorithms 7, 8, 13, 14) whose training core keeps no
    probabilities: ``(x [*, B, Q, c_in], bias [*, 1, H, Q, Q], mask bool [*, B, 1, 1, Q]) -> [*, B, Q, c_in]``.

    Same parameters, initialisation and state-dict layout as :class:`~megatron_protein.kernels.GatedSelfAttention`
    (``linear_q, linear_k, linear_v, linear_g, linear_o``), same function. When autograd records and the PyTorch
    reference runs (CPU), with ``recompute=True`` and no tile size chosen, the core is
    :func:`~megatron_protein.models.folding.chunking.attention_recompute` (chunks of B through the tiled kernel,
    probabilities recomputed in backward); otherwise the kernels' core as the ``FusionConfig`` chose it (Triton
    flash attention on CUDA, tiled attention with ``attention_tile_size``, the plain core in inference).
    """

    def __init__(self, c_in: int, c_hidden: int, num_heads: int, fusion: FusionConfig = FusionConfig(),
                 recompute: bool = True):
        super().__init__(c_in, c_hidden, num_heads, gating=True, fused=fusion.masked_softmax_fusion,
                         tile_size=fusion.attention_tile_size)
        self.recompute = bool(recompute)

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        from megatron_protein.models.folding.chunking import attention_recompute
        if mask is not None and not bool(mask.any()):
            mask = None  # no padding among the keys (the usual crop): skip every masking pass
        q = self._heads(self.linear_q(x))  # [*, H, Q, c]
        k = self._heads(self.linear_k(x))
        v = self._heads(self.linear_v(x))
        scale = 1.0 / math.sqrt(self.c_hidden)
        backend = dispatch.select_backend("GatedSelfAttention", self.fused, x)
        records = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
        if backend == "reference" and self.tile_size is None and records and self.recompute:
            o = attention_recompute(q, k, v, bias, mask, scale)
        elif backend == "reference" and self.tile_size is None and not records:
            o = _attention_inference(q, k, v, bias, mask, scale)
        else:
            o = attention_core(q, k, v, bias, mask, scale, backend, self.tile_size)
        o = o.transpose(-2, -3)  # [*, Q, H, c]
        g = torch.sigmoid(self.linear_g(x)).view(*x.shape[:-1], self.num_heads, self.c_hidden)
        return self.linear_o((o * g).reshape(*x.shape[:-1], self.num_heads * self.c_hidden))


def _attention_inference(q, k, v, bias, mask, scale):
    """Inference core, ``q, k, v [*, B, H, Q, c]``: ``scaled_dot_product_attention``, whose fused CPU kernel takes the
    bias as an additive mask and tiles the keys (no separate bias-add, softmax and matmul passes over the logits),
    when the leading batch dims are 1 (unbatched or batch 1, the inference case; SDPA's fast kernel is 4-D only);
    the kernels' reference core otherwise. A query row whose keys are all masked gets zeros, as the reference."""
    lead = q.shape[:-4]
    if q.dim() < 4 or math.prod(lead) != 1 or any(t is not None and math.prod(t.shape[:-4]) != 1
                                                   for t in (k, v, bias, mask)):
        return attention_core(q, k, v, bias, mask, scale, "reference")
    q4, k4, v4 = (t.reshape(-1, *t.shape[-3:]) for t in (q, k, v))  # [B, H, Q, c]
    bias4 = None if bias is None else bias.reshape(-1, *bias.shape[-3:])  # [1|B, H|1, Q|1, K]
    mask4 = None if mask is None else mask.reshape(-1, *mask.shape[-3:])
    additive = additive_mask(bias4, mask4, q.dtype)
    o = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, attn_mask=additive, scale=scale)
    o = o.view(*q.shape[:-1], v.shape[-1])
    if mask is not None:
        fully_masked = mask.all(dim=-1, keepdim=True)  # [*, B|1, 1|H, 1|Q, 1]
        if bool(fully_masked.any()):
            o = o.masked_fill(fully_masked, 0.0)
    return o


def masked_out(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Float ``1 = real`` mask -> bool ``True = masked out`` (what the kernels take); None stays None."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return ~mask
    return mask == 0


def check_masks(op: str, m: Optional[torch.Tensor], z: Optional[torch.Tensor], msa_mask: Optional[torch.Tensor],
                pair_mask: Optional[torch.Tensor]) -> None:
    """Clear errors for shapes that do not fit ``m [*, S, R, c_m]``, ``z [*, R, R, c_z]`` and their masks."""
    if m is not None and m.dim() < 3:
        raise ValueError(f"{op}: expected the MSA representation [*, N_seq, N_res, c_m], got {tuple(m.shape)}")
    if z is not None and (z.dim() < 3 or z.shape[-2] != z.shape[-3]):
        raise ValueError(f"{op}: expected the pair representation [*, N_res, N_res, c_z], got {tuple(z.shape)}")
    if m is not None and msa_mask is not None and msa_mask.shape[-2:] != m.shape[-3:-1]:
        raise ValueError(f"{op}: msa_mask {tuple(msa_mask.shape)} does not match m {tuple(m.shape)} "
                         "(expected [*, N_seq, N_res])")
    if z is not None and pair_mask is not None and pair_mask.shape[-2:] != z.shape[-3:-1]:
        raise ValueError(f"{op}: pair_mask {tuple(pair_mask.shape)} does not match z {tuple(z.shape)} "
                         "(expected [*, N_res, N_res])")


#: Inference computes pair biases LinearNoBias(LayerNorm(z)) in row chunks of about this many z elements, so that
#: LayerNorm(z) is never whole.
BIAS_CHUNK_ELEMENTS = 1 << 23


def pair_bias_projection(z: torch.Tensor, layer_norm: torch.nn.Module, linear: torch.nn.Module) -> torch.Tensor:
    """``linear(layer_norm(z))`` for ``z [*, I, J, c_z]`` -> ``[*, I, J, H]``; in row chunks when autograd is off."""
    if torch.is_grad_enabled():
        return linear(layer_norm(z))
    n_i = z.shape[-3]
    rows = max(1, BIAS_CHUNK_ELEMENTS // max(1, z[..., :1, :, :].numel()))
    if rows >= n_i:
        return linear(layer_norm(z))
    out = z.new_empty(*z.shape[:-1], linear.out_features)
    for start in range(0, n_i, rows):
        out[..., start:start + rows, :, :] = linear(layer_norm(z[..., start:start + rows, :, :]))
    return out
