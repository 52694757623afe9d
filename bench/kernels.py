"""CPU cost of each fused op's PyTorch reference against the naive composition, in the same run.

For every op (LayerNorm, scale-mask-softmax, pair-bias softmax, bias-GeLU, bias-dropout-add, BERT core attention)
one forward + backward is timed (median of ``--reps``) and its peak memory measured for:

* ``naive``      the unfused composition of torch ops (``fused=False``, Megatron's ``--no-*-fusion``);
* ``reference``  what ``fused=True`` runs on CPU (PyTorch's fused primitives, lean autograd functions);
* ``reference+compile`` the reference with its elementwise math through ``torch.compile`` (bias-GeLU and
  bias-dropout-add, the ops where ``compiled=True`` is offered; compile time excluded, reported separately).

For the Evoformer's gated self-attention with pair bias (AF2 Algorithm 7, MSA row attention) it compares the
plain path, the tiled path (``tile_size``) and the naive path at N_res 512 and 1024: the tiled path never holds
the ``[N_seq, H, N_res, N_res]`` logits.

Each case runs in two fresh processes. Time: with glibc's default allocator, as training runs (freed large blocks
are reused; pinning the mmap threshold would charge every large temporary its page faults, which training does not
pay). Peak memory: with glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_), so every large tensor is its own
mapping and is returned on free; the peak resident set (VmHWM, reset through /proc/self/clear_refs after a warm-up)
minus the resident set before the measured step is the memory the step needed on top of its inputs and weights.

The Triton kernels are not timed: this machine has no CUDA device and Triton's CPU interpreter says nothing about
GPU speed. The JSON says so, and lists the dispatcher's fallbacks. Run::

    python bench/kernels.py                 # all ops, default sizes; JSON on stdout, progress on stderr
    python bench/kernels.py --ops layer_norm,gated_attention_nres1024 --reps 5 --output bench/results/kernels.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from megatron_protein import kernels
from megatron_protein.kernels import dispatch
from _memory import reset_peak_rss, status_kib  # noqa: E402 (bench/ is the script's directory)

# --------------------------------------------------------------------------------------------- the cases
# Each case: name -> (shape description, {impl: factory}); a factory builds inputs and modules and returns a
# zero-argument step doing forward + backward.


def _layer_norm(fused):
    x = torch.randn(4096, 768, requires_grad=True)
    ln = kernels.LayerNorm(768, fused=fused)
    g = torch.randn(4096, 768)
    return lambda: ln(x).backward(g)


def _scale_mask_softmax(fused):
    scores = torch.randn(4, 12, 384, 384, requires_grad=True)
    lengths = torch.tensor([384, 300, 200, 97])
    mask = (torch.arange(384)[None, :] >= lengths[:, None])[:, None, None, :]
    op = kernels.ScaleMaskSoftmax(0.125, fused=fused)
    g = torch.randn_like(scores)
    return lambda: op(scores, mask).backward(g)


def _pair_bias_softmax(fused):
    logits = torch.randn(1, 32, 8, 256, 256, requires_grad=True)  # [b, N_seq, H, N_res, N_res]
    bias = torch.randn(1, 1, 8, 256, 256, requires_grad=True)
    mask = (torch.rand(1, 32, 1, 1, 256) < 0.1)
    op = kernels.PairBiasSoftmax(1.0, fused=fused)
    g = torch.randn_like(logits)
    return lambda: op(logits, bias, mask).backward(g)


def _bias_gelu(fused, compiled=False):
    x = torch.randn(4096, 3072, requires_grad=True)
    b = torch.randn(3072, requires_grad=True)
    op = kernels.BiasGeLU(fused=fused, compiled=compiled)
    g = torch.randn_like(x)
    return lambda: op(x, b).backward(g)


def _bias_dropout_add(fused, compiled=False):
    x = torch.randn(4096, 768, requires_grad=True)
    b = torch.randn(768, requires_grad=True)
    r = torch.randn(4096, 768, requires_grad=True)
    op = kernels.BiasDropoutAdd(0.1, fused=fused, compiled=compiled).train()
    g = torch.randn_like(x)
    return lambda: op(x, b, r).backward(g)


def _core_attention(fused):
    q, k, v = (torch.randn(4, 12, 384, 64, requires_grad=True) for _ in range(3))
    lengths = torch.tensor([384, 300, 200, 97])
    mask = (torch.arange(384)[None, :] >= lengths[:, None])[:, None, None, :]
    op = kernels.CoreAttention(64, dropout_p=0.0, fused=fused)
    g = torch.randn_like(q)
    return lambda: op(q, k, v, mask).backward(g)


def _core_attention_bf16(impl):
    """BERT-base attention in bf16 training (q, k, v as autocast hands them over): SDPA's CPU flash kernel, which
    CoreAttention ran before, against the written-out path it runs now; fp32 for the same shape as a yardstick."""
    from megatron_protein.kernels.attention import attention_written_out
    dtype = torch.float32 if impl == "sdpa_fp32" else torch.bfloat16
    q, k, v = (torch.randn(4, 12, 512, 64, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    if impl == "written_out":
        return lambda: attention_written_out(q, k, v, None, 0.125).backward(g)
    return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.125).backward(g)


def _gated_attention(n_res, fused, tile_size=None):
    torch.manual_seed(0)
    n_seq, c_m, heads, c = 4, 32, 4, 16
    op = kernels.GatedSelfAttention(c_m, c, heads, fused=fused, tile_size=tile_size)
    torch.nn.init.normal_(op.linear_o.weight, std=0.02)
    msa = torch.randn(1, n_seq, n_res, c_m, requires_grad=True)
    pair_bias = torch.randn(1, 1, heads, n_res, n_res, requires_grad=True)
    mask = ~(torch.rand(1, n_seq, 1, 1, n_res) > 0.05)
    g = torch.randn_like(msa)
    return lambda: op(msa, pair_bias, mask).backward(g)


CASES: dict[str, tuple[str, dict[str, Callable]]] = {
    "layer_norm": ("x [4096, 768] fp32", {"naive": lambda: _layer_norm(False), "reference": lambda: _layer_norm(True)}),
    "scale_mask_softmax": ("scores [4, 12, 384, 384], padding mask [4, 1, 1, 384]",
                           {"naive": lambda: _scale_mask_softmax(False),
                            "reference": lambda: _scale_mask_softmax(True)}),
    "pair_bias_softmax": ("logits [1, 32, 8, 256, 256], bias [1, 1, 8, 256, 256], mask [1, 32, 1, 1, 256]",
                          {"naive": lambda: _pair_bias_softmax(False), "reference": lambda: _pair_bias_softmax(True)}),
    "bias_gelu": ("x [4096, 3072], bias [3072]",
                  {"naive": lambda: _bias_gelu(False), "reference": lambda: _bias_gelu(True),
                   "reference+compile": lambda: _bias_gelu(True, compiled=True)}),
    "bias_dropout_add": ("x, residual [4096, 768], bias [768], p = 0.1, training",
                         {"naive": lambda: _bias_dropout_add(False), "reference": lambda: _bias_dropout_add(True),
                          "reference+compile": lambda: _bias_dropout_add(True, compiled=True)}),
    "core_attention": ("q, k, v [4, 12, 384, 64], padding mask",
                       {"naive": lambda: _core_attention(False), "reference": lambda: _core_attention(True)}),
    "core_attention_bf16": ("q, k, v [4, 12, 512, 64] bf16, training",
                            {"sdpa_flash": lambda: _core_attention_bf16("sdpa_flash"),
                             "written_out": lambda: _core_attention_bf16("written_out"),
                             "sdpa_fp32": lambda: _core_attention_bf16("sdpa_fp32")}),
}
for _n in (512, 1024):
    CASES[f"gated_attention_nres{_n}"] = (
        f"MSA row attention with pair bias: msa [1, 4, {_n}, 32], H = 4, c = 16, bias [1, 1, 4, {_n}, {_n}]",
        {"naive": (lambda n=_n: _gated_attention(n, False)),
         "reference": (lambda n=_n: _gated_attention(n, True)),
         "reference_tiled256": (lambda n=_n: _gated_attention(n, True, tile_size=256))})

# --------------------------------------------------------------------------------------------- measuring


def _child(case: str, impl: str, reps: int) -> dict:
    torch.manual_seed(0)
    step = CASES[case][1][impl]()
    start = time.perf_counter()
    step()  # warm-up: thread pools, first-touch, torch.compile
    first_call_s = time.perf_counter() - start
    gc.collect()
    peak_mib = None
    if reset_peak_rss():
        before = status_kib("VmRSS")
        step()
        peak_mib = round((status_kib("VmHWM") - before) / 1024, 1)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"time_ms_median": round(1e3 * statistics.median(times), 2), "time_ms_min": round(1e3 * min(times), 2),
            "peak_extra_mib": peak_mib, "first_call_s": round(first_call_s, 2),
            "fallbacks": dispatch.fallbacks()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ops", default=",".join(CASES), help=f"comma-separated subset of: {', '.join(CASES)}")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per case (median reported)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--output", help="also write the JSON to this file (atomically: temp file, then rename)")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child, args.reps)))
        return

    ops = [o for o in args.ops.split(",") if o]
    unknown = sorted(set(ops) - set(CASES))
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {list(CASES)}")
    jobs = [(op, impl) for op in ops for impl in CASES[op][1] if not (args.no_compile and "compile" in impl)]
    # Memory in a child with the mmap threshold pinned (every large tensor its own mapping, returned on free);
    # time in another with glibc's default allocator, as training runs (freed blocks reused, no page faults).
    memory_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    timing_env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_")}
    results: dict[str, dict] = {op: {"shape": CASES[op][0]} for op in ops}
    fallbacks: set[str] = set()
    started = time.perf_counter()
    for i, (op, impl) in enumerate(jobs):
        elapsed = time.perf_counter() - started
        eta = "" if i == 0 else f", ETA {elapsed / i * (len(jobs) - i):.0f} s"
        print(f"[bench/kernels] {i + 1}/{len(jobs)} {op} {impl}{eta}", file=sys.stderr, flush=True)
        runs = {}
        for purpose, env in (("timing", timing_env), ("memory", memory_env)):
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", op, impl, "--reps",
                                   str(args.reps)], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"bench/kernels.py: case {op}/{impl} failed:\n{proc.stderr}")
            runs[purpose] = json.loads(proc.stdout.strip().splitlines()[-1])
        measured = runs["timing"]
        measured["peak_extra_mib"] = runs["memory"]["peak_extra_mib"]
        fallbacks.update(measured.pop("fallbacks"))
        results[op][impl] = measured
    for op in ops:
        naive = results[op].get("naive")
        for impl, measured in results[op].items():
            if impl in ("shape", "naive") or naive is None:
                continue
            measured["speedup_vs_naive"] = round(naive["time_ms_median"] / measured["time_ms_median"], 2)
            if measured["peak_extra_mib"] is not None and naive["peak_extra_mib"]:
                measured["memory_vs_naive"] = round(measured["peak_extra_mib"] / naive["peak_extra_mib"], 3)
    report = json.dumps({
        "benchmark": "kernels", "device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
        "reps": args.reps, "timing": "forward + backward, median; memory: peak RSS above inputs and weights",
        "triton": ("not timed: no CUDA device here, and Triton's CPU interpreter (used by the tests) is no measure "
                   "of GPU speed; the Triton kernels are checked for correctness only"),
        "triton_importable": dispatch.triton_available(),
        "dispatcher_fallbacks": sorted(fallbacks), "results": results}, indent=1)
    print(report)
    if args.output:
        tmp = f"{args.output}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(report + "\n")
        os.replace(tmp, args.output)


if __name__ == "__main__":
    main()
