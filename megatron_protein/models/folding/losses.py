"""Training losses of the AlphaFold2 model (supplement 1.9, Eq. 7), backbone part.

    loss = 0.5 FAPE_final + 0.5 FAPE_aux + 0.3 distogram + 2.0 masked_MSA + 0.01 pLDDT

- :func:`fape`: Algorithm 28 (``computeFAPE``): every predicted and true position is expressed in every predicted and
  true local frame, the distance between the two is clamped at 10 A and divided by the length scale 10 A. Here the
  frames are the backbone frames and the positions their origins (CA), i.e. backbone FAPE (1.9.2). ``FAPE_final``
  is the final layer's, ``FAPE_aux`` the mean over the structure-module layers (L_aux of 1.9.1 without its torsion
  term). Clamping is used in ``fape_clamp_fraction`` (90%) of training steps and not in the rest (1.11.5).
- :func:`distogram_loss`: 1.9.8: cross-entropy of the 64-bin distogram against the binned true pseudo-beta
  distances, averaged over pairs of resolved residues.
- :func:`masked_msa_loss`: 1.9.9: cross-entropy of the masked-MSA head at the positions that were masked (the
  ``bert_mask``) against ``true_msa``.
- :func:`plddt_loss`: 1.9.6: cross-entropy of the pLDDT head's 50 bins against the per-residue lDDT-Calpha of the
  final prediction (not back-propagated through the structure), averaged over resolved residues.

Not built yet (docs/folding.md): side-chain FAPE, torsion-angle losses, structural violations, experimentally
resolved and TM-score heads. Everything here is float32 whatever the autocast context.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_protein.models.folding.config import FoldingConfig
from megatron_protein.models.folding.heads import distogram_breaks
from megatron_protein.structure import metrics
from megatron_protein.structure import residue_constants as rc
from megatron_protein.structure.rigid import Rigid


def fape(pred_frames: Rigid, true_frames: Rigid, frames_mask: torch.Tensor, pred_positions: torch.Tensor,
         true_positions: torch.Tensor, positions_mask: torch.Tensor, length_scale: float,
         clamp: Optional[float], eps: float = 1e-4) -> torch.Tensor:
    """Algorithm 28: frame-aligned point error, ``[*]`` (one value per batch element).

    ``pred_frames``/``true_frames`` of batch shape ``[*, F]``, ``frames_mask [*, F]``, positions ``[*, P, 3]``,
    ``positions_mask [*, P]``. ``clamp=None`` is unclamped FAPE. ``eps`` (A^2) keeps the square root's gradient
    finite at zero error (AF2's 1e-4).
    """
    local_pred = pred_frames[..., None].invert_apply(pred_positions[..., None, :, :])    # [*, F, P, 3]
    local_true = true_frames[..., None].invert_apply(true_positions[..., None, :, :])
    error = torch.sqrt(((local_pred - local_true) ** 2).sum(-1) + eps)
    if clamp is not None:
        error = torch.clamp(error, max=clamp)
    weight = frames_mask[..., :, None] * positions_mask[..., None, :]
    return (error * weight).sum((-1, -2)) / (length_scale * (weight.sum((-1, -2)) + 1e-8))


def backbone_fape(pred_frames_4x4: torch.Tensor, true_frames_4x4: torch.Tensor, mask: torch.Tensor,
                  length_scale: float, clamp: Optional[float]) -> torch.Tensor:
    """Backbone FAPE (1.9.2) of predicted frames ``[..., *, R, 4, 4]`` (leading layer dims allowed) against the
    true ``backbone_rigid_tensor [*, R, 4, 4]``; positions are the frame origins (CA). Returns ``[..., *]``."""
    pred = Rigid.from_tensor_4x4(pred_frames_4x4)
    true = Rigid.from_tensor_4x4(true_frames_4x4.float())
    return fape(pred, true, mask, pred.trans, true.trans, mask, length_scale, clamp)


def distogram_loss(logits: torch.Tensor, pseudo_beta: torch.Tensor, pseudo_beta_mask: torch.Tensor,
                   first_break: float, last_break: float) -> torch.Tensor:
    """1.9.8: ``logits [*, R, R, B]``, ``pseudo_beta [*, R, 3]``, mask ``[*, R]`` -> ``[*]``."""
    num_bins = logits.shape[-1]
    breaks = distogram_breaks(first_break, last_break, num_bins).to(logits.device) ** 2
    x = pseudo_beta.float()
    d2 = ((x[..., :, None, :] - x[..., None, :, :]) ** 2).sum(-1, keepdim=True)
    true_bins = (d2 > breaks).sum(-1)                                         # [*, R, R] in 0..B-1
    errors = torch.nn.functional.cross_entropy(logits.float().flatten(0, -2), true_bins.flatten(),
                                               reduction="none").view(true_bins.shape)
    pair_mask = pseudo_beta_mask[..., :, None] * pseudo_beta_mask[..., None, :]
    return (errors * pair_mask).sum((-1, -2)) / (pair_mask.sum((-1, -2)) + 1e-6)


def masked_msa_loss(logits: torch.Tensor, true_msa: torch.Tensor, bert_mask: torch.Tensor) -> torch.Tensor:
    """1.9.9: ``logits [*, S, R, 23]``, ``true_msa [*, S, R]``, ``bert_mask [*, S, R]`` -> ``[*]``."""
    errors = torch.nn.functional.cross_entropy(logits.float().flatten(0, -2), true_msa.long().flatten(),
                                               reduction="none").view(true_msa.shape)
    return (errors * bert_mask).sum((-1, -2)) / (bert_mask.sum((-1, -2)) + 1e-8)


def plddt_loss(logits: torch.Tensor, pred_ca: torch.Tensor, true_ca: torch.Tensor, ca_mask: torch.Tensor,
               cutoff: float) -> torch.Tensor:
    """1.9.6: ``logits [*, R, B]``, CA positions ``[*, R, 3]``, ``ca_mask [*, R]`` -> ``[*]``.

    The target is the per-residue lDDT-Calpha of the (detached) prediction, binned into B equal bins of [0, 1]."""
    num_bins = logits.shape[-1]
    with torch.no_grad():
        score = metrics.lddt_ca_torch(pred_ca.detach().float(), true_ca.float(), ca_mask, per_residue=True,
                                      cutoff=cutoff)
        target = torch.clamp((score * num_bins).long(), 0, num_bins - 1)
    errors = torch.nn.functional.cross_entropy(logits.float().flatten(0, -2), target.flatten(),
                                               reduction="none").view(target.shape)
    return (errors * ca_mask).sum(-1) / (ca_mask.sum(-1) + 1e-8)


def aux_loss_factor(config: FoldingConfig, step: Optional[int]) -> float:
    """Factor on the distogram and masked-MSA weights at training step ``step`` (0-based; None: 1), see
    ``LossConfig.aux_warmup_start`` / ``aux_warmup_steps``."""
    lc = config.loss
    if step is None or step >= lc.aux_warmup_start + lc.aux_warmup_steps:
        return 1.0
    if step < lc.aux_warmup_start:
        return 0.0
    return (step - lc.aux_warmup_start + 1) / (lc.aux_warmup_steps + 1)


def alphafold_loss(outputs: dict, batch: dict, config: FoldingConfig, use_clamped_fape: bool = True,
                   step: Optional[int] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eq. 7 of the supplement (backbone part): returns ``(loss, terms)``; ``terms`` holds each unweighted term's
    batch mean (``fape``, ``fape_aux``, ``distogram``, ``masked_msa``, ``plddt``) and ``loss``, all detached.

    ``use_clamped_fape`` chooses clamped (True) or unclamped FAPE for this step (the trainer draws it with
    probability ``loss.fape_clamp_fraction`` from the step's seed); ``step`` applies the auxiliary-loss warm-up
    (:func:`aux_loss_factor`)."""
    lc, hc = config.loss, config.model.heads
    with torch.autocast(device_type=outputs["frames"].device.type, enabled=False):
        frames = outputs["frames"]                                            # [L, B, R, 4, 4]
        frame_mask = batch["backbone_rigid_mask"].float()
        clamp = lc.fape_clamp if use_clamped_fape else None
        per_layer = backbone_fape(frames, batch["backbone_rigid_tensor"], frame_mask, lc.fape_length_scale, clamp)
        fape_final = per_layer[-1]
        fape_aux = per_layer.mean(0)
        dist = distogram_loss(outputs["distogram_logits"], batch["pseudo_beta"], batch["pseudo_beta_mask"].float(),
                              hc.distogram_first_break, hc.distogram_last_break)
        msa = masked_msa_loss(outputs["masked_msa_logits"], batch["true_msa"], batch["bert_mask"].float())
        ca = rc.atom_order["CA"]
        plddt = plddt_loss(outputs["plddt_logits"], outputs["positions"][..., ca, :],
                           batch["all_atom_positions"][..., ca, :], batch["all_atom_mask"][..., ca].float(),
                           lc.plddt_cutoff)
        terms = {"fape": fape_final, "fape_aux": fape_aux, "distogram": dist, "masked_msa": msa, "plddt": plddt}
        aux = aux_loss_factor(config, step)
        weights = {"fape": lc.fape_weight, "fape_aux": lc.aux_weight, "distogram": aux * lc.distogram_weight,
                   "masked_msa": aux * lc.masked_msa_weight, "plddt": lc.plddt_weight}
        loss = sum(weights[k] * terms[k] for k in terms).mean()
    report = {k: v.detach().mean() for k, v in terms.items()}
    report["loss"] = loss.detach()
    return loss, report
