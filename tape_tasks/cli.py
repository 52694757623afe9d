"""Command-line flags of ``finetune/tape_{train,eval,embed}.py``: TAPE's names and defaults, turned into configs.

TAPE users keep their commands: ``tape_train.py transformer secondary_structure --from_pretrained DIR
--batch_size 32 ...`` and ``tape_eval.py transformer secondary_structure RUN_DIR --metrics accuracy --split cb513``.
Added: ProteinLM's ``--force_save PATH`` and ``--time_or_name``, ``--bf16``, ``--pooling``, ``--max_steps``,
``--data_format``, and ``--contact_range`` for the contact metrics. ``--local_rank`` is accepted and ignored
(torchrun passes the rank in the environment).
"""
from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

from megatron_protein.utils import errors

from .metrics import CONTACT_METRICS, METRICS, SEPARATION_RANGES
from .registry import TASKS
from .training import EmbedConfig, EvalConfig, TrainConfig, run_embed, run_eval, run_train

MODELS = ["transformer", "onehot"]


def _int_or_str(value: str):
    try:
        return int(value)
    except ValueError:
        return value


def _base_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("model_type", choices=MODELS, help="backbone: the pre-LN protein BERT or the one-hot baseline")
    parser.add_argument("--no_cuda", action="store_true", help="run on CPU even when a GPU is present")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes (TAPE: 8)")
    parser.add_argument("--tokenizer", choices=["iupac"], default="iupac")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Finetune a model on a TAPE task", parents=[_base_parser()])
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--from_pretrained", default=None, help="model directory (config.json + pytorch_model.bin)")
    parser.add_argument("--model_config_file", default=None, help="config.json for a model trained from scratch")
    parser.add_argument("--data_dir", default="./data", help="TAPE data directory (or data/tape of this repository)")
    parser.add_argument("--data_format", choices=["auto", "lmdb", "json"], default="auto")
    parser.add_argument("--output_dir", default="./results")
    parser.add_argument("--log_dir", default="./logs", help="TensorBoard logs")
    parser.add_argument("--exp_name", default=None, help="run name (default <task>_<model>_<time_or_name>)")
    parser.add_argument("--time_or_name", default="time",
                        help="run-name suffix: 'time' = timestamp + 6 random digits (default), else this NAME")
    parser.add_argument("--force_save", default=None, metavar="PATH",
                        help="write the initial model (pretrained backbone + new head) to PATH and exit")
    parser.add_argument("--batch_size", type=int, default=1024, help="global batch size (all ranks, all "
                                                                     "accumulation steps)")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--num_train_epochs", type=int, default=10)
    parser.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps")
    parser.add_argument("--warmup_steps", type=int, default=10000)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--fp16", action="store_true", help="float16 autocast (CUDA)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPU or CUDA)")
    parser.add_argument("--compile_layers", action="store_true",
                        help="CPU: run the transformer layers of training steps through one torch.compile'd "
                             "forward (the first step compiles it; docs/kernels.md)")
    parser.add_argument("--save_freq", type=_int_or_str, default=1, help="save every N epochs, or 'improvement'")
    parser.add_argument("--eval_freq", type=int, default=1, help="validation pass every N epochs (<= 0: never)")
    parser.add_argument("--patience", type=int, default=-1, help="stop after N epochs without improvement")
    parser.add_argument("--resume_from_checkpoint", action="store_true",
                        help="also restore optimizer, scheduler and epoch from --from_pretrained/checkpoint.bin")
    parser.add_argument("--trust_checkpoint", "--trust-checkpoint", action="store_true", dest="trust_checkpoint",
                        help="load checkpoint.bin with the full unpickler, which can run code from the file (only "
                             "for old files you trust that the safe loader refuses)")
    parser.add_argument("--pooling", choices=["mean", "cls"], default=None, help="per-protein pooling (default: "
                                                                                  "the config's, mean)")
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout inside the task head")
    parser.add_argument("--max_consecutive_skipped_steps", type=int, default=10,
                        help="stop after this many consecutive steps skipped for a non-finite loss or gradient")
    parser.add_argument("--distributed-timeout-minutes", "--distributed_timeout_minutes", type=float, default=10.0,
                        dest="distributed_timeout_minutes",
                        help="how long a collective waits for the other ranks before the run fails (default 10)")
    # Accepted so TAPE command lines keep working; every optimizer step is logged to TensorBoard here.
    parser.add_argument("--num_log_iter", type=int, default=20, help=argparse.SUPPRESS)
    return parser


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate a finetuned model on a TAPE task",
                                     parents=[_base_parser()])
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("from_pretrained", help="finetuned model directory")
    parser.add_argument("--data_dir", default="./data")
    parser.add_argument("--data_format", choices=["auto", "lmdb", "json"], default="auto")
    parser.add_argument("--split", nargs="+", default=["test"], help="one or more splits")
    parser.add_argument("--metrics", nargs="*", default=[],
                        help=f"default: the task's; choices: {sorted(METRICS) + sorted(CONTACT_METRICS)}")
    parser.add_argument("--contact_range", nargs="+", choices=list(SEPARATION_RANGES),
                        default=["short", "medium", "long", "medium_long", "all"],
                        help="sequence-separation ranges of contact precision: short 6-11, medium 12-23, long 24+, "
                             "medium_long 12+ (TAPE paper), all 6+ (TAPE code)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--results_file", default=None, help="default FROM_PRETRAINED/tape_eval_<task>.json")
    return parser


def embed_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Embed the proteins of a FASTA file", parents=[_base_parser()])
    parser.add_argument("data_file", help="FASTA file")
    parser.add_argument("out_file", help=".npz output")
    parser.add_argument("from_pretrained", nargs="?", default=None, help="model directory (not for onehot)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--full_sequence_embed", action="store_true", help="also write per-residue embeddings")
    parser.add_argument("--pooling", choices=["mean", "cls"], default=None)
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _pick(cls, args: argparse.Namespace, **renames):
    names = set(cls.__dataclass_fields__)
    values = {k: v for k, v in vars(args).items() if k in names}
    for field_name, arg_name in renames.items():
        values[field_name] = getattr(args, arg_name)
    return cls(**values)


def train_main(argv: Optional[Sequence[str]] = None):
    args = errors.one_line_parse_errors(train_parser()).parse_args(argv)
    _configure_logging(args.log_level)
    with errors.config_phase():
        config = _pick(TrainConfig, args)
    return run_train(config)


def eval_main(argv: Optional[Sequence[str]] = None):
    args = errors.one_line_parse_errors(eval_parser()).parse_args(argv)
    _configure_logging(args.log_level)
    with errors.config_phase():
        config = _pick(EvalConfig, args, contact_ranges="contact_range")
    return run_eval(config)


def embed_main(argv: Optional[Sequence[str]] = None):
    args = errors.one_line_parse_errors(embed_parser()).parse_args(argv)
    _configure_logging(args.log_level)
    with errors.config_phase():
        config = _pick(EmbedConfig, args)
    return run_embed(config)


def command(main):
    """``main`` as a command line: exit status 0, or 2 with one line for a known error (docs/security.md)."""
    def run(argv: Optional[Sequence[str]] = None) -> int:
        main(argv)
        return 0
    return errors.run_cli(run)
