"""Softmax over attention logits with scale, additive bias and boolean mask, for BERT and Evoformer attention.

probs = softmax(scale * scores + bias, masked where ``mask`` is True) over the last (key) dimension.

* :class:`ScaleMaskSoftmax` is BERT's (Megatron's ``FusedScaleMaskSoftmax``): ``scores [b, h, sq, sk]`` and a
  padding mask ``[b, 1, 1, sk]`` or the packed block-diagonal mask ``[b, 1, sq, sk]``. Unlike Megatron's CUDA
  kernel it has no length restriction (Megatron's fused softmax was only correct from 128 keys up and for lengths
  that fit its warp layout): every length, including 1 and odd lengths, takes the same code.
* :class:`PairBiasSoftmax` is the Evoformer's (AF2 supplement Algorithms 7, 13, 14): ``logits [*, H, Q, K]`` plus a
  pair bias broadcast over the leading dimensions and/or heads, e.g. ``[*, 1, H, Q, K]`` for MSA row attention.

Masked positions get probability 0. A row whose keys are all masked (a padding query) gets all zeros, not NaN
and not the uniform distribution that adding -10000 gives. Half-precision inputs are normalised in fp32 and
returned in their own dtype (Megatron's ``attention_softmax_in_fp32``).

Backward: d_scores = scale * p * (g - sum(g * p)); d_bias is the same without the scale, summed over the
dimensions the bias was broadcast along. Only p is saved.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_protein.kernels import dispatch


def _check_mask(op: str, mask: Optional[torch.Tensor]) -> None:
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be a bool tensor (True = masked out), got dtype {mask.dtype}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def softmax_unfused(scores: torch.Tensor, scale: float, bias: Optional[torch.Tensor],
                    mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Plain composition: scale, add bias, fill masked logits with the dtype's minimum, softmax, zero masked rows."""
    x = scores.to(_compute_dtype(scores)) * scale
    if bias is not None:
        x = x + bias.to(x.dtype)
    if mask is not None:
        x = x.masked_fill(mask, torch.finfo(x.dtype).min)
    probs = torch.softmax(x, dim=-1)
    if mask is not None:
        probs = probs.masked_fill(mask, 0.0)
    return probs.to(scores.dtype)


class _ReferenceMaskedSoftmax(torch.autograd.Function):
    """Fast reference: in-place elementwise work under no_grad, saves only the probabilities."""

    @staticmethod
    def forward(ctx, scores, scale, bias, mask):
        compute_dtype = _compute_dtype(scores)
        x = scores.to(compute_dtype) * scale  # new tensor: the in-place ops below never touch the input
        if bias is not None:
            x.add_(bias.to(compute_dtype))  # bias broadcasts to x (checked by masked_softmax)
        if mask is not None:
            x.masked_fill_(mask, torch.finfo(compute_dtype).min)
        probs = torch.softmax(x, dim=-1)
        del x
        if mask is not None:
            # A fully masked row came out uniform over its (all masked) keys; zero every masked position.
            probs.masked_fill_(mask, 0.0)
        probs = probs.to(scores.dtype)
        ctx.scale = scale
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        ctx.save_for_backward(probs)
        return probs

    @staticmethod
    def backward(ctx, grad_probs):
        (probs,) = ctx.saved_tensors
        compute_dtype = _compute_dtype(probs)
        # ATen's one-pass softmax backward: p * (g - sum(g * p)), no full-size temporaries.
        d_logits = torch.ops.aten._softmax_backward_data(grad_probs.to(compute_dtype), probs.to(compute_dtype),
                                                         -1, compute_dtype)
        d_bias = None
        if ctx.bias_needs_grad:
            d_bias = d_logits.sum_to_size(ctx.bias_shape).to(ctx.bias_dtype)
        d_scores = None
        if ctx.needs_input_grad[0]:
            d_scores = (d_logits.mul_(ctx.scale) if ctx.scale != 1.0 else d_logits).to(probs.dtype)
        return d_scores, None, d_bias, None


def softmax_reference(scores: torch.Tensor, scale: float, bias: Optional[torch.Tensor],
                      mask: Optional[torch.Tensor]) -> torch.Tensor:
    return _ReferenceMaskedSoftmax.apply(scores, float(scale), bias, mask)


def softmax_triton(scores: torch.Tensor, scale: float, bias: Optional[torch.Tensor],
                   mask: Optional[torch.Tensor]) -> torch.Tensor:
    from megatron_protein.kernels._triton.softmax import TritonMaskedSoftmaxFunction
    dispatch.check_triton_tensors("softmax", scores, bias, mask)
    return TritonMaskedSoftmaxFunction.apply(scores, float(scale), bias, mask)


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    """True when ``shape`` broadcasts to ``target`` without enlarging it."""
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def masked_softmax(scores: torch.Tensor, scale: float = 1.0, bias: Optional[torch.Tensor] = None,
                   mask: Optional[torch.Tensor] = None, backend: str = "reference") -> torch.Tensor:
    """Functional form; ``backend`` is one of :data:`dispatch.BACKENDS` (modules choose it for you)."""
    _check_mask("masked_softmax", mask)
    for name, t in (("mask", mask), ("bias", bias)):
        if t is not None and not _broadcasts_to(t.shape, scores.shape):
            raise ValueError(f"masked_softmax: {name} of shape {tuple(t.shape)} does not broadcast to scores of "
                             f"shape {tuple(scores.shape)}")
    if backend == "triton":
        return softmax_triton(scores, scale, bias, mask)
    if backend == "reference":
        return softmax_reference(scores, scale, bias, mask)
    if backend == "unfused":
        return softmax_unfused(scores, scale, bias, mask)
    raise ValueError(f"masked_softmax: unknown backend {backend!r}; expected one of {dispatch.BACKENDS}")


class ScaleMaskSoftmax(torch.nn.Module):
    """BERT attention softmax: ``(scores [b, h, sq, sk], mask bool or None) -> probs``.

    ``scale`` multiplies the scores first (1/sqrt(head_dim) when the caller has not applied it). ``fused=False``
    is Megatron's ``--no-masked-softmax-fusion``.
    """

    def __init__(self, scale: float = 1.0, fused: bool = True):
        super().__init__()
        self.scale = float(scale)
        self.fused = bool(fused)

    def forward(self, scores: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if scores.dim() != 4:
            raise ValueError(f"ScaleMaskSoftmax: expected scores [b, h, sq, sk], got shape {tuple(scores.shape)}")
        backend = dispatch.select_backend("ScaleMaskSoftmax", self.fused, scores)
        return masked_softmax(scores, self.scale, None, mask, backend)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, fused={self.fused}"


class PairBiasSoftmax(torch.nn.Module):
    """Evoformer attention softmax: ``(logits [*, H, Q, K], bias or None, mask bool or None) -> probs``.

    ``bias`` (the pair bias of AF2 Algorithm 7 line 3, or the triangle bias of Algorithms 13/14) broadcasts to the
    logits, e.g. ``[*, 1, H, Q, K]`` shared by every MSA row, or ``[*, 1, Q, K]`` shared by every head; its
    gradient is summed back to its own shape.
    """

    def __init__(self, scale: float = 1.0, fused: bool = True):
        super().__init__()
        self.scale = float(scale)
        self.fused = bool(fused)

    def forward(self, logits: torch.Tensor, bias: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        backend = dispatch.select_backend("PairBiasSoftmax", self.fused, logits)
        return masked_softmax(logits, self.scale, bias, mask, backend)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, fused={self.fused}"
