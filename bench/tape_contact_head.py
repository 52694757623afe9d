"""Time and memory of the TAPE contact head: TAPE's pair features against the factorised form, in the same run.

TAPE's ``PairwiseContactPredictionHead`` builds [B, L, L, 2H] pair features ([h_i * h_j ; h_i - h_j]), applies a
linear layer and symmetrises. Without dropout the difference half cancels in the symmetrisation, so
``tape_tasks.heads.PairwiseContactPredictionHead`` computes the same logits as one batched product with O(L^2)
memory (see its docstring). This script runs both on the same random hidden states (interleaved, so a busy machine
slows both alike), checks they agree, and prints JSON with the median times, the ratio and the peak size of the
largest intermediate tensor. Run::

    python bench/tape_contact_head.py --length 300 --hidden 768 --reps 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tape_tasks.heads import PairwiseContactPredictionHead


def tape_pair_features(head: PairwiseContactPredictionHead, h: torch.Tensor) -> torch.Tensor:
    """TAPE's computation: full pair features -> linear -> symmetrise -> strip specials."""
    pairwise = torch.cat([h[:, :, None] * h[:, None, :], h[:, :, None] - h[:, None, :]], dim=-1)
    logits = head.predict[1](pairwise)
    return ((logits + logits.transpose(1, 2)) / 2)[:, 1:-1, 1:-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=300, help="tokens per protein (with <cls>/<sep>)")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    head = PairwiseContactPredictionHead(args.hidden).eval()
    h = torch.randn(args.batch, args.length, args.hidden)
    times = {"tape_pair_features": [], "factorised": []}
    with torch.no_grad():
        reference = tape_pair_features(head, h)
        (fast,) = head(h)
        max_abs_diff = float((reference - fast).abs().max())
        for _ in range(args.reps):
            for name, fn in (("tape_pair_features", lambda: tape_pair_features(head, h)),
                             ("factorised", lambda: head(h))):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    L, H, B = args.length, args.hidden, args.batch
    print(json.dumps({
        "benchmark": "tape_contact_head",
        "batch": B, "length": L, "hidden": H, "threads": args.threads, "reps": args.reps,
        "median_s": {k: round(v, 5) for k, v in median.items()},
        "speedup_factorised_over_tape": round(median["tape_pair_features"] / median["factorised"], 2),
        "largest_intermediate_mib": {"tape_pair_features": round(B * L * L * 2 * H * 4 / 2 ** 20, 1),
                                     "factorised": round(B * 2 * L * H * 4 / 2 ** 20 + B * L * L * 2 * 4 / 2 ** 20,
                                                         1)},
        "max_abs_diff": max_abs_diff,
    }, indent=2))


if __name__ == "__main__":
    main()
