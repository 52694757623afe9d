"""Training of the folding model: build, then loop sample -> forward (recycling) -> loss -> backward -> clip ->
step, with logging, evaluation on held-out chains and checkpoints; resumes exactly.

Set-up as AlphaFold2's training (supplement 1.11.3): Adam (beta 0.9 / 0.999, eps 1e-6, no weight decay), linear
warm-up of the learning rate, then constant (AF2) or a decay (``train.lr_decay_style``), the global gradient
norm clipped to ``train.grad_clip`` (0.1 in AF2), a random number of recycles per step
(:func:`~megatron_protein.models.folding.model.sample_num_recycles`) and clamped FAPE in 90% of the steps, both
drawn from (seed, step) so that every data-parallel rank and every resumed run draws the same.

Guarantees:
- Checkpoints use the pretraining layout and code (:mod:`megatron_protein.training.checkpointing`:
  ``<model_dir>/iter_0000100/mp_rank_00/model_optim_rng.pt`` + ``latest_checkpointed_iteration.txt``, written to a
  temporary name and renamed). ``args`` holds the run's flags, the full config (``folding_config``, a dict) and the
  data position (``consumed_train_samples``, ``data_seed``) and the skip counters; the RNG states, optimizer and
  schedule are restored by the same code as pretraining, so a resumed run reproduces the uninterrupted losses.
- A non-finite loss or gradient never reaches the weights: the step is skipped (no optimizer or schedule step),
  counted, and the run stops after ``train.max_consecutive_skips`` such steps in a row. A checkpoint is never written
  from non-finite weights.
- A checkpoint of another architecture (a different preset or size) is refused with the differing fields named.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_protein.data.folding_dataset import (DEFAULT_MSA_DIR, FoldingBatches, FoldingDataset, MsaDirectory,
                                                   NpzChains)
from megatron_protein.data.folding_features import FeatureConfig
from megatron_protein.models.folding.config import FoldingConfig, architecture_differences
from megatron_protein.models.folding.losses import alphafold_loss
from megatron_protein.models.folding.dist_trunk import parameter_groups
from megatron_protein.models.folding.model import AlphaFold, sample_num_recycles
from megatron_protein.parallel import bp, collectives, dap, dp, scg
from megatron_protein.parallel.fused_params import fuse_param_groups
from megatron_protein.training import checkpointing
from megatron_protein.training.folding_arguments import RunOptions
from megatron_protein.training.folding_eval import compare_with_baseline, evaluate, format_summary
from megatron_protein.training.folding_logging import FoldingLogger
from megatron_protein.training.optimizer import LRScheduler, clip_grad_norm, grad_norm
from megatron_protein.utils import strict_json


class FoldingTrainingError(RuntimeError):
    """The run cannot continue (too many non-finite steps in a row, a checkpoint that does not fit, ...)."""


@dataclass
class FoldingTrainResult:
    losses: list[dict] = field(default_factory=list)    # per step: the loss terms (skipped steps: {})
    evaluations: list[dict] = field(default_factory=list)
    final: Optional[dict] = None
    final_sequence_only: Optional[dict] = None
    start_step: int = 0
    step: int = 0
    skipped_steps: int = 0
    seconds: float = 0.0
    seconds_per_step: float = float("nan")
    exited: bool = False


def feature_config(config: FoldingConfig) -> FeatureConfig:
    """The feature pipeline's settings from the run config (crop, MSA sampling, masking, profile dropout)."""
    d = config.data
    return FeatureConfig(crop_size=d.crop_size, max_msa_clusters=d.max_msa_clusters, max_extra_msa=d.max_extra_msa,
                         masked_msa_fraction=d.masked_msa_fraction, profile_dropout=d.profile_dropout)


def step_draw(seed: int, step: int, salt: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, step, salt): same on every rank and after resume."""
    generator = torch.Generator().manual_seed((int(seed) * 7_919 + int(step) * 104_729 + salt) % (2 ** 63))
    return float(torch.rand((), generator=generator))


def load_architecture_checked(path: str, config: FoldingConfig, groups: scg.ParallelGroups) -> dict:
    """Read a checkpoint's state and refuse it if its model does not have this config's architecture."""
    state, file = checkpointing.load_state(path, groups)
    saved_args = state.get("args")
    saved = getattr(saved_args, "folding_config", None) if saved_args is not None else None
    if not isinstance(saved, dict):
        raise checkpointing.CheckpointError(f"{file}: not a folding checkpoint (its args hold no folding_config)")
    diffs = architecture_differences(FoldingConfig.from_dict(saved).architecture(), config.architecture())
    if diffs:
        raise checkpointing.CheckpointError(
            f"{file}: the checkpoint's model (preset {saved.get('preset')!r}) differs from this run's (preset "
            f"{config.preset!r}): {'; '.join(diffs)}")
    return state


class FoldingTrainer:
    """Holds the model, optimizer, schedule, data position and counters of one run; :meth:`train` runs it."""

    def __init__(self, config: FoldingConfig, run: RunOptions, args: Optional[argparse.Namespace] = None,
                 groups: Optional[scg.ParallelGroups] = None):
        self.config, self.run = config, run
        self.groups = groups = groups if groups is not None else scg.current()
        self.device = groups.device
        self.args = args if args is not None else argparse.Namespace()
        t = config.train
        torch.manual_seed(t.seed)
        self.model = AlphaFold(config).to(self.device)
        # DP x DAP x BP (docs/parallel_folding.md): refuse a layout the model cannot run before any collective, then
        # start every rank from rank 0's weights. The optimizer's groups are tagged by where each parameter runs
        # (dist_trunk.parameter_groups) and each is one flat buffer, so each gradient sync is one collective per
        # group. The groups are the same at every degree, so a checkpoint resumes under any layout.
        self.model.trunk.check_parallel(groups)
        dp.param_sync(self.model, groups, src_rank=0)
        self.param_groups = parameter_groups(self.model)
        self.fused = fuse_param_groups(self.param_groups)
        # After the syncs every rank holds the whole gradient, so its norm is computed locally: a layout without
        # process groups (summing squares over 'mp' = dap x bp, as the TP/PP pretraining does, would count it
        # dap * bp times).
        self._local = scg.ParallelGroups(axes=("dp",), degrees={"dp": 1}, device=groups.device)
        # Adam without weight decay (AF2); fused multi-tensor update where available.
        self.optimizer = torch.optim.Adam(self.param_groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                          eps=t.adam_eps, foreach=True)
        self.scheduler = LRScheduler(self.optimizer, t.lr, t.min_lr, t.warmup_steps,
                                     max(t.train_step, t.warmup_steps), t.lr_decay_style)
        features = feature_config(config)
        msas = MsaDirectory(run.msa_dirs if run.msa_dirs is not None else DEFAULT_MSA_DIR)
        self.train_set = FoldingDataset(NpzChains(run.data, "train"), msas, features, seed=t.seed)
        # Held-out chains are scored as predict.py would fold them: no BERT masking of the MSA (AF2 masks only
        # in training) and no profile dropout (the sequence-only evaluation asks for that explicitly).
        eval_features = dataclasses.replace(features, masked_msa_fraction=0.0, profile_dropout=0.0)
        self.valid_set = FoldingDataset(NpzChains(run.data, "valid"), msas, eval_features, seed=t.seed)
        for dataset in (self.train_set, self.valid_set):  # a bad MSA fails here, on every rank, before any step
            dataset.check_msas()
        self.batches = FoldingBatches(self.train_set, t.batch_size, groups.rank_in("dp"), groups.size("dp"),
                                      num_workers=run.num_workers)
        self.step = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.resumed_from: Optional[str] = None
        self._resume_or_init()

    # ------------------------------------------------------------------------------------------ checkpoints
    def _resume_or_init(self) -> None:
        run, groups = self.run, self.groups
        if checkpointing.read_tracker(run.model_dir) is not None:
            state = load_architecture_checked(run.model_dir, self.config, groups)
            saved_seed = getattr(state.get("args"), "data_seed", None)
            if saved_seed is not None and int(saved_seed) != self.train_set.seed:
                # The data stream (crops, MSA sampling, masking) is a function of the seed: continuing with
                # another one would silently train on a different stream than the one the checkpoint started.
                raise checkpointing.CheckpointError(
                    f"{run.model_dir}: the run in it was trained with --seed {int(saved_seed)}, this run has seed "
                    f"{self.train_set.seed}; resume it with --seed {int(saved_seed)}, or use another --model_dir")
            position = checkpointing.load_checkpoint(run.model_dir, self.model, self.optimizer, self.scheduler,
                                                     self.args, groups=groups)
            state, _ = checkpointing.load_state(run.model_dir, groups)
            saved = state["args"]
            self.step = position["iteration"]
            self.batches.load_state_dict({"consumed_samples": position["consumed_train_samples"],
                                          "seed": int(getattr(saved, "data_seed", self.train_set.seed))})
            self.skipped_steps = int(getattr(saved, "skipped_steps", 0))
            self.consecutive_skips = int(getattr(saved, "consecutive_skips", 0))
            self.resumed_from = run.model_dir
        elif run.init_model:
            load_architecture_checked(run.init_model, self.config, groups)
            checkpointing.load_checkpoint(run.init_model, self.model, None, None, self.args, groups=groups,
                                          load_optim=False, load_rng=False, finetune=True)

    def save(self) -> str:
        for name, param in self.model.named_parameters():
            if not torch.isfinite(param).all():
                raise FoldingTrainingError(f"parameter {name} is not finite at step {self.step}; refusing to save "
                                           "a checkpoint of it")
        args = argparse.Namespace(**vars(self.args))
        args.folding_config = self.config.to_dict()
        args.iteration = self.step
        args.consumed_train_samples = self.batches.consumed_samples
        args.data_seed = self.train_set.seed
        args.skipped_steps = self.skipped_steps
        args.consecutive_skips = self.consecutive_skips
        return checkpointing.save_checkpoint(self.run.model_dir, self.step, self.model, self.optimizer,
                                             self.scheduler, args, groups=self.groups)

    # ------------------------------------------------------------------------------------------ one step
    def autocast(self):
        bf16 = self.config.train.precision == "bf16"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=bf16)

    def next_batch(self) -> dict:
        # The loader must not touch the global torch RNG (a DataLoader draws its workers' base seed from it), or a
        # resumed run's dropout would differ from the uninterrupted run's.
        with torch.random.fork_rng(devices=[]):
            batch = next(self.batches)
        return {k: v.to(self.device) for k, v in batch.items()}

    def train_step(self, batch: dict, step: int) -> tuple[dict, float, bool]:
        """One optimizer step on ``batch`` as step ``step`` (0-based). Returns (loss terms as floats, gradient
        norm before clipping, skipped)."""
        cfg = self.config
        self.model.train()
        self.fused.zero_grad()  # keeps every .grad a view of its group's flat buffer
        num_recycles = sample_num_recycles(cfg.model.max_recycling_iters, cfg.train.seed, step)
        clamped = step_draw(cfg.train.seed, step, 1) < cfg.loss.fape_clamp_fraction
        with self.autocast():
            outputs = self.model(batch, num_recycles=num_recycles)
        loss, terms = alphafold_loss(outputs, batch, cfg, use_clamped_fape=clamped, step=step)
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = float("nan")
        # In a parallel run every rank goes through backward and the syncs whatever its loss (a rank that skipped
        # would leave its peers waiting in a collective); a non-finite gradient anywhere becomes NaN everywhere in
        # the sums, so every rank skips the step together.
        if torch.isfinite(loss) or self.groups.distributed:
            loss.backward()
            groups = self.optimizer.param_groups
            bp.grad_sync(groups, self.groups)    # SUM over bp: each branch's parameters ran on one bp rank
            dap.grad_sync(groups, self.groups)   # SUM over dap: each dap rank ran them on its slice
            dp.grad_sync(groups, self.groups)    # MEAN over dp: each dp rank had its part of the batch
            norm = (clip_grad_norm(params, cfg.train.grad_clip, self._local) if cfg.train.grad_clip > 0
                    else grad_norm(params, self._local))
        if self.groups.size("dp") > 1:  # log the global batch's mean, the quantity the synced gradient is of
            names = sorted(terms)
            total = collectives.reduce_from_group(torch.stack([terms[k].float() for k in names]).to(self.device),
                                                  self.groups.group("dp")) / self.groups.size("dp")
            terms = dict(zip(names, total.unbind()))
        skipped = not math.isfinite(norm)
        if skipped:
            self.fused.zero_grad()
        else:
            self.optimizer.step()
            self.scheduler.step()
        return {k: float(v) for k, v in terms.items()}, norm, skipped

    # ------------------------------------------------------------------------------------------ evaluation
    def evaluate(self, use_profile: bool = True, keep_predictions: int = 0) -> dict:
        return evaluate(self.model, self.valid_set, self.device, self.config.model.max_recycling_iters,
                        chunk_size=self.run.chunk_size, max_chains=self.run.eval_max_chains,
                        use_profile=use_profile, keep_predictions=keep_predictions,
                        autocast_dtype=torch.bfloat16 if self.config.train.precision == "bf16" else None)

    # ------------------------------------------------------------------------------------------ the loop
    def train(self) -> FoldingTrainResult:
        cfg, run, t = self.config, self.run, self.config.train
        is_writer = self.groups.rank == 0
        log = FoldingLogger(t.train_step, t.log_step, run.model_dir, is_writer, run.tensorboard, self.step)
        result = FoldingTrainResult(start_step=self.step)
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("folding model %r: %s parameters in %d tensors | %d train / %d held-out chains from %s | crop %d, "
                 "batch %d, %d MSA clusters, up to %d recycles | %s on %s", cfg.preset, f"{n_params:,}",
                 len(list(self.model.parameters())), len(self.train_set), len(self.valid_set), run.data,
                 cfg.data.crop_size, t.batch_size, cfg.data.max_msa_clusters, cfg.model.max_recycling_iters,
                 t.precision, self.device)
        if self.resumed_from:
            log.info("resumed from %s at step %d (%d samples consumed)", self.resumed_from, self.step,
                     self.batches.consumed_samples)
        elif run.init_model:
            log.info("initialised the weights from %s", run.init_model)
        started = time.monotonic()
        first_step = self.step
        while self.step < t.train_step:
            batch = self.next_batch()
            lr = self.scheduler.lr
            terms, norm, skipped = self.train_step(batch, self.step)
            self.step += 1
            if skipped:
                self.skipped_steps += 1
                self.consecutive_skips += 1
                log.info("step %d: non-finite loss or gradient (loss %s, grad norm %s); step skipped (%d in a row)",
                         self.step, terms.get("loss"), norm, self.consecutive_skips)
            else:
                self.consecutive_skips = 0
            result.losses.append({} if skipped else terms)
            log.step(self.step, terms, lr, norm, skipped, self.skipped_steps)
            if self.consecutive_skips >= t.max_consecutive_skips:
                raise FoldingTrainingError(
                    f"{self.consecutive_skips} consecutive steps had a non-finite loss or gradient (last at step "
                    f"{self.step}); stopping. The last checkpoint in {run.model_dir} holds finite weights; lower "
                    f"--lr or use --precision fp32")
            last = self.step == t.train_step
            exiting = run.exit_step is not None and self.step == run.exit_step and not last
            if t.eval_step and (self.step % t.eval_step == 0) and not last:
                summary = self.evaluate()
                result.evaluations.append(_public(summary) | {"step": self.step})
                log.evaluation(self.step, _public(summary))
                log.info("held-out at step %d: lDDT-Ca %.3f, TM-score %.3f, pLDDT %.1f (%d chains, %.0f s)",
                         self.step, summary["lddt_ca"], summary["tm_score"], summary["plddt"],
                         summary["num_chains"], summary["seconds"])
            if run.model_dir and ((t.save_step and self.step % t.save_step == 0) or last or exiting):
                self.save()
                log.info("saved checkpoint of step %d to %s", self.step,
                         checkpointing.iteration_dir(run.model_dir, self.step))
            if exiting:
                log.info("exiting at step %d (--exit_step); run the same command again to continue", self.step)
                log.close()
                result.step, result.skipped_steps, result.exited = self.step, self.skipped_steps, True
                return result
        trained = self.step - first_step
        result.seconds = time.monotonic() - started
        result.seconds_per_step = result.seconds / trained if trained else float("nan")
        result.step, result.skipped_steps = self.step, self.skipped_steps
        log.info("trained %d steps in %.0f s (%.3f s per step, evaluations and checkpoints included)", trained,
                 result.seconds, result.seconds_per_step)

        final = self.evaluate(keep_predictions=1)
        sequence_only = self.evaluate(use_profile=False)
        if trained:  # a rerun of a finished run re-evaluates (printed, eval_final.json) but adds no history lines
            log.evaluation(self.step, _public(final))
            log.evaluation(self.step, {**_public(sequence_only), "split": "valid_sequence_only"})
        result.final, result.final_sequence_only = final, sequence_only
        log.info("held-out chains (%d, evaluated whole, %d recycles), means over chains:\n%s",
                 final["num_chains"], cfg.model.max_recycling_iters,
                 format_summary([("model, with profile", final), ("model, sequence only", sequence_only)]))
        if is_writer and run.model_dir:
            write_json(os.path.join(run.model_dir, "eval_final.json"),
                       {"step": self.step, "with_profile": _public(final) | {"chains": final["chains"]},
                        "sequence_only": _public(sequence_only) | {"chains": sequence_only["chains"]},
                        "against_helix": {"with_profile": compare_with_baseline(final, "helix"),
                                          "sequence_only": compare_with_baseline(sequence_only, "helix")},
                        "train_seconds": result.seconds, "seconds_per_step": result.seconds_per_step,
                        "config": cfg.to_dict()})
            if run.plot:
                from megatron_protein.training.folding_plots import plot_run
                for path in plot_run(run.model_dir, final):
                    log.info("plot: %s", path)
        log.close()
        return result


def _public(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("chains", "predictions")}


def write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(strict_json.finite(obj), f, indent=1, default=float, allow_nan=False)
    os.replace(tmp, path)
