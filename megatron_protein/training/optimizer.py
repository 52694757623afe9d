"""AdamW with decoupled weight decay on weights only, Megatron's LR schedule, global-norm clipping across the
model-parallel ranks, and the dynamic loss scaler for fp16.

- Parameter groups follow Megatron's ``get_param_groups``: biases and LayerNorm weights (every 1-D parameter)
  get no weight decay (Loshchilov & Hutter 2019, arXiv:1711.05101, decouple the decay from Adam's update).
- :class:`LRScheduler` is Megatron's ``OptimizerParamScheduler``: linear warmup from 0 to ``lr`` over
  ``warmup_steps``, then constant, linear or cosine decay to ``min_lr`` at ``decay_steps``, ``min_lr`` after.
- :func:`clip_grad_norm` computes the L2 norm of the gradient of the whole model although each rank holds a
  part: the squares are summed locally over the parameters this rank *owns* (tensor-parallel shards on every tp
  rank, replicated parameters on tp rank 0 only, the pipeline's second copy of the tied word embedding not at
  all), then all-reduced over the 'mp' group (every axis but dp). DP ranks hold equal gradients after the
  gradient all-reduce, so they compute the same norm.
- :class:`DynamicLossScaler` is Megatron's/apex's: scale the loss by S, skip the step and shrink S by
  ``backoff`` after ``hysteresis`` overflows (an inf/NaN gradient on any rank), grow S by ``growth`` after
  ``window`` clean steps (Micikevicius et al. 2018, arXiv:1710.03740).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megatron_protein.parallel import scg


@dataclass
class OptimConfig:
    """Optimizer, schedule, clipping and mixed precision (Megatron argument names)."""

    lr: float = 1e-4
    min_lr: float = 0.0
    lr_decay_style: str = "linear"  # constant | linear | cosine
    lr_warmup_steps: int = 0  # iterations
    lr_decay_steps: Optional[int] = None  # iterations; defaults to train_iters
    # Sample-based training (--train-samples): the schedule in samples; the iteration fields are then unused.
    lr_warmup_samples: Optional[int] = None
    lr_decay_samples: Optional[int] = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    fp16: bool = False
    bf16: bool = False
    #: With fp16/bf16: float32 parameters under torch.autocast instead of fp16/bf16 parameters with float32 main
    #: copies in the optimizer (Megatron-LM's way, the default).
    autocast: bool = False
    loss_scale: Optional[float] = None  # static loss scale for fp16; None = dynamic
    initial_loss_scale: float = 2.0 ** 32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2

    def schedule_in_samples(self, global_batch_size: int, train_iters: int) -> tuple[int, int]:
        """(warmup, decay) of the LR schedule in samples, what :class:`LRScheduler` counts in the pretraining."""
        if self.lr_decay_samples is not None:
            return int(self.lr_warmup_samples or 0), int(self.lr_decay_samples)
        return (self.lr_warmup_steps * global_batch_size,
                (self.lr_decay_steps or train_iters) * global_batch_size)

    def __post_init__(self):
        if self.lr_decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"lr_decay_style must be constant, linear or cosine, got {self.lr_decay_style!r}")
        if self.fp16 and self.bf16:
            raise ValueError("--fp16 and --bf16 are exclusive")
        if self.autocast and not (self.fp16 or self.bf16):
            raise ValueError("--autocast needs --bf16 or --fp16 (it chooses how they run)")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr} is larger than lr {self.lr}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"lr warmup steps must be >= 0, got {self.lr_warmup_steps}")


def weight_decay_group(name: str, param: torch.Tensor) -> str:
    """``'decay'`` for weights (matrices, embeddings), ``'no_decay'`` for biases and norm parameters (1-D)."""
    return "no_decay" if param.ndim == 1 or name.endswith(".bias") else "decay"


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weights (matrices, embeddings) with decay; biases and norm parameters without."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if weight_decay_group(name, param) == "no_decay" else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, with PyTorch's fused (single-kernel, multi-tensor) update, which exists
    for CPU and CUDA tensors alike; the math is AdamW's either way."""
    return torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                             betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps, fused=True)


class LRScheduler:
    """Warmup then constant / linear / cosine decay (Megatron's OptimizerParamScheduler); stateful.

    Positions are counted in units of ``increment`` per optimizer step: the pretraining counts samples (increment
    = the global batch size), as Megatron-LM does, so ``--lr-warmup-samples``/``--lr-decay-samples`` and the
    iteration flags (converted to samples) use one schedule, and the state is Megatron's. With the default
    increment of 1 a position is an iteration."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_lr: float, min_lr: float, warmup_steps: int,
                 decay_steps: int, decay_style: str, increment: int = 1):
        if decay_steps < warmup_steps:
            raise ValueError(f"lr decay steps {decay_steps} are fewer than warmup steps {warmup_steps}")
        if increment < 1:
            raise ValueError(f"the schedule's increment per step must be >= 1, got {increment}")
        self.optimizer = optimizer
        self.max_lr, self.min_lr = max_lr, min_lr
        self.warmup_steps, self.decay_steps = warmup_steps, decay_steps
        self.decay_style = decay_style
        self.increment = increment
        self.num_steps = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        """Learning rate of the optimizer step that starts at position ``step`` (0-based): during warmup,
        max_lr (step + increment) / warmup, so with increment 1 warmup steps 0..W-1 use max_lr (k+1)/W."""
        if step < self.warmup_steps:
            return self.max_lr * (step + self.increment) / self.warmup_steps
        if self.decay_style == "constant":
            return self.max_lr
        if step >= self.decay_steps:
            return self.min_lr
        ratio = (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        else:  # cosine
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def _apply(self) -> None:
        lr = self.lr_at(self.num_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.num_steps += self.increment
        self._apply()

    @property
    def lr(self) -> float:
        return self.lr_at(self.num_steps)

    def state_dict(self) -> dict:
        """Megatron-LM's ``OptimizerParamScheduler.state_dict`` keys (positions in samples when the pretraining
        counts samples), so Megatron-LM resumes the schedule from our checkpoints, plus ``increment``."""
        return {"max_lr": self.max_lr, "min_lr": self.min_lr, "lr_warmup_steps": self.warmup_steps,
                "lr_decay_steps": self.decay_steps, "lr_decay_style": self.decay_style,
                "num_steps": self.num_steps, "increment": self.increment}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position in the schedule. The schedule's shape comes from the current arguments (as
        Megatron's --override-opt_param-scheduler); only the position is read. Megatron-LM's state (and ours
        since it uses Megatron's keys) counts samples; our older state (``warmup_steps`` instead of
        ``lr_warmup_steps``) counted iterations, converted here with this schedule's increment."""
        if "num_steps" in state:
            steps = int(state["num_steps"])
        elif "num_iters" in state:  # Megatron-LM 1.x
            steps = int(state["num_iters"])
        else:
            raise KeyError("the scheduler state has no 'num_steps'")
        old_ours = "warmup_steps" in state and "lr_warmup_steps" not in state
        self.num_steps = steps * self.increment if old_ours else steps
        self._apply()


def _owned_by_this_rank(param: torch.nn.Parameter, groups: scg.ParallelGroups) -> bool:
    """True when this rank's copy of ``param`` counts in the model's global gradient norm."""
    if getattr(param, "shared", False):
        return False
    if getattr(param, "tensor_model_parallel", False):
        return True
    return groups.rank_in("tp") == 0


def grad_norm(parameters: Iterable[torch.nn.Parameter], groups: Optional[scg.ParallelGroups] = None) -> float:
    """L2 norm of the full model's gradient, each tensor counted once across tp and pp."""
    groups = groups if groups is not None else scg.current()
    owned = [p.grad.detach() for p in parameters if p.grad is not None and _owned_by_this_rank(p, groups)]
    # Sum of squares in float64 on the gradients' device: one reduction, no host sync per tensor.
    squares = (torch.stack([g.double().pow(2).sum() for g in owned]).sum() if owned
               else torch.zeros((), dtype=torch.float64)).to(groups.device)
    mp = groups.group("mp")
    if mp is not None:
        dist.all_reduce(squares, group=mp)
    return math.sqrt(float(squares))


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float,
                   groups: Optional[scg.ParallelGroups] = None) -> float:
    """Scale every gradient by min(1, max_norm / ||g||) with the global norm; return the norm before clipping.

    A non-finite norm is returned unclipped (the fp16 loss scaler skips that step)."""
    parameters = [p for p in parameters if p.grad is not None]
    total = grad_norm(parameters, groups)
    if max_norm > 0 and math.isfinite(total):
        coeff = max_norm / (total + 1e-6)
        if coeff < 1.0:
            for p in parameters:
                p.grad.detach().mul_(coeff)
    return total


def grads_are_finite(parameters: Iterable[torch.nn.Parameter], groups: Optional[scg.ParallelGroups] = None,
                     loss: Optional[torch.Tensor] = None) -> bool:
    """False when any gradient (or ``loss``, if given) on any rank holds inf or NaN (one MAX all-reduce over the
    whole world, so every rank gets the same answer).

    The local test is the finiteness of the 2-norm of this rank's gradients (one multi-tensor reduction, ~25x
    cheaper than testing every element): NaN or inf anywhere makes it non-finite; so does a norm beyond float32's
    range, which no usable gradient has (Megatron tests the same norm)."""
    groups = groups if groups is not None else scg.current()
    grads = [p.grad.detach() for p in parameters if p.grad is not None]
    finite = bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)).item()) if grads else True
    if loss is not None:
        finite = finite and bool(torch.isfinite(torch.as_tensor(loss)).all().item())
    bad = torch.tensor([0.0 if finite else 1.0], device=groups.device)
    world = groups.group("world")
    if world is not None:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=world)
    return bool(bad.item() == 0.0)


class DynamicLossScaler:
    """Loss scale for fp16 training that grows while gradients stay finite and backs off on overflow."""

    def __init__(self, initial_scale: float = 2.0 ** 32, min_scale: float = 1.0, growth: float = 2.0,
                 backoff: float = 0.5, window: int = 1000, hysteresis: int = 2, dynamic: bool = True):
        self.scale = float(initial_scale)
        self.min_scale, self.growth, self.backoff = float(min_scale), growth, backoff
        self.window, self.hysteresis, self.dynamic = window, hysteresis, dynamic
        self._clean_steps = 0
        self._hysteresis_left = hysteresis

    def at_minimum(self) -> bool:
        """True when an overflow can no longer be answered by a smaller scale (static, or at ``min_scale``)."""
        return not self.dynamic or self.scale <= self.min_scale

    def update(self, found_overflow: bool) -> None:
        if not self.dynamic:
            return
        if found_overflow:
            self._clean_steps = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self.scale = max(self.scale * self.backoff, self.min_scale)
        else:
            self._clean_steps += 1
            if self._clean_steps % self.window == 0:
                self.scale *= self.growth
                self._hysteresis_left = self.hysteresis

    def state_dict(self) -> dict:
        return {"scale": self.scale, "clean_steps": self._clean_steps, "hysteresis_left": self._hysteresis_left}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self._clean_steps = int(state["clean_steps"])
        self._hysteresis_left = int(state["hysteresis_left"])
