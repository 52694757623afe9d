"""Shared pieces of the folding model tests: a micro config (seconds on CPU), real training examples from the
embedded chains, and a run-the-launcher helper."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_protein.data.folding_dataset import FoldingDataset, NpzChains, collate_features
from megatron_protein.models.folding.config import FoldingConfig, tiny

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAINS = os.path.join(REPO_ROOT, "data", "structures", "chains_sample.npz")


def micro_config(**overrides) -> FoldingConfig:
    """The tiny preset shrunk further (one Evoformer block, crop 24) so that a step takes milliseconds."""
    cfg = tiny()
    m = cfg.model
    m.c_m, m.c_z, m.c_s, m.c_e = 16, 16, 32, 8
    m.evoformer.num_blocks = 1
    m.structure_module.num_layers = 2
    m.structure_module.num_heads_ipa = 2
    m.heads.c_hidden_plddt = 16
    cfg.data.crop_size = 24
    cfg.data.max_msa_clusters = 4
    cfg.train.batch_size = 2
    cfg.train.warmup_steps = 2
    cfg.train.log_step = 1
    for key, value in overrides.items():
        cfg.override(key.replace("__", "."), value)
    cfg.validate()
    return cfg


def real_batch(cfg: FoldingConfig, indices: Sequence[int] = (0, 1), crop: bool = True,
               max_length: Optional[int] = None, seed: int = 0) -> dict:
    """Collated examples of embedded training chains (cropped like training, or whole)."""
    from megatron_protein.training.folding_trainer import feature_config

    dataset = FoldingDataset(NpzChains(CHAINS, "train"), config=feature_config(cfg), seed=seed)
    chosen = list(indices)
    if max_length is not None:
        chosen = [i for i in range(len(dataset)) if dataset.chains.lengths[i] <= max_length][:len(indices)]
    rng_examples = []
    for k, i in enumerate(chosen):
        if crop:
            rng_examples.append(dataset._example(i, np.random.default_rng([seed, k]), crop=True, drop_profile=False))
        else:
            rng_examples.append(dataset.eval_example(i))
    pad = cfg.data.crop_size if crop else None
    return collate_features(rng_examples, pad_residues=pad)


def random_rigid_motion(seed: int = 0, shift: float = 30.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random proper rotation [3, 3] and translation [3] (float64)."""
    from megatron_protein.structure.rigid import quat_to_rot

    g = torch.Generator().manual_seed(seed)
    rot = quat_to_rot(torch.randn(4, generator=g, dtype=torch.float64))
    return rot, shift * torch.randn(3, generator=g, dtype=torch.float64)


def write_small_chains(path: str, n_train: int = 8, n_valid: int = 2, max_length: int = 60) -> str:
    """A chains.npz-format file with the shortest real chains of the embedded sample (same keys and format), for
    tests that train and evaluate end to end in seconds."""
    data = np.load(CHAINS)
    lengths, split = data["lengths"], data["split"]
    chosen = []
    for name, count in (("train", n_train), ("valid", n_valid)):
        candidates = [i for i in np.argsort(lengths, kind="stable") if split[i] == name and lengths[i] <= max_length]
        if len(candidates) < count:
            candidates = [i for i in np.argsort(lengths, kind="stable") if split[i] == name]
        chosen.extend(sorted(candidates[:count]))
    per_chain = {k: data[k][chosen] for k in ("ids", "sequence", "dssp8", "start_resnum", "lengths", "split")}
    rows = [np.arange(data["offsets"][i], data["offsets"][i + 1]) for i in chosen]
    rows = np.concatenate(rows)
    offsets = np.concatenate([[0], np.cumsum(per_chain["lengths"])]).astype(np.int64)
    np.savez(path, **per_chain, offsets=offsets, coords=data["coords"][rows], profile=data["profile"][rows],
             atom_names=data["atom_names"], profile_alphabet=data["profile_alphabet"])
    return path
