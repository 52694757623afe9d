"""Finetuning, evaluation and embedding on the TAPE tasks: what ``finetune/tape_{train,eval,embed}.py`` call.

* :func:`run_train` follows TAPE's ``tape-train`` (AdamW, linear warm-up then constant learning rate, gradient
  accumulation, clipping, a validation pass per epoch, ``--save_freq`` and ``--patience``), plus ProteinLM's
  ``--force_save`` and ``--time_or_name``, bf16 autocast and data parallelism under torchrun (gloo on CPU, NCCL on
  CUDA) through the project's process-group builder. ``batch_size`` is the global batch, as in TAPE: each rank
  runs micro-batches of ``batch_size // (world_size * gradient_accumulation_steps)``.
* :func:`run_eval` follows ``tape-eval``: it predicts a split (or several), computes the requested metrics, writes
  them to ``FROM_PRETRAINED/tape_eval_<task>.json`` (merged with earlier splits) and prints a table.
* :func:`run_embed` follows ``tape-embed``: per-protein (and with ``full_sequence_embed`` per-residue) vectors of a
  FASTA file, written to ``.npz`` without pickled objects.

A run directory (``OUTPUT_DIR/<task>_<model>_<suffix>``) holds ``config.json`` and ``pytorch_model.bin`` (TAPE's
model files), ``checkpoint.bin`` (optimizer, scheduler, epoch, best validation loss; what
``--resume_from_checkpoint`` restores) and ``args.json``. TensorBoard logs go to ``LOG_DIR/<run name>``.

Failure handling (docs/security.md): every record of the splits a command reads is checked before the first step
(:meth:`~tape_tasks.datasets.TAPEDataset.validate`; an empty split is an error); a training run holds
``RUN_DIR.lock`` (``--force_save``: ``PATH.lock``), an evaluation its results file's lock and an embedding its
output's, so a second job on the same output fails at once naming the first; ``checkpoint.bin`` is read by the
weights-only loader (``--trust_checkpoint`` for an old file the user vouches for); a non-finite loss or gradient
never reaches the weights (``GradScaler``'s skip for fp16; the same skip, decided on every rank together, in fp32
and bf16).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_protein.parallel import scg
from megatron_protein.utils import fs
from megatron_protein.utils.agree import on_all_ranks
from megatron_protein.utils.errors import ConfigError, NonFiniteLossError
from megatron_protein.utils.locks import LockError, OutputLock
from megatron_protein.utils.safe_load import load_torch_file

from . import metrics as tape_metrics
from .config import ModelFileError, ProteinBertConfig
from .datasets import DataFileError, make_loader, pad_stack
from .heads import ProteinModelForTask
from .model import BACKBONES, ProteinBertForMaskedLM, ProteinModel, compile_transformer_layers, onehot_config
from .registry import TaskSpec, get_task
from .tokenizer import TAPETokenizer

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.bin"


@dataclass
class TrainConfig:
    """The flags of ``tape_train.py`` (TAPE's names; see docs/tape.md)."""

    model_type: str
    task: str
    from_pretrained: Optional[str] = None
    model_config_file: Optional[str] = None
    data_dir: str = "./data"
    output_dir: str = "./results"
    log_dir: str = "./logs"
    exp_name: Optional[str] = None
    time_or_name: str = "time"
    batch_size: int = 1024
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    num_train_epochs: int = 10
    max_steps: int = -1
    warmup_steps: int = 10000
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    fp16: bool = False
    bf16: bool = False
    save_freq: Any = 1
    patience: int = -1
    eval_freq: int = 1
    resume_from_checkpoint: bool = False
    force_save: Optional[str] = None
    num_workers: int = 0
    seed: int = 42
    no_cuda: bool = False
    pooling: Optional[str] = None
    dropout: float = 0.1
    data_format: str = "auto"
    shuffle: bool = True
    trust_checkpoint: bool = False
    distributed_timeout_minutes: float = 10.0
    max_consecutive_skipped_steps: int = 10
    #: Run the transformer layers of training steps through one torch.compile'd forward (CPU; docs/kernels.md).
    compile_layers: bool = False

    def __post_init__(self):
        if not self.distributed_timeout_minutes > 0:
            raise ConfigError(f"--distributed-timeout-minutes must be > 0, got {self.distributed_timeout_minutes}")
        if self.gradient_accumulation_steps < 1:
            raise ConfigError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        if self.fp16 and self.bf16:
            raise ConfigError("choose one of --fp16 and --bf16")
        if isinstance(self.save_freq, str) and self.save_freq != "improvement":
            try:
                self.save_freq = int(self.save_freq)
            except ValueError:
                raise ConfigError(f"--save_freq must be an integer or 'improvement', got {self.save_freq!r}") \
                    from None


@dataclass
class EvalConfig:
    model_type: str
    task: str
    from_pretrained: str
    data_dir: str = "./data"
    split: Sequence[str] = ("test",)
    metrics: Sequence[str] = ()
    contact_ranges: Sequence[str] = ("short", "medium", "long", "medium_long", "all")
    batch_size: int = 8
    num_workers: int = 0
    no_cuda: bool = False
    bf16: bool = False
    data_format: str = "auto"
    seed: int = 42
    results_file: Optional[str] = None


@dataclass
class EmbedConfig:
    model_type: str
    data_file: str
    out_file: str
    from_pretrained: Optional[str] = None
    batch_size: int = 8
    full_sequence_embed: bool = False
    no_cuda: bool = False
    pooling: Optional[str] = None


# ----------------------------------------------------------------------------------------------------------------
# Building


def run_name(task: str, model_type: str, time_or_name: str = "time", exp_name: Optional[str] = None) -> str:
    """``exp_name`` if given, else ``<task>_<model>_<suffix>``: suffix = NAME, or (``time``) a timestamp and six
    random digits, as TAPE names runs (ProteinLM's ``--time_or_name``)."""
    if exp_name:
        return exp_name
    if time_or_name == "time":
        suffix = f"{time.strftime('%y-%m-%d-%H-%M-%S')}_{random.SystemRandom().randint(0, 999999):06d}"
    else:
        if not time_or_name or os.sep in time_or_name:
            raise ConfigError(f"--time_or_name must be 'time' or a name without '{os.sep}', got {time_or_name!r}")
        suffix = time_or_name
    return f"{task}_{model_type}_{suffix}"


def build_model(model_type: str, task: TaskSpec, from_pretrained: Optional[str] = None,
                model_config_file: Optional[str] = None, num_labels: Optional[int] = None,
                pooling: Optional[str] = None, dropout: float = 0.1) -> ProteinModel:
    """The task's model: backbone ``model_type`` with the task head; backbone weights from ``from_pretrained``."""
    overrides = {"pooling": pooling} if pooling else {}
    num_labels = num_labels if num_labels is not None else task.num_labels
    if model_type not in ("transformer", "onehot"):
        raise ConfigError(f"unknown model {model_type!r}; models: ['onehot', 'transformer']")
    if from_pretrained:
        config = ProteinBertConfig.from_pretrained(from_pretrained)
        if config.model_type != model_type:
            raise ModelFileError(f"{from_pretrained}: config.json says model_type {config.model_type!r} but the "
                                 f"command asked for {model_type!r}")
    if task.head == "mlm":
        if model_type != "transformer":
            raise ConfigError("masked_language_modeling needs the transformer model (the one-hot model has no "
                             "language model)")
        if from_pretrained:
            return ProteinBertForMaskedLM.from_pretrained(from_pretrained, **overrides)
        config = ProteinBertConfig.from_json_file(model_config_file) if model_config_file else ProteinBertConfig()
        return ProteinBertForMaskedLM(ProteinBertConfig.from_dict({**config.to_dict(), **overrides}))
    if from_pretrained:
        return ProteinModelForTask.from_pretrained(from_pretrained, head=task.head, num_labels=num_labels,
                                                   dropout=dropout, **overrides)
    if model_type == "onehot":
        config = onehot_config(**overrides)
    else:
        config = ProteinBertConfig.from_json_file(model_config_file) if model_config_file else ProteinBertConfig()
        config = ProteinBertConfig.from_dict({**config.to_dict(), **overrides})
    return ProteinModelForTask(config, head=task.head, num_labels=num_labels, dropout=dropout)


def _device(groups: scg.ParallelGroups, no_cuda: bool) -> torch.device:
    return torch.device("cpu") if no_cuda else groups.device


def _autocast(device: torch.device, fp16: bool, bf16: bool):
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if fp16:
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _forward(model, batch):
    return model(input_ids=batch["input_ids"], input_mask=batch["input_mask"], targets=batch["targets"],
                 protein_length=batch["protein_length"])


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no decay for biases, LayerNorm weights and weight-norm gains (as TAPE and BERT)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith("bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def warmup_constant(warmup_steps: int):
    """TAPE's schedule: linear warm-up over ``warmup_steps`` optimizer steps, then constant."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def check_lengths(dataset, model: ProteinModel, what: str, validate: bool = True, progress: bool = False) -> None:
    """Fail before any step when a record cannot be used (``validate``: every record checked, see
    :meth:`~tape_tasks.datasets.TAPEDataset.validate`) or a protein (plus <cls>/<sep>) is longer than the model's
    position table."""
    if validate and hasattr(dataset, "validate"):
        dataset.validate(progress=progress)
    if model.config.model_type == "onehot":
        return
    limit = model.config.max_position_embeddings
    too_long = [i for i in range(len(dataset)) if dataset.length(i) + 2 > limit]
    if too_long:
        first = too_long[0]
        record = dataset.records[first]
        raise DataFileError(
            f"{getattr(dataset.records, 'path', what)}: {len(too_long)} record(s) longer than the model's "
            f"max_position_embeddings {limit} (with <cls> and <sep>), first record {first} (id "
            f"{record.get('id')!r}, {dataset.length(first)} residues); use a model with longer positions or "
            f"filter the split")


# ----------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    save_dir: Optional[str]
    run_name: str
    steps: int
    epochs: int
    train_losses: list[float] = field(default_factory=list)
    valid_losses: list[float] = field(default_factory=list)
    best_valid_loss: float = math.inf
    skipped_steps: list[int] = field(default_factory=list)  # optimizer steps skipped for a non-finite gradient


def _broadcast_object(value, groups: scg.ParallelGroups):
    if not groups.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _allreduce_sum(values: Sequence[float], groups: scg.ParallelGroups, device) -> list[float]:
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    if groups.distributed:
        dist.all_reduce(tensor, group=groups.group("dp"))
    return tensor.tolist()


def save_run(model: ProteinModel, save_dir: str, optimizer, scheduler, epoch: int, step: int,
             best_valid_loss: float, config: TrainConfig) -> None:
    """Model files (TAPE format) plus ``checkpoint.bin`` and ``args.json``; each file written atomically."""
    model.save_pretrained(save_dir)
    state = {"optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(), "epoch": epoch,
             "step": step, "best_valid_loss": best_valid_loss}
    path = os.path.join(save_dir, CHECKPOINT_NAME)
    torch.save(state, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)
    args_path = os.path.join(save_dir, "args.json")
    with open(f"{args_path}.tmp", "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2, default=str)
    os.replace(f"{args_path}.tmp", args_path)


def run_train(config: TrainConfig) -> TrainResult:
    """Finetune ``config.model_type`` on ``config.task``; see the module docstring."""
    # --no_cuda on a GPU machine keeps the tensors on CPU, so the group must be gloo there too.
    groups = scg.init_process_group([("dp", None)], backend="gloo" if config.no_cuda else None,
                                    timeout=datetime.timedelta(minutes=config.distributed_timeout_minutes))
    rank, world = groups.rank_in("dp"), groups.size("dp")
    is_main = groups.rank == 0
    device = _device(groups, config.no_cuda)
    if config.fp16 and device.type != "cuda":
        raise ConfigError("--fp16 needs a CUDA device (float16 autocast with loss scaling); use --bf16 on CPU")
    task = get_task(config.task)
    name = _broadcast_object(run_name(config.task, config.model_type, config.time_or_name, config.exp_name)
                             if is_main else None, groups)
    micro_batch = config.batch_size // (world * config.gradient_accumulation_steps)
    if micro_batch < 1:
        raise ConfigError(f"--batch_size {config.batch_size} is smaller than world size {world} x "
                         f"gradient_accumulation_steps {config.gradient_accumulation_steps}")
    save_dir = os.path.join(config.output_dir, name)
    lock = OutputLock(config.force_save or save_dir, "--force_save" if config.force_save else "run directory")
    on_all_ranks(lambda: lock.acquire() if is_main else None, groups, LockError, what="locking the output")
    try:
        return _train_holding_lock(config, groups, task, name, save_dir, micro_batch, device)
    finally:
        lock.release()


def _train_holding_lock(config: TrainConfig, groups: scg.ParallelGroups, task: TaskSpec, name: str, save_dir: str,
                        micro_batch: int, device: torch.device) -> TrainResult:
    rank, world = groups.rank_in("dp"), groups.size("dp")
    is_main = groups.rank == 0
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    num_labels = task.resolve_num_labels(config.data_dir)
    model = build_model(config.model_type, task, config.from_pretrained, config.model_config_file, num_labels,
                        config.pooling, config.dropout)
    if config.compile_layers:
        layers = compile_transformer_layers(model)
        if is_main:
            logger.info("--compile_layers: %d transformer layers share one torch.compile'd forward; the first "
                        "training step compiles it", layers)
    if config.force_save:
        if is_main:
            model.save_pretrained(config.force_save)
            logger.info("--force_save: wrote the initial model to %s; not training", config.force_save)
        return TrainResult(save_dir=config.force_save, run_name=name, steps=0, epochs=0)

    tokenizer = TAPETokenizer()
    train_set = task.dataset(config.data_dir, task.train_split, tokenizer, config.data_format, config.seed,
                             num_labels)
    valid_set = task.dataset(config.data_dir, task.valid_split, tokenizer, config.data_format, config.seed + 1,
                             num_labels) if config.eval_freq > 0 else None
    check_lengths(train_set, model, "train", progress=is_main)
    if valid_set is not None:
        check_lengths(valid_set, model, "valid", progress=is_main)
    train_loader = make_loader(train_set, micro_batch, config.shuffle, config.seed, rank, world,
                               config.num_workers, pad_to_equal=True)
    valid_loader = make_loader(valid_set, micro_batch, False, config.seed, rank, world,
                               config.num_workers) if valid_set is not None else None

    model.to(device)
    optimizer = _optimizer(model, config.learning_rate, config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(config.warmup_steps))
    start_epoch, step, best = 0, 0, math.inf
    if config.resume_from_checkpoint:
        if not config.from_pretrained:
            raise ConfigError("--resume_from_checkpoint needs --from_pretrained pointing at a run directory")
        path = os.path.join(config.from_pretrained, CHECKPOINT_NAME)
        if not os.path.exists(path):
            raise ModelFileError(f"--resume_from_checkpoint: {path} does not exist (is {config.from_pretrained} a "
                                 f"tape_train.py run directory?)")
        state = load_torch_file(path, trust=config.trust_checkpoint, map_location=device,
                                what="--resume_from_checkpoint state")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        start_epoch, step, best = state["epoch"] + 1, state["step"], state["best_valid_loss"]
        logger.info("resumed from %s at epoch %d, step %d", path, start_epoch, step)

    # float16 needs loss scaling (gradients underflow otherwise); bfloat16 has float32's range and does not.
    scaler = torch.amp.GradScaler(device.type, enabled=config.fp16)
    ddp_model = model
    if groups.distributed and world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(model, process_group=groups.group("dp"))
    torch.manual_seed(config.seed + 1000 + rank)  # dropout: different masks on different ranks

    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(save_dir, exist_ok=True)
        writer = SummaryWriter(os.path.join(config.log_dir, name))
        logger.info("run %s: %s on %s, %d train / %d valid examples, %d rank(s) x micro-batch %d x %d accumulation "
                    "steps", name, config.model_type, config.task, len(train_set),
                    len(valid_set) if valid_set is not None else 0, world, micro_batch,
                    config.gradient_accumulation_steps)

    result = TrainResult(save_dir=save_dir if is_main else None, run_name=name, steps=step, epochs=0,
                         best_valid_loss=best)
    epochs_without_improvement = 0
    consecutive_skips = 0
    stop = False
    for epoch in range(start_epoch, config.num_train_epochs):
        train_loader.batch_sampler.set_epoch(epoch)
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(epoch)
        ddp_model.train()
        progress = tqdm(total=len(train_loader), desc=f"epoch {epoch} train", disable=not is_main, leave=False)
        loss_sum, loss_count, micro = 0.0, 0, 0
        for batch in train_loader:
            batch = _to(batch, device)
            accumulate = (micro + 1) % config.gradient_accumulation_steps != 0
            sync = contextlib.nullcontext() if not accumulate or ddp_model is model else ddp_model.no_sync()
            with sync:
                with _autocast(device, config.fp16, config.bf16):
                    (loss, batch_metrics), _ = _forward(ddp_model, batch)
                scaler.scale(loss / config.gradient_accumulation_steps).backward()
            micro += 1
            loss = loss.detach()
            loss_sum += float(loss)
            loss_count += 1
            progress.update(1)
            if accumulate:
                continue
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            # fp32/bf16: skip a step whose gradient is not finite (DDP averaged the gradients, so the norm and the
            # decision are the same on every rank); fp16: GradScaler skips it and lowers its scale.
            skip = not config.fp16 and not bool(torch.isfinite(grad_norm))
            if skip:
                result.skipped_steps.append(step + 1)
                consecutive_skips += 1
                logger.warning("step %d: non-finite loss or gradient (loss %s); the step was skipped", step + 1,
                               f"{float(loss):.4g}")
                if consecutive_skips >= config.max_consecutive_skipped_steps:
                    raise NonFiniteLossError(
                        f"step {step + 1}: {consecutive_skips} consecutive steps had a non-finite loss or gradient "
                        f"and were skipped (--max_consecutive_skipped_steps {config.max_consecutive_skipped_steps}); "
                        f"stopping. Lower --learning_rate or check the data of {config.data_dir}")
            else:
                consecutive_skips = 0
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if writer is not None:
                writer.add_scalar("train/loss", float(loss), step)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)
                writer.add_scalar("train/grad_norm", float(grad_norm), step)
                for key, value in batch_metrics.items():
                    writer.add_scalar(f"train/{key}", float(value), step)
            progress.set_postfix(loss=f"{float(loss):.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if config.max_steps > 0 and step >= config.max_steps:
                stop = True
                break
        progress.close()
        if micro % config.gradient_accumulation_steps != 0 and not stop:
            # The epoch ended inside an accumulation window: drop the partial (and, under DDP, unsynchronised)
            # gradients rather than carry them into the next epoch's first step.
            optimizer.zero_grad(set_to_none=True)
        train_loss = _allreduce_sum([loss_sum, loss_count], groups, device)
        result.train_losses.append(train_loss[0] / max(train_loss[1], 1))
        result.epochs = epoch + 1
        result.steps = step

        improved = False
        if valid_loader is not None and (epoch + 1) % config.eval_freq == 0:
            valid_loss = evaluate_loss(model, valid_loader, device, groups, config, is_main, epoch)
            result.valid_losses.append(valid_loss)
            improved = valid_loss < best
            if improved:
                best = valid_loss
            result.best_valid_loss = best
            epochs_without_improvement = 0 if improved else epochs_without_improvement + 1
            if writer is not None:
                writer.add_scalar("valid/loss", valid_loss, step)
            if is_main:
                logger.info("epoch %d: train loss %.4f, valid loss %.4f%s", epoch, result.train_losses[-1],
                            valid_loss, " (best)" if improved else "")
        if is_main:
            save_now = improved if config.save_freq == "improvement" else (
                (epoch + 1) % int(config.save_freq) == 0 or epoch + 1 == config.num_train_epochs or stop)
            if save_now:
                save_run(model, save_dir, optimizer, scheduler, epoch, step, best, config)
                logger.info("saved %s (epoch %d, step %d)", save_dir, epoch, step)
        if config.patience > 0 and epochs_without_improvement >= config.patience:
            if is_main:
                logger.info("no improvement for %d epoch(s): stopping (--patience)", config.patience)
            break
        if stop:
            break
    if is_main and not os.path.exists(os.path.join(save_dir, "pytorch_model.bin")):
        # save_freq='improvement' with no validation pass, or no epoch run: keep the final model all the same.
        save_run(model, save_dir, optimizer, scheduler, result.epochs - 1, step, best, config)
    if writer is not None:
        writer.close()
    return result


@torch.no_grad()
def evaluate_loss(model, loader, device, groups, config: TrainConfig, is_main: bool, epoch: int) -> float:
    """Mean validation loss per example over every rank's shard."""
    model.eval()
    total, count = 0.0, 0
    for batch in tqdm(loader, desc=f"epoch {epoch} valid", disable=not is_main, leave=False):
        batch = _to(batch, device)
        with _autocast(device, config.fp16, config.bf16):
            (loss, _), _ = _forward(model, batch)
        n = batch["input_ids"].shape[0]
        total += float(loss) * n
        count += n
    total, count = _allreduce_sum([total, count], groups, device)
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def predict(model, loader, device, bf16: bool = False, desc: str = "predict"):
    """Per-protein predictions, targets and lengths of a whole split, cut to each protein's own size."""
    model.eval()
    predictions, targets, lengths = [], [], []
    for batch in tqdm(loader, desc=desc, leave=False):
        batch = _to(batch, device)
        with _autocast(device, False, bf16):
            _, prediction = _forward(model, batch)
        prediction = prediction.float().cpu().numpy()
        target = batch["targets"].cpu().numpy()
        for b, length in enumerate(batch["protein_length"].tolist()):
            if prediction.ndim == 4:            # contacts [B, L, L, 2] (specials already stripped)
                predictions.append(prediction[b, :length, :length])
                targets.append(target[b, :length, :length])
            elif prediction.ndim == 3:          # per token [B, L + 2, C]
                predictions.append(prediction[b, :length + 2])
                targets.append(target[b, :length + 2])
            else:                               # per protein
                predictions.append(prediction[b])
                targets.append(target[b])
            lengths.append(length)
    return predictions, targets, lengths


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A metric-by-split table; contact precisions carry their separation range in the metric name."""
    names = sorted({m for split in results.values() for m in split} - {"num_examples"}) + ["num_examples"]
    width = max([len(n) for n in names] + [6])
    splits = list(results)
    cols = [max(len(s), 8) for s in splits]
    lines = [f"{'metric':<{width}}  " + "  ".join(f"{s:>{c}}" for s, c in zip(splits, cols))]
    for name in names:
        fmt = "d" if name == "num_examples" else ".4f"
        cells = [format(results[s].get(name, float("nan")), f">{c}{fmt}") for s, c in zip(splits, cols)]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def run_eval(config: EvalConfig) -> dict[str, dict[str, float]]:
    """Metrics of ``config.from_pretrained`` on each split; written to JSON next to the model and printed."""
    task = get_task(config.task)
    groups = scg.init_process_group([("dp", None)])
    if groups.distributed:
        raise ConfigError("tape_eval.py runs in one process (as tape-eval); launch it with python, not torchrun")
    device = _device(groups, config.no_cuda)
    num_labels = task.resolve_num_labels(config.data_dir)
    torch.manual_seed(config.seed)
    model = build_model(config.model_type, task, config.from_pretrained, num_labels=num_labels).to(device)
    names = list(config.metrics) or list(task.metrics)
    results: dict[str, dict[str, float]] = {}
    for split in config.split:
        dataset = task.dataset(config.data_dir, split, TAPETokenizer(), config.data_format, config.seed,
                               num_labels)
        check_lengths(dataset, model, split, progress=True)
        loader = make_loader(dataset, config.batch_size, False, config.seed, num_workers=config.num_workers)
        predictions, targets, lengths = predict(model, loader, device, config.bf16, desc=f"{split}")
        results[split] = tape_metrics.compute(names, predictions, targets, lengths, config.contact_ranges)
        results[split]["num_examples"] = len(predictions)
    path = config.results_file or os.path.join(config.from_pretrained, f"tape_eval_{config.task}.json")
    # Read, merge and write under the file's lock: evaluations of other splits may finish at the same time.
    with OutputLock(path, "--results_file").acquire(wait_seconds=120):
        previous = {}
        if os.path.exists(path):
            try:
                with open(path) as f:
                    previous = json.load(f).get("splits", {})
            except (json.JSONDecodeError, AttributeError) as exc:
                raise DataFileError(f"{path}: cannot merge the new results into it: not a tape_eval results file "
                                    f"({exc})") from None
        document = {"task": config.task, "model_type": config.model_type,
                    "model": os.path.abspath(config.from_pretrained),
                    "data_dir": os.path.abspath(config.data_dir), "splits": {**previous, **results}}
        fs.write_text_durably(path, json.dumps(document, indent=2, sort_keys=True))
    print(f"{config.task} / {config.model_type} / {config.from_pretrained}")
    print(format_table(results))
    print(f"(written to {path})")
    return results


# ----------------------------------------------------------------------------------------------------------------
# Embedding


def read_fasta(path: str) -> list[tuple[str, str]]:
    """(id, sequence) pairs of a FASTA file; the id is the first word of the header."""
    records: list[tuple[str, str]] = []
    header, chunks = None, []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line.startswith(">"):
                if header is not None:
                    records.append((header, "".join(chunks)))
                header, chunks = (line[1:].split() or [f"seq{len(records)}"])[0], []
            elif header is None:
                raise DataFileError(f"{path}: line {lineno}: sequence before the first '>' header; expected FASTA")
            else:
                chunks.append(line)
    if header is not None:
        records.append((header, "".join(chunks)))
    if not records:
        raise DataFileError(f"{path}: no FASTA record found")
    return records


@torch.no_grad()
def run_embed(config: EmbedConfig) -> str:
    """Write ``ids``, ``pooled`` [N, H] and (``full_sequence_embed``) ``residues`` [sum L, H] with ``offsets``
    [N + 1] (protein i is rows offsets[i]:offsets[i+1]) to ``out_file`` (.npz, no pickled objects), holding the
    output's lock."""
    path = config.out_file if config.out_file.endswith(".npz") else config.out_file + ".npz"
    with OutputLock(path, "out_file"):
        return _embed(config, path)


def _embed(config: EmbedConfig, path: str) -> str:
    groups = scg.init_process_group([("dp", None)])
    device = _device(groups, config.no_cuda)
    records = read_fasta(config.data_file)
    tokenizer = TAPETokenizer()
    encoded = [tokenizer.encode(seq, record=f"{config.data_file}: {name}") for name, seq in records]
    if config.model_type not in BACKBONES:
        raise ConfigError(f"unknown model {config.model_type!r}; models: {sorted(BACKBONES)}")
    backbone_cls = BACKBONES[config.model_type]
    overrides = {"pooling": config.pooling} if config.pooling else {}
    if config.from_pretrained:
        saved = ProteinBertConfig.from_pretrained(config.from_pretrained)
        if saved.model_type != config.model_type:
            raise ModelFileError(f"{config.from_pretrained}: config.json says model_type {saved.model_type!r} but "
                                 f"the command asked for {config.model_type!r}")
        model = backbone_cls.from_pretrained(config.from_pretrained, **overrides)
    elif config.model_type == "onehot":
        model = backbone_cls(onehot_config(**overrides))
    else:
        raise ConfigError("tape_embed.py needs a pretrained model directory for the transformer")
    model.to(device).eval()
    order = np.argsort([len(e) for e in encoded], kind="stable")
    pooled = [None] * len(encoded)
    residues = [None] * len(encoded)
    for start in tqdm(range(0, len(order), config.batch_size), desc="embed"):
        idx = order[start:start + config.batch_size]
        ids = torch.from_numpy(pad_stack([encoded[i] for i in idx], 0)).to(device)
        mask = torch.from_numpy(pad_stack([np.ones_like(encoded[i]) for i in idx], 0)).to(device)
        sequence_output, pooled_output = model(ids, mask)
        for b, i in enumerate(idx):
            pooled[i] = pooled_output[b].float().cpu().numpy()
            residues[i] = sequence_output[b, 1:len(encoded[i]) - 1].float().cpu().numpy()
    out = {"ids": np.array([name for name, _ in records]), "pooled": np.stack(pooled)}
    if config.full_sequence_embed:
        out["residues"] = np.concatenate(residues)
        out["offsets"] = np.concatenate([[0], np.cumsum([r.shape[0] for r in residues])]).astype(np.int64)
    tmp = path[:-4] + ".tmp.npz"
    np.savez(tmp, **out)
    fs.fsync_file(tmp)
    fs.replace_durably(tmp, path)
    logger.info("wrote %d embeddings to %s", len(records), path)
    return path
