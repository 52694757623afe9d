"""Benchmark: our structure metrics against the reference libraries, on 100 real chains, in the same run.

    python bench/structure.py [--chains 100] [--npz PATH] [--out bench/results/structure.json]

Chains: the first ``--chains`` of ``/work/shared/data/structures/chains.npz`` when it exists, else of the repo's
embedded ``data/structures/chains_sample.npz``, else the repo's 40 PDB files. Each chain's CA trace is compared
with a perturbed copy of itself (Gaussian noise of sigma 1, 2 or 4 A by chain, then a random rotation and
translation), so every metric has real work to do.

Per metric, the total seconds over all chains for ours and for the reference that computes the same thing:

- lDDT-CA: ``metrics.lddt_ca`` (numpy) vs ``biotite.structure.lddt`` on CA-only AtomArrays; plus the batched torch
  ``lddt_ca_torch`` on all chains padded into one batch (the pLDDT target).
- TM-score: ``metrics.tm_score`` vs ``tmtools.tm_align`` with the identity alignment (TM-align's -I mode: the same
  residue correspondence, so the same optimisation problem); TM-align's own alignment search is timed too (a
  larger problem: it also optimises the correspondence).
- RMSD: ``metrics.rmsd`` vs ``biotite.structure.superimpose`` + ``rmsd``.
- GDT-TS/HA: ours only (no GDT implementation on PyPI to compare against; said so in the JSON).

Feature building (``megatron_protein.data.folding_features``, the f-features pipeline) per chain of the repo's
embedded set (``data/structures/chains_sample.npz`` with its shipped MSAs): raw features (sequence, MSA read,
targets) and a whole-chain example (``FoldingDataset.eval_example``: MSA sampling, masking, clustering, msa_feat,
profile), ours alone; and the deterministic steps that OpenFold's ``data_transforms`` also implement
(``nearest_neighbor_clusters``, ``summarize_clusters``, ``make_msa_feat``, pseudo-beta, backbone frames) on the same
sampled, masked MSA, ours vs OpenFold's in the same run when OpenFold imports (``--openfold DIR``, default
``$OPENFOLD_DIR`` or /work/peers/openfold, with /work/shared/peers/stubs), else ours alone (said so in the JSON).

Also the largest absolute difference to the reference over the chains. Prints one JSON object and writes it to
``--out``. Timings are wall-clock on a shared machine: the 1-minute load average before and after is recorded.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from importlib.metadata import version

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from megatron_protein.structure import metrics as M  # noqa: E402

SHARED_NPZ = "/work/shared/data/structures/chains.npz"
EMBEDDED_NPZ = os.path.join(REPO, "data", "structures", "chains_sample.npz")


def load_chains(n: int, npz: str | None):
    """``[(name, ca [L, 3] float64, sequence)]`` and a description of the source."""
    for path in [npz] if npz else [SHARED_NPZ, EMBEDDED_NPZ]:
        if path and os.path.exists(path):
            z = np.load(path)
            atom_names = [str(a) for a in z["atom_names"]]
            ca_col = atom_names.index("CA")
            out = []
            for i in range(min(n, len(z["lengths"]))):
                a, b = int(z["offsets"][i]), int(z["offsets"][i + 1])
                out.append((str(z["ids"][i]), z["coords"][a:b, ca_col].astype(np.float64), str(z["sequence"][i])))
            return out, path
    from glob import glob

    from megatron_protein.structure.io import read_chain

    out = []
    for path in sorted(glob(os.path.join(REPO, "data", "structures", "pdb", "dssp_pdb", "*.pdb")))[:n]:
        c = read_chain(path)
        m = c.ca_mask > 0
        out.append((os.path.basename(path), c.ca_positions[m].astype(np.float64),
                    "".join(s for s, k in zip(c.sequence, m) if k)))
    return out, "data/structures/pdb/dssp_pdb"


def perturb(ca: np.ndarray, sigma: float, rng) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    rot = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                    [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                    [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])
    moved = (ca + rng.normal(0, sigma, size=ca.shape)) @ rot.T + rng.normal(0, 20, size=3)
    return moved.astype(np.float32).astype(np.float64)  # float32 like the stored coordinates


def ca_atoms(coords):
    import biotite.structure as struc

    atoms = struc.AtomArray(len(coords))
    atoms.coord = coords.astype(np.float32)
    atoms.res_id = np.arange(1, len(coords) + 1)
    atoms.res_name[:] = "ALA"
    atoms.atom_name[:] = "CA"
    atoms.element[:] = "C"
    atoms.chain_id[:] = "A"
    return atoms


def timed(fn, cases):
    t = time.perf_counter()
    values = [fn(*c) for c in cases]
    return time.perf_counter() - t, np.asarray(values, dtype=np.float64)


def _import_openfold(directory: str, stubs: str):
    if not os.path.isdir(os.path.join(directory, "openfold")):
        return None, f"OpenFold not found at {directory}"
    sys.path[:0] = [stubs, directory]
    try:
        from openfold.data import data_transforms

        return data_transforms, None
    except ImportError as err:
        return None, f"OpenFold's data transforms do not import: {err}"


def feature_benchmark(args) -> dict:
    """Feature building per chain: ours (whole pipeline) and the shared deterministic steps vs OpenFold."""
    import dataclasses

    import torch

    try:
        from megatron_protein.data import folding_features as ff
        from megatron_protein.data.folding_dataset import FoldingDataset
    except ImportError as err:
        return {"note": f"feature builder not available: {err}"}
    ds = FoldingDataset()
    n = min(args.feature_chains, len(ds))
    t0 = time.perf_counter()
    raw = [ds.raw_features(i) for i in range(n)]
    raw_s = time.perf_counter() - t0
    ds.eval_example(0)  # warm-up
    t0 = time.perf_counter()
    for i in range(n):
        ds.eval_example(i)
    example_s = time.perf_counter() - t0
    depths = [r[4] for r in raw]
    out = {
        "chains": n,
        "source": "data/structures/chains_sample.npz + data/structures/msas",
        "msa_depth_min_median_max": [int(min(depths)), int(np.median(depths)), int(max(depths))],
        "chains_with_msa": int(sum(d > 1 for d in depths)),
        "raw_features_ms_per_chain": round(1e3 * raw_s / n, 2),
        "eval_example_ms_per_chain": round(1e3 * example_s / n, 2),
    }
    # The deterministic steps on the same sampled, masked MSA (as the features tests compare them).
    config = dataclasses.replace(ds.config, max_msa_clusters=16)
    inputs = []
    for i, (seq_f, msa_f, targets, _, _) in enumerate(raw):
        rng = np.random.default_rng(i)
        f = ff.sample_msa({**seq_f, **msa_f, **targets}, config.max_msa_clusters, rng)
        f = ff.make_masked_msa(f, ff.msa_residue_profile(msa_f["msa"], msa_f["msa_mask"]), config, rng)
        inputs.append(f)
    def ours_steps(f):
        ff.make_msa_feat(ff.summarize_clusters(f, ff.nearest_neighbor_clusters(f)))
        ff.structure_targets(f["aatype"], f["all_atom_positions"], f["all_atom_mask"])

    ours_steps(inputs[0])  # warm-up (first torch calls)
    t0 = time.perf_counter()
    for f in inputs:
        ff.make_msa_feat(ff.summarize_clusters(f, ff.nearest_neighbor_clusters(f)))
        ff.structure_targets(f["aatype"], f["all_atom_positions"], f["all_atom_mask"])
    ours_s = time.perf_counter() - t0
    steps = {"steps": "nearest_neighbor_clusters, summarize_clusters, make_msa_feat, pseudo_beta, backbone frames",
             "max_msa_clusters": config.max_msa_clusters, "ours_ms_per_chain": round(1e3 * ours_s / n, 2)}
    dt, why = _import_openfold(args.openfold, args.stubs)
    if dt is None:
        steps["openfold"] = None
        steps["note"] = f"ours alone: {why}"
    else:
        tensors = []
        for f in inputs:
            t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in f.items() if isinstance(v, np.ndarray)}
            t["between_segment_residues"] = torch.zeros(len(f["aatype"]), dtype=torch.int64)
            tensors.append(t)
        def openfold_steps(t):
            t = dt.nearest_neighbor_clusters(gap_agreement_weight=0.0)(dict(t))
            dt.make_msa_feat()(dt.summarize_clusters()(t))
            dt.pseudo_beta_fn(t["aatype"], t["all_atom_positions"], t["all_atom_mask"])
            dt.atom37_to_frames({"aatype": t["aatype"], "all_atom_positions": t["all_atom_positions"],
                                 "all_atom_mask": t["all_atom_mask"]})

        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # OpenFold's indexing deprecation warnings under torch 2.13
            openfold_steps(tensors[0])  # warm-up
            t0 = time.perf_counter()
            for t in tensors:
                openfold_steps(t)
            of_s = time.perf_counter() - t0
        steps["openfold_ms_per_chain"] = round(1e3 * of_s / n, 2)
        steps["ours_over_openfold_time"] = round(ours_s / of_s, 2)
        steps["openfold"] = f"{args.openfold} (openfold.data.data_transforms, torch {torch.__version__})"
    out["deterministic_steps"] = steps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chains", type=int, default=100)
    parser.add_argument("--npz", default=None, help="chains file in the chains.npz format")
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results", "structure.json"))
    parser.add_argument("--openfold", default=os.environ.get("OPENFOLD_DIR", "/work/peers/openfold"))
    parser.add_argument("--stubs", default="/work/shared/peers/stubs")
    parser.add_argument("--feature-chains", type=int, default=100)
    args = parser.parse_args()

    import biotite
    import biotite.structure as struc
    import torch
    import tmtools

    load_before = os.getloadavg()[0]
    chains, source = load_chains(args.chains, args.npz)
    rng = np.random.default_rng(20261201)
    sigmas = (1.0, 2.0, 4.0)
    cases = [(perturb(ca, sigmas[i % 3], rng), ca, seq) for i, (_, ca, seq) in enumerate(chains)]
    lengths = [len(c[1]) for c in cases]
    results = {
        "benchmark": "structure",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, {platform.system()}",
        "python": platform.python_version(),
        "versions": {"numpy": np.__version__, "torch": torch.__version__, "biotite": biotite.__version__,
                     "tmtools": version("tmtools")},
        "chains": len(cases),
        "source": source,
        "residues": int(sum(lengths)),
        "length_min_median_max": [int(min(lengths)), int(np.median(lengths)), int(max(lengths))],
        "perturbation": "Gaussian noise sigma 1/2/4 A (by chain), random rotation and translation",
        "metrics": {},
    }

    def record(name, ours, ref, ref_name, values_ours, values_ref, note=None):
        entry = {"ours_s": round(ours, 3), "reference": ref_name}
        if ref is not None:
            entry["reference_s"] = round(ref, 3)
            entry["ours_over_reference_time"] = round(ours / ref, 2)
            entry["max_abs_diff"] = float(f"{np.max(np.abs(values_ours - values_ref)):.3g}")
        if note:
            entry["note"] = note
        results["metrics"][name] = entry
        print(f"[structure bench] {name}: ours {ours:.2f} s" + (f", {ref_name} {ref:.2f} s" if ref else ""),
              file=sys.stderr, flush=True)

    # lDDT-CA
    ours_t, ours_v = timed(lambda p, t, s: M.lddt_ca(p.astype(np.float32), t.astype(np.float32)), cases)
    ref_atoms = [ca_atoms(t) for _, t, _ in cases]
    bt_t, bt_v = timed(lambda a, p: struc.lddt(a, p.astype(np.float32)), [(a, c[0]) for a, c in zip(ref_atoms, cases)])
    record("lddt_ca", ours_t, bt_t, "biotite.structure.lddt", ours_v, bt_v)
    n_max = max(lengths)
    pred_b = torch.zeros(len(cases), n_max, 3)
    true_b = torch.zeros(len(cases), n_max, 3)
    mask_b = torch.zeros(len(cases), n_max)
    for i, (p, t, _) in enumerate(cases):
        pred_b[i, : len(t)] = torch.from_numpy(p).float()
        true_b[i, : len(t)] = torch.from_numpy(t).float()
        mask_b[i, : len(t)] = 1
    t0 = time.perf_counter()
    torch_v = M.lddt_ca_torch(pred_b, true_b, mask_b, per_residue=False).numpy()
    torch_t = time.perf_counter() - t0
    results["metrics"]["lddt_ca_torch_batched"] = {
        "ours_s": round(torch_t, 3), "batch": [len(cases), n_max],
        "max_abs_diff_vs_numpy": float(f"{np.max(np.abs(torch_v - ours_v)):.3g}"),
    }

    # TM-score
    ours_t, ours_v = timed(lambda p, t, s: M.tm_score(p, t), cases)
    tm_t, tm_v = timed(lambda p, t, s: tmtools.tm_align(p, t, s, s, alignment=[s, s]).tm_norm_chain2, cases)
    record("tm_score", ours_t, tm_t, "tmtools.tm_align, identity alignment (TM-align -I)", ours_v, tm_v)
    free_t, free_v = timed(lambda p, t, s: tmtools.tm_align(p, t, s, s).tm_norm_chain2, cases)
    results["metrics"]["tm_score"]["tm_align_free_alignment_s"] = round(free_t, 3)
    results["metrics"]["tm_score"]["tm_align_free_minus_ours_max"] = float(f"{np.max(free_v - ours_v):.3g}")

    # RMSD
    ours_t, ours_v = timed(lambda p, t, s: M.rmsd(p, t), cases)
    ref_t, ref_v = timed(lambda p, t, s: float(struc.rmsd(t, struc.superimpose(t, p)[0])), cases)
    record("rmsd", ours_t, ref_t, "biotite.structure.superimpose + rmsd", ours_v, ref_v)

    # GDT
    t0 = time.perf_counter()
    gdt = np.array([M.gdt_ts_ha(p, t) for p, t, _ in cases])
    results["metrics"]["gdt_ts_ha"] = {
        "ours_s": round(time.perf_counter() - t0, 3),
        "reference": None,
        "note": "no GDT implementation on PyPI to compare with; ours alone (both scores from one search)",
        "mean_gdt_ts": round(float(gdt[:, 0].mean()), 4),
        "mean_gdt_ha": round(float(gdt[:, 1].mean()), 4),
    }
    results["features"] = feature_benchmark(args)
    results["load_average_1min"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
    text = json.dumps(results, indent=2)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text + "\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
