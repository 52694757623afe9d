"""The AlphaFold2 model (supplement Algorithm 2, ``Inference``), with recycling, on one process or many.

    for c in 1 .. N_cycle:                                            recycling iterations
        m, z   = InputEmbedder(target_feat, residue_index, msa_feat)      Algorithms 3-5
        m_1, z += RecyclingEmbedder(m_prev_1, z_prev, x_prev)              Algorithm 32
        z      = ExtraMSAStack(ExtraMSAEmbedder(extra_msa_feat), z)        Algorithms 18-19
        m, z, s = EvoformerStack(m, z)                                     Algorithm 6 (+ s = Linear(m_1))
        frames, positions, s = StructureModule(s, z)                       Algorithm 20
        m_prev_1, z_prev, x_prev = m_1, z, pseudo_beta(positions)          stopped gradients
    heads: distogram (z), masked MSA (m), pLDDT (s)                        1.9.8, 1.9.9, Algorithm 29

Recycling (supplement 1.10): all iterations but the last run without gradients, and the recycled tensors are
detached, so back-propagation goes through the last iteration only. In training the number of iterations is drawn
uniformly from 1 .. ``max_recycling_iters + 1`` per step by the caller (:func:`sample_num_recycles`), from a
generator seeded by (seed, step): every data-parallel rank draws the same number with no communication, and a
resumed run draws the same numbers as an uninterrupted one. At inference ``max_recycling_iters`` (3 in AF2).

The same features are used in every iteration (AF2 resamples the MSA clusters per iteration; our feature
pipeline produces one sample per example). The model never calls ``torch.distributed``: the Evoformer's DAP/BP
hooks are the parallel core's and are the identity at degree 1.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_protein.models.folding.config import FoldingConfig
from megatron_protein.models.folding.dist_trunk import DistEmbeddingsAndEvoformer, evoformer_config  # noqa: F401
from megatron_protein.models.folding.embedders import pseudo_beta_from_atom37
from megatron_protein.models.folding.heads import DistogramHead, MaskedMSAHead, PLDDTHead, plddt_from_logits
from megatron_protein.models.folding.structure_module import StructureModule

#: Features the model reads (CONTRACTS.md feature dict, batched [B, ...]); the extra-MSA ones only when the
#: extra-MSA stack has blocks.
MODEL_FEATURES = ("aatype", "residue_index", "seq_mask", "target_feat", "msa_feat", "msa_mask")
EXTRA_MSA_FEATURES = ("extra_msa", "extra_has_deletion", "extra_deletion_value", "extra_msa_mask")
PROFILE_FEATURES = ("profile", "profile_mask")


def sample_num_recycles(max_recycling_iters: int, seed: int, step: int) -> int:
    """Number of recycles (0 .. max) for training step ``step``: uniform, from a generator seeded by (seed, step)
    alone, so it is the same on every rank and after a resume (supplement 1.10)."""
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2 ** 63))
    return int(torch.randint(0, max_recycling_iters + 1, (1,), generator=generator))


class AlphaFold(torch.nn.Module):
    """``forward(batch, num_recycles=None, chunk_size=None) -> outputs`` (see :meth:`forward`)."""

    def __init__(self, config: FoldingConfig):
        super().__init__()
        self.config = config
        m = config.model
        fused = m.fused_kernels
        # Embedders + extra-MSA stack + Evoformer: one class at every dap/bp degree (identity hooks at degree 1).
        self.trunk = DistEmbeddingsAndEvoformer(m)
        self.use_extra_msa = self.trunk.use_extra_msa
        sm = m.structure_module
        self.structure_module = StructureModule(m.c_s, m.c_z, sm.c_ipa, sm.num_heads_ipa, sm.num_qk_points,
                                                sm.num_v_points, sm.num_layers, sm.num_transition_layers,
                                                sm.dropout, sm.position_scale, fused=fused,
                                                initial_frames=sm.initial_frames)
        h = m.heads
        self.distogram_head = DistogramHead(m.c_z, h.distogram_bins)
        self.masked_msa_head = MaskedMSAHead(m.c_m)
        self.plddt_head = PLDDTHead(m.c_s, h.c_hidden_plddt, h.plddt_bins, fused=fused)

    # ------------------------------------------------------------------------------------------ one iteration
    def iteration(self, batch: dict, prev: tuple, chunk_size: Optional[int]) -> dict:
        """Algorithm 2 lines 5-19 for one recycling iteration; ``prev = (m_1, z, x)`` of the last one."""
        seq_mask = batch["seq_mask"].to(batch["target_feat"].dtype)
        m, z, s = self.trunk(batch, prev, chunk_size)
        sm = self.structure_module(s, z, batch["aatype"], seq_mask, batch["residue_index"])
        return {"msa": m, "pair": z, "single_evoformer": s, **sm}

    def forward(self, batch: dict, num_recycles: Optional[int] = None, chunk_size: Optional[int] = None) -> dict:
        """Run ``num_recycles + 1`` iterations (default: ``model.max_recycling_iters``) on a batched feature dict.

        Returns ``frames [L_sm, B, R, 4, 4]``, ``positions [B, R, 37, 3]`` and ``atom37_mask`` (Angstrom),
        ``single [B, R, c_s]``, ``distogram_logits [B, R, R, 64]``, ``masked_msa_logits [B, S, R, 23]``,
        ``plddt_logits [B, R, 50]``, ``plddt [B, R]`` (0-100) and ``num_recycles``.
        """
        needed = (MODEL_FEATURES + (EXTRA_MSA_FEATURES if self.use_extra_msa else ())
                  + (PROFILE_FEATURES if self.config.model.use_profile else ()))
        missing = [k for k in needed if k not in batch]
        if missing:
            raise KeyError(f"AlphaFold.forward: the batch lacks feature(s) {', '.join(missing)}")
        if num_recycles is None:
            num_recycles = self.config.model.max_recycling_iters
        if num_recycles < 0:
            raise ValueError(f"num_recycles must be >= 0, got {num_recycles}")
        target = batch["target_feat"]
        batch_shape, num_res = target.shape[:-2], target.shape[-2]
        m = self.config.model
        prev = (target.new_zeros(*batch_shape, num_res, m.c_m),
                target.new_zeros(*batch_shape, num_res, num_res, m.c_z),
                target.new_zeros(*batch_shape, num_res, 3, dtype=torch.float32))
        grad_enabled = torch.is_grad_enabled()
        outputs = None
        for cycle in range(num_recycles + 1):
            last = cycle == num_recycles
            with torch.set_grad_enabled(grad_enabled and last):
                outputs = self.iteration(batch, prev, chunk_size)
            if not last:
                x = pseudo_beta_from_atom37(batch["aatype"], outputs["positions"])
                prev = (outputs["msa"][..., 0, :, :].detach(), outputs["pair"].detach(), x.detach())
        outputs["distogram_logits"] = self.distogram_head(outputs["pair"])
        outputs["masked_msa_logits"] = self.masked_msa_head(outputs["msa"])
        outputs["plddt_logits"] = self.plddt_head(outputs["single"])
        outputs["plddt"] = plddt_from_logits(outputs["plddt_logits"])
        outputs["num_recycles"] = num_recycles
        return outputs
