"""Command-line flags (Megatron-LM's names) -> small config dataclasses grouped by concern.

This module only parses and converts: :func:`parse_args` returns an ``argparse.Namespace`` with Megatron's
attribute names (it is what checkpoints store as ``args``), and :func:`configs_from_args` turns it into a
:class:`PretrainConfig` holding :class:`~megatron_protein.models.bert.BertConfig`, :class:`ParallelConfig`,
:class:`~megatron_protein.training.optimizer.OptimConfig`, :class:`DataConfig`, :class:`CheckpointConfig`,
:class:`LoggingConfig` and :class:`TrainConfig`, each checking its own constraints in ``__post_init__``. Flags that
need the world size (the data-parallel degree, gradient-accumulation steps) are resolved in :func:`resolve_batch`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional, Sequence

from megatron_protein.models.bert import IUPAC_VOCAB_SIZE, BertConfig
from megatron_protein.training.optimizer import OptimConfig
from megatron_protein.utils.errors import ConfigError, one_line_parse_errors


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    overlap_grad_reduce: bool = False
    #: How long a collective waits for the other ranks before the run fails (Megatron's default, 10 minutes).
    distributed_timeout_minutes: float = 10.0
    #: Megatron-LM's --use-tp-pp-dp-mapping: ranks ordered (dp, pp, tp) instead of Megatron's default (pp, dp, tp).
    use_tp_pp_dp_mapping: bool = False
    #: Megatron-LM's --use-distributed-optimizer: optimizer state and float32 main parameters sharded over dp.
    use_distributed_optimizer: bool = False
    #: Model chunks per pipeline rank (interleaved 1F1B), from --num-layers-per-virtual-pipeline-stage; None: 1F1B.
    virtual_pipeline_model_parallel_size: Optional[int] = None
    #: --sequence-parallel: LayerNorm, dropout and residuals on a 1/tp slice of the sequence (needs tp > 1).
    sequence_parallel: bool = False

    @property
    def num_model_chunks(self) -> int:
        return self.virtual_pipeline_model_parallel_size or 1

    def __post_init__(self):
        if self.tensor_model_parallel_size < 1 or self.pipeline_model_parallel_size < 1:
            raise ValueError("tensor- and pipeline-model-parallel sizes must be >= 1")
        if not self.distributed_timeout_minutes > 0:
            raise ValueError(f"--distributed-timeout-minutes must be > 0, got {self.distributed_timeout_minutes}")

    def degrees(self) -> list[tuple[str, Optional[int]]]:
        """The scg layout, outermost axis first (consecutive ranks share a node).

        Default, Megatron-LM's order: tp innermost, then dp, then pp outermost (``rank = (pp_rank * dp + dp_rank)
        * tp + tp_rank``), so a node holds whole tensor-parallel groups, then whole data-parallel groups of one
        pipeline stage when tp x dp fits in it, and only the pipeline's point-to-point sends cross nodes.
        ``--use-tp-pp-dp-mapping`` (Megatron-LM's flag): dp outermost, then pp, then tp."""
        pp, tp = self.pipeline_model_parallel_size, self.tensor_model_parallel_size
        if self.use_tp_pp_dp_mapping:
            return [("dp", None), ("pp", pp), ("tp", tp)]
        return [("pp", pp), ("dp", None), ("tp", tp)]


@dataclass
class DataConfig:
    """Where the samples come from. ``data_path`` is an indexed-dataset prefix: either the prefix given to
    ``preprocess --split-by-family`` (``PREFIX_{train,valid,test}`` exist: families held out) or one dataset that
    ``split`` cuts into train/valid/test by sequence index (Megatron's --split). ``data_blend`` (from
    ``--data-path 0.7 A 0.3 B`` or several prefixes) holds ``(weight, prefix)`` pairs instead, each prefix of
    either kind; ``data_path`` is then None."""

    data_path: Optional[str] = None
    data_blend: Optional[list[tuple[Optional[float], str]]] = None
    train_data_path: Optional[str] = None
    valid_data_path: Optional[str] = None
    test_data_path: Optional[str] = None
    split: str = "949,50,1"
    seq_length: int = 512
    mask_prob: float = 0.15
    mask_token_prob: float = 0.8     # of the chosen residues: shown as <mask>
    random_token_prob: float = 0.1   # ... shown as a random residue (the rest are kept)
    pack_sequences: bool = False
    data_cache_path: Optional[str] = None
    seed: int = 1234

    def __post_init__(self):
        if self.data_path is None and self.data_blend is None and self.train_data_path is None:
            raise ValueError("give --data-path PREFIX (or --train-data-path)")
        split_weights(self.split)
        if not (0.0 <= self.mask_token_prob <= 1.0 and 0.0 <= self.random_token_prob <= 1.0
                and self.mask_token_prob + self.random_token_prob <= 1.0):
            raise ValueError(f"--mask-token-prob {self.mask_token_prob} and --random-token-prob "
                             f"{self.random_token_prob} must be in [0, 1] with a sum <= 1")


def split_weights(split: str) -> list[float]:
    """Megatron's ``--split``: one to three non-negative weights (train, valid, test), separated by ``,`` or
    ``/``; missing ones are 0 (``98,2`` = no test split). Raises ValueError otherwise."""
    parts = [p.strip() for p in split.replace("/", ",").split(",")]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--split must be one to three non-negative weights (train, valid, test) like 949,50,1 or "
                         f"98,2, got {split!r}")
    return weights + [0.0] * (3 - len(weights))


def parse_data_path(values: Optional[Sequence[str]]) -> tuple[Optional[str], Optional[list]]:
    """Megatron's ``--data-path``: ``PREFIX``, ``W1 PREFIX1 W2 PREFIX2 ...`` (a weighted blend) or ``PREFIX1
    PREFIX2 ...`` (a blend weighted by the datasets' sizes). Returns ``(prefix, None)`` for one prefix without a
    weight and ``(None, [(weight or None, prefix), ...])`` for a blend."""
    if not values:
        return None, None
    values = list(values)
    if len(values) == 1:
        return values[0], None

    def number(text: str) -> Optional[float]:
        try:
            return float(text)
        except ValueError:
            return None

    weights = [number(v) for v in values[0::2]]
    if len(values) % 2 == 0 and all(w is not None for w in weights):
        if any(w is not None and not w > 0 for w in weights):
            raise ValueError(f"--data-path: blend weights must be positive, got {values[0::2]}")
        return None, [(float(w), prefix) for w, prefix in zip(weights, values[1::2])]
    if any(number(v) is not None for v in values):
        raise ValueError(f"--data-path {' '.join(values)}: expected PREFIX, WEIGHT PREFIX pairs (0.7 A 0.3 B) or "
                         f"several prefixes, not a mix")
    return None, [(None, prefix) for prefix in values]


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    no_save_optim: bool = False
    no_save_rng: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False
    #: Load checkpoints with the full unpickler (runs code from the file): only for files the user vouches for.
    trust_checkpoint: bool = False
    #: Resume although the checkpoint was trained on another --data-path (refused otherwise).
    allow_data_path_change: bool = False

    def __post_init__(self):
        if self.save_interval is not None and self.save_interval < 1:
            raise ValueError(f"--save-interval must be >= 1, got {self.save_interval}")


@dataclass
class LoggingConfig:
    log_interval: int = 100
    tensorboard_dir: Optional[str] = None
    eval_interval: int = 1000
    eval_iters: int = 100

    def __post_init__(self):
        if self.log_interval < 1 or self.eval_interval < 1 or self.eval_iters < 0:
            raise ValueError("--log-interval and --eval-interval must be >= 1, --eval-iters >= 0")


@dataclass
class TrainConfig:
    micro_batch_size: int = 8
    global_batch_size: Optional[int] = None
    #: Iterations to train; with ``train_samples`` it is ``train_samples // global_batch_size`` (resolve_batch).
    train_iters: Optional[int] = 1000
    train_samples: Optional[int] = None
    exit_interval: Optional[int] = None  # stop (after saving) once iteration % exit_interval == 0
    #: Stop (after saving) once this many minutes have passed since the start (Megatron's flag).
    exit_duration_in_mins: Optional[float] = None
    #: Save and stop at the end of the iteration during which the process received SIGTERM (Megatron's flag).
    exit_signal_handler: bool = False
    # The last layer and the MLM head only at the masked positions (less work; the same loss and gradients when
    # dropout is 0, the same distribution of them otherwise); see ProteinBertModel. --no-sparse-prediction
    # computes them at every position.
    sparse_prediction: bool = True
    # A step whose loss or gradient is not finite on any rank is skipped on every rank (Megatron's
    # --check-for-nan-in-loss-and-grad); after this many consecutive skips the run stops with an error.
    check_for_nan_in_loss_and_grad: bool = True
    max_consecutive_skipped_iterations: int = 10

    def __post_init__(self):
        if self.micro_batch_size < 1 or (self.train_iters is not None and self.train_iters < 1):
            raise ValueError("--micro-batch-size and --train-iters must be >= 1")
        if self.train_samples is not None and self.train_samples < 1:
            raise ValueError(f"--train-samples must be >= 1, got {self.train_samples}")
        if self.train_iters is None and self.train_samples is None:
            raise ValueError("give --train-iters or --train-samples")
        if self.exit_duration_in_mins is not None and not self.exit_duration_in_mins > 0:
            raise ValueError(f"--exit-duration-in-mins must be > 0, got {self.exit_duration_in_mins}")
        if self.max_consecutive_skipped_iterations < 1:
            raise ValueError(f"--max-consecutive-skipped-iterations must be >= 1, got "
                             f"{self.max_consecutive_skipped_iterations}")


@dataclass
class PretrainConfig:
    model: BertConfig
    parallel: ParallelConfig
    optim: OptimConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    train: TrainConfig
    args: argparse.Namespace = field(repr=False, default_factory=argparse.Namespace)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Pretrain a protein BERT (masked language model) on Pfam with tensor, pipeline and data "
                    "parallelism (Megatron-LM's flags).", allow_abbrev=False)
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=12)
    g.add_argument("--hidden-size", type=int, default=768)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden size")
    g.add_argument("--num-attention-heads", type=int, default=12)
    g.add_argument("--seq-length", type=int, default=512)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default: --seq-length")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=8)
    g.add_argument("--layernorm-epsilon", type=float, default=1e-5)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--no-masked-softmax-fusion", action="store_false", dest="masked_softmax_fusion")
    g.add_argument("--no-bias-gelu-fusion", action="store_false", dest="bias_gelu_fusion")
    g.add_argument("--no-bias-dropout-fusion", action="store_false", dest="bias_dropout_fusion")
    g.add_argument("--no-layernorm-fusion", action="store_false", dest="layernorm_fusion",
                   help="plain torch LayerNorm composition instead of the fused kernel")
    g.add_argument("--compile-layers", action="store_true",
                   help="CPU training: run each transformer layer's non-matmul work (LayerNorm, bias-GeLU, "
                        "bias-dropout-add, softmax, layout changes) through one torch.compile'd chain; the first "
                        "step pays the compilation (docs/kernels.md)")
    g.add_argument("--checkpoint-activations", "--recompute-activations", action="store_true",
                   dest="checkpoint_activations", help="recompute every layer's activations in backward")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=8)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: micro batch x data-parallel size (no accumulation)")
    g.add_argument("--train-iters", type=int, default=None, help="default 1000 (unless --train-samples)")
    g.add_argument("--train-samples", type=int, default=None,
                   help="train on this many samples instead of --train-iters (iterations = samples // global batch)")
    g.add_argument("--exit-interval", type=int, default=None)
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save and stop once this many minutes have passed since the start")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM (what cluster schedulers send before the end of a job), finish the iteration, "
                        "save a checkpoint and stop")
    g.add_argument("--no-sparse-prediction", action="store_false", dest="sparse_prediction",
                   help="compute the last layer and the MLM head at every position, not only at the masked ones "
                        "(slower; with dropout 0 the same loss and gradients, with dropout other masks in the last layer)")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true",
                   help="bf16 parameters, activations and gradients; float32 main parameters, gradient accumulation "
                        "and update in the optimizer (Megatron-LM's --bf16)")
    g.add_argument("--fp16", action="store_true", help="as --bf16 in fp16, with dynamic loss scaling")
    g.add_argument("--autocast", action="store_true",
                   help="with --bf16/--fp16: float32 parameters under torch.autocast instead (casts every weight in "
                        "each step; the model and optimizer stay float32)")
    g.add_argument("--loss-scale", type=float, default=None, help="static loss scale (fp16); default dynamic")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)

    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--optimizer", choices=["adam"], default="adam", help="AdamW (decoupled weight decay)")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="linear")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-decay-samples", type=int, default=None, help="with --train-samples; default: it")
    g.add_argument("--lr-warmup-fraction", type=float, default=None, help="fraction of the decay steps")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-samples", type=int, default=0, help="with --train-samples")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="max global L2 norm; 0 disables")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="indexed-dataset prefix (PREFIX_{train,valid,test} when preprocess split it by family), or "
                        "a blend: W1 PREFIX1 W2 PREFIX2 ... (each dataset sampled in its weight's proportion)")
    g.add_argument("--train-data-path", default=None)
    g.add_argument("--valid-data-path", default=None)
    g.add_argument("--test-data-path", default=None)
    g.add_argument("--split", default="949,50,1",
                   help="train,valid,test weights when a prefix is one dataset (missing ones are 0: 98,2)")
    g.add_argument("--mask-prob", type=float, default=0.15, help="fraction of residues chosen for prediction")
    g.add_argument("--mask-token-prob", type=float, default=0.8,
                   help="of the chosen residues, the fraction shown as <mask> (BERT: 0.8)")
    g.add_argument("--random-token-prob", type=float, default=0.1,
                   help="of the chosen residues, the fraction shown as a random residue (BERT: 0.1); the rest are "
                        "kept")
    g.add_argument("--pack-sequences", action="store_true",
                   help="pack several sequences per sample with a block-diagonal attention mask (ProteinLM)")
    g.add_argument("--data-cache-path", default=None, help="where sample index maps are cached")
    g.add_argument("--num-workers", type=int, default=0)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="start the data-parallel all-reduce of each bucket during the last backward pass")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved 1F1B: each pipeline rank holds (layers / pp) / N model chunks of N layers "
                        "(virtual stages), a smaller pipeline bubble for more point-to-point messages; needs pp > 1 "
                        "and a number of micro-batches that is a multiple of pp")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="with tensor parallelism: LayerNorm, dropout and residual activations on a 1/tp slice of "
                        "the sequence (all-gather before and reduce-scatter after each parallel linear pair "
                        "instead of all-reduce); needs tp > 1 and tp dividing --seq-length")
    g.add_argument("--use-tp-pp-dp-mapping", action="store_true",
                   help="order ranks (dp, pp, tp) instead of Megatron's default (pp, dp, tp); tp is innermost in "
                        "both")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the AdamW state and float32 main parameters over the data-parallel ranks "
                        "(reduce-scatter gradients, step the local shard, all-gather parameters)")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-save-rng", action="store_true")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true", help="load only the weights and start at iteration 0")

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)

    g = p.add_argument_group("failure handling (docs/security.md)")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", action="store_false", dest="check_for_nan_in_loss_and_grad",
                   help="step even when the loss or a gradient is NaN/inf (default: skip that step on every rank)")
    g.add_argument("--check-for-nan-in-loss-and-grad", action="store_true", dest="check_for_nan_in_loss_and_grad",
                   default=True, help=argparse.SUPPRESS)
    g.add_argument("--max-consecutive-skipped-iterations", type=int, default=10,
                   help="stop the run after this many consecutive steps skipped for a non-finite loss or gradient "
                        "(fp16: counted once the loss scale is at --min-loss-scale)")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="load --load with the full unpickler, which can run code from the file (only for old "
                        "checkpoints you trust that the safe loader refuses)")
    g.add_argument("--allow-data-path-change", action="store_true",
                   help="resume from a checkpoint trained on another --data-path (refused otherwise)")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="how long a collective waits for the other ranks before the run fails (default 10)")
    return one_line_parse_errors(p)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    args.vocab_size = IUPAC_VOCAB_SIZE
    args.tokenizer_type = "IUPAC"
    if args.seq_length > args.max_position_embeddings:
        raise ValueError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                         f"{args.max_position_embeddings}")
    check_schedule_flags(args)
    check_parallel_flags(args)
    if args.autocast and not (args.bf16 or args.fp16):
        raise ValueError("--autocast chooses how --bf16 or --fp16 runs; add one of them (or drop --autocast)")
    # The dtype of the model's parameters (Megatron's name): float32 under --autocast.
    args.params_dtype = ("float32" if args.autocast else
                         "bfloat16" if args.bf16 else ("float16" if args.fp16 else "float32"))
    args.consumed_train_samples = 0
    args.consumed_valid_samples = 0
    return args


def check_parallel_flags(args: argparse.Namespace) -> None:
    """Megatron-LM's rules for --num-layers-per-virtual-pipeline-stage and --sequence-parallel, as errors naming
    the flags; sets ``args.virtual_pipeline_model_parallel_size`` (Megatron's name: None without the flag)."""
    args.virtual_pipeline_model_parallel_size = None
    per_virtual = args.num_layers_per_virtual_pipeline_stage
    pp, tp = args.pipeline_model_parallel_size, args.tensor_model_parallel_size
    if per_virtual is not None:
        if per_virtual < 1:
            raise ValueError(f"--num-layers-per-virtual-pipeline-stage must be >= 1, got {per_virtual}")
        if pp < 2:
            raise ValueError(f"--num-layers-per-virtual-pipeline-stage {per_virtual} needs "
                             f"--pipeline-model-parallel-size >= 2 (it is {pp}): the interleaved schedule splits "
                             f"each pipeline stage into model chunks")
        if args.num_layers % pp or (args.num_layers // pp) % per_virtual:
            raise ValueError(f"--num-layers-per-virtual-pipeline-stage {per_virtual} must divide the layers of a "
                             f"pipeline stage: --num-layers {args.num_layers} / --pipeline-model-parallel-size {pp}"
                             f"{'' if args.num_layers % pp == 0 else ' is not a whole number'}")
        args.virtual_pipeline_model_parallel_size = args.num_layers // pp // per_virtual
    if args.sequence_parallel:
        if tp < 2:
            raise ValueError(f"--sequence-parallel splits the sequence over the tensor-parallel ranks and needs "
                             f"--tensor-model-parallel-size >= 2 (it is {tp})")
        if args.seq_length % tp:
            raise ValueError(f"--sequence-parallel needs --seq-length {args.seq_length} to be a multiple of "
                             f"--tensor-model-parallel-size {tp}")


def check_schedule_flags(args: argparse.Namespace) -> None:
    """Megatron-LM's rules for the length and schedule flags (``validate_args``), as errors naming the flags; fills
    in the default --train-iters 1000."""
    if args.train_iters is not None and args.train_samples is not None:
        raise ValueError("give --train-iters or --train-samples, not both")
    if args.train_samples is None:
        if args.train_iters is None:
            args.train_iters = 1000
        for name, default in (("lr_decay_samples", None), ("lr_warmup_samples", 0)):
            if getattr(args, name) != default:
                raise ValueError(f"--{name.replace('_', '-')} needs --train-samples (this run counts iterations: "
                                 f"use --{name.replace('_samples', '_iters').replace('_', '-')})")
    else:
        for name, default in (("lr_decay_iters", None), ("lr_warmup_iters", 0)):
            if getattr(args, name) != default:
                raise ValueError(f"--{name.replace('_', '-')} cannot be used with --train-samples (use "
                                 f"--{name.replace('_iters', '_samples').replace('_', '-')})")
    if args.lr_warmup_fraction is not None:
        if not 0.0 <= args.lr_warmup_fraction <= 1.0:
            raise ValueError(f"--lr-warmup-fraction must be in [0, 1], got {args.lr_warmup_fraction}")
        if args.lr_warmup_iters != 0 or args.lr_warmup_samples != 0:
            given = "--lr-warmup-iters" if args.lr_warmup_iters != 0 else "--lr-warmup-samples"
            raise ValueError(f"give --lr-warmup-fraction or {given}, not both (one would silently override the "
                             f"other)")
    if args.loss_scale is not None and not args.fp16:
        raise ValueError(f"--loss-scale {args.loss_scale:g} is a static loss scale for --fp16; this run is "
                         f"{'bf16' if args.bf16 else 'fp32'}, which needs none (add --fp16 or drop --loss-scale)")


def configs_from_args(args: argparse.Namespace) -> PretrainConfig:
    """Split the flat Megatron namespace into the per-concern configs."""
    model = BertConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size, max_position_embeddings=args.max_position_embeddings,
        vocab_size=args.vocab_size, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        layernorm_epsilon=args.layernorm_epsilon, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout, init_method_std=args.init_method_std, init_seed=args.seed,
        masked_softmax_fusion=args.masked_softmax_fusion, bias_gelu_fusion=args.bias_gelu_fusion,
        bias_dropout_fusion=args.bias_dropout_fusion, layernorm_fusion=args.layernorm_fusion,
        checkpoint_activations=args.checkpoint_activations, sequence_parallel=args.sequence_parallel,
        compile_layers=args.compile_layers)
    parallel = ParallelConfig(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                              args.overlap_grad_reduce, args.distributed_timeout_minutes,
                              args.use_tp_pp_dp_mapping, args.use_distributed_optimizer,
                              virtual_pipeline_model_parallel_size=getattr(
                                  args, "virtual_pipeline_model_parallel_size", None),
                              sequence_parallel=getattr(args, "sequence_parallel", False))
    model.check_parallel(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size)
    warmup_samples = decay_samples = None
    if args.train_samples is not None:  # the schedule in samples (Megatron's sample-based training)
        decay_samples = args.lr_decay_samples or args.train_samples
        warmup_samples = (int(args.lr_warmup_fraction * decay_samples) if args.lr_warmup_fraction is not None
                          else args.lr_warmup_samples)
        decay_iters, warmup = None, 0
    else:
        decay_iters = args.lr_decay_iters or args.train_iters
        warmup = (int(args.lr_warmup_fraction * decay_iters) if args.lr_warmup_fraction is not None
                  else args.lr_warmup_iters)
    optim = OptimConfig(
        lr=args.lr, min_lr=args.min_lr, lr_decay_style=args.lr_decay_style, lr_warmup_steps=warmup,
        lr_decay_steps=decay_iters, lr_warmup_samples=warmup_samples, lr_decay_samples=decay_samples,
        weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad, fp16=args.fp16,
        bf16=args.bf16, autocast=args.autocast, loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale, loss_scale_window=args.loss_scale_window, hysteresis=args.hysteresis)
    data_path, data_blend = parse_data_path(args.data_path)
    data = DataConfig(
        data_path=data_path, data_blend=data_blend, train_data_path=args.train_data_path, valid_data_path=args.valid_data_path,
        test_data_path=args.test_data_path, split=args.split, seq_length=args.seq_length,
        mask_prob=args.mask_prob, mask_token_prob=args.mask_token_prob,
        random_token_prob=args.random_token_prob, pack_sequences=args.pack_sequences, data_cache_path=args.data_cache_path,
        seed=args.seed)
    checkpoint = CheckpointConfig(
        save=args.save, load=args.load, save_interval=args.save_interval, no_save_optim=args.no_save_optim,
        no_save_rng=args.no_save_rng, no_load_optim=args.no_load_optim, no_load_rng=args.no_load_rng,
        finetune=args.finetune, trust_checkpoint=args.trust_checkpoint,
        allow_data_path_change=args.allow_data_path_change)
    logging_config = LoggingConfig(log_interval=args.log_interval, tensorboard_dir=args.tensorboard_dir,
                                   eval_interval=args.eval_interval, eval_iters=args.eval_iters)
    train = TrainConfig(micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
                        train_iters=args.train_iters, train_samples=args.train_samples,
                        exit_interval=args.exit_interval, exit_duration_in_mins=args.exit_duration_in_mins,
                        exit_signal_handler=args.exit_signal_handler,
                        sparse_prediction=args.sparse_prediction,
                        check_for_nan_in_loss_and_grad=args.check_for_nan_in_loss_and_grad,
                        max_consecutive_skipped_iterations=args.max_consecutive_skipped_iterations)
    return PretrainConfig(model=model, parallel=parallel, optim=optim, data=data, checkpoint=checkpoint,
                          logging=logging_config, train=train, args=args)


def resolve_batch(train: TrainConfig, dp_size: int) -> int:
    """Number of micro-batches each dp rank accumulates per step; fills in the default global batch size."""
    if train.global_batch_size is None:
        train.global_batch_size = train.micro_batch_size * dp_size
    per_step = train.micro_batch_size * dp_size
    if train.global_batch_size % per_step:
        raise ConfigError(f"--global-batch-size {train.global_batch_size} is not a multiple of micro batch "
                         f"{train.micro_batch_size} x data-parallel size {dp_size}")
    if train.train_samples is not None:  # Megatron's update_train_iters with a constant batch size
        train.train_iters = train.train_samples // train.global_batch_size
        if train.train_iters < 1:
            raise ConfigError(f"--train-samples {train.train_samples} is less than one global batch "
                              f"({train.global_batch_size})")
    return train.global_batch_size // per_step
