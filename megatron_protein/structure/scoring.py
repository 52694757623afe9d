"""Score predicted structures against references: residue matching and the four metrics (``folding/score.py``).

Residues are matched by author residue label (number + insertion code) by default, or, with ``align=True``, by a
global sequence alignment (biotite's ``align_optimal``, BLOSUM62, affine gaps -10/-1): pairs of aligned, non-gap
positions. Only residues with a CA in both structures are compared.

Normalisation: TM-score and GDT divide by the number of reference residues with a CA (a reference residue the
prediction lacks counts as 0, as the TM-score program counts unaligned residues); lDDT-CA scores every pair of
reference residues within 15 A, counting pairs whose predicted partner is missing as not preserved; RMSD is over
the matched pairs. ``n_residues`` is the number of matched pairs.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import metrics
from .io import ProteinChain, StructureError, read_chain

METRIC_KEYS = ("lddt_ca", "tm_score", "gdt_ts", "gdt_ha", "rmsd", "n_residues")
STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".ent.gz", ".cif.gz", ".mmcif.gz")


@dataclass
class Score:
    lddt_ca: float
    tm_score: float
    gdt_ts: float
    gdt_ha: float
    rmsd: float
    n_residues: int

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


def match_by_number(pred: ProteinChain, ref: ProteinChain) -> Tuple[np.ndarray, np.ndarray]:
    """Indices ``(pred_idx, ref_idx)`` of residues with the same author label (number + insertion code)."""
    pred_pos = {label: i for i, label in enumerate(pred.residue_labels())}
    pairs = [(pred_pos[label], j) for j, label in enumerate(ref.residue_labels()) if label in pred_pos]
    if not pairs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    p, r = zip(*pairs)
    return np.asarray(p, dtype=np.int64), np.asarray(r, dtype=np.int64)


def match_by_alignment(pred: ProteinChain, ref: ProteinChain) -> Tuple[np.ndarray, np.ndarray]:
    """Indices of residues paired by a global alignment of the two sequences (biotite, BLOSUM62, gaps -10/-1).

    ``X`` residues align as biotite's ``X`` symbol."""
    import biotite.sequence as seq
    import biotite.sequence.align as align

    a, b = seq.ProteinSequence(pred.sequence), seq.ProteinSequence(ref.sequence)
    matrix = align.SubstitutionMatrix.std_protein_matrix()
    alignment = align.align_optimal(a, b, matrix, gap_penalty=(-10, -1), terminal_penalty=False, max_number=1)[0]
    trace = alignment.trace
    both = (trace[:, 0] >= 0) & (trace[:, 1] >= 0)
    return trace[both, 0].astype(np.int64), trace[both, 1].astype(np.int64)


def score_chains(pred: ProteinChain, ref: ProteinChain, align: bool = False, step: int = 1) -> Score:
    """All four metrics of ``pred`` against ``ref`` on CA atoms (see the module docstring)."""
    pi, ri = match_by_alignment(pred, ref) if align else match_by_number(pred, ref)
    ref_has = ref.ca_mask > 0
    # Work on the reference residues that have a CA: prediction coordinates where matched and present.
    ref_rows = np.flatnonzero(ref_has)
    true = ref.ca_positions[ref_rows].astype(np.float64)
    pred_xyz = np.zeros_like(true)
    pred_present = np.zeros(len(ref_rows), dtype=bool)
    row_of = {r: k for k, r in enumerate(ref_rows)}
    for p, r in zip(pi, ri):
        if r in row_of and pred.ca_mask[p] > 0:
            pred_xyz[row_of[r]] = pred.ca_positions[p]
            pred_present[row_of[r]] = True
    n_pairs = int(pred_present.sum())
    l_ref = len(ref_rows)
    if n_pairs == 0:
        return Score(0.0, 0.0, 0.0, 0.0, float("nan"), 0)
    gdt_ts, gdt_ha = metrics.gdt_ts_ha(pred_xyz, true, pred_present, reference_length=l_ref, step=step)
    return Score(
        lddt_ca=float(metrics.lddt_ca(pred_xyz, true, pred_mask=pred_present)),
        tm_score=float(metrics.tm_score(pred_xyz, true, pred_present, reference_length=l_ref, step=step)),
        gdt_ts=gdt_ts,
        gdt_ha=gdt_ha,
        rmsd=float(metrics.rmsd(pred_xyz, true, pred_present)),
        n_residues=n_pairs,
    )


def score_files(
    pred_path: str,
    ref_path: str,
    chain: Optional[str] = None,
    ref_chain: Optional[str] = None,
    align: bool = False,
    reference: Optional[ProteinChain] = None,
    step: int = 1,
) -> Score:
    """Read both files (first protein chain unless told) and score. Raises :class:`StructureError`."""
    ref = reference if reference is not None else read_chain(ref_path, ref_chain)
    pred = read_chain(pred_path, chain)
    result = score_chains(pred, ref, align=align, step=step)
    if result.n_residues == 0:
        how = "by sequence alignment" if align else "by residue number (try --align if the numbering differs)"
        raise StructureError(pred_path, f"no residue of chain {pred.chain_id} matches reference {ref_path} {how}")
    return result


def expand_predictions(spec: str) -> List[str]:
    """A file, a directory (its structure files, sorted) or a glob pattern -> list of paths."""
    if os.path.isdir(spec):
        found = sorted(
            os.path.join(spec, name) for name in os.listdir(spec) if name.lower().endswith(STRUCTURE_SUFFIXES)
        )
        if not found:
            raise StructureError(spec, f"directory has no structure files ({', '.join(STRUCTURE_SUFFIXES)})")
        return found
    if os.path.exists(spec):
        return [spec]
    if glob.has_magic(spec):
        found = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
        if not found:
            raise StructureError(spec, "the pattern matches no file")
        return found
    raise StructureError(spec, "no such file; expected a PDB/mmCIF file, a directory or a glob pattern")


def mean_scores(scores: Sequence[Score]) -> Dict[str, float]:
    """Mean of each metric over several predictions (n_residues: mean as well)."""
    return {key: float(np.mean([getattr(s, key) for s in scores])) for key in METRIC_KEYS}


def format_table(rows: Sequence[Tuple[str, Score]], mean: Optional[Dict[str, float]] = None) -> str:
    """A plain-text table: one row per prediction, then the mean when there are several."""
    header = f"{'prediction':<40} {'lDDT-CA':>8} {'TM':>7} {'GDT-TS':>7} {'GDT-HA':>7} {'RMSD':>7} {'N':>5}"
    lines = [header, "-" * len(header)]

    def line(name, d):
        name = name if len(name) <= 40 else "..." + name[-37:]
        return (f"{name:<40} {d['lddt_ca']:8.4f} {d['tm_score']:7.4f} {d['gdt_ts']:7.4f} {d['gdt_ha']:7.4f} "
                f"{d['rmsd']:7.3f} {d['n_residues']:5.0f}")

    for name, score in rows:
        lines.append(line(name, score.to_dict()))
    if mean is not None:
        lines.append("-" * len(header))
        lines.append(line(f"mean of {len(rows)}", mean))
    return "\n".join(lines)


def to_json(rows: Sequence[Tuple[str, Score]]) -> str:
    """One JSON object: the metrics for one prediction, or ``{"predictions": [...], "mean": {...}}``."""
    if len(rows) == 1:
        return json.dumps(rows[0][1].to_dict())
    return json.dumps(
        {
            "predictions": [dict(prediction=name, **score.to_dict()) for name, score in rows],
            "mean": mean_scores([s for _, s in rows]),
        }
    )


def _write_atomically(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return value


def build_parser():
    import argparse

    parser = argparse.ArgumentParser(
        prog="score.py",
        description="Score predicted structures against a reference on CA atoms: lDDT-CA, TM-score, GDT-TS, "
        "GDT-HA, RMSD (docs/structure.md).",
    )
    parser.add_argument("prediction", help="predicted PDB/mmCIF file, a directory of them, or a quoted glob pattern")
    parser.add_argument("reference", help="reference PDB/mmCIF file")
    parser.add_argument("--chain", default=None, help="chain of the prediction(s) (default: first protein chain)")
    parser.add_argument("--ref-chain", default=None, help="chain of the reference (default: first protein chain)")
    parser.add_argument("--align", action="store_true",
                        help="match residues by a global sequence alignment instead of by residue number")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--output", default=None, help="also write the JSON object to this file (atomically)")
    parser.add_argument("--search-step", type=_positive_int, default=1,
                        help="spacing of the seed fragments' starts in the TM-score/GDT search (1: every start, as "
                        "the TM-score program; 4 is ~3x faster and was within 0.005 GDT and 1e-5 TM of it on 10 "
                        "real chains)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``folding/score.py``: returns the exit status (0, or 2 with ``error: <file>[:<line>]: ...`` on stderr)."""
    import sys

    args = build_parser().parse_args(argv)
    try:
        paths = expand_predictions(args.prediction)
        reference = read_chain(args.reference, args.ref_chain)
        rows = [(p, score_files(p, args.reference, args.chain, args.ref_chain, args.align, reference,
                                args.search_step)) for p in paths]
    except StructureError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = to_json(rows)
    if args.output:
        _write_atomically(args.output, text + "\n")
    if args.json:
        print(text)
    else:
        print(format_table(rows, mean_scores([s for _, s in rows]) if len(rows) > 1 else None))
    return 0
