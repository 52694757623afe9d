"""Rebuild data/structures/chains_sample.npz from ../shared/data/structures/chains.npz (see PROVENANCE.md).

    python data/structures/make_sample.py /work/shared/data/structures/chains.npz data/structures/chains_sample.npz

Selection: chains of length MIN_LENGTH..MAX_LENGTH (inclusive); N_CHAINS of them drawn with
random.Random(SEED).sample over the eligible source indices in source order; the drawn chains are kept in the order
drawn, and the first N_TRAIN form the training split, the rest the validation split. Every source chain is the sole
member of its 40% identity cluster (cd-hit), so a random split of chains is a split by cluster.

The output has the source's keys, dtypes and layout (per-chain arrays plus per-residue arrays concatenated over
chains with `offsets`), strings narrowed to the longest value, plus `split` (str per chain: "train" / "valid").
Written with numpy.savez_compressed to a temporary name, then renamed; no pickled objects.
"""
import hashlib
import os
import random
import sys

import numpy as np

SEED, N_CHAINS, N_TRAIN, MIN_LENGTH, MAX_LENGTH = 20261201, 400, 360, 40, 256
PER_CHAIN = ("ids", "sequence", "dssp8", "start_resnum", "lengths")
PER_RESIDUE = ("coords", "profile")
ORDERS = ("atom_names", "profile_alphabet")


def select(lengths):
    """Source indices of the sample, in the order drawn (the first N_TRAIN are the training split)."""
    eligible = [i for i, n in enumerate(lengths.tolist()) if MIN_LENGTH <= n <= MAX_LENGTH]
    return eligible, random.Random(SEED).sample(eligible, N_CHAINS)


def narrow(strings):
    return strings.astype(f"<U{max(1, max(len(s) for s in strings.tolist()))}")


def main(source, target):
    src = np.load(source, allow_pickle=False)
    missing = [k for k in PER_CHAIN + PER_RESIDUE + ORDERS + ("offsets",) if k not in src.files]
    if missing:
        sys.exit(f"error: {source}: expected the keys of chains.npz, missing {missing}")
    eligible, picked = select(src["lengths"])
    offsets = src["offsets"]
    out = {}
    for key in PER_CHAIN:
        values = src[key][picked]
        out[key] = narrow(values) if values.dtype.kind == "U" else values
    lengths = out["lengths"].astype(np.int64)
    out["offsets"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in picked])
    for key in PER_RESIDUE:
        out[key] = src[key][rows]
    for key in ORDERS:
        out[key] = src[key]
    out["split"] = np.array(["train"] * N_TRAIN + ["valid"] * (N_CHAINS - N_TRAIN))
    # Consistency of what was cut out: every chain's sequence length equals its residue rows.
    assert all(len(s) == n for s, n in zip(out["sequence"].tolist(), lengths.tolist()))
    assert out["offsets"][-1] == len(out["coords"]) == len(out["profile"])

    tmp = f"{target}.tmp.{os.getpid()}.npz"
    try:
        np.savez_compressed(tmp, **out)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    digest = hashlib.sha256(open(target, "rb").read()).hexdigest()
    n_train = int(N_TRAIN)
    print(
        f"{N_CHAINS} chains ({n_train} train / {N_CHAINS - n_train} valid) of {len(eligible)} with length "
        f"{MIN_LENGTH}-{MAX_LENGTH}; {int(lengths.sum())} residues; length {int(lengths.min())}-"
        f"{int(lengths.max())}, median {float(np.median(lengths)):g}; {os.path.getsize(target)} bytes; "
        f"sha256 {digest}"
    )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
