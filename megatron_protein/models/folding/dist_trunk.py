"""The embeddings + Evoformer trunk of AlphaFold2 (supplement Algorithm 2 lines 5-17), on one process or split over
the ``dap`` and ``bp`` axes: HelixFold's ``DistEmbeddingsAndEvoformer``, AlphaFold's ``EmbeddingsAndEvoformer``.

    m, z    = InputEmbedder(target_feat, residue_index, msa_feat)       Algorithms 3-5
    m_1, z += RecyclingEmbedder(m_prev_1, z_prev, x_prev)                 Algorithm 32
    z       = ExtraMSAStack(ExtraMSAEmbedder(extra_msa_feat), z)          Algorithms 18-19
    m, z, s = EvoformerStack(m, z)                                        Algorithm 6, s = Linear(m_1)

This one class is the trunk of :class:`~megatron_protein.models.folding.model.AlphaFold` at every degree: at dap =
bp = 1 every hook is the identity and it is the plain single-process computation (there is no separate
"distributed" copy of the model). With dap = n (``parallel/dap.py``):

* the embedders run whole on every rank (their parameters are replicated and get the whole gradient);
* ``N_seq``, ``N_extra`` and ``N_res`` are padded up to multiples of n when they do not divide (and only then), the
  masks padded with zeros, so attention, the outer product mean and triangle multiplication ignore the padding;
* each stack scatters the MSA along sequences and the pair along its first residue axis, runs its blocks (FastFold's
  layout switches are in the blocks), and gathers; the extra-MSA stack gathers only the pair;
* the padding is sliced off the outputs, so ``m``, ``z``, ``s`` have the input's sizes and the structure module, the
  heads and the losses run whole (and identically) on every rank.

With bp = 2 (``parallel/bp.py``) the blocks of a stack built with ``outer_product_mean_position='end'`` (the
Parallel Evoformer) run their MSA branch on bp rank 0 and their pair branch on bp rank 1.

Parameter groups (:func:`parameter_groups`): a parameter is tagged by where it runs, which the trunk knows because
it is the one that splits the activations: the parameters of every block of a stack (they run between the entry
scatter and the exit gather, on split activations) are ``{'dap': True}``; those of a stack whose blocks run through
``bp.run_branches`` (``outer_product_mean_position='end'``) are ``{'dap': True, 'bp': True}``; everything else (the
embedders, each stack's output projection ``s = Linear(m_1)``, which runs after the gather, the structure module
and the heads) is untagged and synced over dp only. No name is matched; in particular the pair transition of an
Evoformer block, which runs in the pair branch, is ``{'dap', 'bp'}`` (HelixFold's name test puts it in ``{'dap'}``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatron_protein.kernels import FusionConfig
from megatron_protein.models.folding.config import ModelConfig
from megatron_protein.models.folding.embedders import (ExtraMSAEmbedder, InputEmbedder, ProfileEmbedder,
                                                       RecyclingEmbedder, extra_msa_features)
from megatron_protein.models.folding.evoformer import EvoformerConfig, EvoformerStack, ExtraMSAStack
from megatron_protein.parallel import bp, dap, scg

__all__ = ["DistEmbeddingsAndEvoformer", "evoformer_config", "parameter_groups", "GROUP_TAGS"]

#: The tags of the three parameter groups, in the order :func:`parameter_groups` returns them.
GROUP_TAGS = ({"dap": True, "bp": True}, {"dap": True}, {})


def evoformer_config(model: ModelConfig, extra: bool) -> EvoformerConfig:
    """The Evoformer module config of the main (``extra=False``) or extra-MSA stack from the run config."""
    section = model.extra_msa if extra else model.evoformer
    fusion = FusionConfig() if model.fused_kernels else FusionConfig.unfused()
    return EvoformerConfig(c_m=model.c_e if extra else model.c_m, c_z=model.c_z, c_s=model.c_s, fusion=fusion,
                           global_column_attention=extra, **dataclasses.asdict(section))


class DistEmbeddingsAndEvoformer(torch.nn.Module):
    """``forward(batch, prev, chunk_size=None) -> (m [*, S, R, c_m], z [*, R, R, c_z], s [*, R, c_s])``.

    ``batch`` is the batched feature dict (``target_feat``, ``residue_index``, ``msa_feat``, ``msa_mask``,
    ``seq_mask`` and, with an extra-MSA stack, ``extra_msa``, ``extra_has_deletion``, ``extra_deletion_value``,
    ``extra_msa_mask``); ``prev = (m_prev_1 [*, R, c_m], z_prev, x_prev [*, R, 3])`` is the last recycling
    iteration's output (zeros at the first). The groups are read from ``groups`` or ``scg.current()`` at every
    call, so the trunk may be built before ``scg.init_process_group``.
    """

    def __init__(self, model: ModelConfig, groups: Optional[scg.ParallelGroups] = None):
        super().__init__()
        self._groups = groups
        fused = model.fused_kernels
        self.input_embedder = InputEmbedder(model.target_feat_dim, model.msa_feat_dim, model.c_m, model.c_z,
                                            model.relpos_k)
        self.recycling_embedder = RecyclingEmbedder(model.c_m, model.c_z, model.recycle_min_bin,
                                                    model.recycle_max_bin, model.recycle_num_bins, fused=fused)
        # Optional (model.use_profile, not AF2): the chain's profile added to the query row, replicated like the
        # other embedders.
        self.profile_embedder = ProfileEmbedder(model.c_m) if model.use_profile else None
        self.use_extra_msa = model.extra_msa.num_blocks > 0
        if self.use_extra_msa:
            self.extra_msa_embedder = ExtraMSAEmbedder(model.extra_msa_feat_dim, model.c_e)
            self.extra_msa_stack = ExtraMSAStack(evoformer_config(model, extra=True))
        self.evoformer = EvoformerStack(evoformer_config(model, extra=False))

    # ------------------------------------------------------------------------------------------ parallel layout
    @property
    def groups(self) -> scg.ParallelGroups:
        return self._groups if self._groups is not None else scg.current()

    def stacks(self) -> list[torch.nn.Module]:
        """The stacks whose blocks run on split activations (extra-MSA first, in execution order)."""
        return ([self.extra_msa_stack] if self.use_extra_msa else []) + [self.evoformer]

    @staticmethod
    def _branched(stack: torch.nn.Module) -> bool:
        return getattr(stack.config, "outer_product_mean_position", None) == "end"

    def check_parallel(self, groups: Optional[scg.ParallelGroups] = None) -> None:
        """Raise before any collective, on every rank alike, if this trunk cannot run at the groups' degrees:
        blocks that do not call the hooks (``dap.DAPHookError``), or bp > 1 without the Parallel Evoformer."""
        pg = groups if groups is not None else self.groups
        n_dap, n_bp = dap.get_world_size(pg), bp.get_world_size(pg)
        if n_dap == 1 and n_bp == 1:
            return
        for name, stack in (("extra-MSA stack", getattr(self, "extra_msa_stack", None)),
                            ("Evoformer stack", self.evoformer)):
            if stack is not None:
                dap.require_hooks(list(stack.blocks), f"DistEmbeddingsAndEvoformer {name} at dap={n_dap}, bp={n_bp}")
        if n_bp > 1 and not self._branched(self.evoformer):
            raise scg.ParallelConfigError(
                f"bp={n_bp} needs the Parallel Evoformer (outer product mean at the end of the block, so its MSA and "
                f"pair branches are independent): set model.evoformer.outer_product_mean_position=end (the "
                f"extra-MSA stack may keep 'middle'; it then runs whole on both bp ranks); this model has "
                f"{self.evoformer.config.outer_product_mean_position!r}")

    def parallel_tags(self) -> dict[int, dict]:
        """``id(parameter) -> tags`` for the parameters that run on split activations (see the module docstring)."""
        tags: dict[int, dict] = {}
        for stack in self.stacks():
            tag = GROUP_TAGS[0] if self._branched(stack) else GROUP_TAGS[1]
            for block in stack.blocks:
                for p in block.parameters():
                    tags[id(p)] = dict(tag)
        return tags

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, batch: dict, prev: tuple, chunk_size: Optional[int] = None):
        self.check_parallel()
        seq_mask = batch["seq_mask"].to(batch["target_feat"].dtype)
        pair_mask = seq_mask[..., :, None] * seq_mask[..., None, :]
        msa_mask = batch["msa_mask"].to(seq_mask.dtype)
        m, z = self.input_embedder(batch["target_feat"], batch["residue_index"], batch["msa_feat"])
        m_prev, z_prev, x_prev = prev
        m_update, z_update = self.recycling_embedder(m_prev.to(m.dtype), z_prev.to(z.dtype), x_prev)
        if self.profile_embedder is not None:
            m_update = m_update + self.profile_embedder(batch["profile"].to(m.dtype),
                                                        batch["profile_mask"].to(m.dtype))
        m = torch.cat([m[..., :1, :, :] + m_update[..., None, :, :], m[..., 1:, :, :]], dim=-3)
        z = z + z_update

        num_seq, num_res = m.shape[-3], m.shape[-2]
        pg = self.groups
        res_p = dap.padded_size(num_res, pg)
        z = dap.pad(z, {-3: res_p, -2: res_p})
        pair_mask = dap.pad(pair_mask, {-2: res_p, -1: res_p})
        if self.use_extra_msa:
            feat = extra_msa_features(batch["extra_msa"], batch["extra_has_deletion"],
                                      batch["extra_deletion_value"])
            a = self.extra_msa_embedder(feat.to(m.dtype))
            extra_p = dap.padded_size(a.shape[-3], pg)
            a = dap.pad(a, {-3: extra_p, -2: res_p})
            extra_mask = dap.pad(batch["extra_msa_mask"].to(m.dtype), {-2: extra_p, -1: res_p})
            z = self.extra_msa_stack(a, z, extra_mask, pair_mask, chunk_size)
        seq_p = dap.padded_size(num_seq, pg)
        m = dap.pad(m, {-3: seq_p, -2: res_p})
        msa_mask = dap.pad(msa_mask, {-2: seq_p, -1: res_p})
        m, z, s = self.evoformer(m, z, msa_mask, pair_mask, chunk_size)
        if seq_p != num_seq or res_p != num_res:
            m = m[..., :num_seq, :num_res, :]
            z = z[..., :num_res, :num_res, :]
            s = s[..., :num_res, :]
        return m, z, s


def parameter_groups(model: torch.nn.Module, **options) -> list[dict]:
    """Optimizer parameter groups of a model holding :class:`DistEmbeddingsAndEvoformer` trunk(s), tagged by where
    each parameter runs: ``[{'params', 'dap': True, 'bp': True}, {'params', 'dap': True}, {'params'}]`` (groups
    left empty are dropped). Every trainable parameter is in exactly one group; ``options`` (lr, weight_decay, ...)
    are copied into every group. ``bp.grad_sync``, ``dap.grad_sync`` and ``dp.grad_sync`` read the tags."""
    tags: dict[int, dict] = {}
    for module in model.modules():
        if isinstance(module, DistEmbeddingsAndEvoformer):
            tags.update(module.parallel_tags())
    members: list[list] = [[], [], []]
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        tag = tags.get(id(p), {})
        members[GROUP_TAGS.index(tag)].append(p)
    names = ("dap_bp", "dap", "replicated")
    return [{"params": params, "group": label, **tag, **options}
            for params, tag, label in zip(members, GROUP_TAGS, names) if params]
