"""PNG plots of a folding run: the loss terms over the steps (from ``metrics.jsonl``), each held-out chain's
lDDT-Calpha beside the ideal helix's, and, for one held-out chain, the predicted pLDDT along the chain beside the
true per-residue lDDT-Calpha of the prediction (how well the model knows where it is right)."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from megatron_protein.training.folding_logging import METRICS_FILENAME, read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(metrics_path: str, out_path: str) -> Optional[str]:
    """Training loss terms (left: total, right: each term) and held-out lDDT-Calpha over the steps."""
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("split") == "train" and r.get("loss") is not None]
    valid = [r for r in records if r.get("split") == "valid" and r.get("lddt_ca") is not None]
    if not train:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], color="black")
    axes[0].set(title="weighted total loss", xlabel="step")
    for key in ("fape", "fape_aux", "distogram", "masked_msa", "plddt"):
        if key in train[0]:
            axes[1].plot(steps, [r.get(key) for r in train], label=key)
    axes[1].set(title="loss terms (unweighted)", xlabel="step")
    axes[1].legend(fontsize=8)
    if valid:
        vs = [r["step"] for r in valid]
        axes[2].plot(vs, [r["lddt_ca"] for r in valid], "o-", label="model")
        for kind, style in (("helix", "--"), ("extended", ":")):
            if f"{kind}_lddt_ca" in valid[0]:
                axes[2].axhline(valid[0][f"{kind}_lddt_ca"], linestyle=style, color="grey", label=f"{kind} baseline")
        axes[2].legend(fontsize=8)
    axes[2].set(title="held-out mean lDDT-Ca", xlabel="step", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_plddt(prediction: dict, out_path: str) -> str:
    """pLDDT along one held-out chain and the true per-residue lDDT-Calpha x 100 of the same prediction."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.5))
    x = np.arange(1, len(prediction["plddt"]) + 1)
    ax.plot(x, prediction["plddt"], label="predicted pLDDT")
    ax.plot(x, 100 * np.nan_to_num(prediction["lddt_ca"]), label="true lDDT-Ca x 100", alpha=0.8)
    ax.set(xlabel="residue", ylabel="score", ylim=(0, 100),
           title=f"held-out chain {prediction['chain_id']}: pLDDT along the chain")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_heldout_vs_helix(final_summary: dict, out_path: str) -> Optional[str]:
    """Per held-out chain: the model's lDDT-Calpha against the ideal helix's of the same length (left, one point per
    chain, above the diagonal = better than the helix), and both along the chains sorted by length (right)."""
    chains = final_summary.get("chains") or []
    if not chains or "helix_lddt_ca" not in chains[0]:
        return None
    plt = _pyplot()
    model = np.array([c["lddt_ca"] for c in chains])
    helix = np.array([c["helix_lddt_ca"] for c in chains])
    strand = np.array([c.get("extended_lddt_ca", np.nan) for c in chains])
    lengths = np.array([c["length"] for c in chains])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    top = max(0.6, float(np.nanmax([model.max(), helix.max()])) + 0.05)
    axes[0].scatter(helix, model, s=18)
    axes[0].plot([0, top], [0, top], color="grey", linestyle="--", linewidth=1)
    axes[0].set(xlim=(0, top), ylim=(0, top), xlabel="ideal alpha-helix lDDT-Ca", ylabel="model lDDT-Ca",
                title=f"{int((model > helix).sum())} of {len(chains)} chains above the helix")
    order = np.argsort(lengths, kind="stable")
    x = np.arange(len(chains))
    axes[1].bar(x - 0.2, model[order], width=0.4, label=f"model (mean {model.mean():.3f})")
    axes[1].bar(x + 0.2, helix[order], width=0.4, label=f"ideal helix (mean {helix.mean():.3f})", alpha=0.7)
    axes[1].plot(x, strand[order], "k.", label=f"extended strand (mean {np.nanmean(strand):.3f})")
    axes[1].set_xticks(x, [str(v) for v in lengths[order]], rotation=90, fontsize=7)
    axes[1].set(xlabel="held-out chain (by length)", ylabel="lDDT-Ca", title="held-out chains, evaluated whole")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_run(model_dir: str, final_summary: dict) -> list[str]:
    """The plots into ``model_dir`` (``loss_curve.png``, ``heldout_lddt.png``, ``plddt_<chain>.png``); returns the
    paths written."""
    written = []
    path = plot_losses(os.path.join(model_dir, METRICS_FILENAME), os.path.join(model_dir, "loss_curve.png"))
    if path:
        written.append(path)
    path = plot_heldout_vs_helix(final_summary, os.path.join(model_dir, "heldout_lddt.png"))
    if path:
        written.append(path)
    for prediction in final_summary.get("predictions", [])[:1]:
        written.append(plot_plddt(prediction, os.path.join(model_dir, f"plddt_{prediction['chain_id']}.png")))
    return written
