"""Command-line flags of ``folding/train.py`` -> a :class:`FoldingConfig` plus the run's options.

Flag names are the ones HelixFold and OpenFold users know (``--config_preset``, ``--crop_size``,
``--max_msa_clusters``, ``--train_step``, ``--batch_size``, ``--lr``, ``--warmup_steps``, ``--grad_clip``,
``--seed``, ``--precision``, ``--log_step``, ``--eval_step``, ``--save_step``, ``--model_dir``, ``--init_model``,
``--chunk_size``, ``--no_dropout``). Any other config value is set with ``--override section.field=value``
(repeatable; e.g. ``--override model.evoformer.num_blocks=4``); ``--print_config`` shows every field.

Order of precedence: the preset, then ``--override`` assignments, then the named flags.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

from megatron_protein.models.folding.config import PRESETS, ConfigError, FoldingConfig, preset

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_DATA = os.path.join(REPO_ROOT, "data", "structures", "chains_sample.npz")

#: Named flags -> config paths (``None`` default = keep the preset's value).
FLAG_TO_CONFIG = {
    "crop_size": "data.crop_size",
    "max_msa_clusters": "data.max_msa_clusters",
    "max_extra_msa": "data.max_extra_msa",
    "profile_dropout": "data.profile_dropout",
    "max_recycling_iters": "model.max_recycling_iters",
    "train_step": "train.train_step",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "warmup_steps": "train.warmup_steps",
    "grad_clip": "train.grad_clip",
    "seed": "train.seed",
    "precision": "train.precision",
    "log_step": "train.log_step",
    "eval_step": "train.eval_step",
    "save_step": "train.save_step",
}

#: Reserved for the hybrid-parallel work (DP x DAP x BP), so that no other meaning can take these names.
PARALLEL_FLAGS = ("distributed", "dap_degree", "bp_degree")


@dataclass
class RunOptions:
    """What is not part of the model/training config: paths and switches of this invocation."""

    model_dir: str
    data: str = DEFAULT_DATA
    #: Folders of ``<chain id>.a3m`` (or ``.a3m.gz``, ``.sto``) MSAs, first match wins; None: the embedded ones.
    msa_dirs: Optional[List[str]] = None
    init_model: Optional[str] = None
    chunk_size: Optional[int] = None
    eval_max_chains: Optional[int] = None
    exit_step: Optional[int] = None
    num_workers: int = 0
    plot: bool = True
    tensorboard: bool = True
    distributed: bool = False
    dap_degree: int = 1
    bp_degree: int = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="folding/train.py",
        description="Train the AlphaFold2-style folding model on real structures (default: the tiny preset on the "
                    "embedded chains of data/structures/, on CPU in about ten minutes).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("config")
    g.add_argument("--config_preset", default="tiny", choices=sorted(PRESETS),
                   help="starting values of every setting (models/folding/config.py)")
    g.add_argument("--override", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="set any config value, e.g. model.evoformer.num_blocks=4 (repeatable)")
    g.add_argument("--print_config", action="store_true", help="print the resolved config as JSON and exit")
    g.add_argument("--no_dropout", action="store_true", help="set every dropout rate to 0")
    d = p.add_argument_group("data")
    d.add_argument("--data", default=DEFAULT_DATA, help="chains .npz (data/structures format) with train/valid split")
    d.add_argument("--msa_dir", nargs="+", default=None, metavar="DIR",
                   help="folders of <chain id>.a3m MSAs, first match wins (default: data/structures/msas); chains "
                        "without one train in single-sequence mode")
    d.add_argument("--crop_size", type=int, default=None, help="residues per training crop")
    d.add_argument("--max_msa_clusters", type=int, default=None, help="MSA cluster rows per example")
    d.add_argument("--max_extra_msa", type=int, default=None, help="extra-MSA rows per example")
    d.add_argument("--profile_dropout", type=float, default=None,
                   help="fraction of training examples without MSA/profile information (bare-sequence folding)")
    d.add_argument("--eval_max_chains", type=int, default=None, help="evaluate on the first N held-out chains")
    d.add_argument("--num_workers", type=int, default=0, help="data loader worker processes")
    t = p.add_argument_group("training")
    t.add_argument("--train_step", type=int, default=None, help="optimizer steps in total")
    t.add_argument("--batch_size", type=int, default=None, help="examples per step")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (Adam)")
    t.add_argument("--warmup_steps", type=int, default=None, help="linear warm-up steps")
    t.add_argument("--grad_clip", type=float, default=None, help="clip the global gradient norm to this (0: off)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="bf16 = autocast (geometry in fp32)")
    t.add_argument("--max_recycling_iters", type=int, default=None,
                   help="recycles at evaluation; training samples 0..this many per step")
    o = p.add_argument_group("logging and checkpoints")
    o.add_argument("--log_step", type=int, default=None, help="print and log every N steps")
    o.add_argument("--eval_step", type=int, default=None, help="evaluate on the held-out chains every N steps")
    o.add_argument("--save_step", type=int, default=None, help="checkpoint every N steps (and at the end)")
    o.add_argument("--model_dir", default=os.path.join(REPO_ROOT, "runs", "folding_tiny"),
                   help="checkpoints (Megatron layout), metrics.jsonl, TensorBoard and plots; a run resumes from it")
    o.add_argument("--init_model", default=None,
                   help="start from the weights of this checkpoint directory (new optimizer and schedule)")
    o.add_argument("--chunk_size", type=int, default=None, help="chunk the Evoformer at evaluation (memory)")
    o.add_argument("--exit_step", type=int, default=None,
                   help="stop when reaching this step, with a checkpoint; the same command again continues")
    o.add_argument("--no_plot", action="store_true", help="do not write the PNG plots")
    o.add_argument("--no_tensorboard", action="store_true")
    x = p.add_argument_group("parallelism (DP x DAP x BP)")
    x.add_argument("--distributed", action="store_true", help="run under torchrun over several processes")
    x.add_argument("--dap_degree", type=int, default=1, help="dynamic axial parallelism degree")
    x.add_argument("--bp_degree", type=int, default=1, help="branch parallelism degree (1 or 2)")
    return p


def config_from_args(args: argparse.Namespace) -> FoldingConfig:
    """Preset, then ``--override``, then the named flags; raises :class:`ConfigError` with the offending name."""
    cfg = preset(args.config_preset)
    cfg.apply_overrides(args.override)
    for flag, path in FLAG_TO_CONFIG.items():
        value = getattr(args, flag, None)
        if value is not None:
            cfg.override(path, value)
    if args.no_dropout:
        for section in (cfg.model.evoformer, cfg.model.extra_msa):
            section.msa_dropout = section.pair_dropout = 0.0
        cfg.model.structure_module.dropout = 0.0
    cfg.validate()
    return cfg


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, FoldingConfig, RunOptions]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.chunk_size is not None and args.chunk_size <= 0:
        parser.error(f"--chunk_size must be positive, got {args.chunk_size}")
    if args.dap_degree < 1 or args.bp_degree not in (1, 2):
        parser.error(f"--dap_degree must be >= 1 and --bp_degree 1 or 2, got {args.dap_degree} and {args.bp_degree}")
    run = RunOptions(model_dir=os.path.abspath(args.model_dir), data=args.data, msa_dirs=args.msa_dir,
                     init_model=args.init_model, chunk_size=args.chunk_size, eval_max_chains=args.eval_max_chains,
                     exit_step=args.exit_step,
                     num_workers=args.num_workers, plot=not args.no_plot, tensorboard=not args.no_tensorboard,
                     distributed=args.distributed, dap_degree=args.dap_degree, bp_degree=args.bp_degree)
    return args, config, run
