"""Embedders of the AlphaFold2 model: input features -> MSA and pair representations, the previous recycle's
outputs -> updates of both, and the extra MSA -> its own narrow representation.

- :class:`InputEmbedder`: supplement Algorithm 3 (``InputEmbedder``) with the relative position encoding of
  Algorithms 4 (``relpos``) and 5 (``one_hot``).
- :class:`RecyclingEmbedder`: Algorithm 32 (``RecyclingEmbedder``): the previous first MSA row and pair
  representation through LayerNorm, and the previous pseudo-beta distances binned and projected.
- :class:`ExtraMSAEmbedder`: Algorithm 2 lines 12-13: ``extra_msa_feat`` (one-hot of 23 classes, has_deletion,
  deletion_value) projected to c_e.
- :class:`ProfileEmbedder` (not in AlphaFold2; off in the AF2 presets): the chain's sequence profile (``profile``
  [*, R, 20] and ``profile_mask`` [*, R], e.g. the HHblits-derived profiles of the embedded chains) projected and
  added to the query row of the MSA representation, so a chain whose MSA is shallow still gets its profile.

Shapes (``*`` = batch): ``target_feat [*, R, 22]``, ``residue_index [*, R]``, ``msa_feat [*, S, R, 49]``,
``m [*, S, R, c_m]``, ``z [*, R, R, c_z]``, ``extra_msa [*, S_e, R]`` (int), ``a [*, S_e, R, c_e]``.
"""
from __future__ import annotations

import torch

from megatron_protein.kernels import LayerNorm
from megatron_protein.models.folding.primitives import Linear
from megatron_protein.structure import residue_constants as rc


def relative_position_bins(residue_index: torch.Tensor, k: int) -> torch.Tensor:
    """Algorithm 4 lines 1-2 and Algorithm 5: one-hot of clip(r_i - r_j, -k, k) + k, ``[*, R, R, 2k + 1]``.

    Algorithm 5 picks the nearest of the integer bins -k..k, which for integer offsets is the clipped offset."""
    offset = residue_index[..., :, None] - residue_index[..., None, :]
    index = torch.clamp(offset, -k, k) + k
    return torch.nn.functional.one_hot(index.long(), 2 * k + 1)


class InputEmbedder(torch.nn.Module):
    """Algorithm 3: ``(target_feat, residue_index, msa_feat) -> (m [*, S, R, c_m], z [*, R, R, c_z])``.

        a, b = Linear(target_feat), Linear(target_feat)         c_z each
        z_ij = a_i + b_j + Linear(one_hot(relpos_ij))             Algorithm 4, 2k + 1 = 65 bins in AF2
        m_si = Linear(msa_feat_si) + Linear(target_feat_i)        c_m
    """

    def __init__(self, tf_dim: int, msa_dim: int, c_m: int, c_z: int, relpos_k: int):
        super().__init__()
        self.relpos_k = int(relpos_k)
        self.linear_tf_z_i = Linear(tf_dim, c_z)
        self.linear_tf_z_j = Linear(tf_dim, c_z)
        self.linear_tf_m = Linear(tf_dim, c_m)
        self.linear_msa_m = Linear(msa_dim, c_m)
        self.linear_relpos = Linear(2 * self.relpos_k + 1, c_z)

    def forward(self, target_feat: torch.Tensor, residue_index: torch.Tensor,
                msa_feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tf = target_feat
        z = self.linear_tf_z_i(tf)[..., :, None, :] + self.linear_tf_z_j(tf)[..., None, :, :]
        relpos = relative_position_bins(residue_index, self.relpos_k).to(z.dtype)
        z = z + self.linear_relpos(relpos)
        m = self.linear_msa_m(msa_feat) + self.linear_tf_m(tf)[..., None, :, :]
        return m, z


def pseudo_beta_from_atom37(aatype: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """CB position, or CA for glycine (supplement 1.9.8 / Algorithm 32 line 1): ``[*, R, 37, 3] -> [*, R, 3]``."""
    is_gly = (aatype == rc.restype_order["G"])[..., None]
    ca = positions[..., rc.atom_order["CA"], :]
    cb = positions[..., rc.atom_order["CB"], :]
    return torch.where(is_gly, ca, cb)


class RecyclingEmbedder(torch.nn.Module):
    """Algorithm 32: updates from the previous iteration's first MSA row, pair representation and structure.

        m_1i  += LayerNorm(m_prev_1i)
        z_ij  += LayerNorm(z_prev_ij) + Linear(one_hot(d_ij))    d = |x_i - x_j| of the previous pseudo-beta
                                                                  positions, 15 bins 3.25-20.75 Angstrom
    Bin b holds distances in (break_b, break_{b+1}), the last bin everything above ``max_bin``; distances below
    ``min_bin`` (and the diagonal) get no bin, as AF2's ``dgram_from_positions``. At the first iteration the inputs
    are zeros, as in Algorithm 2.
    """

    def __init__(self, c_m: int, c_z: int, min_bin: float, max_bin: float, num_bins: int, fused: bool = True):
        super().__init__()
        self.layer_norm_m = LayerNorm(c_m, fused=fused)
        self.layer_norm_z = LayerNorm(c_z, fused=fused)
        self.linear_dist = Linear(num_bins, c_z)
        self.register_buffer("lower_breaks_sq", torch.linspace(min_bin, max_bin, num_bins) ** 2, persistent=False)

    def distance_bins(self, x: torch.Tensor) -> torch.Tensor:
        """One-hot ``[*, R, R, num_bins]`` of the pairwise distances of ``x [*, R, 3]``."""
        x = x.float()
        d2 = ((x[..., :, None, :] - x[..., None, :, :]) ** 2).sum(-1, keepdim=True)
        lower = self.lower_breaks_sq
        upper = torch.cat([lower[1:], lower.new_full((1,), float("inf"))])
        return ((d2 > lower) & (d2 < upper)).float()

    def forward(self, m_prev_first_row: torch.Tensor, z_prev: torch.Tensor,
                x_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (update of m's first row [*, R, c_m], update of z [*, R, R, c_z])."""
        m_update = self.layer_norm_m(m_prev_first_row)
        z_update = self.layer_norm_z(z_prev) + self.linear_dist(self.distance_bins(x_prev).to(z_prev.dtype))
        return m_update, z_update


def extra_msa_features(extra_msa: torch.Tensor, extra_has_deletion: torch.Tensor,
                       extra_deletion_value: torch.Tensor) -> torch.Tensor:
    """Supplement Table 1 ``extra_msa_feat``: one-hot (23 classes) + has_deletion + deletion_value, ``[*, S_e, R, 25]``."""
    one_hot = torch.nn.functional.one_hot(extra_msa.long(), rc.msa_num_classes).to(extra_deletion_value.dtype)
    return torch.cat([one_hot, extra_has_deletion[..., None], extra_deletion_value[..., None]], dim=-1)


class ExtraMSAEmbedder(torch.nn.Module):
    """Algorithm 2 line 13: ``a = Linear(extra_msa_feat)`` to c_e channels."""

    def __init__(self, extra_msa_dim: int, c_e: int):
        super().__init__()
        self.linear = Linear(extra_msa_dim, c_e)

    def forward(self, extra_msa_feat: torch.Tensor) -> torch.Tensor:
        return self.linear(extra_msa_feat)


class ProfileEmbedder(torch.nn.Module):
    """``m_1i += Linear(concat(profile_i, profile_mask_i))``: 21 -> c_m, added to the first (query) MSA row."""

    def __init__(self, c_m: int, profile_dim: int = 20):
        super().__init__()
        self.linear = Linear(profile_dim + 1, c_m)

    def forward(self, profile: torch.Tensor, profile_mask: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.cat([profile * profile_mask[..., None], profile_mask[..., None]], dim=-1))


def zeros_like_previous(batch_shape: tuple, num_res: int, c_m: int, c_z: int, device, dtype
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Algorithm 2 line 2: m_prev = 0, z_prev = 0, x_prev = 0 for the first iteration."""
    return (torch.zeros(*batch_shape, num_res, c_m, device=device, dtype=dtype),
            torch.zeros(*batch_shape, num_res, num_res, c_z, device=device, dtype=dtype),
            torch.zeros(*batch_shape, num_res, 3, device=device, dtype=torch.float32))


__all__ = ["InputEmbedder", "RecyclingEmbedder", "ExtraMSAEmbedder", "ProfileEmbedder", "relative_position_bins",
           "pseudo_beta_from_atom37", "extra_msa_features", "zeros_like_previous"]
