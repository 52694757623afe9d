"""The structure module: single and pair representations -> one rigid frame per residue -> backbone atoms.

- :class:`InvariantPointAttention`: supplement Algorithm 22.
- :class:`BackboneUpdate`: Algorithm 23 (quaternion (1, b, c, d) normalised, plus a translation).
- :class:`StructureModuleTransition`: Algorithm 20 lines 8-9 (Linear-ReLU-Linear-ReLU-Linear, residual,
  dropout, LayerNorm).
- :class:`StructureModule`: Algorithm 20 without the side-chain torsion branch (lines 11-14, not built): one set of
  weights applied ``num_layers`` times (8 in AF2), starting from identity frames ("black hole" initialisation),
  with the rotation gradient stopped between layers (line 20; supplement 1.8.1) and every layer's frames kept for
  the auxiliary FAPE loss.
- :func:`backbone_atoms`: N, CA, C and CB from each residue type's ideal coordinates in its backbone frame, and O in
  the psi frame (supplement 1.8.1, Table 2 values in ``structure.residue_constants``), with psi taken from the
  predicted next residue's N (the dihedral N(i)-CA(i)-C(i)-N(i+1)).

Units: inside the module translations are in nm (AF2's position scale 10); everything returned is in Angstrom.
Precision: the module runs in float32 with autocast off, whatever the caller's precision: the frames are composed
eight times and the IPA point distances are differences of coordinates (``structure.rigid`` explains why bf16 is
not enough). Its cost is small next to the Evoformer's.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from megatron_protein.kernels import LayerNorm
from megatron_protein.models.folding.primitives import Linear
from megatron_protein.structure import residue_constants as rc
from megatron_protein.structure.ideal_chain import CONFORMATIONS, ideal_backbone
from megatron_protein.structure.rigid import Rigid


class InvariantPointAttention(torch.nn.Module):
    """Algorithm 22: attention whose logits and outputs are invariant to a global rotation and translation.

    For head h, with the frames T_i (rotation R_i, translation t_i, in nm):

        a_ij^h = softmax_j( w_L ( q_i.k_j / sqrt(c) + b_ij^h - gamma^h w_C / 2 sum_p |T_i q_ip - T_j k_jp|^2 ) )
        w_L = sqrt(1/3), w_C = sqrt(2 / (9 N_qk_points)), gamma^h = softplus(head weight), initialised to 1
        o_i   = sum_j a_ij v_j,   o_ip = T_i^-1 sum_j a_ij T_j v_jp,   o~_i = sum_j a_ij z_ij
        out_i = Linear(concat(o_i, o_ip, |o_ip|, o~_i))           zero-initialised ('final')

    ``s [*, R, c_s]``, ``z [*, R, R, c_z]``, ``frames`` a :class:`Rigid` of batch shape ``[*, R]``, ``mask [*, R]``
    (1 = real residue) -> ``[*, R, c_s]``. The squared point distance is expanded as
    |q|^2 + |k|^2 - 2 q.k so that no ``[*, R, R, H, P, 3]`` tensor is built.
    """

    def __init__(self, c_s: int, c_z: int, c_hidden: int, num_heads: int, num_qk_points: int, num_v_points: int,
                 inf: float = 1e5, eps: float = 1e-8):
        super().__init__()
        self.c_hidden, self.num_heads = c_hidden, num_heads
        self.num_qk_points, self.num_v_points = num_qk_points, num_v_points
        self.inf, self.eps = inf, eps
        hc = c_hidden * num_heads
        self.linear_q = Linear(c_s, hc)
        self.linear_k = Linear(c_s, hc)
        self.linear_v = Linear(c_s, hc)
        self.linear_q_points = Linear(c_s, num_heads * num_qk_points * 3)
        self.linear_k_points = Linear(c_s, num_heads * num_qk_points * 3)
        self.linear_v_points = Linear(c_s, num_heads * num_v_points * 3)
        self.linear_b = Linear(c_z, num_heads)
        # softplus(x) = 1 at x = log(e - 1): every head starts with weight 1 on the point term (Algorithm 22 line 7).
        self.head_weights = torch.nn.Parameter(torch.full((num_heads,), math.log(math.e - 1.0)))
        self.linear_out = Linear(num_heads * (c_hidden + c_z + num_v_points * 4), c_s, init="final")

    def _points(self, linear: Linear, s: torch.Tensor, frames: Rigid, num_points: int) -> torch.Tensor:
        """Local points of each residue and head, mapped to global coordinates: ``[*, R, H, P, 3]``."""
        local = linear(s).view(*s.shape[:-1], self.num_heads, num_points, 3)
        return frames[..., None, None].apply(local)

    def forward(self, s: torch.Tensor, z: torch.Tensor, frames: Rigid, mask: torch.Tensor) -> torch.Tensor:
        heads, c = self.num_heads, self.c_hidden
        q = self.linear_q(s).view(*s.shape[:-1], heads, c)
        k = self.linear_k(s).view(*s.shape[:-1], heads, c)
        v = self.linear_v(s).view(*s.shape[:-1], heads, c)
        q_pts = self._points(self.linear_q_points, s, frames, self.num_qk_points)
        k_pts = self._points(self.linear_k_points, s, frames, self.num_qk_points)
        v_pts = self._points(self.linear_v_points, s, frames, self.num_v_points)

        # Logits [*, H, R_i, R_j]: scalar term, pair bias, point term (Algorithm 22 line 7).
        scalar = torch.einsum("...ihc,...jhc->...hij", q, k) / math.sqrt(c)
        bias = self.linear_b(z).movedim(-1, -3)
        qf, kf = q_pts.flatten(-2), k_pts.flatten(-2)                      # [*, R, H, P*3]
        sq_dist = (qf.pow(2).sum(-1).transpose(-1, -2)[..., :, None]
                   + kf.pow(2).sum(-1).transpose(-1, -2)[..., None, :]
                   - 2.0 * torch.einsum("...ihd,...jhd->...hij", qf, kf))
        gamma = torch.nn.functional.softplus(self.head_weights)[:, None, None]
        w_c = math.sqrt(2.0 / (9.0 * self.num_qk_points))
        logits = math.sqrt(1.0 / 3.0) * (scalar + bias - gamma * (w_c / 2.0) * sq_dist)
        pair_mask = mask[..., :, None] * mask[..., None, :]
        logits = logits + (self.inf * (pair_mask - 1.0))[..., None, :, :]
        attn = torch.softmax(logits, dim=-1)

        o = torch.einsum("...hij,...jhc->...ihc", attn, v).flatten(-2)                       # [*, R, H*c]
        o_pts_global = torch.einsum("...hij,...jhpx->...ihpx", attn, v_pts)                   # [*, R, H, P, 3]
        o_pts = frames[..., None, None].invert_apply(o_pts_global)
        o_pts_norm = torch.sqrt(o_pts.pow(2).sum(-1) + self.eps).flatten(-2)                  # [*, R, H*P]
        o_pair = torch.einsum("...hij,...ijc->...ihc", attn, z).flatten(-2)                   # [*, R, H*c_z]
        features = torch.cat([o, o_pts.flatten(-3), o_pts_norm, o_pair], dim=-1)
        return self.linear_out(features)


class BackboneUpdate(torch.nn.Module):
    """Algorithm 23: ``Linear(s) -> (b, c, d, t) [*, R, 6]``; the caller composes it onto the frames.

    Zero-initialised ('final'), so a fresh module leaves the frames where they are."""

    def __init__(self, c_s: int):
        super().__init__()
        self.linear = Linear(c_s, 6, init="final")

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.linear(s)


class StructureModuleTransition(torch.nn.Module):
    """Algorithm 20 lines 8-9: ``s = LN(dropout(s + Linear(ReLU(Linear(ReLU(Linear(s)))))))``, repeated
    ``num_layers`` times (AF2: once)."""

    def __init__(self, c_s: int, num_layers: int, dropout: float, fused: bool = True):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.Sequential(Linear(c_s, c_s, init="relu"), torch.nn.ReLU(), Linear(c_s, c_s, init="relu"),
                                torch.nn.ReLU(), Linear(c_s, c_s, init="final"))
            for _ in range(num_layers))
        self.dropout = torch.nn.Dropout(dropout)
        self.layer_norm = LayerNorm(c_s, fused=fused)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            s = s + layer(s)
        return self.layer_norm(self.dropout(s))


# ---------------------------------------------------------------------------------------------------------------
# Backbone atoms from frames
# ---------------------------------------------------------------------------------------------------------------

def _ideal_tables() -> dict[str, torch.Tensor]:
    """Per restype (21 rows, X = alanine): group-0 atom37 positions and mask, the O position in the psi frame, and
    the default psi frame (psi = 0) in the backbone frame."""
    positions, mask = rc.ideal_backbone_atom37(frame_group=0)
    o_local = np.zeros((rc.restype_num + 1, 3), dtype=np.float32)
    psi_rot = np.zeros((rc.restype_num + 1, 3, 3), dtype=np.float32)
    psi_trans = np.zeros((rc.restype_num + 1, 3), dtype=np.float32)
    for r, aa in enumerate(rc.restypes_with_x):
        name = rc.restype_1to3[aa]
        o_local[r] = rc.ideal_backbone_positions(name)["O"][1]
        psi_rot[r], psi_trans[r] = rc.psi_frame_in_backbone_frame(name, 0.0)
    return {"positions": torch.from_numpy(positions), "mask": torch.from_numpy(mask),
            "o_local": torch.from_numpy(o_local), "psi_rot": torch.from_numpy(psi_rot),
            "psi_trans": torch.from_numpy(psi_trans)}


_TABLES: Optional[dict[str, torch.Tensor]] = None


def ideal_tables(device) -> dict[str, torch.Tensor]:
    global _TABLES
    if _TABLES is None:
        _TABLES = _ideal_tables()
    return {k: v.to(device) for k, v in _TABLES.items()}


def dihedral(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Dihedral angle a-b-c-d in radians, ``[*, 3] x 4 -> [*]`` (atan2 form, stable for all angles)."""
    b0, b1, b2 = a - b, c - b, d - c
    b1n = b1 / torch.linalg.vector_norm(b1, dim=-1, keepdim=True).clamp_min(1e-8)
    v = b0 - (b0 * b1n).sum(-1, keepdim=True) * b1n
    w = b2 - (b2 * b1n).sum(-1, keepdim=True) * b1n
    x = (v * w).sum(-1)
    y = (torch.cross(b1n, v, dim=-1) * w).sum(-1)
    return torch.atan2(y, x)


def backbone_atoms(frames: Rigid, aatype: torch.Tensor, residue_index: Optional[torch.Tensor] = None,
                   seq_mask: Optional[torch.Tensor] = None, default_psi: float = math.pi
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """atom37 positions ``[*, R, 37, 3]`` (N, CA, C, O, CB filled) and mask ``[*, R, 37]`` from backbone frames in
    Angstrom and residue types.

    N, CA, C, CB: the residue type's ideal coordinates in the backbone frame (CB absent for glycine). O: ideal
    position in the psi frame, rotated by psi = dihedral(N_i, CA_i, C_i, N_{i+1}) with the next residue's predicted
    N; where there is no next residue (chain end, a gap in ``residue_index``, padding) ``default_psi`` is used
    (pi: O anti to N-CA about the CA-C bond, an extended backbone).
    """
    tables = ideal_tables(frames.device)
    aatype = aatype.clamp(0, rc.restype_num).long()
    o_index = rc.atom_order["O"]
    ideal = tables["positions"][aatype]                                   # [*, R, 37, 3]
    o_slot = torch.zeros(rc.atom_type_num, device=frames.device)
    o_slot[o_index] = 1.0
    group0_mask = tables["mask"][aatype]                                  # [*, R, 37]: N, CA, C, CB
    positions = frames[..., None].apply(ideal) * group0_mask[..., None]

    n, ca, c = (positions[..., rc.atom_order[a], :] for a in ("N", "CA", "C"))
    n_next = torch.roll(n, shifts=-1, dims=-2)
    has_next = torch.ones_like(aatype, dtype=torch.bool)
    has_next[..., -1] = False
    if residue_index is not None:
        has_next &= (torch.roll(residue_index, -1, dims=-1) - residue_index) == 1
    if seq_mask is not None:
        has_next &= torch.roll(seq_mask, -1, dims=-1) > 0
    psi = torch.where(has_next, dihedral(n, ca, c, n_next), torch.full_like(n[..., 0], default_psi))

    # O in the psi frame: rotate the ideal O about the frame's x axis by psi, then the default psi frame, then the
    # backbone frame (AF2 supplement 1.8.1: rigid group 3).
    o_local = tables["o_local"][aatype]                                   # [*, R, 3]
    cos, sin = torch.cos(psi), torch.sin(psi)
    o_rotated = torch.stack([o_local[..., 0], cos * o_local[..., 1] - sin * o_local[..., 2],
                             sin * o_local[..., 1] + cos * o_local[..., 2]], dim=-1)
    o_backbone = Rigid(tables["psi_rot"][aatype], tables["psi_trans"][aatype]).apply(o_rotated)
    o_global = frames.apply(o_backbone)
    positions = positions + o_global[..., None, :] * o_slot[:, None]
    mask = group0_mask + o_slot
    if seq_mask is not None:
        mask = mask * seq_mask[..., None]
        positions = positions * mask[..., None]
    return positions, mask


# ---------------------------------------------------------------------------------------------------------------
# Starting frames
# ---------------------------------------------------------------------------------------------------------------

#: ``identity``: AF2's "black hole" start (every residue at the origin, supplement 1.8.1). ``extended`` / ``helix``:
#: the backbone frames of the extended strand / ideal alpha-helix of :mod:`megatron_protein.structure.ideal_chain`,
#: centred on their centroid (not AF2; docs/folding_tiny.md).
INITIAL_FRAMES = ("identity", "extended", "helix")

_CHAIN_CACHE: dict[tuple[int, str], Rigid] = {}


def ideal_chain_frames(length: int, kind: str, device) -> Rigid:
    """Backbone frames ``[length]`` (Angstrom) of an ideal chain of constant dihedrals, centred at the origin."""
    key = (int(length), kind)
    if key not in _CHAIN_CACHE:
        xyz = torch.from_numpy(ideal_backbone(int(length), *CONFORMATIONS[kind])).float()
        xyz = xyz - xyz[:, 1].mean(0)
        _CHAIN_CACHE[key] = Rigid.from_3_points(xyz[:, 0], xyz[:, 1], xyz[:, 2])
    return _CHAIN_CACHE[key].to(device)


# ---------------------------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------------------------

class StructureModule(torch.nn.Module):
    """Algorithm 20 (backbone part): ``(s [*, R, c_s], z [*, R, R, c_z], aatype, seq_mask) -> dict``.

    Returns (all float32, Angstrom):
      ``frames``     ``[L, *, R, 4, 4]`` the backbone frames after each of the L layers (for FAPE and aux FAPE)
      ``single``     ``[*, R, c_s]`` the final single representation (input of the pLDDT head)
      ``positions``  ``[*, R, 37, 3]`` final backbone atoms (N, CA, C, O, CB), ``atom37_mask`` ``[*, R, 37]``
    """

    def __init__(self, c_s: int, c_z: int, c_ipa: int, num_heads_ipa: int, num_qk_points: int, num_v_points: int,
                 num_layers: int, num_transition_layers: int, dropout: float, position_scale: float,
                 fused: bool = True, initial_frames: str = "identity"):
        super().__init__()
        if initial_frames not in INITIAL_FRAMES:
            raise ValueError(f"initial_frames must be one of {', '.join(INITIAL_FRAMES)}, got {initial_frames!r}")
        self.initial_frames = initial_frames
        self.num_layers = num_layers
        self.position_scale = position_scale
        self.layer_norm_s = LayerNorm(c_s, fused=fused)
        self.layer_norm_z = LayerNorm(c_z, fused=fused)
        self.linear_in = Linear(c_s, c_s)
        self.ipa = InvariantPointAttention(c_s, c_z, c_ipa, num_heads_ipa, num_qk_points, num_v_points)
        self.ipa_dropout = torch.nn.Dropout(dropout)
        self.layer_norm_ipa = LayerNorm(c_s, fused=fused)
        self.transition = StructureModuleTransition(c_s, num_transition_layers, dropout, fused=fused)
        self.backbone_update = BackboneUpdate(c_s)

    def start_frames(self, shape: torch.Size, device) -> Rigid:
        """Algorithm 20 line 4: identity frames (AF2), or the frames of an ideal chain (``initial_frames``)."""
        if self.initial_frames == "identity":
            return Rigid.identity(shape, dtype=torch.float32, device=device)
        chain = ideal_chain_frames(shape[-1], self.initial_frames, device).scale_translation(1.0 / self.position_scale)
        return Rigid(chain.rots.expand(*shape, 3, 3), chain.trans.expand(*shape, 3))

    def forward(self, s: torch.Tensor, z: torch.Tensor, aatype: torch.Tensor, seq_mask: torch.Tensor,
                residue_index: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        with torch.autocast(device_type=s.device.type, enabled=False):
            s, z, seq_mask = s.float(), z.float(), seq_mask.float()
            s = self.layer_norm_s(s)                                      # line 1: s_initial
            z = self.layer_norm_z(z)                                      # line 2
            s = self.linear_in(s)                                         # line 3
            frames = self.start_frames(s.shape[:-1], s.device)                      # line 4
            per_layer = []
            for layer in range(self.num_layers):                          # lines 5-21, weights shared
                s = s + self.ipa(s, z, frames, seq_mask)                  # line 6
                s = self.layer_norm_ipa(self.ipa_dropout(s))              # line 7
                s = self.transition(s)                                    # lines 8-9
                frames = frames.compose_q_update_vec(self.backbone_update(s))   # line 10
                per_layer.append(frames.scale_translation(self.position_scale).to_tensor_4x4())
                if layer < self.num_layers - 1:
                    frames = frames.stop_rot_gradient()                   # line 20
            final = frames.scale_translation(self.position_scale)
            positions, atom_mask = backbone_atoms(final, aatype, residue_index, seq_mask)
        return {"frames": torch.stack(per_layer), "single": s, "positions": positions, "atom37_mask": atom_mask}
