"""Evaluation of a folding model on held-out chains, beside trivial baselines of the same length.

Each held-out chain is predicted whole (no crop) with ``max_recycling_iters`` recycles and scored on C-alpha by the
project's metrics (:mod:`megatron_protein.structure.metrics`): lDDT-Calpha (superposition-free, 15 A inclusion
radius) and TM-score (normalised by the chain's length). The same two numbers are computed for an ideal
alpha-helix and an extended strand of the same sequence length (:mod:`megatron_protein.models.folding.baselines`), so
"the model learnt to fold" has a concrete meaning: its means over the chains are above both baselines'. Because
40 chains are few, :func:`compare_with_baseline` also counts the chains on which the model is above a baseline and
gives the one-sided Wilcoxon signed-rank p-value of the paired per-chain scores (scipy), so a mean that is above the
helix by chance on a few chains is not read as a model that folds.
"""
from __future__ import annotations

import time
import warnings
from typing import Optional

import numpy as np
import torch

from megatron_protein.data.folding_dataset import FoldingDataset, collate_features
from megatron_protein.models.folding.baselines import CONFORMATIONS, baseline_structure
from megatron_protein.structure import metrics
from megatron_protein.structure import residue_constants as rc

CA = rc.atom_order["CA"]

_BASELINE_CACHE: dict[tuple, dict] = {}


#: Sequence separation that splits lDDT-Calpha into its local (``|i - j| < 12``) and non-local parts.
NONLOCAL_SEPARATION = 12


def shape_scores(pred_ca: np.ndarray, true_ca: np.ndarray, ca_mask: np.ndarray) -> dict:
    """What the standard scores hide: lDDT-Calpha over local pairs (``lddt_ca_local``, ``|i - j| < 12``) and over
    non-local pairs (``lddt_ca_nonlocal``, ``|i - j| >= 12``), and the radius of gyration of the prediction over
    the reference's (``rg_ratio``: below 1 = collapsed, above 1 = too extended)."""
    true_rg = metrics.radius_of_gyration(true_ca, ca_mask)
    return {"lddt_ca_local": float(metrics.lddt_ca(pred_ca, true_ca, ca_mask,
                                                   max_separation=NONLOCAL_SEPARATION - 1)),
            "lddt_ca_nonlocal": float(metrics.lddt_ca(pred_ca, true_ca, ca_mask,
                                                      min_separation=NONLOCAL_SEPARATION)),
            "rg_ratio": metrics.radius_of_gyration(pred_ca, ca_mask) / true_rg}


def baseline_scores(aatype: np.ndarray, true_ca: np.ndarray, ca_mask: np.ndarray, key: tuple) -> dict:
    """lDDT-Calpha, TM-score and the shape scores of each baseline against one chain (cached: they never
    change)."""
    if key not in _BASELINE_CACHE:
        out = {}
        for kind in CONFORMATIONS:
            positions, _ = baseline_structure(aatype, kind)
            out[f"{kind}_lddt_ca"] = float(metrics.lddt_ca(positions[:, CA], true_ca, ca_mask))
            out[f"{kind}_tm_score"] = float(metrics.tm_score(positions[:, CA], true_ca, ca_mask,
                                                             reference_length=len(aatype)))
            out.update({f"{kind}_{k}": v for k, v in shape_scores(positions[:, CA], true_ca, ca_mask).items()})
        _BASELINE_CACHE[key] = out
    return _BASELINE_CACHE[key]


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: FoldingDataset, device: torch.device, num_recycles: int,
             chunk_size: Optional[int] = None, max_chains: Optional[int] = None, use_profile: bool = True,
             autocast_dtype: Optional[torch.dtype] = None, keep_predictions: int = 0) -> dict:
    """Predict and score the chains of ``dataset`` (the first ``max_chains``). Returns means over chains
    (``lddt_ca``, ``tm_score``, ``plddt``, and each baseline's ``<kind>_lddt_ca`` / ``<kind>_tm_score``),
    ``chains`` (per-chain records) and ``predictions`` (the first ``keep_predictions`` chains' CA coordinates,
    per-residue pLDDT and lDDT-Calpha, for plots)."""
    was_training = model.training
    model.eval()
    n = len(dataset) if max_chains is None else min(max_chains, len(dataset))
    chains, predictions = [], []
    started = time.monotonic()
    for i in range(n):
        example = dataset.eval_example(i, use_profile=use_profile)
        batch = {k: v.to(device) for k, v in collate_features([example]).items()}
        with torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            out = model(batch, num_recycles=num_recycles, chunk_size=chunk_size)
        pred_ca = out["positions"][0, :, CA].float().cpu().numpy()
        true_ca = example["all_atom_positions"][:, CA]
        ca_mask = example["all_atom_mask"][:, CA] > 0
        record = {"chain_id": dataset.chain_id(i), "length": int(len(example["aatype"])),
                  "lddt_ca": float(metrics.lddt_ca(pred_ca, true_ca, ca_mask)),
                  "tm_score": float(metrics.tm_score(pred_ca, true_ca, ca_mask,
                                                     reference_length=len(example["aatype"]))),
                  "plddt": float(out["plddt"][0].float().mean())}
        record.update(shape_scores(pred_ca, true_ca, ca_mask))
        record.update(baseline_scores(example["aatype"], true_ca, ca_mask,
                                      (dataset.chain_id(i), record["length"])))
        chains.append(record)
        if i < keep_predictions:
            predictions.append({"chain_id": record["chain_id"], "pred_ca": pred_ca, "true_ca": true_ca,
                                "plddt": out["plddt"][0].float().cpu().numpy(),
                                "lddt_ca": metrics.lddt_ca(pred_ca, true_ca, ca_mask, per_residue=True)})
    if was_training:
        model.train()
    keys = [k for k in chains[0] if k not in ("chain_id", "length")] if chains else []
    # nanmean: a chain with no scored pair in a band (a lone helix has no non-local pair under 15 A) has NaN there
    # and is left out of that band's mean; the standard scores are never NaN for a chain with a CA.
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        summary = {k: float(np.nanmean([c[k] for c in chains])) for k in keys}
    summary.update({"num_chains": n, "use_profile": use_profile, "seconds": time.monotonic() - started,
                    "chains": chains, "predictions": predictions})
    return summary


def compare_with_baseline(summary: dict, kind: str = "helix") -> dict:
    """Per-chain paired comparison of the model with one baseline, for lDDT-Calpha and TM-score: the number of
    chains on which the model scores higher (``chains_above_<kind>_<metric>``) and the one-sided Wilcoxon
    signed-rank p-value for "the model's scores are higher" (``wilcoxon_p_above_<kind>_<metric>``; 1.0 when every
    difference is zero)."""
    from scipy.stats import wilcoxon

    out = {"num_chains": len(summary["chains"])}
    for metric in ("lddt_ca", "tm_score"):
        model = np.array([c[metric] for c in summary["chains"]], dtype=np.float64)
        base = np.array([c[f"{kind}_{metric}"] for c in summary["chains"]], dtype=np.float64)
        out[f"chains_above_{kind}_{metric}"] = int((model > base).sum())
        diff = model - base
        out[f"wilcoxon_p_above_{kind}_{metric}"] = (float(wilcoxon(model, base, alternative="greater").pvalue)
                                                   if np.any(diff != 0) else 1.0)
    return out


def format_summary(models: list[tuple[str, dict]]) -> str:
    """A small table: each ``(name, summary)`` model row, then the baselines (of the first summary's chains):
    means over the chains of lDDT-Calpha, TM-score, the local and non-local parts of lDDT-Calpha and the radius of
    gyration over the true one; then each model's paired comparison with the helix."""
    keys = ("lddt_ca", "tm_score", "lddt_ca_local", "lddt_ca_nonlocal", "rg_ratio")
    rows = [(name, [summary.get(k, float("nan")) for k in keys]) for name, summary in models]
    names = {"helix": "ideal alpha-helix, same length", "extended": "extended strand, same length"}
    first = models[0][1]
    for kind in CONFORMATIONS:
        rows.append((names.get(kind, kind), [first.get(f"{kind}_{k}", float("nan")) for k in keys]))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  lDDT-Ca  TM-score  lDDT-Ca |i-j|<12  lDDT-Ca |i-j|>=12  Rg / true Rg"]
    lines += [f"{name:<{width}}  {v[0]:7.3f}  {v[1]:8.3f}  {v[2]:16.3f}  {v[3]:17.3f}  {v[4]:12.2f}"
              for name, v in rows]
    for name, summary in models:
        if summary.get("chains"):
            c = compare_with_baseline(summary, "helix")
            lines.append(f"{name}: above the helix on {c['chains_above_helix_lddt_ca']} of {c['num_chains']} chains "
                         f"by lDDT-Ca (one-sided Wilcoxon p = {c['wilcoxon_p_above_helix_lddt_ca']:.2g}), "
                         f"{c['chains_above_helix_tm_score']} by TM-score (p = {c['wilcoxon_p_above_helix_tm_score']:.2g})")
    return "\n".join(lines)
