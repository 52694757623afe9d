"""Pretrain a protein BERT on Pfam (masked language modelling) with Megatron-LM's flags.

    # one process
    python pretrain/pretrain_protein_bert.py --data-path /data/pfam --num-layers 4 --hidden-size 256 ...
    # tensor parallel on 2 local processes (CPU: gloo; GPU: NCCL)
    torchrun --nproc_per_node 2 pretrain/pretrain_protein_bert.py --tensor-model-parallel-size 2 ...

Parses the flags, lays out the process groups, and hands over to megatron_protein.training.train_loop.pretrain.
Known errors (bad flags or data, a refused checkpoint, a --save in use, ...) print one line ``error: ...`` once
and exit with status 2; see docs/security.md. See docs/pretraining.md and scripts/pretrain_pfam.sh.
"""
import datetime
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_protein.parallel import scg  # noqa: E402
from megatron_protein.training.arguments import configs_from_args, parse_args  # noqa: E402
from megatron_protein.training.train_loop import pretrain  # noqa: E402
from megatron_protein.utils import errors  # noqa: E402


def main(argv=None) -> int:
    # Rank 0 tells the story; the other ranks speak only for warnings and errors.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    with errors.config_phase():
        config = configs_from_args(parse_args(argv))
    timeout = datetime.timedelta(minutes=config.parallel.distributed_timeout_minutes)
    groups = scg.init_process_group(config.parallel.degrees(), timeout=timeout)
    try:
        pretrain(config, groups)
    except BaseException as exc:
        errors.claim_report(exc)  # while the process group (and its store) still exists
        raise
    finally:
        scg.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_cli(main))
