"""Build the shipped MSAs of the embedded chains: jackhmmer (pyhmmer, in process) of every chain of
data/structures/chains_sample.npz against a FASTA database; one A3M per chain that has at least one homologue.

    python data/structures/make_msas.py --database /work/shared/data/pfam/pfam_domains.fasta \\
        --chains data/structures/chains_sample.npz --out data/structures/msas --cache-dir data_cache/msas \\
        --iterations 3 --evalue 1e-3 --max-sequences 1000 --cpus 2

Writes ``<out>/<chain id>.a3m.gz`` (gzip level 9, mtime 0, so a rerun gives identical bytes) for chains with
homologues, removes stale ones of chains that now have none, and writes ``<out>/summary.json`` (settings, database
sha256, run time, load, per-chain depth). Searches are cached per query under ``--cache-dir``, so an interrupted
run resumes where it stopped. Progress and an ETA are logged every few queries.
"""
import argparse
import gzip
import io
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_protein.data.msa import JackhmmerMsaBuilder, JackhmmerSettings, MsaError  # noqa: E402


def write_gzip_atomically(text: str, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0,
                                                     filename="") as out:
            out.write(text.encode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def a3m_text(msa) -> str:
    buffer = io.StringIO()
    for name, row in zip(msa.names, msa.rows):
        buffer.write(f">{name}\n{row}\n")
    return buffer.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database", required=True)
    parser.add_argument("--chains", default="data/structures/chains_sample.npz")
    parser.add_argument("--out", default="data/structures/msas")
    parser.add_argument("--cache-dir", default="data_cache/msas")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--evalue", type=float, default=1e-3)
    parser.add_argument("--max-sequences", type=int, default=1000)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="only the first N chains (for a trial run)")
    args = parser.parse_args(argv)

    try:
        chains = np.load(args.chains, allow_pickle=False)
        ids = [str(i) for i in chains["ids"]]
        sequences = [str(s) for s in chains["sequence"]]
    except (OSError, ValueError, KeyError) as error:
        print(f"error: {args.chains}: expected a chains.npz-format file with ids and sequence ({error})",
              file=sys.stderr)
        return 2
    if args.limit is not None:
        ids, sequences = ids[: args.limit], sequences[: args.limit]
    settings = JackhmmerSettings(args.iterations, args.evalue, args.max_sequences)
    try:
        builder = JackhmmerMsaBuilder(args.database, settings, cache_dir=args.cache_dir, cpus=args.cpus)
        cached = sum(os.path.exists(builder.cache_path(s)) for s in sequences)
        print(f"[make_msas] {len(ids)} chains, {cached} cached; database {args.database} "
              f"sha256 {builder.database_sha256[:16]}; load {os.getloadavg()}", flush=True)
        start = time.time()
        last = [start]

        def progress(done, total):
            now = time.time()
            if now - last[0] > 30 or done == total:
                rate = done / (now - start)
                print(f"[make_msas] {done}/{total} searched, {rate * 60:.1f} queries/min, "
                      f"ETA {(total - done) / max(rate, 1e-9) / 60:.1f} min, load {os.getloadavg()[0]:.2f}",
                      flush=True)
                last[0] = now

        msas = builder.build_many(list(zip(ids, sequences)), progress=progress)
    except MsaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    seconds = time.time() - start

    os.makedirs(args.out, exist_ok=True)
    depths = {}
    for chain_id, msa in zip(ids, msas):
        homologues = msa.depth - 1
        depths[chain_id] = homologues
        path = os.path.join(args.out, f"{chain_id}.a3m.gz")
        if homologues > 0:
            write_gzip_atomically(a3m_text(msa), path)
        elif os.path.exists(path):
            os.remove(path)
    values = np.array(list(depths.values()))
    with_homologues = values[values > 0]
    summary = {
        "command": " ".join(["python", "data/structures/make_msas.py"] + (argv if argv is not None else sys.argv[1:])),
        "database": args.database, "database_sha256": builder.database_sha256,
        "settings": {"iterations": args.iterations, "evalue": args.evalue, "max_sequences": args.max_sequences},
        "cpus": args.cpus, "search_seconds_this_run": round(seconds, 1),
        "searched_this_run": len(ids) - cached, "load_at_end": [round(x, 2) for x in os.getloadavg()],
        "chains": len(ids), "with_homologues": int(len(with_homologues)),
        "homologues_quantiles_of_chains_with_any": (
            {q: int(np.quantile(with_homologues, float(q))) for q in ("0", "0.25", "0.5", "0.75", "0.9", "1")}
            if len(with_homologues) else {}),
        "depth_histogram": {label: int(((values >= lo) & (values <= hi)).sum()) for label, lo, hi in
                            (("0", 0, 0), ("1", 1, 1), ("2-9", 2, 9), ("10-99", 10, 99), ("100-999", 100, 999),
                             ("1000+", 1000, 10 ** 9))},
        "homologues_per_chain": depths,
    }
    tmp = os.path.join(args.out, f"summary.json.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(args.out, "summary.json"))
    print(json.dumps({k: v for k, v in summary.items() if k != "homologues_per_chain"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
