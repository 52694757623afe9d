"""Shared pieces of the Evoformer tests: a tiny config, weight randomisation, masks, OpenFold's import.

No tests here (pytest collects the file and finds none).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from megatron_protein.models.folding.evoformer import EvoformerConfig

#: Where the peers README unpacks OpenFold (its ``openfold/`` package) and the stub of its CUDA extension.
OPENFOLD_DIR = Path(os.environ.get("OPENFOLD_DIR", "/work/peers/openfold"))
OPENFOLD_STUBS = Path(os.environ.get("OPENFOLD_STUBS", "/work/shared/peers/stubs"))


def import_openfold():
    """Return OpenFold's ``openfold.model`` package, or None when it (or its dependencies) is absent."""
    if not (OPENFOLD_DIR / "openfold" / "model" / "evoformer.py").is_file():
        return None
    for p in (str(OPENFOLD_DIR), str(OPENFOLD_STUBS)):
        if p not in sys.path:
            sys.path.insert(0, p)
    try:
        import openfold.model.evoformer  # noqa: F401
        import openfold.model.msa  # noqa: F401
        import openfold.model.outer_product_mean  # noqa: F401
        import openfold.model.pair_transition  # noqa: F401
        import openfold.model.triangular_attention  # noqa: F401
        import openfold.model.triangular_multiplicative_update  # noqa: F401
        import openfold.model as model
    except Exception:  # noqa: BLE001 - a missing dependency of OpenFold means "no peer"
        return None
    return model


def tiny_config(**overrides) -> EvoformerConfig:
    """Small, odd sizes (so no dimension is confused with another)."""
    base = dict(c_m=12, c_z=10, c_s=14, num_blocks=2, c_hidden_msa_att=4, num_heads_msa=3, c_hidden_opm=5,
                c_hidden_mul=6, c_hidden_pair_att=4, num_heads_pair=2, transition_n=2)
    base.update(overrides)
    return EvoformerConfig(**base)


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Every parameter random (the 'final' and 'gating' initialisers make a fresh block the identity, which would
    let a comparison pass with any bug in the updates)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1.0 + scale * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return module


def random_masks(batch: tuple, n_seq: int, n_res: int, seed: int = 0, p_zero: float = 0.25):
    """Random 0/1 masks where no attention row is fully masked: sequence 0, residue 0 and the pair's first row and
    column stay real (a fully masked row is padding, where implementations legitimately differ)."""
    g = torch.Generator().manual_seed(seed)
    msa_mask = (torch.rand(*batch, n_seq, n_res, generator=g) > p_zero).float()
    msa_mask[..., 0, :] = 1.0
    msa_mask[..., :, 0] = 1.0
    pair_mask = (torch.rand(*batch, n_res, n_res, generator=g) > p_zero).float()
    pair_mask[..., 0, :] = 1.0
    pair_mask[..., :, 0] = 1.0
    return msa_mask, pair_mask


def random_inputs(batch: tuple, n_seq: int, n_res: int, c_m: int, c_z: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randn(*batch, n_seq, n_res, c_m, generator=g), torch.randn(*batch, n_res, n_res, c_z, generator=g)


def assert_close_scaled(actual, expected, atol: float = 2e-5, rtol: float = 1e-5, msg: str = "") -> None:
    """float32 rounding relative to the tensor's scale: |a - b| <= atol * max(1, max|b|) + rtol |b|
    (gradients of a stack reach tens; an absolute 1e-5 would test rounding, not correctness)."""
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol,
                               msg=(lambda m: f"{msg}: {m}") if msg else None)
