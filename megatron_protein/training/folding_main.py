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

from megatron_protein.training.folding_arguments import PARALLEL_FLAGS, parse_args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, config, run = parse_args(argv)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=1))
        return 0
    logging.basicConfig(level=logging.INFO, format="[folding] %(message)s", stream=sys.stdout)
    if run.distributed or run.dap_degree > 1 or run.bp_degree > 1:
        used = [f"--{name}" for name in PARALLEL_FLAGS if getattr(args, name) not in (False, 1)]
        print(f"error: {' '.join(used)}: data/dynamic-axial/branch parallel folding training is not built yet in "
              "this version; run on one process (omit these flags)", file=sys.stderr)
        return 2

    import torch

    from megatron_protein.data.folding_dataset import FoldingDataError
    from megatron_protein.training.checkpointing import CheckpointError
    from megatron_protein.training.folding_trainer import FoldingTrainer, FoldingTrainingError

    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        trainer = FoldingTrainer(config, run, args)
        trainer.train()
    except (CheckpointError, FoldingDataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FoldingTrainingError as exc:
        print(f"error: {run.model_dir}: {exc}", file=sys.stderr)
        return 1
    return 0
