"""One log line per --log-interval (iteration, loss, perplexity, lr, grad norm, tokens/s, elapsed, ETA) and the
same numbers as TensorBoard scalars. Only global rank 0 writes; the loop makes the numbers known there."""
from __future__ import annotations

import logging
import math
import time
from typing import Optional

logger = logging.getLogger("megatron_protein.pretrain")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"


def perplexity(loss: float) -> float:
    """exp(loss) of a mean cross-entropy in nats; inf instead of an overflow."""
    return math.exp(loss) if loss < 700 else float("inf")


class TrainingLogger:
    """Averages the training numbers over each log interval, prints one line and writes TensorBoard scalars."""

    def __init__(self, train_iters: int, log_interval: int, tokens_per_iteration: int, is_writer: bool,
                 tensorboard_dir: Optional[str] = None, start_iteration: int = 0):
        self.train_iters = train_iters
        self.log_interval = log_interval
        self.tokens_per_iteration = tokens_per_iteration
        self.is_writer = is_writer
        self.writer = None
        if is_writer and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        self.start_time = time.monotonic()
        self.start_iteration = start_iteration
        self._reset_window()

    def _reset_window(self) -> None:
        self._window_start = time.monotonic()
        self._losses: list[float] = []
        self._norms: list[float] = []
        self._skipped = 0

    def info(self, message: str, *args) -> None:
        if self.is_writer:
            logger.info(message, *args)

    def warning(self, message: str, *args) -> None:
        if self.is_writer:
            logger.warning(message, *args)

    def training_step(self, iteration: int, loss: float, lr: float, grad_norm: float, skipped: bool,
                      loss_scale: Optional[float] = None) -> Optional[dict]:
        """Record one optimizer step; every ``log_interval`` steps print and return the interval's averages."""
        if skipped:
            self._skipped += 1
        else:
            self._losses.append(loss)
            self._norms.append(grad_norm)
        if iteration % self.log_interval and iteration != self.train_iters:
            return None
        now = time.monotonic()
        steps = len(self._losses) + self._skipped
        interval = now - self._window_start
        mean_loss = sum(self._losses) / len(self._losses) if self._losses else float("nan")
        mean_norm = sum(self._norms) / len(self._norms) if self._norms else float("nan")
        tokens_per_s = self.tokens_per_iteration * steps / max(interval, 1e-9)
        elapsed = now - self.start_time
        done = iteration - self.start_iteration
        eta = elapsed / done * (self.train_iters - iteration) if done else float("nan")
        record = {"loss": mean_loss, "perplexity": perplexity(mean_loss), "lr": lr, "grad_norm": mean_norm,
                  "tokens_per_s": tokens_per_s, "ms_per_iteration": 1000 * interval / max(steps, 1),
                  "skipped_iterations": self._skipped}
        if loss_scale is not None:
            record["loss_scale"] = loss_scale
        if self.is_writer:
            line = (f"iteration {iteration:>7d}/{self.train_iters} | loss {mean_loss:.4f} | "
                    f"ppl {record['perplexity']:.3f} | lr {lr:.3e} | grad norm {mean_norm:.3f} | "
                    f"tokens/s {tokens_per_s:,.0f} | {record['ms_per_iteration']:.1f} ms/it | "
                    f"elapsed {format_duration(elapsed)} | ETA {format_duration(eta)}")
            if loss_scale is not None:
                line += f" | loss scale {loss_scale:.1f}"
            if self._skipped:
                line += f" | skipped {self._skipped}"
            logger.info(line)
            if self.writer is not None:
                for key, value in record.items():
                    self.writer.add_scalar(f"train/{key}", value, iteration)
                self.writer.flush()
        self._reset_window()
        return record

    def evaluation(self, iteration: int, split: str, loss: float, tokens: int) -> dict:
        record = {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens}
        if self.is_writer:
            logger.info("%s at iteration %d | loss %.4f | ppl %.3f | %d predicted tokens", split, iteration, loss,
                        record["perplexity"], tokens)
            if self.writer is not None:
                self.writer.add_scalar(f"{split}/loss", loss, iteration)
                self.writer.add_scalar(f"{split}/perplexity", record["perplexity"], iteration)
                self.writer.flush()
        return record

    def scalar(self, tag: str, value: float, iteration: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
