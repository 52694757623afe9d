"""Overhead of the core's autograd collectives over raw torch.distributed, at the same size in the same run.

Times, on every rank of a gloo (CPU) or NCCL (GPU) group:

* ``reduce_from_group`` (an out-of-place copy, then ``all_reduce``) and ``reduce_from_group_`` (in place, what
  RowParallelLinear uses) against a raw in-place ``torch.distributed.all_reduce`` of a preallocated tensor;
* ``all_to_all(x, scatter_dim=1, gather_dim=0)`` (the DAP transposition: the chunks of dim 1 are packed for the
  wire, received chunks land directly along dim 0) against a raw ``all_to_all_single`` of a contiguous tensor;
* ``all_to_all_async`` + ``wait()`` (the same exchange through the async path) against the same raw baseline.

Each repetition runs core and raw back to back after a barrier (interleaved, so a busy machine slows both alike);
the JSON reports the median and the ratio core / raw. Run::

    python bench/collectives.py                     # spawns 2 local processes
    torchrun --nproc-per-node 2 bench/collectives.py --size-mb 16 --reps 40
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist

from _launch import run_and_print
from megatron_protein.parallel import collectives, scg


def _timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bench(args) -> dict:
    torch.set_num_threads(1)
    pg = scg.init_process_group([("world", None)])
    group = pg.group("world")
    world = pg.size("world")
    numel = int(args.size_mb * 2 ** 20) // 4
    side = int(numel ** 0.5) // (world * world) * (world * world)
    x = torch.randn(side, side, device=pg.device)
    raw_buffer = x.clone()
    raw_out = torch.empty_like(x)

    inplace_buffer = x.clone()
    cases = {
        "all_reduce": (lambda: collectives.reduce_from_group(x, group),
                       lambda: dist.all_reduce(raw_buffer, group=group)),
        "all_reduce_inplace": (lambda: collectives.reduce_from_group_(inplace_buffer, group),
                               lambda: dist.all_reduce(raw_buffer, group=group)),
        "all_to_all": (lambda: collectives.all_to_all(x, 1, 0, group),
                       lambda: dist.all_to_all_single(raw_out, x, group=group)),
        "all_to_all_async": (lambda: collectives.all_to_all_async(x, 1, 0, group)[1].wait(),
                             lambda: dist.all_to_all_single(raw_out, x, group=group)),
    }
    # Correctness of what is timed: the core all-to-all equals the raw one after the same exchange of layouts.
    expected = torch.empty(world * side, side // world, device=pg.device)
    dist.all_to_all_single(expected, torch.cat(x.chunk(world, 1), 0).contiguous(), group=group)
    if not torch.equal(collectives.all_to_all(x, 1, 0, group), expected):
        raise RuntimeError("core all_to_all differs from the raw exchange")

    results = {}
    for name, (core, raw) in cases.items():
        for _ in range(args.warmup):
            core(), raw()
        core_times, raw_times = [], []
        case_start = time.perf_counter()
        for i in range(args.reps):
            if args.progress and pg.rank == 0 and i % 10 == 0 and i > 0:
                rate = i / (time.perf_counter() - case_start)
                print(f"[bench] {name}: repetition {i}/{args.reps}, {rate:.1f} rep/s, "
                      f"ETA {(args.reps - i) / rate:.0f} s", file=sys.stderr, flush=True)
            core_times.append(_timed(core))
            raw_times.append(_timed(raw))
        core_ms, raw_ms = 1e3 * statistics.median(core_times), 1e3 * statistics.median(raw_times)
        results[name] = {"core_ms_median": round(core_ms, 3), "raw_ms_median": round(raw_ms, 3),
                         "overhead_ratio": round(core_ms / raw_ms, 3),
                         "core_ms_min": round(1e3 * min(core_times), 3), "raw_ms_min": round(1e3 * min(raw_times), 3)}
    return {"benchmark": "collectives", "backend": pg.backend, "world_size": world, "device": str(pg.device),
            "tensor_shape": list(x.shape), "tensor_mb": round(x.numel() * 4 / 2 ** 20, 2), "dtype": "float32",
            "reps": args.reps, "torch": torch.__version__, "results": results}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=float, default=16.0, help="tensor size in MiB (float32)")
    parser.add_argument("--reps", type=int, default=40, help="timed repetitions per case")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--world-size", type=int, default=2, help="processes to spawn when not under torchrun")
    parser.add_argument("--progress", action="store_true", help="print progress to stderr")
    args = parser.parse_args(argv)

    run_and_print(_bench, args, args.world_size)

if __name__ == "__main__":
    main()
