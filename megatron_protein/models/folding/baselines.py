"""Trivial structure baselines of a given length, built from ideal geometry: an alpha-helix and an extended strand.

A folding model that has learnt anything must beat these on chains it never saw (lDDT-Calpha and TM-score
of the same length), which is how the launcher reports its result. N, CA, C come from the ideal chains of
:mod:`megatron_protein.structure.ideal_chain` (NeRF with Engh & Huber geometry; helix phi -57, psi -47; extended
strand phi -139, psi 135); O and CB are then placed from the backbone frames exactly as the structure module places
them (:func:`~megatron_protein.models.folding.structure_module.backbone_atoms`), so baseline and prediction share
one definition of the ideal residue.
"""
from __future__ import annotations

import numpy as np
import torch

from megatron_protein.models.folding.structure_module import backbone_atoms
from megatron_protein.structure.ideal_chain import CONFORMATIONS, ideal_backbone, place_atom  # noqa: F401 (re-export)
from megatron_protein.structure.rigid import Rigid


def baseline_structure(aatype: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """atom37 positions ``[L, 37, 3]`` and mask ``[L, 37]`` (float32) of the ``kind`` baseline for ``aatype``."""
    if kind not in CONFORMATIONS:
        raise ValueError(f"unknown baseline {kind!r}; choose one of {', '.join(CONFORMATIONS)}")
    xyz = torch.from_numpy(ideal_backbone(len(aatype), *CONFORMATIONS[kind])).float()
    frames = Rigid.from_3_points(xyz[:, 0], xyz[:, 1], xyz[:, 2])
    positions, mask = backbone_atoms(frames, torch.as_tensor(np.asarray(aatype), dtype=torch.long),
                                     torch.arange(len(aatype)))
    return positions.numpy(), mask.numpy()
