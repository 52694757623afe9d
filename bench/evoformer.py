"""Our Evoformer block against OpenFold's ``EvoformerBlock`` at AlphaFold2's block sizes, in the same run.

Sizes (``openfold/config.py``'s ``evoformer_stack``): c_m 256, c_z 128, MSA attention 8 heads x 32, pair attention
4 heads x 32, outer product mean 32, triangle multiplication 128, transition 4, dropout 0.15 / 0.25 (train mode).
Both blocks hold the same weights: OpenFold's block is built and given random weights (a fixed seed; AF2's zero
'final' initialisers would make every update zero), and they are copied into ours
(``load_openfold_state_dict``); without OpenFold ours gets random weights of its own and only our figures are
reported.

Cases, at (N_seq, N_res) = (16, 64), (32, 128), (64, 256) unless ``--sizes`` says otherwise, all fp32:

* ``forward``    train mode (dropout on), autograd recording; the graph is dropped after the call.
* ``train``      forward + backward (train mode, dropout as AF2), no chunking, as both train.
* ``inference``  eval, ``torch.no_grad()``, chunk size 4; OpenFold with its inference settings
                 (``inplace_safe=True``), ours with ``inplace=True`` (both may overwrite their inputs; both are
                 handed fresh copies, and the copy is part of the measured step for both).
* ``agreement``  the outputs of the two blocks on the same inputs (eval, unchunked and chunked) and the input
                 gradients (eval, forward + backward): max abs difference, with the largest |value| beside it.
* ``max_n_res``  the longest N_res whose chunked inference (N_seq 32) fits in ``--memory-limit-gib`` (16): see
                 below.

Every measurement runs in a fresh subprocess (``--child``):

* Time: median of ``--reps`` steps after one warm-up step, with glibc's default allocator (as a run would).
* Memory: a second subprocess with glibc's mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_=65536``), so every
  large tensor is its own mapping and goes back to the system when freed: the resident set then follows what is
  live. After a warm-up step the peak RSS (VmHWM) is reset (``/proc/self/clear_refs``) and one step is run.
  ``peak_rss_mib`` is the process's peak during that step (Python, torch, weights, inputs included: what the
  reference figures count); ``peak_extra_mib`` subtracts the RSS just before the step (the step's own need).
  RSS rather than tracemalloc: torch's CPU tensors are not allocated through Python's allocator.
* ``max_n_res``: a real search would run chunked inference at thousands of residues, where one block takes many
  minutes on two cores (its cost is cubic in N_res). Unless ``--max-res-search bisect`` is given, the peak RSS of
  chunked inference is measured at several N_res (``--model-n-res``) and fitted by least squares with
  ``a + b N + c N^2`` (the pair representation and its projections are quadratic; the MSA and the weights linear
  and constant), and the fit is solved for the limit; the JSON says ``"method": "extrapolated"``. With
  ``bisect``, subprocesses run the real case under ``RLIMIT_AS`` = the limit, bisecting N_res, each bounded by
  ``--search-timeout`` seconds (a timeout counts as "unknown", and the search stops there).

The machine is shared: ``uptime`` is recorded before and after every case; ratios of the two implementations
measured in the same run are the meaningful part when the load is high. Run (one command, JSON on stdout and in
``--output``, progress on stderr)::

    python bench/evoformer.py [--openfold DIR] [--reps 3] [--output bench/results/evoformer.json]
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_protein.models.folding import evoformer as evo  # noqa: E402
from _memory import reset_peak_rss, status_kib  # noqa: E402 (bench/ is the script's directory)

DEFAULT_OPENFOLD = "/work/peers/openfold"
DEFAULT_STUBS = "/work/shared/peers/stubs"
SIZES = ((16, 64), (32, 128), (64, 256))
MODES = ("forward", "train", "inference")
INFERENCE_CHUNK = 4
C_M, C_Z = 256, 128
GOALS = {"train_time_ratio_max": 0.77, "train_peak_memory_ratio_max": 0.7, "inference_time_ratio_max": 0.7,
         "inference_peak_memory_ratio_max": 1.0}


# --------------------------------------------------------------------------------------------- the blocks

def import_openfold(directory: str | None):
    """OpenFold's ``EvoformerBlock`` class from an unpacked ``openfold/`` package, or None (with the reason)."""
    if not directory:
        return None, "no OpenFold directory given"
    if not (Path(directory) / "openfold" / "model" / "evoformer.py").is_file():
        return None, f"{directory}/openfold/model/evoformer.py not found"
    stubs = os.environ.get("OPENFOLD_STUBS", DEFAULT_STUBS)
    sys.path[:0] = [stubs, directory]
    try:
        from openfold.model.evoformer import EvoformerBlock
    except Exception as exc:  # noqa: BLE001 - any import failure means "no peer"
        return None, f"import failed: {type(exc).__name__}: {exc}"
    return EvoformerBlock, None


def openfold_block(cls):
    return cls(c_m=C_M, c_z=C_Z, c_hidden_msa_att=32, c_hidden_opm=32, c_hidden_mul=128, c_hidden_pair_att=32,
               no_heads_msa=8, no_heads_pair=4, transition_n=4, msa_dropout=0.15, pair_dropout=0.25,
               no_column_attention=False, opm_first=False, fuse_projection_weights=False, inf=1e9, eps=1e-8)


def our_block():
    return evo.EvoformerBlock(evo.EvoformerConfig(num_blocks=1))


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Random weights, the same for every run (layer-norm gains around 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1.0 + scale * noise if "layer_norm" in name and name.endswith("weight") else scale * noise)


def build(impl: str, openfold_dir: str | None):
    """(block, call) with the shared weights; call(block, m, z, msa_mask, pair_mask, chunk_size, inplace)."""
    of_cls, reason = import_openfold(openfold_dir)
    if impl == "openfold":
        if of_cls is None:
            raise RuntimeError(f"OpenFold unavailable: {reason}")
        block = openfold_block(of_cls)
        randomize_(block)

        def call(b, m, z, mm, pm, chunk_size, inplace):
            return b(m, z, msa_mask=mm, pair_mask=pm, chunk_size=chunk_size, inplace_safe=inplace)
        return block, call
    block = our_block()
    if of_cls is not None:
        reference = openfold_block(of_cls)
        randomize_(reference)
        evo.load_openfold_state_dict(block, reference.state_dict())
        del reference
    else:
        randomize_(block)

    def call(b, m, z, mm, pm, chunk_size, inplace):
        return b(m, z, mm, pm, chunk_size, inplace=inplace)
    return block, call


def inputs(n_seq: int, n_res: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n_seq, n_res, C_M, generator=g)
    z = torch.randn(n_res, n_res, C_Z, generator=g)
    return m, z, torch.ones(n_seq, n_res), torch.ones(n_res, n_res)


def make_step(impl: str, mode: str, n_seq: int, n_res: int, openfold_dir: str | None):
    block, call = build(impl, openfold_dir)
    m, z, msa_mask, pair_mask = inputs(n_seq, n_res)
    if mode == "inference":
        block.eval()

        def step():
            with torch.no_grad():
                call(block, m.clone(), z.clone(), msa_mask, pair_mask, INFERENCE_CHUNK, True)
        return step
    block.train()
    g = torch.Generator().manual_seed(2)
    grad_m, grad_z = torch.randn(m.shape, generator=g), torch.randn(z.shape, generator=g)

    def step():
        m_in, z_in = m.clone().requires_grad_(), z.clone().requires_grad_()
        m_out, z_out = call(block, m_in, z_in, msa_mask, pair_mask, None, False)
        if mode == "train":
            torch.autograd.backward((m_out, z_out), (grad_m, grad_z))
            block.zero_grad(set_to_none=True)
    return step


# --------------------------------------------------------------------------------------------- measurement

def child_measure(impl, mode, n_seq, n_res, what, reps, openfold_dir) -> dict:
    torch.manual_seed(0)
    step = make_step(impl, mode, n_seq, n_res, openfold_dir)
    start = time.perf_counter()
    step()  # warm-up: thread pools, first touch of the weights
    result = {"warmup_s": round(time.perf_counter() - start, 3)}
    gc.collect()
    if what == "memory":
        if reset_peak_rss():
            before = status_kib("VmRSS")
            step()
            peak = status_kib("VmHWM")
            result.update(peak_rss_mib=round(peak / 1024, 1), peak_extra_mib=round((peak - before) / 1024, 1))
        else:  # no clear_refs: the whole process's high-water mark (warm-up included)
            step()
            result.update(peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                          peak_extra_mib=None, note="VmHWM could not be reset; peak includes the warm-up")
        return result
    times, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    result.update(time_s_median=round(statistics.median(times), 4), time_s_min=round(min(times), 4),
                  cpu_s_median=round(statistics.median(cpu), 4), reps=reps)
    return result


def child_agreement(n_seq, n_res, openfold_dir) -> dict:
    """Max abs differences between the two blocks with the same weights (eval: dropout off)."""
    ours, our_call = build("ours", openfold_dir)
    theirs, their_call = build("openfold", openfold_dir)
    ours.eval(), theirs.eval()
    m, z, mm, pm = inputs(n_seq, n_res)
    out = {"n_seq": n_seq, "n_res": n_res}
    with torch.no_grad():
        a, b = our_call(ours, m, z, mm, pm, None, False), their_call(theirs, m, z, mm, pm, None, False)
        out["forward_max_abs_diff"] = {"m": float((a[0] - b[0]).abs().max()), "z": float((a[1] - b[1]).abs().max())}
        out["forward_max_abs_value"] = {"m": float(b[0].abs().max()), "z": float(b[1].abs().max())}
        a = our_call(ours, m.clone(), z.clone(), mm, pm, INFERENCE_CHUNK, True)
        b = their_call(theirs, m.clone(), z.clone(), mm, pm, INFERENCE_CHUNK, True)
        out["chunked_inference_max_abs_diff"] = {"m": float((a[0] - b[0]).abs().max()),
                                                 "z": float((a[1] - b[1]).abs().max())}
    grads = []
    for block, call in ((ours, our_call), (theirs, their_call)):
        m_in, z_in = m.clone().requires_grad_(), z.clone().requires_grad_()
        m_out, z_out = call(block, m_in, z_in, mm, pm, None, False)
        (m_out.square().mean() + z_out.square().mean()).backward()
        grads.append((m_in.grad, z_in.grad))
    out["input_gradient_max_abs_diff"] = {"m": float((grads[0][0] - grads[1][0]).abs().max()),
                                          "z": float((grads[0][1] - grads[1][1]).abs().max())}
    out["input_gradient_max_abs_value"] = {"m": float(grads[1][0].abs().max()), "z": float(grads[1][1].abs().max())}
    return out


def child_fits(impl, n_seq, n_res, openfold_dir) -> dict:
    """One chunked-inference step under the address-space limit set by the parent."""
    step = make_step(impl, "inference", n_seq, n_res, openfold_dir)
    step()
    return {"fits": True, "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


# --------------------------------------------------------------------------------------------- the parent

def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unavailable"


def run_child(args_list, env, timeout=None, preexec_fn=None) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args_list], env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec_fn)
    if proc.returncode != 0:
        raise RuntimeError(f"bench/evoformer.py child {args_list} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def progress(msg: str, started: float, done: int, total: int) -> None:
    elapsed = time.perf_counter() - started
    eta = f", ETA {elapsed / done * (total - done):.0f} s" if done else ""
    print(f"[bench/evoformer] {done}/{total} {msg} (elapsed {elapsed:.0f} s{eta})", file=sys.stderr, flush=True)


def fit_quadratic(points):
    """Least-squares a + b N + c N^2 through (N, MiB) points; returns (a, b, c)."""
    xs = torch.tensor([[1.0, n, n * n] for n, _ in points], dtype=torch.float64)
    ys = torch.tensor([mib for _, mib in points], dtype=torch.float64)
    coef = torch.linalg.lstsq(xs, ys.unsqueeze(-1)).solution.squeeze(-1)
    return [float(c) for c in coef]


def solve_quadratic(coef, limit_mib) -> float:
    a, b, c = coef
    if c <= 0:
        return float("nan")
    return (-b + math.sqrt(b * b - 4 * c * (a - limit_mib))) / (2 * c)


def max_n_res_model(impl, n_seq, model_n_res, limit_gib, env, openfold_dir) -> dict:
    points = []
    for n_res in model_n_res:
        measured = run_child(["--child", "memory", impl, "inference", str(n_seq), str(n_res), "--reps", "1",
                              *(["--openfold", openfold_dir] if openfold_dir else [])], env)
        points.append((n_res, measured["peak_rss_mib"]))
    coef = fit_quadratic(points)
    limit_mib = limit_gib * 1024
    residual = max(abs(coef[0] + coef[1] * n + coef[2] * n * n - mib) for n, mib in points)
    return {"method": "extrapolated", "n_seq": n_seq, "limit_gib": limit_gib,
            "measured_peak_rss_mib": {str(n): mib for n, mib in points},
            "fit_mib": {"a": round(coef[0], 3), "b_per_res": round(coef[1], 5), "c_per_res2": round(coef[2], 8)},
            "fit_max_residual_mib": round(residual, 1),
            "max_n_res": int(solve_quadratic(coef, limit_mib))}


def max_n_res_bisect(impl, n_seq, lo, hi, limit_gib, timeout, env, openfold_dir) -> dict:
    limit = int(limit_gib * 2 ** 30)

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    tried, unknown = {}, None
    while hi - lo > 16:
        mid = (lo + hi) // 2
        try:
            run_child(["--child", "fits", impl, "inference", str(n_seq), str(mid),
                       *(["--openfold", openfold_dir] if openfold_dir else [])], env, timeout, limited)
            tried[mid], lo = "fits", mid
        except subprocess.TimeoutExpired:
            tried[mid], unknown = "timeout", mid
            break
        except RuntimeError:
            tried[mid], hi = "out of memory", mid
    return {"method": "bisection", "n_seq": n_seq, "limit_gib": limit_gib, "tried": tried,
            "max_n_res_at_least": lo, "stopped_by_timeout_at": unknown}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--openfold", default=os.environ.get("OPENFOLD_DIR") or
                        (DEFAULT_OPENFOLD if Path(DEFAULT_OPENFOLD).is_dir() else None),
                        help="folder holding OpenFold's unpacked openfold/ package (or OPENFOLD_DIR)")
    parser.add_argument("--sizes", default=",".join(f"{s}x{r}" for s, r in SIZES), help="N_seq x N_res, comma-separated")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--reps", type=int, default=3, help="timed steps per case (median reported)")
    parser.add_argument("--max-res-search", choices=("model", "bisect", "off"), default="model")
    parser.add_argument("--model-n-res", default="128,192,256,320", help="N_res points of the memory model")
    parser.add_argument("--memory-limit-gib", type=float, default=16.0)
    parser.add_argument("--search-timeout", type=float, default=1800.0, help="seconds per bisection step")
    parser.add_argument("--output", help="also write the JSON here (atomically)")
    parser.add_argument("--child", nargs=5, metavar=("WHAT", "IMPL", "MODE", "N_SEQ", "N_RES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        what, impl, mode, n_seq, n_res = args.child
        if what == "agreement":
            out = child_agreement(int(n_seq), int(n_res), args.openfold)
        elif what == "fits":
            out = child_fits(impl, int(n_seq), int(n_res), args.openfold)
        else:
            out = child_measure(impl, mode, int(n_seq), int(n_res), what, args.reps, args.openfold)
        print(json.dumps(out))
        return

    of_cls, reason = import_openfold(args.openfold)
    impls = ["ours"] + (["openfold"] if of_cls is not None else [])
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    of_args = ["--openfold", args.openfold] if args.openfold else []
    memory_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    timing_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    report = {
        "benchmark": "bench/evoformer.py", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)},
        "openfold": {"dir": args.openfold, "available": of_cls is not None, "reason": reason,
                     "commit": "ce0029e1199b65fd834fe822be50d936cfe57fd4 (per /work/shared/peers/README.md)"},
        "block": {"c_m": C_M, "c_z": C_Z, "msa_heads": "8 x 32", "pair_heads": "4 x 32", "opm": 32, "tri_mul": 128,
                  "transition": 4, "msa_dropout": 0.15, "pair_dropout": 0.25, "dtype": "float32",
                  "inference_chunk_size": INFERENCE_CHUNK},
        "cases": {}, "goals": GOALS,
    }
    jobs = [(mode, s, r, impl) for (s, r) in sizes for mode in modes for impl in impls]
    total = len(jobs) + (1 if of_cls is not None else 0) + (len(impls) if args.max_res_search != "off" else 0)
    started, done = time.perf_counter(), 0
    if of_cls is not None:
        progress("agreement", started, done, total)
        report["agreement"] = run_child(["--child", "agreement", "both", "-", "16", "64", *of_args], timing_env)
        done += 1
    for mode, n_seq, n_res, impl in jobs:
        progress(f"{mode} {impl} N_seq {n_seq} N_res {n_res}", started, done, total)
        case = {"uptime_before": uptime()}
        child = ["--child", "{}", impl, mode, str(n_seq), str(n_res), "--reps", str(args.reps), *of_args]
        case.update(run_child([c if c != "{}" else "time" for c in child], timing_env))
        case.update({k: v for k, v in run_child([c if c != "{}" else "memory" for c in child], memory_env).items()
                     if k.startswith("peak") or k == "note"})
        case["uptime_after"] = uptime()
        report["cases"].setdefault(f"{mode}_{n_seq}x{n_res}", {})[impl] = case
        done += 1
    if "openfold" in impls:
        for key, pair in report["cases"].items():
            if "openfold" in pair:
                o, t = pair["ours"], pair["openfold"]
                pair["ratio_ours_over_openfold"] = {
                    "time": round(o["time_s_median"] / t["time_s_median"], 3),
                    "cpu_time": round(o["cpu_s_median"] / t["cpu_s_median"], 3),
                    "peak_rss": round(o["peak_rss_mib"] / t["peak_rss_mib"], 3),
                    "peak_extra": (round(o["peak_extra_mib"] / t["peak_extra_mib"], 3)
                                   if o.get("peak_extra_mib") and t.get("peak_extra_mib") else None)}
    if args.max_res_search != "off":
        report["max_n_res"] = {}
        for impl in impls:
            progress(f"max N_res search ({args.max_res_search}) {impl}", started, done, total)
            if args.max_res_search == "model":
                found = max_n_res_model(impl, 32, [int(n) for n in args.model_n_res.split(",")],
                                        args.memory_limit_gib, memory_env, args.openfold)
            else:
                found = max_n_res_bisect(impl, 32, 64, 8192, args.memory_limit_gib, args.search_timeout,
                                         timing_env, args.openfold)
            found["uptime_after"] = uptime()
            report["max_n_res"][impl] = found
            done += 1
    report["total_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as tmp:
            tmp.write(text + "\n")
        os.replace(tmp.name, out)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
