"""Residue chemistry for folding: the one source of amino-acid alphabets, atom layouts and ideal backbone geometry.

Orders follow the AlphaFold2 supplement (section 1.2.9, "Input features" and the atom37 representation of
section 1.9), so that features, model outputs and checkpoints line up with AlphaFold2/OpenFold without
remapping:

* ``restypes``: the 20 amino acids in AF2's order ``ARNDCQEGHILKMFPSTWYV`` (index 0-19), ``X`` (unknown) = 20.
* MSA alphabet: 0-19 amino acids in that order, 20 = ``X``, 21 = gap ``-``; the masked-MSA "mask" token is 22
  (supplement 1.2.7, masked MSA prediction), so the masked-MSA head and the ``msa_feat`` one-hot have 23 classes.
* atom37: every heavy atom name that occurs in the 20 amino acids (plus the terminal ``OXT``), in AF2's fixed
  order, N=0, CA=1, C=2, CB=3, O=4. A residue's atoms occupy a subset of the 37 slots; ``atom_mask`` says which.

Geometry is in Angstrom. The ideal backbone positions are AF2's "rigid group atom positions" (supplement 1.8.1,
Table 2's "backbone" and "psi" groups), themselves built from Engh & Huber (1991) bond lengths and angles:
N, CA, C and CB in the backbone frame (rigid group 0, the frame of Algorithm 21 with CA at the origin, C on the
positive x axis and N in the xy plane with positive y), and O in the psi frame (rigid group 3), because O rotates
with psi. :func:`psi_frame_in_backbone_frame` gives the psi frame for a given psi angle, so O can be placed in the
backbone frame.

Derived tables come from functions that return fresh arrays (nothing is filled in place at import), so a caller
that modifies one cannot corrupt the others.
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# Residue types
# ----------------------------------------------------------------------------------------------------------------

#: The 20 standard amino acids in AlphaFold2's order (index 0-19).
restypes: Tuple[str, ...] = tuple("ARNDCQEGHILKMFPSTWYV")
#: The 20 amino acids plus the unknown residue ``X`` (index 20).
restypes_with_x: Tuple[str, ...] = restypes + ("X",)
restype_order: Dict[str, int] = {aa: i for i, aa in enumerate(restypes)}
restype_num = len(restypes)  # 20
unk_restype_index = restype_num  # 20, "X"

restype_1to3: Dict[str, str] = {
    "A": "ALA", "R": "ARG", "N": "ASN", "D": "ASP", "C": "CYS", "Q": "GLN", "E": "GLU", "G": "GLY", "H": "HIS",
    "I": "ILE", "L": "LEU", "K": "LYS", "M": "MET", "F": "PHE", "P": "PRO", "S": "SER", "T": "THR", "W": "TRP",
    "Y": "TYR", "V": "VAL", "X": "UNK",
}
restype_3to1: Dict[str, str] = {three: one for one, three in restype_1to3.items()}
#: Three-letter names in restype order, then ``UNK``.
resnames: Tuple[str, ...] = tuple(restype_1to3[aa] for aa in restypes_with_x)

#: Parent standard residue of common non-standard (modified) residues, after the PDB Chemical Component
#: Dictionary's ``mon_nstd_parent_comp_id``. Selenomethionine (MSE) is read as methionine, as AF2's data
#: pipeline does (supplement 1.2.1). Residues not listed here are looked up in biotite's copy of the CCD by
#: :mod:`megatron_protein.structure.io`; anything without a standard parent becomes ``X``.
nonstandard_parent: Dict[str, str] = {
    "MSE": "MET",  # selenomethionine
    "SEC": "CYS",  # selenocysteine
    "PYL": "LYS",  # pyrrolysine
    "HYP": "PRO",  # 4-hydroxyproline
    "MLY": "LYS",  # N-dimethyl-lysine
    "M3L": "LYS",  # N-trimethyl-lysine
    "KCX": "LYS",  # lysine NZ-carboxylic acid
    "LLP": "LYS",  # lysine-pyridoxal-5'-phosphate
    "SEP": "SER",  # phosphoserine
    "TPO": "THR",  # phosphothreonine
    "PTR": "TYR",  # phosphotyrosine
    "CSO": "CYS",  # S-hydroxycysteine
    "CSD": "CYS",  # 3-sulfinoalanine
    "CME": "CYS",  # S,S-(2-hydroxyethyl)thiocysteine
    "OCS": "CYS",  # cysteinesulfonic acid
    "CAS": "CYS",  # S-(dimethylarsenic)cysteine
    "MLE": "LEU",  # N-methylleucine
    "MVA": "VAL",  # N-methylvaline
    "NLE": "LEU",  # norleucine
    "HIC": "HIS",  # 4-methyl-histidine
    "DAL": "ALA",  # D-alanine
    "PCA": "GLN",  # pyroglutamic acid (CCD parent: GLN)
    "FME": "MET",  # N-formylmethionine
    "CGU": "GLU",  # gamma-carboxy-glutamic acid
    "ASX": "ASP",  # ASP/ASN ambiguous (B)
    "GLX": "GLU",  # GLU/GLN ambiguous (Z)
}


def sequence_to_aatype(sequence: str) -> np.ndarray:
    """One-letter sequence -> int64 ``aatype`` [L] in restype order; letters outside the 20 map to X (20)."""
    return np.array([restype_order.get(aa, unk_restype_index) for aa in sequence.upper()], dtype=np.int64)


def aatype_to_sequence(aatype) -> str:
    """int ``aatype`` [L] -> one-letter sequence (20 -> ``X``)."""
    return "".join(restypes_with_x[int(i)] for i in np.asarray(aatype).reshape(-1))


# ----------------------------------------------------------------------------------------------------------------
# MSA alphabet (supplement 1.2.2 and 1.2.7)
# ----------------------------------------------------------------------------------------------------------------

#: MSA symbols by id: 0-19 amino acids, 20 = X, 21 = gap. (The mask token 22 has no letter.)
msa_alphabet: Tuple[str, ...] = restypes_with_x + ("-",)
msa_gap_index = 21
msa_mask_index = 22
msa_num_classes = 23  # one-hot width of msa_feat's cluster columns and of the masked-MSA head


def msa_letter_to_id(letter: str) -> int:
    """MSA letter -> id: amino acids 0-19, ``-`` (and ``.``) 21, anything else X (20).

    Upper-case only: A3M insertions (lower case) are removed by the MSA reader before this is called.
    """
    if letter in ("-", "."):
        return msa_gap_index
    return restype_order.get(letter, unk_restype_index)


# ----------------------------------------------------------------------------------------------------------------
# Atoms: the atom37 layout (supplement 1.9)
# ----------------------------------------------------------------------------------------------------------------

atom_types: Tuple[str, ...] = (
    "N", "CA", "C", "CB", "O", "CG", "CG1", "CG2", "OG", "OG1", "SG", "CD", "CD1", "CD2", "ND1", "ND2", "OD1",
    "OD2", "SD", "CE", "CE1", "CE2", "CE3", "NE", "NE1", "NE2", "OE1", "OE2", "CH2", "NH1", "NH2", "OH", "CZ",
    "CZ2", "CZ3", "NZ", "OXT",
)
atom_order: Dict[str, int] = {name: i for i, name in enumerate(atom_types)}
atom_type_num = len(atom_types)  # 37
backbone_atoms: Tuple[str, ...] = ("N", "CA", "C", "O")

#: Heavy atoms of each standard residue (PDB names); every residue also may carry OXT at a C terminus.
residue_atoms: Dict[str, Tuple[str, ...]] = {
    "ALA": ("C", "CA", "CB", "N", "O"),
    "ARG": ("C", "CA", "CB", "CG", "CD", "CZ", "N", "NE", "O", "NH1", "NH2"),
    "ASN": ("C", "CA", "CB", "CG", "N", "ND2", "O", "OD1"),
    "ASP": ("C", "CA", "CB", "CG", "N", "O", "OD1", "OD2"),
    "CYS": ("C", "CA", "CB", "N", "O", "SG"),
    "GLN": ("C", "CA", "CB", "CG", "CD", "N", "NE2", "O", "OE1"),
    "GLU": ("C", "CA", "CB", "CG", "CD", "N", "O", "OE1", "OE2"),
    "GLY": ("C", "CA", "N", "O"),
    "HIS": ("C", "CA", "CB", "CG", "CD2", "CE1", "N", "ND1", "NE2", "O"),
    "ILE": ("C", "CA", "CB", "CG1", "CG2", "CD1", "N", "O"),
    "LEU": ("C", "CA", "CB", "CG", "CD1", "CD2", "N", "O"),
    "LYS": ("C", "CA", "CB", "CG", "CD", "CE", "N", "NZ", "O"),
    "MET": ("C", "CA", "CB", "CG", "CE", "N", "O", "SD"),
    "PHE": ("C", "CA", "CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ", "N", "O"),
    "PRO": ("C", "CA", "CB", "CG", "CD", "N", "O"),
    "SER": ("C", "CA", "CB", "N", "O", "OG"),
    "THR": ("C", "CA", "CB", "CG2", "N", "O", "OG1"),
    "TRP": ("C", "CA", "CB", "CG", "CD1", "CD2", "CE2", "CE3", "CZ2", "CZ3", "CH2", "N", "NE1", "O"),
    "TYR": ("C", "CA", "CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ", "N", "O", "OH"),
    "VAL": ("C", "CA", "CB", "CG1", "CG2", "N", "O"),
}

#: Element of each atom37 name (first letter: C, N, O or S), for writers.
atom_element: Dict[str, str] = {name: name[0] for name in atom_types}


def restype_atom37_mask() -> np.ndarray:
    """float32 [21, 37]: 1 where residue type r (restype order, X last with no atoms) has atom a.

    OXT is left at 0 (it exists only at a C terminus).
    """
    mask = np.zeros((restype_num + 1, atom_type_num), dtype=np.float32)
    for r, aa in enumerate(restypes):
        for name in residue_atoms[restype_1to3[aa]]:
            mask[r, atom_order[name]] = 1.0
    return mask


# ----------------------------------------------------------------------------------------------------------------
# Ideal geometry (Engh & Huber 1991; AF2 supplement 1.8.1 Table 2 and section 1.9.11 for between-residue terms)
# ----------------------------------------------------------------------------------------------------------------

#: Ideal intra-residue backbone bond lengths [Angstrom] and their standard deviations (Engh & Huber 1991).
bond_length: Dict[Tuple[str, str], Tuple[float, float]] = {
    ("N", "CA"): (1.458, 0.019),
    ("CA", "C"): (1.525, 0.021),
    ("C", "O"): (1.231, 0.020),
    ("CA", "CB"): (1.530, 0.020),
}
#: Ideal intra-residue backbone bond angles [degrees] and standard deviations (Engh & Huber 1991).
bond_angle: Dict[Tuple[str, str, str], Tuple[float, float]] = {
    ("N", "CA", "C"): (111.2, 2.8),
    ("N", "CA", "CB"): (110.5, 1.7),
    ("C", "CA", "CB"): (110.1, 1.9),
    ("CA", "C", "O"): (120.1, 2.1),
}
#: Peptide bond C(i)-N(i+1) [Angstrom], mean and stddev for non-proline and proline as residue i+1, as used by
#: AF2's structural violation loss (supplement 1.9.11, eq. 44).
between_res_bond_length_c_n: Tuple[float, float] = (1.329, 1.341)
between_res_bond_length_stddev_c_n: Tuple[float, float] = (0.014, 0.016)
#: cos of the angles CA(i)-C(i)-N(i+1) (116.568 +- 1.995 degrees) and C(i)-N(i+1)-CA(i+1) (121.352 +- 2.315).
between_res_cos_angles_ca_c_n: Tuple[float, float] = (-0.4473, 0.0311)
between_res_cos_angles_c_n_ca: Tuple[float, float] = (-0.5203, 0.0353)
#: CA(i)-CA(i+1) distance for a trans peptide (omega = 180 degrees) [Angstrom].
ca_ca = 3.80209737096

# (rigid group, position) of N, CA, C, CB and O per residue: groups 0 (backbone) and 3 (psi), AF2 supplement
# 1.8.1 / Table 2 (the values of AlphaFold2's "rigid group atom positions"). GLY has no CB.
_IDEAL_BACKBONE: Dict[str, Dict[str, Tuple[float, float, float]]] = {
    # residue: N, C, CB (CA is the origin of group 0) and O (group 3)
    "ALA": {"N": (-0.525, 1.363, 0.0), "C": (1.526, 0.0, 0.0), "CB": (-0.529, -0.774, -1.205), "O": (0.627, 1.062, 0.0)},
    "ARG": {"N": (-0.524, 1.362, 0.0), "C": (1.525, 0.0, 0.0), "CB": (-0.524, -0.778, -1.209), "O": (0.626, 1.062, 0.0)},
    "ASN": {"N": (-0.536, 1.357, 0.0), "C": (1.526, 0.0, 0.0), "CB": (-0.531, -0.787, -1.200), "O": (0.625, 1.062, 0.0)},
    "ASP": {"N": (-0.525, 1.362, 0.0), "C": (1.527, 0.0, 0.0), "CB": (-0.526, -0.778, -1.208), "O": (0.626, 1.062, 0.0)},
    "CYS": {"N": (-0.522, 1.362, 0.0), "C": (1.524, 0.0, 0.0), "CB": (-0.519, -0.773, -1.212), "O": (0.625, 1.062, 0.0)},
    "GLN": {"N": (-0.526, 1.361, 0.0), "C": (1.526, 0.0, 0.0), "CB": (-0.525, -0.779, -1.207), "O": (0.626, 1.062, 0.0)},
    "GLU": {"N": (-0.528, 1.361, 0.0), "C": (1.526, 0.0, 0.0), "CB": (-0.526, -0.781, -1.207), "O": (0.626, 1.062, 0.0)},
    "GLY": {"N": (-0.572, 1.337, 0.0), "C": (1.517, 0.0, 0.0), "O": (0.626, 1.062, 0.0)},
    "HIS": {"N": (-0.527, 1.360, 0.0), "C": (1.525, 0.0, 0.0), "CB": (-0.525, -0.778, -1.208), "O": (0.625, 1.063, 0.0)},
    "ILE": {"N": (-0.493, 1.373, 0.0), "C": (1.527, 0.0, 0.0), "CB": (-0.536, -0.793, -1.213), "O": (0.627, 1.062, 0.0)},
    "LEU": {"N": (-0.520, 1.363, 0.0), "C": (1.525, 0.0, 0.0), "CB": (-0.522, -0.773, -1.214), "O": (0.625, 1.063, 0.0)},
    "LYS": {"N": (-0.526, 1.362, 0.0), "C": (1.526, 0.0, 0.0), "CB": (-0.524, -0.778, -1.208), "O": (0.626, 1.062, 0.0)},
    "MET": {"N": (-0.521, 1.364, 0.0), "C": (1.525, 0.0, 0.0), "CB": (-0.523, -0.776, -1.210), "O": (0.625, 1.062, 0.0)},
    "PHE": {"N": (-0.518, 1.363, 0.0), "C": (1.524, 0.0, 0.0), "CB": (-0.525, -0.776, -1.212), "O": (0.626, 1.062, 0.0)},
    "PRO": {"N": (-0.566, 1.351, 0.0), "C": (1.527, 0.0, 0.0), "CB": (-0.546, -0.611, -1.293), "O": (0.621, 1.066, 0.0)},
    "SER": {"N": (-0.529, 1.360, 0.0), "C": (1.525, 0.0, 0.0), "CB": (-0.518, -0.777, -1.211), "O": (0.626, 1.062, 0.0)},
    "THR": {"N": (-0.517, 1.364, 0.0), "C": (1.526, 0.0, 0.0), "CB": (-0.516, -0.793, -1.215), "O": (0.626, 1.062, 0.0)},
    "TRP": {"N": (-0.521, 1.363, 0.0), "C": (1.525, 0.0, 0.0), "CB": (-0.523, -0.776, -1.212), "O": (0.627, 1.062, 0.0)},
    "TYR": {"N": (-0.522, 1.362, 0.0), "C": (1.524, 0.0, 0.0), "CB": (-0.522, -0.776, -1.213), "O": (0.627, 1.062, 0.0)},
    "VAL": {"N": (-0.494, 1.373, 0.0), "C": (1.527, 0.0, 0.0), "CB": (-0.533, -0.795, -1.213), "O": (0.627, 1.062, 0.0)},
}
#: Rigid group of each backbone atom: 0 = backbone frame, 3 = psi frame (AF2 supplement Table 2).
backbone_atom_group: Dict[str, int] = {"N": 0, "CA": 0, "C": 0, "CB": 0, "O": 3}


def ideal_backbone_positions(resname: str) -> Dict[str, Tuple[int, np.ndarray]]:
    """``{atom: (rigid_group, xyz)}`` for N, CA, C, CB (group 0) and O (group 3) of a residue (three-letter).

    Unknown residues get alanine's geometry (a CB like every non-glycine residue). Fresh arrays each call.
    """
    table = _IDEAL_BACKBONE.get(resname, _IDEAL_BACKBONE["ALA"])
    out = {"CA": (0, np.zeros(3, dtype=np.float32))}
    for name, xyz in table.items():
        out[name] = (backbone_atom_group[name], np.asarray(xyz, dtype=np.float32))
    return out


def ideal_backbone_atom37(frame_group: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Ideal positions of N, CA, C, CB and O per restype in atom37 slots: float32 [21, 37, 3] and mask [21, 37].

    Only atoms of ``frame_group`` (0: N, CA, C, CB in the backbone frame; 3: O in the psi frame) are filled.
    Row 20 (X) takes alanine's values.
    """
    positions = np.zeros((restype_num + 1, atom_type_num, 3), dtype=np.float32)
    mask = np.zeros((restype_num + 1, atom_type_num), dtype=np.float32)
    for r, aa in enumerate(restypes_with_x):
        for name, (group, xyz) in ideal_backbone_positions(restype_1to3[aa]).items():
            if group == frame_group:
                positions[r, atom_order[name]] = xyz
                mask[r, atom_order[name]] = 1.0
    return positions, mask


def psi_frame_in_backbone_frame(resname: str, psi: float) -> Tuple[np.ndarray, np.ndarray]:
    """Rotation [3, 3] and translation [3] of the psi frame (rigid group 3) in the backbone frame.

    As in AF2 (supplement 1.8.1, Algorithm 24): the default psi frame has its x axis along CA->C, its y axis in the
    N-CA-C plane pointing away from N, and its origin at C; the torsion then rotates it about x by ``psi``
    (radians). O placed through this frame has the dihedral N-CA-C-O = psi + 180 degrees, so ``psi`` is the
    backbone psi (N-CA-C-N of the next residue), O being anti to the next N in the peptide plane.
    """
    table = ideal_backbone_positions(resname)
    n, c = table["N"][1].astype(np.float64), table["C"][1].astype(np.float64)
    e1 = c / np.linalg.norm(c)  # CA is the origin: x along CA->C
    v = -n  # y from N towards CA, Gram-Schmidt against x
    v = v - np.dot(v, e1) * e1
    e2 = v / np.linalg.norm(v)
    e3 = np.cross(e1, e2)
    default = np.stack([e1, e2, e3], axis=-1)
    cos, sin = math.cos(psi), math.sin(psi)
    torsion = np.array([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    return (default @ torsion).astype(np.float32), c.astype(np.float32)


def chain_residue_names() -> List[str]:
    """The 20 standard three-letter names in restype order (no UNK)."""
    return [restype_1to3[aa] for aa in restypes]
