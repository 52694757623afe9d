"""DAP and BP scaling of one Evoformer block at AlphaFold2's sizes: 1 process x 1 thread against 2 processes x 1
thread (gloo, CPU), inference and a training step.

    python bench/dap.py                                   # both sizes, inference and training, dap=2 and bp=2
    python bench/dap.py --sizes 64x256 --modes infer --reps 2 --output bench/results/dap_quick.json

For every (N_seq, N_res) in ``--sizes`` and every mode (``infer``: forward under no_grad; ``train``: forward and
backward with a fixed upstream gradient), three layouts run one after another, each in fresh processes:

* ``single``: 1 process, 1 thread, the block as the one-process model runs it (OPM in the middle for the dap
  comparison; OPM at the end, the Parallel Evoformer, for the bp comparison: ``single_end``);
* ``dap2``: 2 processes x 1 thread, the MSA and pair split over the dap group (row layout at entry, FastFold's
  layout switches inside the block, async MSA col_to_row overlapping the pair stack);
* ``bp2``: 2 processes x 1 thread, the Parallel Evoformer block's MSA branch on one rank, pair branch on the other.

Block sizes (AF2 supplement Table 1): c_m 256, c_z 128, MSA attention 8 x 32, OPM 32, triangle multiplication 128,
triangle attention 4 x 32, transitions x4; no chunking; dropout on in training. Inputs of the parallel layouts are
scattered before the clock starts: the entry scatter and exit gather happen once per stack (48 blocks), not per
block. Reported per layout: median step time, speedup and scaling efficiency (speedup / 2) against ``single``,
peak memory of the step per rank (the rise of VmHWM over the RSS before the step: the activations the block
allocates, which DAP should cut to about 1/2), and per rank the time blocked inside ``torch.distributed`` calls
(sync calls and waits on async ones: communication not hidden behind computation) and the bytes sent.

The machine is shared: ``load_before`` / ``load_after`` (1-minute load average) are recorded for every layout.
Scaling numbers need both cores free (a load under about 1 besides this benchmark); with a higher load they
measure the other users. The JSON goes to stdout and, with ``--output``, to a file (written to a temporary name,
then renamed).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import queue as queue_module
import socket
import statistics
import sys
import time

import torch
import torch.multiprocessing as mp

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from _memory import reset_peak_rss, status_kib  # noqa: E402 (bench/ is the script's directory)

LAYOUTS = {  # name: (world size, dap degree, bp degree, OPM position)
    "single": (1, 1, 1, "middle"),
    "dap2": (2, 2, 1, "middle"),
    "single_end": (1, 1, 1, "end"),
    "bp2": (2, 1, 2, "end"),
}
BASELINE = {"dap2": "single", "bp2": "single_end"}


# ------------------------------------------------------------------------------------------ measuring inside a rank

class CommTimer:
    """Wraps the ``torch.distributed`` calls the parallel core makes; sums the time blocked in them and the bytes
    each rank sends. Async calls count their launch and their ``wait()``, not the time they run in the background."""

    NAMES = ("all_to_all_single", "all_gather_single", "reduce_scatter_single", "all_reduce", "broadcast")

    def __init__(self):
        import torch.distributed as dist
        self.dist, self.seconds, self.bytes, self.calls, self._saved = dist, 0.0, 0, 0, {}

    def _wrap(self, name, fn):
        timer = self

        class TimedWork:
            def __init__(self, work):
                self._work = work

            def wait(self, *args, **kwargs):
                start = time.perf_counter()
                try:
                    return self._work.wait(*args, **kwargs)
                finally:
                    timer.seconds += time.perf_counter() - start

            def __getattr__(self, item):
                return getattr(self._work, item)

        def wrapped(*args, **kwargs):
            tensor = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if name in ("all_to_all_single", "all_gather_single", "reduce_scatter_single"):
                tensor = args[1] if len(args) > 1 else kwargs.get("input", tensor)
            if tensor is not None:
                timer.bytes += tensor.numel() * tensor.element_size()
            timer.calls += 1
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            timer.seconds += time.perf_counter() - start
            return TimedWork(result) if kwargs.get("async_op") else result

        return wrapped

    def __enter__(self):
        for name in self.NAMES:
            self._saved[name] = getattr(self.dist, name)
            setattr(self.dist, name, self._wrap(name, self._saved[name]))
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(self.dist, name, fn)

    def reset(self):
        self.seconds, self.bytes, self.calls = 0.0, 0, 0


def _rank_main(rank: int, world: int, port: int, layout: str, size: tuple, mode: str, reps: int, results):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    try:
        results.put((rank, _measure(layout, size, mode, reps)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback
        results.put((rank, {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}))
    finally:
        from megatron_protein.parallel import scg
        scg.destroy_process_group()


def _measure(layout: str, size: tuple, mode: str, reps: int) -> dict:
    from megatron_protein.models.folding.evoformer import EvoformerBlock, EvoformerConfig
    from megatron_protein.parallel import dap, scg

    world, n_dap, n_bp, opm = LAYOUTS[layout]
    pg = scg.init_process_group(parallel_degree=[("dp", None), ("dap", n_dap), ("bp", n_bp)], seed=0)
    num_seq, num_res = size
    train = mode == "train"
    torch.manual_seed(0)
    block = EvoformerBlock(EvoformerConfig(outer_product_mean_position=opm))
    with torch.no_grad():  # non-zero final layers, so the backward does the full work
        for p in block.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    block.train(train)
    m = torch.randn(1, num_seq, num_res, 256)
    z = torch.randn(1, num_res, num_res, 128)
    msa_mask = torch.ones(1, num_seq, num_res)
    pair_mask = torch.ones(1, num_res, num_res)
    m_local, z_local = dap.scatter(m, -3, pg), dap.scatter(z, -3, pg)
    del m, z
    grad_m = torch.randn_like(m_local)
    grad_z = torch.randn_like(z_local)

    def step():
        if train:
            mi = m_local.detach().requires_grad_()
            zi = z_local.detach().requires_grad_()
            out_m, out_z = block(mi, zi, msa_mask, pair_mask)
            ((out_m * grad_m).sum() + (out_z * grad_z).sum()).backward()
            block.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                block(m_local, z_local, msa_mask, pair_mask)

    step()  # warm-up (allocator, thread pools)
    gc.collect()
    peak_mib = None
    if reset_peak_rss():
        before = status_kib("VmRSS")
        step()
        peak_mib = round((status_kib("VmHWM") - before) / 1024, 1)
    times, comm, comm_bytes = [], [], 0
    with CommTimer() as timer:
        for _ in range(reps):
            timer.reset()
            if pg.group("world") is not None:
                torch.distributed.barrier(group=pg.group("world"))  # start together
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
            comm.append(timer.seconds)
            comm_bytes = timer.bytes
    return {"time_s": times, "comm_blocked_s": comm, "comm_mib_sent": round(comm_bytes / 2 ** 20, 1),
            "peak_step_mib": peak_mib, "rss_mib": round(status_kib("VmRSS") / 1024, 1)}


# ------------------------------------------------------------------------------------------ the parent

def _load() -> float:
    return round(os.getloadavg()[0], 2)


def run_layout(layout: str, size: tuple, mode: str, reps: int, timeout: float) -> dict:
    world = LAYOUTS[layout][0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    load_before = _load()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, layout, size, mode, reps, results))
             for r in range(world)]
    for p in procs:
        p.start()
    per_rank = {}
    deadline = time.monotonic() + timeout
    try:
        while len(per_rank) < world:
            try:
                rank, value = results.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue_module.Empty:
                raise TimeoutError(f"{layout} {size} {mode}: no result within {timeout:.0f} s") from None
            per_rank[rank] = value
            if "error" in value:
                raise RuntimeError(f"{layout} {size} {mode} rank {rank}: {value['traceback']}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    ranks = [per_rank[r] for r in range(world)]
    step_times = [max(ts) for ts in zip(*(r["time_s"] for r in ranks))]  # a parallel step ends with its last rank
    return {"world_size": world, "time_s_median": round(statistics.median(step_times), 3),
            "time_s_all": [round(t, 3) for t in step_times],
            "peak_step_mib_per_rank": [r["peak_step_mib"] for r in ranks],
            "comm_blocked_s_median_per_rank": [round(statistics.median(r["comm_blocked_s"]), 3) for r in ranks],
            "comm_mib_sent_per_rank": [r["comm_mib_sent"] for r in ranks],
            "load_before": load_before, "load_after": _load()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64x256,128x384", help="comma-separated N_seqxN_res")
    parser.add_argument("--modes", default="infer,train", help="comma-separated subset of infer,train")
    parser.add_argument("--layouts", default="single,dap2,single_end,bp2",
                        help=f"comma-separated subset of {','.join(LAYOUTS)}")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per layout (median reported)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per layout before giving up")
    parser.add_argument("--output", help="also write the JSON here (temporary name, then rename)")
    args = parser.parse_args(argv)
    sizes = []
    for item in args.sizes.split(","):
        try:
            num_seq, num_res = (int(v) for v in item.lower().split("x"))
        except ValueError:
            parser.error(f"--sizes: {item!r} is not N_seqxN_res (e.g. 64x256)")
        sizes.append((num_seq, num_res))
    layouts = args.layouts.split(",")
    unknown = [x for x in layouts if x not in LAYOUTS]
    if unknown:
        parser.error(f"--layouts: unknown {unknown}; choose from {list(LAYOUTS)}")
    report = {"benchmark": "bench/dap.py", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "processor": platform.processor() or platform.machine(), "torch": torch.__version__},
              "block": "EvoformerBlock, AF2 sizes (c_m 256, c_z 128), fp32, no chunking, 1 thread per process",
              "reps": args.reps, "results": []}
    for num_seq, num_res in sizes:
        for mode in args.modes.split(","):
            entry = {"n_seq": num_seq, "n_res": num_res, "mode": mode, "layouts": {}}
            for layout in layouts:
                print(f"[bench/dap] {num_seq}x{num_res} {mode} {layout} (load {_load()})", file=sys.stderr,
                      flush=True)
                entry["layouts"][layout] = run_layout(layout, (num_seq, num_res), mode, args.reps, args.timeout)
            for layout, base in BASELINE.items():
                if layout in entry["layouts"] and base in entry["layouts"]:
                    t1 = entry["layouts"][base]["time_s_median"]
                    t2 = entry["layouts"][layout]["time_s_median"]
                    peak1 = entry["layouts"][base]["peak_step_mib_per_rank"][0]
                    peaks = entry["layouts"][layout]["peak_step_mib_per_rank"]
                    entry["layouts"][layout].update({
                        "speedup": round(t1 / t2, 3), "scaling_efficiency": round(t1 / t2 / 2, 3),
                        "peak_step_ratio_to_single": (None if not peak1 or None in peaks
                                                      else round(max(peaks) / peak1, 3))})
            report["results"].append(entry)
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        tmp = f"{args.output}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.output)
    return report


if __name__ == "__main__":
    main()
