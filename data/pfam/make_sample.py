"""Rebuild data/pfam/pfam_sample.fasta from ../shared/data/pfam/pfam_domains.fasta (see PROVENANCE.md).

    python data/pfam/make_sample.py /work/shared/data/pfam/pfam_domains.fasta data/pfam/pfam_sample.fasta

Selection: families with at least MIN_DOMAINS domains; FAMILIES of them drawn with random.Random(SEED); up to
PER_FAMILY domains per family drawn with the same generator; records written in source order, unchanged.
"""
import random
import sys
from collections import defaultdict

SEED, FAMILIES, MIN_DOMAINS, PER_FAMILY = 20261123, 300, 8, 16


def records(path):
    header, lines = None, []
    with open(path) as f:
        for line in f:
            if line.startswith(">"):
                if header:
                    yield header, lines
                header, lines = line, []
            else:
                lines.append(line)
    if header:
        yield header, lines


def main(source, target):
    family_of = lambda header: header.split()[2]  # "PFxxxxx.v;Name;"
    members = defaultdict(list)
    for i, (header, _) in enumerate(records(source)):
        members[family_of(header)].append(i)
    rng = random.Random(SEED)
    eligible = sorted(f for f, m in members.items() if len(m) >= MIN_DOMAINS)
    chosen = rng.sample(eligible, FAMILIES)
    keep = set()
    for family in chosen:
        m = members[family]
        keep.update(rng.sample(m, min(PER_FAMILY, len(m))))
    with open(target, "w") as out:
        for i, (header, lines) in enumerate(records(source)):
            if i in keep:
                out.write(header + "".join(lines))
    print(f"{len(keep)} domains of {len(chosen)} families (of {len(eligible)} with >= {MIN_DOMAINS} domains)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
