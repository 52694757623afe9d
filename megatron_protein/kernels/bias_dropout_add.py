"""Bias-dropout-add: residual + dropout(x + bias), the end of every BERT sublayer and Evoformer update.

Training: out = residual + keep * (x + bias) / (1 - p) with keep ~ Bernoulli(1 - p).
Inference (module in eval mode, or p == 0): out = residual + x + bias, no mask drawn.

``broadcast_dim`` shares the dropout mask along one axis (or several), which is the AF2 supplement's
DropoutRowwise / DropoutColumnwise (section 1.11.6): for MSA activations ``[*, N_seq, N_res, c_m]`` the row-wise
dropout of Algorithm 6 shares the mask over rows (``broadcast_dim=-3``), the column-wise one over columns
(``broadcast_dim=-2``).

The keep mask is drawn the same way on every path (``torch.bernoulli_`` on the mask's own shape), so fused and
unfused runs with the same seed drop the same units. The fused paths save the mask as bool (one byte per
element, or fewer when shared) instead of a full-precision scaled mask.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from megatron_protein.kernels import dispatch


def dropout_keep_mask(shape: torch.Size, p: float, broadcast_dims: Sequence[int], device, dtype) -> torch.Tensor:
    """Bernoulli(1 - p) keep mask of ``shape`` with size 1 along ``broadcast_dims`` (shared there)."""
    mask_shape = list(shape)
    for d in broadcast_dims:
        mask_shape[d] = 1
    return torch.empty(mask_shape, device=device, dtype=dtype).bernoulli_(1.0 - p).bool()


def bias_dropout_add_unfused(x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor,
                             keep: Optional[torch.Tensor], p: float) -> torch.Tensor:
    """Plain composition; ``keep=None`` means inference (no dropout)."""
    y = x + bias if bias is not None else x
    if keep is not None:
        y = y * keep.to(y.dtype) / (1.0 - p)
    return residual + y


def _train_math(x, bias, residual, keep, scale):
    y = x + bias if bias is not None else x
    return torch.addcmul(residual, y, keep, value=scale)


_compiled: dict[str, object] = {}


class _ReferenceBiasDropoutAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, residual, keep, p, compiled):
        scale = 1.0 / (1.0 - p)
        fn = _train_math
        if compiled:
            fn = _compiled.setdefault("train", torch.compile(_train_math, dynamic=True))
        out = fn(x, bias, residual, keep, scale)
        ctx.scale = scale
        ctx.x_shape = x.shape
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.save_for_backward(keep)
        return out

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        dx = grad * keep * ctx.scale
        dbias = dx.sum_to_size(ctx.bias_shape) if ctx.bias_shape is not None and ctx.needs_input_grad[1] else None
        return dx, dbias, grad, None, None, None


def bias_dropout_add_reference(x, bias, residual, keep, p, compiled: bool = False) -> torch.Tensor:
    if keep is None:
        out = residual + x
        return out + bias if bias is not None else out
    return _ReferenceBiasDropoutAdd.apply(x, bias, residual, keep, float(p), compiled)


def bias_dropout_add_triton(x, bias, residual, keep, p) -> torch.Tensor:
    from megatron_protein.kernels._triton.bias_dropout_add import TritonBiasDropoutAddFunction
    dispatch.check_triton_tensors("BiasDropoutAdd", x, bias, residual)
    return TritonBiasDropoutAddFunction.apply(x, bias, residual, keep, float(p))


class BiasDropoutAdd(torch.nn.Module):
    """``(x, bias or None, residual) -> residual + dropout(x + bias)``; train/eval follows ``self.training``.

    ``fused=False`` is Megatron's ``--no-bias-dropout-fusion``. ``broadcast_dim`` (int or tuple of ints) shares
    the dropout mask along those dimensions of ``x`` (AF2's row-/column-wise dropout). ``compiled=True`` runs the
    reference's training math through ``torch.compile``.
    """

    def __init__(self, p: float, fused: bool = True, broadcast_dim: Union[int, Sequence[int], None] = None,
                 compiled: bool = False):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"BiasDropoutAdd: dropout probability must be in [0, 1), got {p}")
        self.p = float(p)
        self.fused = bool(fused)
        if broadcast_dim is None:
            self.broadcast_dims: tuple[int, ...] = ()
        elif isinstance(broadcast_dim, int):
            self.broadcast_dims = (broadcast_dim,)
        else:
            self.broadcast_dims = tuple(int(d) for d in broadcast_dim)
        self.compiled = bool(compiled)

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor) -> torch.Tensor:
        if residual.shape != x.shape:
            raise ValueError(f"BiasDropoutAdd: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        if bias is not None and bias.shape != x.shape[-1:]:
            raise ValueError(f"BiasDropoutAdd: bias must have shape [{x.shape[-1]}], got {tuple(bias.shape)}")
        for d in self.broadcast_dims:
            if not -x.dim() <= d < x.dim():
                raise ValueError(f"BiasDropoutAdd: broadcast_dim {d} out of range for x of shape {tuple(x.shape)}")
        keep = None
        if self.training and self.p > 0.0:
            keep = dropout_keep_mask(x.shape, self.p, self.broadcast_dims, x.device, x.dtype)
        backend = dispatch.select_backend("BiasDropoutAdd", self.fused, x, bias, residual)
        if backend == "triton":
            return bias_dropout_add_triton(x, bias, residual, keep, self.p)
        if backend == "reference":
            return bias_dropout_add_reference(x, bias, residual, keep, self.p, self.compiled)
        return bias_dropout_add_unfused(x, bias, residual, keep, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, fused={self.fused}, broadcast_dims={self.broadcast_dims}, compiled={self.compiled}"
