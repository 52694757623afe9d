"""Run a multi-process benchmark under torchrun or, without it, in local spawned processes (gloo on CPU).

``run_and_print(bench, args, world_size)`` calls ``bench(args)`` on every rank and prints rank 0's result as JSON;
``run_spawned(bench, args, world_size)`` returns it instead (for a benchmark made of several launches).
"""
from __future__ import annotations

import json
import os
import socket

import torch.multiprocessing as mp

from megatron_protein.parallel import scg


def _spawned(rank, world, port, bench, args, queue):
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        result = bench(args)
        if rank == 0:
            queue.put(result)
    finally:
        scg.destroy_process_group()


def run_and_print(bench, args, world_size: int) -> None:
    if "RANK" in os.environ:  # under torchrun: this process is one rank
        result = bench(args)
        if int(os.environ["RANK"]) == 0:
            print(json.dumps(result))
        scg.destroy_process_group()
        return
    print(json.dumps(run_spawned(bench, args, world_size)))


def run_spawned(bench, args, world_size: int):
    """Run ``bench(args)`` in ``world_size`` local spawned processes (gloo); return rank 0's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_spawned, args=(world_size, port, bench, args, queue), nprocs=world_size,
                       start_method="spawn")
    return queue.get()
