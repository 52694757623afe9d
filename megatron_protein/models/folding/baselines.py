"""Trivial structure baselines of a given length, built from ideal geometry: an alpha-helix and an extended strand.

A folding model that has learnt anything must beat these on chains it never saw (lDDT-Calpha and TM-score
of the same length), which is how the launcher reports its result. The chain is built residue by residue with the
natural extension reference frame method (NeRF; Parsons et al. 2005, J. Comput. Chem. 26:1063) from the backbone
dihedrals and Engh & Huber's bond lengths and angles (``structure.residue_constants``):

    helix      phi -57, psi -47, omega 180 degrees (ideal right-handed alpha-helix, 3.6 residues per turn)
    extended   phi -139, psi 135, omega 180 degrees (antiparallel beta-strand; Pauling & Corey)

N, CA, C come from NeRF; O and CB are then placed from the backbone frames exactly as the structure module places
them (:func:`~megatron_protein.models.folding.structure_module.backbone_atoms`), so baseline and prediction share
one definition of the ideal residue.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from megatron_protein.models.folding.structure_module import backbone_atoms
from megatron_protein.structure import residue_constants as rc
from megatron_protein.structure.rigid import Rigid

#: (phi, psi, omega) in degrees of each baseline conformation.
CONFORMATIONS = {"helix": (-57.0, -47.0, 180.0), "extended": (-139.0, 135.0, 180.0)}


def place_atom(a: np.ndarray, b: np.ndarray, c: np.ndarray, bond: float, angle: float, torsion: float) -> np.ndarray:
    """NeRF: the point d with |cd| = bond, angle(b, c, d) = angle and dihedral(a, b, c, d) = torsion (radians)."""
    bc = c - b
    bc /= np.linalg.norm(bc)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    basis = np.stack([bc, np.cross(n, bc), n], axis=-1)
    local = bond * np.array([-math.cos(angle), math.sin(angle) * math.cos(torsion),
                             math.sin(angle) * math.sin(torsion)])
    return c + basis @ local


def ideal_backbone(length: int, phi: float, psi: float, omega: float = 180.0) -> np.ndarray:
    """N, CA, C of ``length`` residues with constant dihedrals (degrees): float64 ``[length, 3, 3]`` in Angstrom."""
    if length < 1:
        raise ValueError(f"ideal_backbone: length must be >= 1, got {length}")
    n_ca = rc.bond_length[("N", "CA")][0]
    ca_c = rc.bond_length[("CA", "C")][0]
    c_n = rc.between_res_bond_length_c_n[0]
    ang_n_ca_c = math.radians(rc.bond_angle[("N", "CA", "C")][0])
    ang_ca_c_n = math.acos(rc.between_res_cos_angles_ca_c_n[0])
    ang_c_n_ca = math.acos(rc.between_res_cos_angles_c_n_ca[0])
    phi, psi, omega = (math.radians(x) for x in (phi, psi, omega))
    xyz = np.zeros((length, 3, 3))
    xyz[0, 0] = (0.0, 0.0, 0.0)
    xyz[0, 1] = (n_ca, 0.0, 0.0)
    xyz[0, 2] = xyz[0, 1] + ca_c * np.array([-math.cos(ang_n_ca_c), math.sin(ang_n_ca_c), 0.0])
    for i in range(1, length):
        n_prev, ca_prev, c_prev = xyz[i - 1]
        xyz[i, 0] = place_atom(n_prev, ca_prev, c_prev, c_n, ang_ca_c_n, psi)
        xyz[i, 1] = place_atom(ca_prev, c_prev, xyz[i, 0], n_ca, ang_c_n_ca, omega)
        xyz[i, 2] = place_atom(c_prev, xyz[i, 0], xyz[i, 1], ca_c, ang_n_ca_c, phi)
    return xyz


def baseline_structure(aatype: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """atom37 positions ``[L, 37, 3]`` and mask ``[L, 37]`` (float32) of the ``kind`` baseline for ``aatype``."""
    if kind not in CONFORMATIONS:
        raise ValueError(f"unknown baseline {kind!r}; choose one of {', '.join(CONFORMATIONS)}")
    xyz = torch.from_numpy(ideal_backbone(len(aatype), *CONFORMATIONS[kind])).float()
    frames = Rigid.from_3_points(xyz[:, 0], xyz[:, 1], xyz[:, 2])
    positions, mask = backbone_atoms(frames, torch.as_tensor(np.asarray(aatype), dtype=torch.long),
                                     torch.arange(len(aatype)))
    return positions.numpy(), mask.numpy()
