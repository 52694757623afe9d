"""``folding/train.py``: parse the flags, set up the process (threads, logging, parallel groups), train, report.

Errors a user can fix (a bad flag value, a checkpoint of another config, unreadable data) end the process with
exit status 2 and one line ``error: <file>: <what is wrong>``; nothing is left half-written (checkpoints and JSON
files are written to temporary names and renamed).
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Optional, Sequence

from megatron_protein.training.folding_arguments import parse_args


def parallel_groups(args, run, config):
    """The DP x DAP x BP process groups of this rank (``scg.init_process_group``), or None for one process.

    Every check here depends only on the flags and the environment, so each rank fails alike, before any
    collective: ``--dap_degree``/``--bp_degree`` > 1 without ``--distributed``; ``--distributed`` outside torchrun;
    degrees that do not divide the number of processes; ``--bp_degree`` > 2; no ``--seed`` with dap or bp > 1
    (the ranks that share one forward pass must draw the same random numbers, so the seed is not left to a
    default). The number of dp replicas is the rest: world size / (dap * bp).
    """
    import os

    from megatron_protein.parallel import scg

    split = run.dap_degree > 1 or run.bp_degree > 1
    if not run.distributed:
        if split:
            raise scg.ParallelConfigError(
                f"--dap_degree {run.dap_degree} --bp_degree {run.bp_degree} needs several processes: launch with "
                f"torchrun --nproc_per_node {run.dap_degree * run.bp_degree} folding/train.py --distributed ...")
        return None
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise scg.ParallelConfigError("--distributed: RANK/WORLD_SIZE are not set; launch with torchrun "
                                      "(e.g. torchrun --nproc_per_node 2 folding/train.py --distributed ...)")
    if split and args.seed is None:
        raise scg.ParallelConfigError(
            f"--seed: required with --dap_degree {run.dap_degree} / --bp_degree {run.bp_degree} (every rank of a "
            f"dap or bp group must draw the same random numbers); pass --seed S")
    return scg.init_process_group(parallel_degree=[("dp", None), ("dap", run.dap_degree), ("bp", run.bp_degree)],
                                  seed=config.train.seed)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, config, run = parse_args(argv)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=1))
        return 0
    logging.basicConfig(level=logging.INFO, format="[folding] %(message)s", stream=sys.stdout)

    import torch

    from megatron_protein.data.folding_dataset import FoldingDataError
    from megatron_protein.data.msa import MsaError
    from megatron_protein.parallel import dap, scg
    from megatron_protein.training.checkpointing import CheckpointError
    from megatron_protein.training.folding_trainer import FoldingTrainer, FoldingTrainingError

    groups = None
    try:
        groups = parallel_groups(args, run, config)
    except (scg.ParallelConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        trainer = FoldingTrainer(config, run, args, groups=groups)
        trainer.train()
    except (scg.ParallelConfigError, dap.DAPHookError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (CheckpointError, FoldingDataError, MsaError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FoldingTrainingError as exc:
        print(f"error: {run.model_dir}: {exc}", file=sys.stderr)
        return 1
    return 0
