"""Benchmark: converting a TP=2 x PP=2 Megatron checkpoint (with AdamW state) to TAPE: time and peak memory.

    python bench/converter.py [--hidden 512] [--layers 8] [--heads 8]

A synthetic checkpoint of the protein BERT is written in Megatron's layout (model + AdamW moments + args in every
partition, as the pretraining saves them). Each measurement runs in a fresh Python process reporting its own peak
RSS (``ru_maxrss``):

* ``baseline_load_all``: what a merge-then-convert workflow costs at least: ``torch.load`` every partition whole
  (model and optimizer state) and save the model tensors to one file;
* ``convert``: ``megatron_protein.conversion.to_tape.convert`` (memory-mapped partitions, merge, TAPE mapping,
  write), without and with the built-in verification.

``peak_above_imports_mib`` subtracts the RSS after the imports (torch alone for the baseline; the conversion
modules for ``convert``), which is the memory the work itself needs. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MAKE = """
import argparse, json, os, sys, torch
from megatron_protein.conversion.reshard import split_full_state
hidden, layers, heads, save = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
g = torch.Generator().manual_seed(0)
r = lambda *s: torch.randn(*s, generator=g) * 0.02
full = {"language_model.embedding.word_embeddings.weight": r(32, hidden),
        "language_model.embedding.position_embeddings.weight": r(512, hidden)}
for i in range(layers):
    p = f"language_model.encoder.layers.{i}."
    full.update({p + "input_layernorm.weight": torch.ones(hidden), p + "input_layernorm.bias": r(hidden),
                 p + "self_attention.query_key_value.weight": r(3 * hidden, hidden),
                 p + "self_attention.query_key_value.bias": r(3 * hidden),
                 p + "self_attention.dense.weight": r(hidden, hidden), p + "self_attention.dense.bias": r(hidden),
                 p + "post_attention_layernorm.weight": torch.ones(hidden),
                 p + "post_attention_layernorm.bias": r(hidden),
                 p + "mlp.dense_h_to_4h.weight": r(4 * hidden, hidden), p + "mlp.dense_h_to_4h.bias": r(4 * hidden),
                 p + "mlp.dense_4h_to_h.weight": r(hidden, 4 * hidden), p + "mlp.dense_4h_to_h.bias": r(hidden)})
full.update({"language_model.encoder.final_layernorm.weight": torch.ones(hidden),
             "language_model.encoder.final_layernorm.bias": r(hidden),
             "lm_head.dense.weight": r(hidden, hidden), "lm_head.dense.bias": r(hidden),
             "lm_head.layernorm.weight": torch.ones(hidden), "lm_head.layernorm.bias": r(hidden),
             "lm_head.bias": r(32)})
args = argparse.Namespace(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                          max_position_embeddings=512, padded_vocab_size=32, make_vocab_size_divisible_by=8,
                          vocab_size=30, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                          layernorm_epsilon=1e-5)
total = 0
for (t, p), model in split_full_state(full, 2, 2).items():
    path = os.path.join(save, "iter_0000100", f"mp_rank_{t:02d}_{p:03d}", "model_optim_rng.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    optimizer = {"state": {i: {"step": torch.tensor(100.0), "exp_avg": torch.randn_like(v),
                               "exp_avg_sq": torch.rand_like(v)} for i, v in enumerate(model.values())},
                 "param_groups": [{"params": list(range(len(model)))}]}
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 100, "model": model,
                "optimizer": {"optimizer": optimizer}}, path)
    total += os.path.getsize(path)
open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w").write("100")
print(json.dumps({"parameters": sum(v.numel() for v in full.values()), "checkpoint_bytes": total}))
"""

RSS = """
def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
"""

BASELINE = RSS + """
import glob, json, os, resource, sys, time, torch
from megatron_protein.utils.safe_load import load_torch_file
save, out = sys.argv[1], sys.argv[2]
after_import = rss_mib()
t = time.perf_counter()
merged = {}
for path in sorted(glob.glob(os.path.join(save, "iter_*", "mp_rank_*", "model_optim_rng.pt"))):
    state = load_torch_file(path)     # the whole file read, optimizer included (torch.load, weights only)
    for k, v in state["model"].items():
        merged[os.path.basename(os.path.dirname(path)) + "/" + k] = v
torch.save(merged, out)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss_mib": peak, "peak_above_imports_mib": peak - after_import}))
"""

CONVERT = RSS + """
import json, resource, sys, time
t0 = time.perf_counter()
import torch
from megatron_protein.conversion.to_tape import convert
import_seconds = time.perf_counter() - t0
after_import = rss_mib()
save, out, verify = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
t = time.perf_counter()
convert(save, out, table_file=None, verify=verify)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": time.perf_counter() - t, "import_seconds": import_seconds, "peak_rss_mib": peak,
                  "peak_above_imports_mib": peak - after_import}))
"""


def run(code: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    args = parser.parse_args()
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        save = os.path.join(tmp, "save")
        made = run(MAKE, str(args.hidden), str(args.layers), str(args.heads), save)
        baseline = run(BASELINE, save, os.path.join(tmp, "baseline.pt"))
        convert = run(CONVERT, save, os.path.join(tmp, "tape"), "0")
        verified = run(CONVERT, save, os.path.join(tmp, "tape_verified"), "1")
    result = {
        "benchmark": "converter",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "tp": 2, "pp": 2,
                  "parameters": made["parameters"], "checkpoint_mib": round(made["checkpoint_bytes"] / 2**20, 1)},
        "baseline_load_all": {k: round(v, 3) for k, v in baseline.items()},
        "convert": {k: round(v, 3) for k, v in convert.items()},
        "convert_with_verification": {k: round(v, 3) for k, v in verified.items()},
        "working_memory_ratio_convert_vs_baseline": round(
            convert["peak_above_imports_mib"] / baseline["peak_above_imports_mib"], 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
