"""Progress of a folding run: one line per ``--log_step`` (step, every loss term, lr, grad norm, steps/s, ETA), the
same numbers as TensorBoard scalars, and one JSON object per logged step in ``<model_dir>/metrics.jsonl``.

``metrics.jsonl`` lines: training ``{"split": "train", "step", "loss", "fape", "fape_aux", "distogram",
"masked_msa", "plddt", "lr", "grad_norm", "steps_per_s", "skipped_steps"}`` (loss terms averaged over the steps
since the last line, unweighted; ``loss`` is the weighted total) and evaluation ``{"split": "valid", "step",
"lddt_ca", "tm_score", ...}``. When a run resumes from a checkpoint, lines of steps after it (written by the
interrupted run) are removed first, so the file always describes one uninterrupted history.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

from megatron_protein.training.logging_utils import format_duration
from megatron_protein.utils import strict_json

logger = logging.getLogger("megatron_protein.folding")

METRICS_FILENAME = "metrics.jsonl"


def truncate_metrics(path: str, last_step: int) -> None:
    """Drop the lines of ``path`` whose ``step`` is after ``last_step`` (atomically: temporary file + rename)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
            if int(record.get("step", 0)) <= last_step:
                kept.append(json.dumps(record))
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return records


class FoldingLogger:
    """Averages the per-step loss terms over each log window; prints, writes TensorBoard and metrics.jsonl.

    Only the writer rank (global rank 0) prints and writes files."""

    def __init__(self, train_step: int, log_step: int, model_dir: Optional[str], is_writer: bool = True,
                 tensorboard: bool = True, start_step: int = 0):
        self.train_step, self.log_step = train_step, log_step
        self.is_writer = is_writer
        self.start_step = start_step
        self.start_time = time.monotonic()
        self.metrics_path = os.path.join(model_dir, METRICS_FILENAME) if model_dir else None
        self.writer = None
        if is_writer and model_dir:
            os.makedirs(model_dir, exist_ok=True)
            truncate_metrics(self.metrics_path, start_step)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(log_dir=os.path.join(model_dir, "tensorboard"))
        self._reset()

    def _reset(self) -> None:
        self._window_start = time.monotonic()
        self._sums: dict[str, float] = {}
        self._steps = 0
        self._norms: list[float] = []
        self._skipped = 0

    def info(self, message: str, *args) -> None:
        if self.is_writer:
            logger.info(message, *args)

    def _write(self, record: dict) -> None:
        if self.metrics_path is not None and self.is_writer:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def step(self, step: int, terms: dict[str, float], lr: float, grad_norm: float, skipped: bool,
             total_skipped: int) -> Optional[dict]:
        """Record optimizer step ``step`` (1-based); every ``log_step`` steps (and at the last) log the window."""
        if skipped:
            self._skipped += 1
        else:
            for key, value in terms.items():
                self._sums[key] = self._sums.get(key, 0.0) + value
            self._norms.append(grad_norm)
            self._steps += 1
        if step % self.log_step and step != self.train_step:
            return None
        now = time.monotonic()
        steps_in_window = self._steps + self._skipped
        rate = steps_in_window / max(now - self._window_start, 1e-9)
        elapsed = now - self.start_time
        done = step - self.start_step
        eta = elapsed / done * (self.train_step - step) if done else float("nan")
        means = {k: v / self._steps for k, v in self._sums.items()} if self._steps else {}
        record = {"split": "train", "step": step, **means, "lr": lr,
                  "grad_norm": sum(self._norms) / len(self._norms) if self._norms else float("nan"),
                  "steps_per_s": rate, "skipped_steps": total_skipped}
        if self.is_writer:
            order = ["loss"] + sorted(k for k in means if k != "loss")
            terms_text = " | ".join(f"{k} {means[k]:.4f}" for k in order if k in means)
            line = (f"step {step:>6d}/{self.train_step} | {terms_text or 'all steps skipped'} | lr {lr:.3e} | "
                    f"grad norm {record['grad_norm']:.3f} | {rate:.2f} steps/s | elapsed {format_duration(elapsed)}"
                    f" | ETA {format_duration(eta)}")
            if total_skipped:
                line += f" | skipped {total_skipped}"
            logger.info(line)
            self._write(strict_json.finite(record))
            if self.writer is not None:
                for key, value in record.items():
                    if key != "split" and key != "step" and isinstance(value, (int, float)):
                        self.writer.add_scalar(f"train/{key}", value, step)
                self.writer.flush()
        self._reset()
        return record

    def evaluation(self, step: int, summary: dict) -> None:
        """Write one evaluation record (means over held-out chains) to metrics.jsonl and TensorBoard, under its
        ``split`` (``valid`` unless ``summary`` names another, e.g. ``valid_sequence_only``)."""
        if not self.is_writer:
            return
        record = {"split": "valid", "step": step, **{k: v for k, v in summary.items() if not isinstance(v, list)}}
        self._write(strict_json.finite(record))
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("split", "step") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record['split']}/{key}", value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


