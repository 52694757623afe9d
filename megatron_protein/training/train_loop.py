"""Protein BERT pretraining: build, then loop forward, backward, clip, step, log, evaluate, save.

The loop reads top to bottom like nanoGPT's ``train.py``; every parallel axis is handled by the core:
the model's layers split over tp, :func:`~megatron_protein.parallel.pipeline.run_pipeline` runs the micro-batches
through the pp stages (plain gradient accumulation when pp = 1), :class:`~megatron_protein.parallel.dp.DataParallel`
averages gradients over dp, and :func:`~megatron_protein.parallel.pipeline.all_reduce_tied_gradients` sums the two
copies of the tied word embedding over the pipeline ends. One process runs the same code with every group None.

Loss: each micro-batch's loss is the mean cross-entropy over its predicted tokens (Megatron BERT); the step
minimises the mean of the micro-batch losses of the global batch. Evaluation scores a fixed set of samples of
each held-out split (the first ``eval_iters`` global batches, the same at every evaluation so the curve is
comparable) with :class:`~megatron_protein.training.mlm_metrics.MLMMetrics`: the loss and perplexity over all
predicted positions, and apart at the positions whose input was ``<mask>`` (the masked-position perplexity), kept
or randomised, each beside the unigram perplexity of the same residues (training frequencies, and their own).
The held-out splits are the held-out families (``valid``/``test``) and, when preprocessing made them, held-out
sequences of the training families (``valid_infamily``/``test_infamily``); every one present is reported.

Non-finite steps (Megatron's ``--check-for-nan-in-loss-and-grad``, on by default): after the gradients are reduced,
one MAX all-reduce over the world tells every rank whether the loss or any gradient on any rank is NaN or inf;
then every rank skips the optimizer and LR-schedule step together, so the update never reaches the weights (in
fp32, bf16 and fp16 alike; fp16's loss scaler backs off as before). Skipped steps are counted in the log line and
in TensorBoard like fp16's; ``--max-consecutive-skipped-iterations`` (default 10) consecutive skips stop the run
with :class:`NonFiniteLossError` (for fp16, only skips at the minimum loss scale count: above it, overflow is how
the scaler finds its scale). Checkpoints are never written with non-finite weights (checkpointing refuses them).

Precision (``docs/pretraining.md``, "Precision"): ``--bf16`` / ``--fp16`` keep the model's parameters in bf16 /
fp16 and train float32 main copies of them with
:class:`~megatron_protein.training.mixed_precision_optimizer.MixedPrecisionOptimizer` (Megatron-LM's way: no cast
inside the step, float32 gradient accumulation and update); ``--autocast`` runs the float32 model under
``torch.autocast`` instead. ``--use-distributed-optimizer`` shards that optimizer's state over dp (in any precision).

The job holds ``SAVE.lock`` (:class:`~megatron_protein.utils.locks.OutputLock`) for its whole duration, taken by
global rank 0 before anything else, so a second job on the same ``--save`` fails at once naming this one; and a
resumed checkpoint whose ``data_path`` differs from this run's is refused unless ``--allow-data-path-change``.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from megatron_protein.data.mlm_dataset import IGNORE_INDEX, PREDICTED_AS_MASK
from megatron_protein.models.bert import build_model, model_chunks, predicted_labels
from megatron_protein.parallel import scg
from megatron_protein.parallel.dp import DataParallel
from megatron_protein.parallel.pipeline import all_reduce_tied_gradients, run_pipeline, sync_tied_parameters
from megatron_protein.parallel.tensor_parallel import (all_reduce_sequence_parallel_gradients, model_parallel_seed,
                                                       sequence_parallel_parameters, vocab_parallel_cross_entropy)
from megatron_protein.training import checkpointing
from megatron_protein.training.arguments import PretrainConfig, resolve_batch
from megatron_protein.training.logging_utils import TrainingLogger, logger
from megatron_protein.training.mixed_precision_optimizer import MixedPrecisionOptimizer, build_data_parallel
from megatron_protein.training.mlm_metrics import MLMMetrics, training_frequencies
from megatron_protein.training.optimizer import (DynamicLossScaler, LRScheduler, build_optimizer, clip_grad_norm,
                                                 grads_are_finite)
from megatron_protein.training.pretrain_data import (TEST_SPLITS, VALID_SPLITS, attention_mask,
                                                     blend_residue_counts, blend_sources_by_split,
                                                     build_blended_datasets, build_datasets,
                                                     check_blend_training_data, check_training_data,
                                                     micro_batch_loader, residue_counts, resolve_blend,
                                                     resolve_sources, split_titles)
from megatron_protein.utils.agree import on_all_ranks
from megatron_protein.utils.errors import ConfigError, NonFiniteLossError
from megatron_protein.utils.locks import LockError, OutputLock


#: The data arguments a resumed run must share with its checkpoint (unless --allow-data-path-change).
DATA_PATH_ARGS = ("data_path", "train_data_path", "valid_data_path", "test_data_path")

#: The masking of every held-out evaluation (BERT's, Devlin et al. 2019), independent of the training flags.
EVAL_MASK_PROB, EVAL_MASK_TOKEN_PROB, EVAL_RANDOM_TOKEN_PROB = 0.15, 0.8, 0.1


@dataclass
class TrainResult:
    """What a run did, on every rank: per-iteration training losses (global-batch mean, all predicted positions,
    and at the ``<mask>`` positions only), evaluations (one dict per split and evaluation: ``iteration``, ``split``,
    ``title``, ``tokens_seen`` and the :meth:`MLMMetrics.summary` numbers), paths."""

    losses: list[float] = field(default_factory=list)
    masked_losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    skipped_iterations: list[int] = field(default_factory=list)  # iterations whose step was skipped
    evaluations: list[dict] = field(default_factory=list)
    start_iteration: int = 0
    iteration: int = 0
    consumed_train_samples: int = 0
    checkpoint_dir: Optional[str] = None
    tensorboard_dir: Optional[str] = None
    elapsed_seconds: float = 0.0
    saved_at: Optional[int] = None      # iteration of the last checkpoint this run wrote
    exit_reason: Optional[str] = None   # why the run stopped before --train-iters (an --exit-* flag)


class ExitSignal:
    """Megatron's ``--exit-signal-handler``: while installed, SIGTERM only sets :attr:`received` (the loop then
    finishes the iteration, saves and stops, :meth:`Pretrainer._exit_reason`); :meth:`restore` puts the previous
    handler back. Under torchrun, a SIGTERM to the launcher is passed on to every worker, which then has the
    launcher's grace period (30 s by default) before SIGKILL; schedulers such as Slurm signal every process of the
    job step themselves."""

    def __init__(self, enabled: bool):
        self.received = False
        self._previous = None
        self.enabled = enabled
        if enabled:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def restore(self) -> None:
        if self.enabled:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self.enabled = False


def params_dtype(config: PretrainConfig) -> torch.dtype:
    """The dtype of the model's parameters: bf16 / fp16 with ``--bf16`` / ``--fp16`` (float32 main copies in the
    optimizer), float32 otherwise and under ``--autocast``."""
    optim = config.optim
    if optim.autocast:
        return torch.float32
    return torch.bfloat16 if optim.bf16 else torch.float16 if optim.fp16 else torch.float32


def autocast_context(config: PretrainConfig, device: torch.device):
    """``torch.autocast`` in bf16 / fp16 with ``--autocast``; nothing otherwise (the parameters' dtype decides)."""
    if config.optim.autocast and config.optim.bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if config.optim.autocast and config.optim.fp16:
        return torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def _all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _from_last_stage(tensor: torch.Tensor, groups: scg.ParallelGroups) -> torch.Tensor:
    if groups.group("pp") is not None:
        dist.broadcast(tensor, src=groups.ranks("pp")[-1], group=groups.group("pp"))
    return tensor


class Pretrainer:
    """Holds the model, optimizer and data position of one run; :meth:`train` runs it."""

    def __init__(self, config: PretrainConfig, groups: Optional[scg.ParallelGroups] = None,
                 start_time: Optional[float] = None):
        #: time.monotonic() at the start of the job (--exit-duration-in-mins counts from here).
        self.start_time = start_time if start_time is not None else time.monotonic()
        self.config = config
        self.groups = groups = groups if groups is not None else scg.current()
        args = config.args
        self.num_micro_batches = resolve_batch(config.train, groups.size("dp"))
        # The data is checked before anything is built: an empty training split fails here, naming its file.
        self.blend_sources = None
        if config.data.data_blend is not None:
            self.blend_sources = resolve_blend(config.data.data_blend, config.data.split)
            check_blend_training_data(self.blend_sources, config.data.split)
            self.sources = {}
        else:
            self.sources = resolve_sources(config.data.data_path, config.data.split, config.data.train_data_path,
                                           config.data.valid_data_path, config.data.test_data_path)
            check_training_data(self.sources, config.data.split, config.data.data_path)
        # What checkpoints record (Megatron's names), including what only the world size decides.
        args.global_batch_size = config.train.global_batch_size
        args.train_iters = config.train.train_iters
        args.data_parallel_size = groups.size("dp")
        args.world_size = groups.world_size
        args.padded_vocab_size = config.model.padded_vocab_size(groups.size("tp"))
        args.resolved_data_paths = resolved_data_paths(args)
        model_parallel_seed(config.data.seed, groups)

        # Model: this rank's tp shard of its pp stage (its model chunks under the interleaved schedule), replicas
        # made equal over dp, tied copies over pp ends (all in float32: these values become the main parameters of
        # a mixed-precision run).
        num_chunks = config.parallel.num_model_chunks
        if num_chunks > 1 and self.num_micro_batches % groups.size("pp"):
            raise ConfigError(
                f"--num-layers-per-virtual-pipeline-stage: the interleaved schedule needs the number of "
                f"micro-batches per step ({self.num_micro_batches} = --global-batch-size "
                f"{config.train.global_batch_size} / (--micro-batch-size {config.train.micro_batch_size} x "
                f"data-parallel size {groups.size('dp')})) to be a multiple of --pipeline-model-parallel-size "
                f"{groups.size('pp')}")
        args.virtual_pipeline_model_parallel_size = config.parallel.virtual_pipeline_model_parallel_size
        self.model = build_model(config.model, groups, num_chunks).to(groups.device)
        self.chunks = model_chunks(self.model)
        tied = self.model.shared_embedding_weight()
        self.tied_params = [tied] if tied is not None else []
        # LayerNorm parameters and row-parallel biases acting on sequence slices (--sequence-parallel).
        self.sequence_parallel_params = sequence_parallel_parameters(self.model)
        #: bf16 / fp16 parameters with float32 main copies, and/or the distributed optimizer.
        self.params_dtype = params_dtype(config)
        self.main_params = self.params_dtype != torch.float32 or config.parallel.use_distributed_optimizer
        if self.main_params:
            self.ddp = build_data_parallel(self.model, groups, config.parallel.overlap_grad_reduce,
                                           config.parallel.use_distributed_optimizer, self.tied_params)
        else:
            self.ddp = DataParallel(self.model, groups, overlap_grad_reduce=config.parallel.overlap_grad_reduce)
        self.ddp.broadcast_parameters()
        sync_tied_parameters(self.tied_params, groups)

        if self.main_params:  # casts the model to params_dtype, keeping the float32 values as main parameters
            self.optimizer = MixedPrecisionOptimizer(self.ddp, config.optim, self.params_dtype, groups)
        else:
            self.optimizer = build_optimizer(self.model, config.optim)
        # The schedule counts samples, as Megatron-LM's (so its state is Megatron's and --lr-*-samples work).
        warmup, decay = config.optim.schedule_in_samples(config.train.global_batch_size, config.train.train_iters)
        self.scheduler = LRScheduler(self.optimizer, config.optim.lr, config.optim.min_lr, warmup, decay,
                                     config.optim.lr_decay_style, increment=config.train.global_batch_size)
        self.loss_scaler = None
        if config.optim.fp16:
            self.loss_scaler = DynamicLossScaler(
                initial_scale=config.optim.loss_scale or config.optim.initial_loss_scale,
                min_scale=config.optim.min_loss_scale, window=config.optim.loss_scale_window,
                hysteresis=config.optim.hysteresis, dynamic=config.optim.loss_scale is None)
        self.iteration = 0
        self.consumed_train_samples = 0
        self.consecutive_skips = 0
        self._skip_is_hard = True
        tracked = (checkpointing.read_tracker_on_rank0(config.checkpoint.load, groups)
                   if config.checkpoint.load else None)
        if tracked is not None:
            position = checkpointing.load_checkpoint(
                config.checkpoint.load, self.model, self.optimizer, self.scheduler, args, self.loss_scaler,
                groups, load_optim=not config.checkpoint.no_load_optim, load_rng=not config.checkpoint.no_load_rng,
                finetune=config.checkpoint.finetune, iteration=tracked,
                trust_checkpoint=config.checkpoint.trust_checkpoint)
            if not config.checkpoint.finetune and not config.checkpoint.allow_data_path_change:
                check_same_data(position.get("args"), args, config.checkpoint.load, tracked)
            self.iteration = position["iteration"]
            self.consumed_train_samples = position["consumed_train_samples"]
        elif config.checkpoint.load and groups.rank == 0:
            logger.info("no checkpoint in %s yet: starting from random weights", config.checkpoint.load)

        # Data: every rank opens the datasets (memory-mapped); stages read the fields they need.
        train, data = config.train, config.data
        sources = self.sources
        eval_samples = config.logging.eval_iters * train.global_batch_size
        if self.blend_sources is not None:  # --data-path W1 A W2 B: every split a BlendedDataset
            def build(counts, mask_prob, mask_token_prob, random_token_prob):
                return build_blended_datasets(self.blend_sources, data.seq_length, counts, data.seed, mask_prob,
                                              data.pack_sequences, data.data_cache_path,
                                              mask_token_prob=mask_token_prob, random_token_prob=random_token_prob)
            sources = blend_sources_by_split(self.blend_sources)
            train_counts = blend_residue_counts(self.blend_sources, "train")
        else:
            def build(counts, mask_prob, mask_token_prob, random_token_prob):
                return build_datasets(sources, data.seq_length, counts, data.seed, mask_prob, data.pack_sequences,
                                      data.data_cache_path, mask_token_prob=mask_token_prob,
                                      random_token_prob=random_token_prob)
            train_counts = residue_counts(sources["train"])
        self.datasets = build({"train": train.train_iters * train.global_batch_size}, data.mask_prob,
                              data.mask_token_prob, data.random_token_prob)
        # Held-out sets are always masked as BERT masks (15%; 80% <mask>, 10% random, 10% kept), whatever the
        # training masking, so that runs with other --mask-prob / --mask-token-prob are scored on the same task.
        held_out = build({name: eval_samples for name in VALID_SPLITS + TEST_SPLITS}, EVAL_MASK_PROB,
                         EVAL_MASK_TOKEN_PROB, EVAL_RANDOM_TOKEN_PROB)
        self.datasets.update({name: held_out[name] for name in VALID_SPLITS + TEST_SPLITS})
        self.split_titles = split_titles(data.data_path, sources)
        # The context-free baseline a model must beat: the training set's residue frequencies.
        self.train_frequencies = training_frequencies(train_counts, config.model.vocab_size)
        self._masked_stats = torch.zeros(2, dtype=torch.float64, device=groups.device)  # this step: sum, count
        # What travels between pipeline stages: the hidden states, this rank's 1/tp slice of the sequence under
        # sequence parallelism (Megatron sends the slice too).
        seq = data.seq_length // groups.size("tp") if config.model.sequence_parallel else data.seq_length
        self.activation_shape = (train.micro_batch_size, seq, config.model.hidden_size)

    # ------------------------------------------------------------------------------------------ one stage
    def forward_step(self, stage_input: Optional[torch.Tensor], batch: dict, chunk: int = 0) -> torch.Tensor:
        """This pipeline stage's forward (of model chunk ``chunk``): tokens on the first stage, the received
        hidden states elsewhere."""
        device = self.groups.device
        mask = attention_mask(batch, self.config.data.pack_sequences).to(device)
        model_input = batch["tokens"].to(device) if stage_input is None else stage_input
        prediction_mask = batch["loss_mask"].to(device).bool() if self.config.train.sparse_prediction else None
        with autocast_context(self.config, device):
            return self.chunks[chunk](model_input, mask, batch["position_ids"].to(device),
                                      prediction_mask=prediction_mask)

    def forward_steps(self):
        """What :func:`run_pipeline` runs: the forward step, or one per model chunk (interleaved schedule)."""
        if len(self.chunks) == 1:
            return self.forward_step
        return [functools.partial(self.forward_step, chunk=c) for c in range(len(self.chunks))]

    def loss_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels and loss mask laid out like the last stage's logits: [b, s], or [n] under sparse prediction."""
        device = self.groups.device
        labels, loss_mask = batch["labels"].to(device), batch["loss_mask"].to(device)
        return predicted_labels(labels, loss_mask) if self.config.train.sparse_prediction else (labels, loss_mask)

    def prediction_kinds(self, batch: dict) -> torch.Tensor:
        """What the input showed at each predicted position (``mlm_dataset.prediction_kind``), laid out like the
        labels of :meth:`loss_inputs`."""
        kinds = batch["prediction_kind"].to(self.groups.device)
        return kinds[batch["loss_mask"].to(self.groups.device).bool()] if self.config.train.sparse_prediction \
            else kinds

    def loss_fn(self, logits_shard: torch.Tensor, batch: dict) -> torch.Tensor:
        """The micro-batch's mean cross-entropy over its predicted positions (``models.bert.masked_lm_loss``,
        written out to keep the per-token losses); the ``<mask>`` positions' part is added to this step's stats."""
        labels, loss_mask = self.loss_inputs(batch)
        per_token = vocab_parallel_cross_entropy(logits_shard, labels, groups=self.groups, ignore_index=IGNORE_INDEX)
        loss_mask = loss_mask.float()
        loss = (per_token * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)
        with torch.no_grad():
            masked = self.prediction_kinds(batch) == PREDICTED_AS_MASK
            self._masked_stats[0] += per_token.detach()[masked].double().sum()
            self._masked_stats[1] += masked.sum()
        return loss * (self.loss_scaler.scale if self.loss_scaler is not None else 1.0)

    # ------------------------------------------------------------------------------------------ one step
    def train_step(self, micro_batches: list[dict]) -> tuple[float, float, bool, float]:
        """Forward and backward of the global batch, gradient sync, clip, optimizer step. Returns
        (mean loss over the global batch, gradient norm before clipping, whether the step was skipped, mean loss at
        the global batch's ``<mask>`` positions)."""
        groups = self.groups
        self.model.train()
        self.ddp.zero_grad()  # zeroes the flat gradient buffers (the .grad views stay attached)
        self._masked_stats.zero_()
        loss = run_pipeline(self.forward_steps(), micro_batches, self.loss_fn, self.activation_shape,
                            dtype=self.params_dtype, groups=groups, no_sync=self.ddp.no_sync)
        self.ddp.sync_gradients()                              # mean over dp (reduce-scatter: distributed optimizer)
        all_reduce_sequence_parallel_gradients(self.sequence_parallel_params, groups)  # sum the slices' parts
        all_reduce_tied_gradients(self.tied_params, groups)    # word embedding used on the first and last stage
        if self.main_params:
            norm, skipped, loss = self._step_main_params(loss)
        else:
            norm, skipped, loss = self._step_torch_optimizer(loss)
        # One dp all-reduce for the loss and the <mask> positions' sum and count (those live on the last stage).
        stats = torch.cat([loss.detach().double().view(1), _from_last_stage(self._masked_stats, groups)])
        stats = _all_reduce(stats, groups.group("dp"))
        masked_loss = float(stats[1] / stats[2]) if stats[2] > 0 else float("nan")
        return float(stats[0]) / groups.size("dp"), norm, skipped, masked_loss

    def _step_main_params(self, loss: torch.Tensor) -> tuple[float, bool, torch.Tensor]:
        """Unscale (fp16), one world-wide vote on finiteness with the global norm, clip and step the float32 main
        parameters (:class:`MixedPrecisionOptimizer`). Returns (norm or NaN when skipped, skipped, loss)."""
        optimizer = self.optimizer
        if self.loss_scaler is not None:
            inverse = 1.0 / self.loss_scaler.scale
            optimizer.unscale_(inverse)
            loss = loss * inverse
        norm, finite = optimizer.grad_norm_and_finite(loss)
        if self.loss_scaler is not None:
            skipped = not finite
            # An overflow above the minimum scale is how the scaler finds its scale; at the minimum it is real.
            self._skip_is_hard = self.loss_scaler.at_minimum()
            self.loss_scaler.update(skipped)
        else:
            skipped = not finite and self.config.train.check_for_nan_in_loss_and_grad
        if skipped:
            return float("nan"), True, loss
        optimizer.clip_(self.config.optim.clip_grad, norm)
        optimizer.step()
        self.scheduler.step()
        return norm, False, loss

    def _step_torch_optimizer(self, loss: torch.Tensor) -> tuple[float, bool, torch.Tensor]:
        """The float32 (and --autocast) step: torch AdamW on the model's own parameters."""
        groups = self.groups
        params = [p for p in self.model.parameters() if p.grad is not None]
        skipped = False
        if self.loss_scaler is not None:
            inverse = 1.0 / self.loss_scaler.scale
            for p in params:
                p.grad.mul_(inverse)
            loss = loss * inverse
            skipped = not grads_are_finite(params, groups, loss)
            # An overflow above the minimum scale is how the scaler finds its scale; at the minimum it is real.
            self._skip_is_hard = self.loss_scaler.at_minimum()
            self.loss_scaler.update(skipped)
        elif self.config.train.check_for_nan_in_loss_and_grad:
            # One world-wide vote, so that all tp/pp/dp ranks skip together (a NaN in one rank's shard would
            # otherwise be stepped into that shard only, or into none).
            skipped = not grads_are_finite(params, groups, loss)
        norm = clip_grad_norm(params, self.config.optim.clip_grad, groups) if not skipped else float("nan")
        if not skipped:  # as Megatron: a skipped step does not advance the schedule either
            self.optimizer.step()
            self.scheduler.step()
        return norm, skipped, loss

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, split: str = "valid") -> dict:
        """The :class:`MLMMetrics` summary of the fixed evaluation samples of ``split`` (the same on every rank):
        loss and perplexity over all predicted positions and per kind (``masked``, ``randomised``, ``kept``), each
        with the unigram perplexity of the same residues from the training frequencies and from their own."""
        dataset = self.datasets.get(split)
        if dataset is None:
            raise ValueError(f"no {split!r} split to evaluate; splits: {sorted(k for k, v in self.datasets.items() if v)}")
        groups, train = self.groups, self.config.train
        self.model.eval()
        metrics = MLMMetrics(self.config.model.vocab_size, groups.device)

        def loss_fn(logits_shard, batch):
            labels, loss_mask = self.loss_inputs(batch)
            per_token = metrics.add_logits(logits_shard, labels, self.prediction_kinds(batch), groups)
            loss_mask = loss_mask.float()
            return (per_token * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)

        loader = micro_batch_loader(dataset, 0, train.micro_batch_size, groups.rank_in("dp"), groups.size("dp"))
        for _ in range(self.config.logging.eval_iters):
            micro_batches = [next(loader) for _ in range(self.num_micro_batches)]
            run_pipeline(self.forward_steps(), micro_batches, loss_fn, self.activation_shape,
                         dtype=self.params_dtype, groups=groups, forward_only=True)
        metrics.reduce(groups)
        self.model.train()
        return metrics.summary(self.train_frequencies)

    def _evaluate_splits(self, splits, log: TrainingLogger, result: TrainResult) -> None:
        tokens_seen = self.iteration * self.config.train.global_batch_size * self.config.data.seq_length
        for split in splits:
            if self.datasets.get(split) is None:
                continue
            summary = self.evaluate(split)
            title = self.split_titles.get(split, split)
            log.evaluation(self.iteration, split, summary, title=title, tokens_seen=tokens_seen)
            result.evaluations.append({"iteration": self.iteration, "split": split, "title": title,
                                       "tokens_seen": tokens_seen, **summary})

    def _count_skip(self, log: TrainingLogger, loss: float) -> None:
        """Count a skipped step toward --max-consecutive-skipped-iterations; stop the run at the limit."""
        train, optim = self.config.train, self.config.optim
        counts = self.loss_scaler is None or self._skip_is_hard
        if self.loss_scaler is None:
            log.warning("iteration %d: non-finite loss or gradient (loss %s) on some rank; the step was skipped on "
                        "every rank", self.iteration, f"{loss:.4g}")
        if not counts:
            return
        self.consecutive_skips += 1
        if self.consecutive_skips >= train.max_consecutive_skipped_iterations:
            where = (f"; the last checkpoint in {self.config.checkpoint.save} has finite weights"
                     if self.config.checkpoint.save else "")
            scale = (f" at the minimum loss scale {optim.min_loss_scale:g}" if self.loss_scaler is not None else "")
            raise NonFiniteLossError(
                f"iteration {self.iteration}: {self.consecutive_skips} consecutive steps had a non-finite loss or "
                f"gradient{scale} and were skipped (--max-consecutive-skipped-iterations "
                f"{train.max_consecutive_skipped_iterations}); stopping{where}. Lower --lr, check the data, or "
                f"use --bf16 instead of --fp16")

    # ------------------------------------------------------------------------------------------ the loop
    def save(self) -> None:
        cfg = self.config
        cfg.args.consumed_train_samples = self.consumed_train_samples
        cfg.args.iteration = self.iteration
        checkpointing.save_checkpoint(cfg.checkpoint.save, self.iteration, self.model, self.optimizer,
                                      self.scheduler, cfg.args, self.loss_scaler, self.groups,
                                      save_optim=not cfg.checkpoint.no_save_optim,
                                      save_rng=not cfg.checkpoint.no_save_rng)

    def train(self) -> TrainResult:
        cfg, groups = self.config, self.groups
        train, log_cfg, ckpt = cfg.train, cfg.logging, cfg.checkpoint
        result = TrainResult(start_iteration=self.iteration, checkpoint_dir=ckpt.save,
                             tensorboard_dir=log_cfg.tensorboard_dir)
        self._train_started = time.monotonic()
        tokens_per_iteration = train.global_batch_size * cfg.data.seq_length
        log = TrainingLogger(train.train_iters, log_cfg.log_interval, tokens_per_iteration,
                             is_writer=groups.rank == 0, tensorboard_dir=log_cfg.tensorboard_dir,
                             start_iteration=self.iteration)
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("%s | this rank's model shard: %s parameters | global batch %d = micro %d x %d micro-batches x "
                 "dp %d | %d tokens per iteration", groups.describe(), f"{n_params:,}", train.global_batch_size,
                 train.micro_batch_size, self.num_micro_batches, groups.size("dp"), tokens_per_iteration)
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", groups.world_size) or groups.world_size)
        if 0 < per_node < groups.world_size:
            spans = scg.nodes_spanned(groups.degrees, per_node)
            log.info("rank order %s (outermost first), %d ranks per node: %s", ", ".join(groups.axes), per_node,
                     ", ".join(f"{axis} groups span {spans[axis]} node{'s' if spans[axis] > 1 else ''}"
                               for axis in groups.axes if groups.size(axis) > 1))
        log.info("held-out sets: %s; the unigram baselines are the training residue frequencies and each set's "
                 "own", ", ".join(f"{name} ({title})" for name, title in self.split_titles.items()) or "none")
        if self.iteration:
            log.info("resumed from %s at iteration %d (%d samples consumed)", ckpt.load, self.iteration,
                     self.consumed_train_samples)

        loader = None
        if self.iteration < train.train_iters:
            loader = micro_batch_loader(self.datasets["train"], self.consumed_train_samples,
                                        train.micro_batch_size, groups.rank_in("dp"), groups.size("dp"),
                                        cfg.args.num_workers)
        else:
            log.info("the run is complete (iteration %d of %d); nothing to train", self.iteration,
                     train.train_iters)
        exit_signal = ExitSignal(train.exit_signal_handler)
        try:
            self._train_loop(result, log, loader, exit_signal)
        finally:
            exit_signal.restore()
        return self._finish(result, log)

    def _exit_reason(self, exit_signal: "ExitSignal") -> Optional[str]:
        """Why the run stops after this iteration (Megatron's --exit-interval, --exit-signal-handler,
        --exit-duration-in-mins), or None. The signal and the clock are voted on by every rank (one MAX all-reduce,
        only when either flag is given), so all ranks stop and save at the same iteration even when only some
        received the signal or their clocks disagree."""
        train = self.config.train
        if train.exit_interval is not None and self.iteration % train.exit_interval == 0:
            return f"--exit-interval {train.exit_interval}"
        if not train.exit_signal_handler and train.exit_duration_in_mins is None:
            return None
        minutes = (time.monotonic() - self.start_time) / 60.0
        flags = torch.tensor([float(exit_signal.received),
                              float(train.exit_duration_in_mins is not None and minutes > train.exit_duration_in_mins)],
                             device=self.groups.device)
        _all_reduce(flags, self.groups.group("world"), op=dist.ReduceOp.MAX)
        if flags[0] > 0:
            return "SIGTERM received (--exit-signal-handler)"
        if flags[1] > 0:
            return f"--exit-duration-in-mins {train.exit_duration_in_mins:g} passed"
        return None

    def _train_loop(self, result: TrainResult, log: TrainingLogger, loader, exit_signal: "ExitSignal") -> None:
        train, log_cfg, ckpt = self.config.train, self.config.logging, self.config.checkpoint
        saved_at = None
        step_seconds = []   # of this run's first two steps (--compile-layers: the first one compiles)
        while self.iteration < train.train_iters:
            micro_batches = [next(loader) for _ in range(self.num_micro_batches)]
            lr = self.scheduler.lr
            started = time.monotonic()
            loss, norm, skipped, masked_loss = self.train_step(micro_batches)
            if self.config.model.compile_layers and len(step_seconds) < 2:
                step_seconds.append(time.monotonic() - started)
                self._log_compile_time(log, step_seconds, self.iteration + 1 == train.train_iters)
            self.iteration += 1
            self.consumed_train_samples += train.global_batch_size
            result.losses.append(loss)
            result.masked_losses.append(masked_loss)
            result.grad_norms.append(norm)
            log.training_step(self.iteration, loss, lr, norm, skipped,
                              self.loss_scaler.scale if self.loss_scaler is not None else None,
                              masked_loss=masked_loss)
            if skipped:
                result.skipped_iterations.append(self.iteration)
                self._count_skip(log, loss)
            else:
                self.consecutive_skips = 0

            if log_cfg.eval_iters > 0 and (self.iteration % log_cfg.eval_interval == 0
                                           or self.iteration == train.train_iters):
                self._evaluate_splits(VALID_SPLITS, log, result)
            exit_reason = self._exit_reason(exit_signal)
            exiting = exit_reason is not None
            if ckpt.save and ((ckpt.save_interval and self.iteration % ckpt.save_interval == 0) or exiting
                              or self.iteration == train.train_iters):
                self.save()
                saved_at = self.iteration
                log.info("saved checkpoint of iteration %d to %s", self.iteration,
                         checkpointing.iteration_dir(ckpt.save, self.iteration))
            if exiting:
                result.exit_reason = exit_reason
                log.info("exiting at iteration %d (%s)%s", self.iteration, exit_reason,
                         "" if ckpt.save else "; no --save, so nothing was saved")
                break
        result.saved_at = saved_at

    @staticmethod
    def _log_compile_time(log: TrainingLogger, step_seconds: list[float], last: bool) -> None:
        """--compile-layers: the first step compiles the layer chain; say what that cost once a second step shows
        the compiled speed (or after the only step)."""
        from megatron_protein.kernels import compiled
        if len(step_seconds) == 2 or last:
            first = step_seconds[0]
            later = f"; the next step took {step_seconds[1]:.1f} s, so compiling cost about " \
                    f"{first - step_seconds[1]:.0f} s" if len(step_seconds) == 2 else ""
            forward = compiled.COMPILE_SECONDS.get("bert_layer")
            log.info("--compile-layers: the first step took %.1f s%s (the first call of the compiled layer forward, "
                     "compilation included: %s)", first, later,
                     f"{forward:.1f} s" if forward is not None else "not reached: no compiled layer on this rank")

    def _finish(self, result: TrainResult, log: TrainingLogger) -> TrainResult:
        train, log_cfg, ckpt = self.config.train, self.config.logging, self.config.checkpoint
        if self.iteration == train.train_iters and log_cfg.eval_iters:
            self._evaluate_splits(TEST_SPLITS, log, result)
            log.final_summary(self.iteration, result.evaluations, time.monotonic() - self._train_started)
        result.iteration = self.iteration
        result.consumed_train_samples = self.consumed_train_samples
        if result.saved_at is not None:
            log.info("checkpoints: %s (latest iteration %d)", ckpt.save, result.saved_at)
        if log_cfg.tensorboard_dir:
            log.info("TensorBoard logs: %s (tensorboard --logdir %s)", log_cfg.tensorboard_dir,
                     log_cfg.tensorboard_dir)
        log.close()
        return result


def _real_data_path(value):
    """A data argument as real paths: a prefix, or Megatron's list ``[PREFIX]`` / ``[W1, PREFIX1, ...]`` (the
    weights kept as numbers, so a changed weight counts as other data)."""
    if value is None:
        return None
    values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
    if not values:
        return None
    resolved = []
    for item in values:
        try:
            resolved.append(float(item))
        except (TypeError, ValueError):
            resolved.append(os.path.realpath(str(item)))
    return resolved[0] if len(resolved) == 1 else resolved


def _as_flag_value(value) -> str:
    """A data argument as it was typed: Megatron's ``--data-path`` list joined by spaces."""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def resolved_data_paths(args) -> dict:
    """The data arguments as real paths (what checkpoints record in ``args.resolved_data_paths``)."""
    return {name: _real_data_path(getattr(args, name, None)) for name in DATA_PATH_ARGS}


def check_same_data(saved_args, args, load: str, iteration) -> None:
    """Refuse to resume a checkpoint trained on other data (the consumed-samples position would index another
    dataset): compare the data paths, resolved to real paths, with the checkpoint's ``args``."""
    if saved_args is None:
        return
    current = resolved_data_paths(args)
    recorded = getattr(saved_args, "resolved_data_paths", None)
    if not isinstance(recorded, dict):  # a checkpoint of Megatron-LM or an older version: its raw arguments
        recorded = resolved_data_paths(saved_args)
    for name in DATA_PATH_ARGS:
        old, new = recorded.get(name), current.get(name)
        if old != new:
            old, new = (_as_flag_value(getattr(saved_args, name, None)), _as_flag_value(getattr(args, name, None)))
            flag = "--" + name.replace("_", "-")
            raise checkpointing.CheckpointError(
                f"{checkpointing.iteration_dir(load, iteration)}: this checkpoint was trained with {flag} {old}, "
                f"but this run has {new}; resuming would continue its data position in other data. Use "
                f"another --save/--load, --finetune to start a new run from its weights, or "
                f"--allow-data-path-change to resume anyway")


def pretrain(config: PretrainConfig, groups: Optional[scg.ParallelGroups] = None) -> TrainResult:
    """Build everything for ``config`` on ``groups`` (default: the current layout) and train, holding the lock of
    ``--save`` (taken by global rank 0; every rank fails at once if another job holds it)."""
    groups = groups if groups is not None else scg.current()
    started = time.monotonic()
    lock = None
    if config.checkpoint.save:
        lock = OutputLock(config.checkpoint.save, "--save")
        on_all_ranks(lambda: lock.acquire() if groups.rank == 0 else None, groups, LockError,
                     what="locking --save")
    try:
        result = Pretrainer(config, groups, start_time=started).train()
    finally:
        if lock is not None:
            lock.release()
    result.elapsed_seconds = time.monotonic() - started
    return result
