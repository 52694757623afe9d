"""Shared pieces of the Evoformer: the Linear layer with AlphaFold2's named initialisers (supplement 1.11.4), mask
conversions, residual updates, and the switch point for the DAP/BP parallel hooks.

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


def residual_add(residual: torch.Tensor, update: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``residual + update``; in place into ``residual`` when the caller owns it and autograd is off."""
    if inplace and not torch.is_grad_enabled():
        return residual.add_(update)
    return residual + update


# ---------------------------------------------------------------------------------------------------------------
# DAP / BP hooks (CONTRACTS: parallel/dap.py and parallel/bp.py, owned by the hybrid-parallel work). Until those
# modules exist this fallback gives their degree-1 behaviour (identity layout switches, plain local computation),
# so the block's call sites are already the production ones.
# ---------------------------------------------------------------------------------------------------------------
try:  # pragma: no cover - which branch runs depends on whether parallel/dap.py is present
    from megatron_protein.parallel import bp, dap  # noqa: F401
except ImportError:  # pragma: no cover
    class _Handle:
        def __init__(self, tensor):
            self._tensor = tensor

        def wait(self):
            return self._tensor

    class _DegreeOneDAP:
        """DAP at degree 1: every layout switch and gather is the identity."""

        @staticmethod
        def row_to_col(x):
            return x

        @staticmethod
        def col_to_row(x):
            return x

        @staticmethod
        def row_to_col_async(x):
            return x, _Handle(x)

        @staticmethod
        def col_to_row_async(x):
            return x, _Handle(x)

        @staticmethod
        def all_gather(x, dim):
            return x

        @staticmethod
        def scatter(x, dim):
            return x

        @staticmethod
        def gather(x, dim):
            return x

        @staticmethod
        def local_slice(t, dim):
            return t

    class _DegreeOneBP:
        """BP at degree 1: both branches run here, the OPM update is added to the new pair."""

        @staticmethod
        def run_branches(msa_branch, pair_branch, m, z):
            m_new, opm_update = msa_branch(m, z)
            z_new = pair_branch(z)
            return m_new, z_new + opm_update

    dap = _DegreeOneDAP()
    bp = _DegreeOneBP()
