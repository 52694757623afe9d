"""One log line per --log-interval (iteration, loss, perplexity, masked-position perplexity, lr, grad norm,
tokens/s, elapsed, ETA), one per evaluation of a held-out split (masked-position perplexity beside the unigram
perplexities of the same residues; kept and randomised positions apart), a final summary line, and the same numbers
as TensorBoard scalars. Only global rank 0 writes; the loop makes the numbers known there.

TensorBoard: ``train/*`` and ``<split>/*`` (every key of :meth:`MLMMetrics.summary
<megatron_protein.training.mlm_metrics.MLMMetrics.summary>`) against the iteration, and
``by_tokens/<split>/<key>`` for the masked-position perplexity and its two unigram baselines against the tokens
seen (iterations x global batch x sequence length), so that runs with other batch shapes line up."""
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
    """exp(loss) of a mean cross-entropy in nats; inf instead of an overflow (nan stays nan)."""
    if math.isnan(loss):
        return float("nan")
    return math.exp(loss) if loss < 700 else float("inf")


def below(fraction: float) -> str:
    """``1 - model / baseline`` as words: '2.1% below', '3.0% above'."""
    if math.isnan(fraction):
        return "n/a"
    return f"{100 * abs(fraction):.1f}% {'below' if fraction >= 0 else 'above'}"


def format_evaluation(summary: dict) -> str:
    """``all predicted ppl .. | <mask> ppl .. vs unigram .. (train) / .. (own): x% below | randomised .. | kept ..``"""
    def ppl(key):
        value = summary.get(key, float("nan"))
        return f"{value:.3f}"
    return (f"loss {summary['loss']:.4f} | ppl {summary['perplexity']:.3f} over {summary['tokens']:,} predicted | "
            f"<mask> ({summary['masked_tokens']:,}): ppl {ppl('masked_perplexity')}, unigram "
            f"{ppl('masked_unigram_train_perplexity')} (train) / {ppl('masked_unigram_own_perplexity')} (own), "
            f"{below(summary.get('masked_below_unigram_own', float('nan')))} own | "
            f"randomised ({summary['randomised_tokens']:,}): ppl {ppl('randomised_perplexity')} | "
            f"kept ({summary['kept_tokens']:,}): ppl {ppl('kept_perplexity')}")


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
        self._masked_losses: list[float] = []
        self._norms: list[float] = []
        self._skipped = 0

    def info(self, message: str, *args) -> None:
        if self.is_writer:
            logger.info(message, *args)

    def warning(self, message: str, *args) -> None:
        if self.is_writer:
            logger.warning(message, *args)

    def training_step(self, iteration: int, loss: float, lr: float, grad_norm: float, skipped: bool,
                      loss_scale: Optional[float] = None, masked_loss: Optional[float] = None) -> Optional[dict]:
        """Record one optimizer step; every ``log_interval`` steps print and return the interval's averages.
        ``loss`` is over all predicted positions, ``masked_loss`` over the ``<mask>`` positions only."""
        if skipped:
            self._skipped += 1
        else:
            self._losses.append(loss)
            self._norms.append(grad_norm)
            if masked_loss is not None and not math.isnan(masked_loss):
                self._masked_losses.append(masked_loss)
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
        mean_masked = (sum(self._masked_losses) / len(self._masked_losses) if self._masked_losses
                       else float("nan"))
        record = {"loss": mean_loss, "perplexity": perplexity(mean_loss), "masked_loss": mean_masked,
                  "masked_perplexity": perplexity(mean_masked), "lr": lr, "grad_norm": mean_norm,
                  "tokens_per_s": tokens_per_s, "ms_per_iteration": 1000 * interval / max(steps, 1),
                  "skipped_iterations": self._skipped}
        if loss_scale is not None:
            record["loss_scale"] = loss_scale
        if self.is_writer:
            line = (f"iteration {iteration:>7d}/{self.train_iters} | loss {mean_loss:.4f} | "
                    f"ppl {record['perplexity']:.3f} | <mask> ppl {record['masked_perplexity']:.3f} | lr {lr:.3e} | grad norm {mean_norm:.3f} | "
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

    def evaluation(self, iteration: int, split: str, summary: dict, title: Optional[str] = None,
                   tokens_seen: Optional[int] = None) -> dict:
        """Print one line for the evaluation ``summary`` (:meth:`MLMMetrics.summary`) of ``split`` and write every
        number as ``<split>/<key>``."""
        if self.is_writer:
            logger.info("%s at iteration %d%s | %s", split, iteration, f" ({title})" if title else "",
                        format_evaluation(summary))
            if self.writer is not None:
                for key, value in summary.items():
                    self.writer.add_scalar(f"{split}/{key}", value, iteration)
                if tokens_seen is not None:
                    for key in ("masked_perplexity", "masked_unigram_train_perplexity",
                                "masked_unigram_own_perplexity"):
                        if key in summary:
                            self.writer.add_scalar(f"by_tokens/{split}/{key}", summary[key], tokens_seen)
                self.writer.flush()
        return summary

    def final_summary(self, iteration: int, evaluations: list[dict], seconds: float) -> Optional[str]:
        """The run's last line: for each kind of held-out set, its latest evaluation (test split preferred)."""
        if not evaluations:
            return None
        latest: dict[str, dict] = {}
        for record in evaluations:  # later evaluations replace earlier ones; a test split replaces its valid one
            kind = record.get("title") or record["split"]
            current = latest.get(kind)
            if (current is None or record["iteration"] > current["iteration"]
                    or (record["iteration"] == current["iteration"] and record["split"].startswith("test"))):
                latest[kind] = record
        parts = [f"{kind} ({r['split']}, {r['masked_tokens']:,} <mask> positions): masked-position ppl "
                 f"{r['masked_perplexity']:.3f} | unigram {r.get('masked_unigram_train_perplexity', float('nan')):.3f} "
                 f"(training frequencies) / {r['masked_unigram_own_perplexity']:.3f} (own) | "
                 f"{below(r.get('masked_below_unigram_train', float('nan')))} / "
                 f"{below(r['masked_below_unigram_own'])}"
                 for kind, r in latest.items()]
        tokens = max(r.get("tokens_seen") or 0 for r in evaluations)
        line = (f"summary at iteration {iteration} ({tokens:,} tokens seen, {format_duration(seconds)}) | "
                + " || ".join(parts))
        if self.is_writer:
            logger.info(line)
        return line

    def scalar(self, tag: str, value: float, iteration: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
