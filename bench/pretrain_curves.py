#!/usr/bin/env python
"""Masked-position perplexity against tokens seen, next to the unigram line, from pretraining TensorBoard logs.

    python bench/pretrain_curves.py runs/pfam_tiny/tensorboard --label "default run" \\
        --out docs/images/pretrain_default.png

Reads the ``by_tokens/<split>/masked_perplexity`` scalars that pretraining writes at every evaluation (step = tokens
seen: iterations x global batch x sequence length) and the two unigram baselines of the same residues, for each
held-out split (held-out families ``valid``/``test``, held-out sequences of training families
``valid_infamily``/``test_infamily``), and draws one panel per kind of held-out set: the model's masked-position
perplexity as a curve, the unigram perplexity of the same residues (their own frequencies: the best context-free
model) as a dashed line, the training-frequency unigram dotted. Several logs (``LOGDIR[:LABEL]``) share the panels.
Writes the PNG and, beside it, a JSON of every point plotted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

PANELS = (("held-out families", ("valid", "test")),
          ("held-out sequences of training families", ("valid_infamily", "test_infamily")))


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a TensorBoard log directory: tag -> [(step, value)] in step order (last write wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not os.path.isdir(logdir):
        raise SystemExit(f"pretrain_curves: {logdir} is not a directory (expected a TensorBoard log directory)")
    accumulator = EventAccumulator(logdir, size_guidance={"scalars": 0})
    accumulator.Reload()
    out = {}
    for tag in accumulator.Tags().get("scalars", []):
        points = {}
        for event in accumulator.Scalars(tag):
            points[int(event.step)] = float(event.value)
        out[tag] = sorted(points.items())
    return out


def curves(scalars: dict) -> dict:
    """Per panel and split: masked-position perplexity and both unigram baselines against tokens seen."""
    result = {}
    for title, splits in PANELS:
        for split in splits:
            tag = f"by_tokens/{split}/masked_perplexity"
            if tag not in scalars:
                continue
            result.setdefault(title, {})[split] = {
                key: scalars.get(f"by_tokens/{split}/{key}", [])
                for key in ("masked_perplexity", "masked_unigram_own_perplexity", "masked_unigram_train_perplexity")}
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logdirs", nargs="+", help="TensorBoard directories, each optionally LOGDIR:LABEL")
    parser.add_argument("--out", required=True, help="PNG to write (a .json with the points goes beside it)")
    parser.add_argument("--title", default="Masked-position perplexity against tokens seen")
    args = parser.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for item in args.logdirs:
        logdir, _, label = item.partition(":")
        runs.append((label or os.path.basename(os.path.dirname(os.path.abspath(logdir))), curves(read_scalars(logdir))))
    if not any(run for _, run in runs):
        raise SystemExit("pretrain_curves: no by_tokens/*/masked_perplexity scalars in " + ", ".join(args.logdirs))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(6.2 * len(PANELS), 4.4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, _) in zip(axes[0], PANELS):
        for number, (label, run) in enumerate(runs):
            colour = colours[number % len(colours)]
            for split, series in run.get(title, {}).items():
                points = series["masked_perplexity"]
                if not points:
                    continue
                x = [p[0] / 1e6 for p in points]
                marker = "o" if split.startswith("valid") else "s"
                ax.plot(x, [p[1] for p in points], marker=marker, markersize=3, color=colour,
                        label=f"{label}: model ({split})")
                own = series["masked_unigram_own_perplexity"]
                if len(own) > 1:
                    ax.plot([p[0] / 1e6 for p in own], [p[1] for p in own], linestyle="--", color=colour,
                            alpha=0.7, label=f"{label}: unigram, own frequencies ({split})")
                elif own:  # a test split is scored once, at the end: its unigram as a marker beside the model's
                    ax.plot([p[0] / 1e6 for p in own], [p[1] for p in own], marker="_", markersize=14,
                            linestyle="none", color=colour, label=f"{label}: unigram, own frequencies ({split})")
                train = series["masked_unigram_train_perplexity"]
                if len(train) > 1:
                    ax.plot([p[0] / 1e6 for p in train], [p[1] for p in train], linestyle=":", color=colour,
                            alpha=0.7, label=f"{label}: unigram, training frequencies ({split})")
        ax.set_title(title)
        ax.set_xlabel("tokens seen (millions: iterations x global batch x sequence length)")
        ax.set_ylabel("perplexity at <mask> positions")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5)
    fig.suptitle(args.title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = f"{args.out}.tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, args.out)
    points = {label: run for label, run in runs}
    json_path = os.path.splitext(args.out)[0] + ".json"
    with open(f"{json_path}.tmp", "w") as f:
        json.dump({"logdirs": args.logdirs, "curves": points}, f, indent=1)
    os.replace(f"{json_path}.tmp", json_path)
    print(f"wrote {args.out} and {json_path}")
    return points


if __name__ == "__main__":
    sys.exit(main() and 0)
