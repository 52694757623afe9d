"""Output heads of the AlphaFold2 model.

- :class:`DistogramHead`: supplement 1.9.8: logits = Linear(z), symmetrised (logits_ij + logits_ji), over 64
  bins of the pseudo-beta distance (63 breaks from 2.3125 to 21.6875 A; the first and last bins open).
- :class:`MaskedMSAHead`: 1.9.9: ``Linear(m)`` to 23 classes (20 amino acids, X, gap, mask).
- :class:`PLDDTHead`: Algorithm 29 (``predictPerResidueLDDT_Ca``): LayerNorm, Linear-ReLU-Linear-ReLU, Linear to
  50 bins of the per-residue lDDT-Calpha; the pLDDT is the expectation over the bin centres, times 100.
"""
from __future__ import annotations

import torch

from megatron_protein.kernels import LayerNorm
from megatron_protein.models.folding.primitives import Linear
from megatron_protein.structure import residue_constants as rc


class DistogramHead(torch.nn.Module):
    """``z [*, R, R, c_z] -> logits [*, R, R, num_bins]``, symmetric in (i, j)."""

    def __init__(self, c_z: int, num_bins: int):
        super().__init__()
        self.linear = Linear(c_z, num_bins, init="final")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        logits = self.linear(z)
        return logits + logits.transpose(-2, -3)


class MaskedMSAHead(torch.nn.Module):
    """``m [*, S, R, c_m] -> logits [*, S, R, 23]``."""

    def __init__(self, c_m: int, num_classes: int = rc.msa_num_classes):
        super().__init__()
        self.linear = Linear(c_m, num_classes, init="final")

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return self.linear(m)


class PLDDTHead(torch.nn.Module):
    """Algorithm 29: ``s [*, R, c_s] -> logits [*, R, num_bins]``; :func:`plddt_from_logits` gives 0-100."""

    def __init__(self, c_s: int, c_hidden: int, num_bins: int, fused: bool = True):
        super().__init__()
        self.layer_norm = LayerNorm(c_s, fused=fused)
        self.linear_1 = Linear(c_s, c_hidden, init="relu")
        self.linear_2 = Linear(c_hidden, c_hidden, init="relu")
        self.linear_3 = Linear(c_hidden, num_bins, init="final")

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.linear_1(self.layer_norm(s)))
        x = torch.relu(self.linear_2(x))
        return self.linear_3(x)


def plddt_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Expected lDDT-Calpha x 100 over equal-width bins of [0, 1] with centres (k + 0.5) / num_bins."""
    num_bins = logits.shape[-1]
    centres = (torch.arange(num_bins, device=logits.device, dtype=torch.float32) + 0.5) / num_bins
    return 100.0 * (torch.softmax(logits.float(), dim=-1) * centres).sum(-1)


def distogram_breaks(first_break: float, last_break: float, num_bins: int) -> torch.Tensor:
    """The ``num_bins - 1`` bin edges (Angstrom) of the distogram: bin 0 below the first, the last bin above."""
    return torch.linspace(first_break, last_break, num_bins - 1)
