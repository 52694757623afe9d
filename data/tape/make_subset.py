"""Rebuild the small TAPE-format data set of data/tape/ from ../shared/data (see PROVENANCE.md).

    python data/tape/make_subset.py --source /work/shared/data --out data/tape

Each task split keeps the first N records of the corresponding shared file (those files are already random
splits), unchanged. The Pfam masked-LM splits are drawn from pfam/pfam_domains.fasta: whole families are held out
for ``pfam_holdout`` (as TAPE holds out families), the rest is sampled into train and valid.
"""
from __future__ import annotations

import argparse
import json
import os
import random

#: (folder, file stem, split, number of records kept)
SUBSETS = [
    ("secondary_structure", "secondary_structure", "train", 300),
    ("secondary_structure", "secondary_structure", "valid", 100),
    ("secondary_structure", "secondary_structure", "test", 100),
    ("proteinnet", "proteinnet", "train", 100),
    ("proteinnet", "proteinnet", "valid", 40),
    ("proteinnet", "proteinnet", "test", 40),
    ("remote_homology", "remote_homology", "train", 400),
    ("remote_homology", "remote_homology", "valid", 100),
    ("remote_homology", "remote_homology", "test_fold_holdout", 100),
    ("remote_homology", "remote_homology", "test_family_holdout", 100),
    ("remote_homology", "remote_homology", "test_superfamily_holdout", 100),
    ("fluorescence", "fluorescence", "train", 300),
    ("fluorescence", "fluorescence", "valid", 100),
    ("fluorescence", "fluorescence", "test", 100),
    ("stability", "stability", "train", 300),
    ("stability", "stability", "valid", 100),
    ("stability", "stability", "test", 100),
]


def write_json(records, path):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, separators=(",", ":"))
    os.replace(tmp, path)


def read_fasta(path):
    header, seq = None, []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith(">"):
                if header is not None:
                    yield header, "".join(seq)
                header, seq = line[1:], []
            elif line:
                seq.append(line)
    if header is not None:
        yield header, "".join(seq)


def pfam_splits(fasta, seed=20261123, n_train=300, n_valid=100, n_holdout_families=10, n_holdout=100):
    by_family: dict[str, list[dict]] = {}
    for header, seq in read_fasta(fasta):
        name, _, rest = header.partition(" ")
        family = rest.split()[-1].split(";")[0]          # e.g. PF10417.12
        by_family.setdefault(family, []).append(
            {"id": name, "primary": seq, "protein_length": len(seq), "family": family})
    rng = random.Random(seed)
    families = sorted(by_family)
    holdout_families = set(rng.sample(families, n_holdout_families))
    holdout = [r for f in sorted(holdout_families) for r in by_family[f]]
    rest = [r for f in families if f not in holdout_families for r in by_family[f]]
    rng.shuffle(holdout)
    rng.shuffle(rest)
    return {"train": rest[:n_train], "valid": rest[n_train:n_train + n_valid], "holdout": holdout[:n_holdout]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="/work/shared/data")
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = parser.parse_args()
    for folder, stem, split, n in SUBSETS:
        with open(os.path.join(args.source, "tape", folder, f"{stem}_{split}.json")) as f:
            records = json.load(f)[:n]
        os.makedirs(os.path.join(args.out, folder), exist_ok=True)
        write_json(records, os.path.join(args.out, folder, f"{stem}_{split}.json"))
        print(f"{folder}/{stem}_{split}.json: {len(records)} records")
    label_maps = os.path.join(args.source, "tape", "remote_homology", "remote_homology_label_maps.json")
    with open(label_maps) as f:
        write_json(json.load(f), os.path.join(args.out, "remote_homology", "remote_homology_label_maps.json"))
    os.makedirs(os.path.join(args.out, "pfam"), exist_ok=True)
    for split, records in pfam_splits(os.path.join(args.source, "pfam", "pfam_domains.fasta")).items():
        write_json(records, os.path.join(args.out, "pfam", f"pfam_{split}.json"))
        print(f"pfam/pfam_{split}.json: {len(records)} records")


if __name__ == "__main__":
    main()
