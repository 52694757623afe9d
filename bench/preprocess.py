"""Benchmark: preprocess throughput (residues/s) and peak memory, on the shared Pfam set and on 10 copies of it.

    python bench/preprocess.py [--input /work/shared/data/pfam/pfam_domains.fasta] [--copies 10]

Each measurement runs in a fresh Python process, which reports its own peak RSS (``ru_maxrss``). The baseline in the
same run is the naive pipeline (read every record into a list, encode, then write), whose memory grows with the
input; the streaming ``preprocess`` must stay flat: its peak at 10 copies is compared with its peak at 1 copy.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

from importlib.metadata import version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STREAMING = """
import json, resource, sys, time
from megatron_protein.data.preprocess import preprocess
inputs, prefix, workers = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
t = time.perf_counter()
s = preprocess(inputs, prefix, split_by_family=(0.9, 0.05, 0.05), seed=1234, workers=workers, progress=False)
elapsed = time.perf_counter() - t
residues = sum(o["residues"] for o in s["outputs"].values())
children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"seconds": elapsed, "residues": residues, "sequences": s["records_read"],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_peak_rss_mib": children / 1024}))
"""

NAIVE = """
import json, resource, sys, time
import numpy as np
from megatron_protein.data.indexed_dataset import make_dataset
from megatron_protein.data.readers import read_records
from megatron_protein.data.tokenizer import IUPACTokenizer
inputs, prefix = json.loads(sys.argv[1]), sys.argv[2]
t = time.perf_counter()
records = [r for path in inputs for r in read_records(path)]          # everything in memory
tok = IUPACTokenizer()
encoded = [tok.encode(r.sequence) for r in records]                  # python lists of ints
make_dataset(prefix, [np.array(e) for e in encoded if e])
elapsed = time.perf_counter() - t
print(json.dumps({"seconds": elapsed, "residues": sum(map(len, encoded)), "sequences": len(records),
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(code: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["residues_per_second"] = round(result["residues"] / result["seconds"])
    result["seconds"] = round(result["seconds"], 2)
    for key in ("peak_rss_mib", "worker_peak_rss_mib"):
        if key in result:
            result[key] = round(result[key], 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default="/work/shared/data/pfam/pfam_domains.fasta")
    parser.add_argument("--copies", type=int, default=10)
    args = parser.parse_args()
    results = {"benchmark": "preprocess", "input": args.input,
               "input_mib": round(os.path.getsize(args.input) / 2**20, 1),
               "copies": args.copies, "torch": version("torch"), "python": platform.python_version(),
               "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        for copies in (1, args.copies):
            inputs = json.dumps([args.input] * copies)
            results[f"streaming_x{copies}"] = run(STREAMING, inputs, os.path.join(tmp, f"s{copies}"), "1")
            results[f"naive_x{copies}"] = run(NAIVE, inputs, os.path.join(tmp, f"n{copies}"))
            results[f"streaming_workers2_x{copies}"] = run(STREAMING, inputs, os.path.join(tmp, f"w{copies}"), "2")
            for name in os.listdir(tmp):
                os.unlink(os.path.join(tmp, name))
    s1, sN = results["streaming_x1"], results[f"streaming_x{args.copies}"]
    n1, nN = results["naive_x1"], results[f"naive_x{args.copies}"]
    results["streaming_peak_growth_mib"] = round(sN["peak_rss_mib"] - s1["peak_rss_mib"], 1)
    results["naive_peak_growth_mib"] = round(nN["peak_rss_mib"] - n1["peak_rss_mib"], 1)
    results["streaming_speedup_vs_naive_x1"] = round(s1["residues_per_second"] / n1["residues_per_second"], 2)
    results["workers2_speedup_x1"] = round(results["streaming_workers2_x1"]["residues_per_second"]
                                           / s1["residues_per_second"], 2)
    results[f"workers2_speedup_x{args.copies}"] = round(
        results[f"streaming_workers2_x{args.copies}"]["residues_per_second"] / sN["residues_per_second"], 2)
    results["load_average_1min"] = round(os.getloadavg()[0], 1)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
