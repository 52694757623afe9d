"""Ideal polypeptide backbones of constant dihedrals, built residue by residue with the natural extension
reference frame method (NeRF; Parsons et al. 2005, J. Comput. Chem. 26:1063) from the backbone dihedrals and Engh &
Huber's bond lengths and angles (:mod:`megatron_protein.structure.residue_constants`):

    helix      phi -57, psi -47, omega 180 degrees (ideal right-handed alpha-helix, 3.6 residues per turn)
    extended   phi -139, psi 135, omega 180 degrees (antiparallel beta-strand; Pauling & Corey)

Geometry only (numpy), below the models: the trivial folding baselines
(:mod:`megatron_protein.models.folding.baselines`) and the structure module's optional ideal-chain start both build
on it.
"""
from __future__ import annotations

import math

import numpy as np

from megatron_protein.structure import residue_constants as rc

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
