"""Pretrain a protein BERT on Pfam (masked language modelling) with Megatron-LM's flags.

    # one process
    python pretrain/pretrain_protein_bert.py --data-path /data/pfam --num-layers 4 --hidden-size 256 ...
    # tensor parallel on 2 local processes (CPU: gloo; GPU: NCCL)
    torchrun --nproc_per_node 2 pretrain/pretrain_protein_bert.py --tensor-model-parallel-size 2 ...

Parses the flags, lays out the process groups, and hands over to megatron_protein.training.train_loop.pretrain.
See docs/pretraining.md and scripts/pretrain_pfam.sh.
"""
import logging
import os
import sys

from megatron_protein.parallel import scg
from megatron_protein.training.arguments import configs_from_args, parse_args
from megatron_protein.training.train_loop import pretrain


def main(argv=None) -> int:
    # Rank 0 tells the story; the other ranks speak only for warnings and errors.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    config = configs_from_args(parse_args(argv))
    groups = scg.init_process_group(config.parallel.degrees())
    try:
        pretrain(config, groups)
    finally:
        scg.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
