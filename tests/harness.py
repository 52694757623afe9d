"""Run a function in N local processes on gloo and collect what each returns.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes, each with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and a free MASTER_PORT in its environment, calls ``fn(*args)`` in each, and returns the
list of results ordered by rank. ``fn`` must be a module-level function (it is pickled), and it normally starts
with ``scg.init_process_group(...)``.

A rank that raises fails the call with that rank's traceback; the other ranks are killed, so a peer blocked in a
collective cannot hang the test. A run that has not finished in ``timeout`` seconds is killed and reported with the
ranks that had not finished.
"""
from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp


class DistributedTestError(AssertionError):
    """A rank failed or the run timed out; the message holds every failing rank's traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _worker(fn, rank, world_size, port, args, kwargs, extra_env, results):
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    })
    os.environ.update(extra_env)
    torch.set_num_threads(1)
    try:
        value = fn(*args, **kwargs)
        results.put((rank, "ok", _to_bytes(value)))
    except BaseException:  # noqa: BLE001 - the traceback goes to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 180.0, env: dict | None = None,
                    **kwargs) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return the per-rank results, rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, kwargs, dict(env or {}), results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pending = sorted(set(range(world_size)) - set(outputs) - set(errors))
                detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
                raise DistributedTestError(
                    f"timed out after {timeout:.0f}s; ranks {pending} did not finish{detail}")
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if not p.is_alive() and p.exitcode not in (0, None) and r not in outputs and r not in errors]
                if dead:
                    for r in dead:
                        errors[r] = f"process exited with code {procs[r].exitcode} without reporting"
                continue
            if status == "ok":
                outputs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors[rank] = payload
                break  # one failure is enough: the peers may be blocked in a collective
        if errors:
            # Give the other ranks a moment to report their own errors (the first one may be a consequence).
            grace = time.monotonic() + 2.0
            while time.monotonic() < grace and len(outputs) + len(errors) < world_size:
                try:
                    rank, status, payload = results.get(timeout=0.2)
                    if status == "error":
                        errors[rank] = payload
                except queue.Empty:
                    pass
            detail = "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise DistributedTestError(f"{len(errors)} of {world_size} ranks failed:{detail}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)
    return [outputs[r] for r in range(world_size)]
