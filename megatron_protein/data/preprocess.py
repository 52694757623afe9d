"""Turn protein sequence files into Megatron indexed datasets (``PREFIX.bin``/``PREFIX.idx``).

    python -m megatron_protein.data.preprocess --input data/pfam/pfam_sample.fasta \\
        --output-prefix /tmp/pfam/pfam --split-by-family 0.9,0.05,0.05 --seed 1234 --workers 2

Inputs: FASTA (Pfam-A.fasta headers give the family), Stockholm (plain or gzip, one or many alignments), TAPE's
Pfam LMDB and TAPE-schema JSON; several ``--input`` files are read in turn. Reading streams (one record, or one
Stockholm alignment, at a time) and the writer streams to disk, so memory stays flat as the input grows
(``bench/preprocess.py`` measures it).

Workers (``--workers N``), as Megatron's ``preprocess_data.py --partitions``: an uncompressed FASTA or Stockholm
file is cut at record boundaries into byte ranges of at most 32 MiB (:func:`readers.partition_file`); each worker
parses and encodes whole ranges and sends back the token arrays, which this process writes in input order, with at
most ``2 x N`` ranges in flight. The result is byte-identical to ``--workers 1``. Inputs that cannot be cut (gzip,
LMDB, JSON) are read in the main process and encoded in the pool, with at most ``2 x N`` batches in flight.

Splits (optional) are decided per record by a keyed hash, so they need no second pass, do not depend on the order
of records or on ``--workers``, and are reproducible by ``--seed``:

* ``--split-by-family TRAIN,VALID,TEST``: a family goes wholly to one split (held-out families, as TAPE's Pfam
  holdout): the split of ``blake2b(family, key=seed)``. The fractions are fractions of families.
* ``--split-random TRAIN,VALID,TEST``: each record by ``blake2b(name + sequence, key=seed)`` (identical records
  land in the same split, so exact duplicates cannot leak between splits).
* ``--holdout-sequences VALID,TEST`` (with ``--split-by-family``): of the records of the *training* families, these
  fractions go to ``PREFIX_valid_infamily`` and ``PREFIX_test_infamily``, drawn per record by
  ``blake2b(sequence, key=seed + 1)``: the second held-out set, sequences of families the model trains on (what
  TAPE's and ProteinLM's Pfam validation sets measure), beside the held-out families. Keyed on the sequence alone,
  so copies of one sequence under different names never straddle training and held-out. Every training family
  keeps these fractions in expectation; a family of n sequences holds none out with probability
  (1 - VALID - TEST)^n.

Outputs ``PREFIX_{train,valid,test}.{bin,idx}`` when splitting (and ``PREFIX_{valid,test}_infamily`` with
``--holdout-sequences``) (``PREFIX.{bin,idx}`` otherwise) and
``PREFIX_summary.json``: sequences, residues, unknown residues, dropped records with the reason, length histogram.
Every file is written under a temporary name and renamed when complete; an error leaves nothing behind, and so do
SIGTERM, SIGHUP and SIGINT (the temporary files are removed before the process exits).

A run holds ``PREFIX.lock`` (:class:`~megatron_protein.utils.locks.OutputLock`): a second run on the same prefix
fails at once, naming the first; temporary files left under the prefix by a run that was killed with SIGKILL are
removed when the next run starts. Inputs are checked before any work (every file exists, is not empty, has a
known format) and the outputs after: an input without records, or a split that would be empty although its
fraction is not 0, is an error naming the file.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from .indexed_dataset import MMapIndexedDatasetBuilder, best_fitting_dtype, make_world_readable
from .readers import FORMATS, ByteRange, SequenceRecord, detect_format, is_gzip, partition_file, read_records
from .readers import read_fasta, read_stockholm
from .tokenizer import build_tokenizer
from megatron_protein.utils import errors, fs
from megatron_protein.utils.locks import OutputLock

logger = logging.getLogger(__name__)
SPLIT_NAMES = ("train", "valid", "test")
INFAMILY_SPLIT_NAMES = ("valid_infamily", "test_infamily")
# Length histogram bin edges (residues): [1,32), [32,64), ... , [4096, inf)
HISTOGRAM_EDGES = (1, 32, 64, 128, 256, 512, 1024, 2048, 4096)
PARTITIONS_PER_WORKER = 4  # more ranges than workers, so a slow range does not idle the others
PARTITION_BYTES = 32 << 20  # and ranges of at most ~32 MiB, so a part's encoded result stays small


class PreprocessError(errors.UserError, ValueError):
    """The inputs produce no usable output (no records, or an empty split); nothing was written."""


def parse_fractions(text: str, flag: str) -> tuple[float, float, float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise errors.ConfigError(f"{flag} expects three numbers like 0.9,0.05,0.05, got {text!r}") from None
    if len(values) != 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise errors.ConfigError(f"{flag} expects three non-negative numbers TRAIN,VALID,TEST, got {text!r}")
    total = sum(values)
    return tuple(v / total for v in values)  # type: ignore[return-value]


def parse_holdout(text: str) -> tuple[float, float]:
    """``--holdout-sequences VALID,TEST``: two fractions (of each training family's records), not renormalised."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise errors.ConfigError(f"--holdout-sequences expects two numbers like 0.05,0.05, got {text!r}") from None
    if len(values) != 2 or min(values) < 0 or sum(values) >= 1:
        raise errors.ConfigError(f"--holdout-sequences expects VALID,TEST fractions >= 0 with a sum below 1, got "
                                 f"{text!r}")
    return values  # type: ignore[return-value]


def split_of(key: str, seed: int, fractions: tuple[float, float, float]) -> int:
    """Split index (0 train, 1 valid, 2 test) of ``key``: a uniform draw from a keyed hash, cut by fractions."""
    digest = hashlib.blake2b(key.encode("latin-1", errors="replace"), digest_size=8,
                             key=str(seed).encode()[:64]).digest()
    u = int.from_bytes(digest, "little") / 2.0 ** 64
    return int(min(np.searchsorted(np.cumsum(fractions), u, side="right"), 2))


@dataclass
class Options:
    split_by_family: tuple[float, float, float] | None = None
    split_random: tuple[float, float, float] | None = None
    holdout_sequences: tuple[float, float] | None = None  # (valid, test) fractions of training-family records
    seed: int = 1234
    tokenizer_type: str = "iupac"
    tokenizer_model: str | None = None
    min_length: int = 1
    max_length: int | None = None
    batch_size: int = 2048

    @property
    def splitting(self) -> bool:
        return bool(self.split_by_family or self.split_random)


@dataclass
class SplitStats:
    sequences: int = 0
    residues: int = 0
    unknown: int = 0
    families: set = field(default_factory=set)
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(len(HISTOGRAM_EDGES), dtype=np.int64))

    def add(self, lengths: np.ndarray, unknown: np.ndarray, families: Iterable[str | None]) -> None:
        self.sequences += int(lengths.size)
        self.residues += int(lengths.sum())
        self.unknown += int(unknown.sum())
        self.families.update(f for f in families if f is not None)
        bins = np.searchsorted(HISTOGRAM_EDGES, lengths, side="right") - 1
        self.histogram += np.bincount(bins, minlength=len(HISTOGRAM_EDGES))

    def merge(self, other: "SplitStats") -> None:
        self.sequences += other.sequences
        self.residues += other.residues
        self.unknown += other.unknown
        self.families |= other.families
        self.histogram += other.histogram

    def as_dict(self) -> dict:
        labels = [f"{lo}-{hi - 1}" for lo, hi in zip(HISTOGRAM_EDGES, HISTOGRAM_EDGES[1:])] + \
                 [f"{HISTOGRAM_EDGES[-1]}+"]
        return {"sequences": self.sequences, "residues": self.residues, "unknown_residues": self.unknown,
                "families": len(self.families), "length_histogram": dict(zip(labels, self.histogram.tolist()))}


@dataclass
class Progress:
    """What a conversion did: per-split statistics, records read and dropped (with the reason)."""
    stats: list
    records_read: int = 0
    dropped: collections.Counter = field(default_factory=collections.Counter)

    def merge(self, other: "Progress") -> None:
        for mine, theirs in zip(self.stats, other.stats):
            mine.merge(theirs)
        self.records_read += other.records_read
        self.dropped.update(other.dropped)


def _batches(records: Iterable[SequenceRecord], size: int) -> Iterator[list[SequenceRecord]]:
    batch = []
    for record in records:
        batch.append(record)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Converter:
    """Filters, splits and writes encoded batches; one per process (main, or each partition in a worker)."""

    def __init__(self, builders: list[MMapIndexedDatasetBuilder], options: Options) -> None:
        self.builders = builders
        self.options = options
        self.progress = Progress([SplitStats() for _ in builders])
        self._family_split: dict[str, int] = {}

    def _split(self, batch: list[SequenceRecord], keep: np.ndarray) -> np.ndarray:
        o = self.options
        split = np.zeros(len(batch), dtype=np.int64)
        if o.split_by_family:
            for j in np.flatnonzero(keep):
                family = batch[j].family
                if family not in self._family_split:
                    self._family_split[family] = split_of(family, o.seed, o.split_by_family)
                split[j] = self._family_split[family]
        elif o.split_random:
            for j in np.flatnonzero(keep):
                split[j] = split_of(batch[j].name + "\0" + batch[j].sequence, o.seed, o.split_random)
        if o.holdout_sequences:
            valid, test = o.holdout_sequences
            for j in np.flatnonzero(keep & (split == 0)):
                held = split_of(batch[j].sequence, o.seed + 1, (1.0 - valid - test, valid, test))
                if held:
                    split[j] = len(SPLIT_NAMES) - 1 + held  # 3 = valid_infamily, 4 = test_infamily
        split[~keep] = -1
        return split

    def add(self, batch: list[SequenceRecord], ids: np.ndarray, lengths: np.ndarray, unknown: np.ndarray) -> None:
        o, p = self.options, self.progress
        keep = np.ones(len(batch), dtype=bool)
        rules = [(lengths == 0, "no residues after removing gaps"),
                 (lengths < o.min_length, f"shorter than --min-length {o.min_length}"),
                 (lengths > o.max_length if o.max_length is not None else None,
                  f"longer than --max-length {o.max_length}"),
                 (unknown == lengths, "only unknown residues")]
        if o.split_by_family:
            rules.append((np.array([r.family is None for r in batch], dtype=bool),
                          "no family (needed by --split-by-family)"))
        for failing, reason in rules:  # the first failing rule is the reason reported
            if failing is not None and (keep & failing).any():
                p.dropped[reason] += int((keep & failing).sum())
                keep &= ~failing
        split = self._split(batch, keep)
        token_split = np.repeat(split, lengths)
        for k, builder in enumerate(self.builders):
            chosen = split == k
            if chosen.any():
                builder.add_documents(ids[token_split == k], lengths[chosen])
                p.stats[k].add(lengths[chosen], unknown[chosen], (batch[j].family for j in np.flatnonzero(chosen)))
        p.records_read += len(batch)


def _output_names(prefix: str, options: Options) -> list[str]:
    if not options.splitting:
        return [prefix]
    names = SPLIT_NAMES + (INFAMILY_SPLIT_NAMES if options.holdout_sequences else ())
    return [f"{prefix}_{s}" for s in names]


# --------------------------------------------------------------------------------------------- worker side
_WORKER_TOKENIZER = None


def _init_worker(tokenizer_type: str, tokenizer_model: str | None) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = build_tokenizer(tokenizer_type, tokenizer_model)


def _encode_in_worker(sequences: list[str]):
    return _WORKER_TOKENIZER.encode_batch(sequences)


class _Collector:
    """Stands in for a dataset builder inside a worker: keeps a part's encoded sequences to send back."""

    def __init__(self) -> None:
        self.tokens: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        self.tokens.append(np.asarray(tokens))
        self.lengths.append(np.asarray(lengths, dtype=np.int64))

    def arrays(self, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        if not self.lengths:
            return np.zeros(0, dtype=dtype), np.zeros(0, dtype=np.int64)
        return np.concatenate(self.tokens).astype(dtype), np.concatenate(self.lengths)


def _convert_partition(path: str, input_format: str, part: ByteRange, options: Options, dtype: str):
    """Worker task: parse and encode one byte range; returns (Progress, [(tokens, lengths) per output])."""
    reader = read_fasta if input_format == "fasta" else read_stockholm
    collectors = [_Collector() for _ in _output_names("", options)]
    converter = _Converter(collectors, options)  # type: ignore[arg-type]
    for batch in _batches(reader(path, part), options.batch_size):
        converter.add(batch, *_WORKER_TOKENIZER.encode_batch([r.sequence for r in batch]))
    return converter.progress, [c.arrays(np.dtype(dtype)) for c in collectors]


# ------------------------------------------------------------------------------------------------ main side
def stale_temp_patterns(output_prefix: str) -> list[str]:
    """Regular expressions of the temporary file names any run on ``output_prefix`` creates (builders and summary),
    whatever its split options."""
    names = [output_prefix] + [f"{output_prefix}_{s}" for s in SPLIT_NAMES + INFAMILY_SPLIT_NAMES]
    patterns = [rf"\.{re.escape(os.path.basename(n))}\.{fs.MKSTEMP_RANDOM}\.(bin|sizes|docs|idx)\.tmp"
                for n in names]
    patterns.append(rf"{re.escape(os.path.basename(output_prefix))}_summary\.json\.{fs.MKSTEMP_RANDOM}\.tmp")
    return patterns


def check_inputs(inputs: list[str], input_format: str | None) -> list[str]:
    """Every input exists, is not empty and has a known format (before any work); returns the formats."""
    formats = []
    for path in inputs:
        if not os.path.exists(path):
            raise FileNotFoundError(2, "no such file or directory (expected a FASTA, Stockholm, TAPE LMDB or "
                                       "TAPE JSON input)", path)
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise PreprocessError(f"{path}: empty file; expected {input_format or 'FASTA, Stockholm or JSON'} "
                                  f"records")
        formats.append(input_format or detect_format(path))
    return formats


def preprocess(inputs: list[str], output_prefix: str, input_format: str | None = None,
               split_by_family: tuple[float, float, float] | None = None,
               split_random: tuple[float, float, float] | None = None,
               holdout_sequences: tuple[float, float] | None = None, seed: int = 1234, workers: int = 1,
               tokenizer_type: str = "iupac", tokenizer_model: str | None = None, min_length: int = 1,
               max_length: int | None = None, batch_size: int = 2048, progress: bool = True) -> dict:
    """Run the conversion; returns the summary dict (also written to ``PREFIX_summary.json``).

    Holds the prefix's lock, removes what a killed run left, checks the inputs, and removes its own temporary
    files on an error or on SIGTERM/SIGHUP/SIGINT (see the module docstring)."""
    if split_by_family and split_random:
        raise errors.ConfigError("choose one of --split-by-family and --split-random")
    if holdout_sequences is not None:
        if not split_by_family:
            raise errors.ConfigError("--holdout-sequences holds out sequences of the training families: it needs "
                                     "--split-by-family")
        holdout_sequences = tuple(float(v) for v in holdout_sequences)
        if len(holdout_sequences) != 2 or min(holdout_sequences) < 0 or sum(holdout_sequences) >= 1:
            raise errors.ConfigError(f"--holdout-sequences expects VALID,TEST fractions >= 0 with a sum below 1, "
                                     f"got {holdout_sequences}")
        if sum(holdout_sequences) == 0:
            holdout_sequences = None
    if isinstance(inputs, str):
        inputs = [inputs]
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    with OutputLock(output_prefix, "--output-prefix"), errors.terminate_on_signals():
        fs.remove_stale_temp_files(out_dir, stale_temp_patterns(output_prefix))
        formats = check_inputs(inputs, input_format)
        try:
            return _preprocess(inputs, formats, output_prefix, split_by_family, split_random, holdout_sequences,
                               seed, workers, tokenizer_type, tokenizer_model, min_length, max_length, batch_size,
                               progress)
        except BaseException:
            # A signal can land between two mkstemp calls, before a builder is known to anyone who could abort
            # it; we hold the prefix's lock, so every file matching our temporary names is ours to remove.
            fs.remove_stale_temp_files(out_dir, stale_temp_patterns(output_prefix), why=None)
            raise


def _check_outputs(inputs: list[str], per_input: dict, names: list[str], progress: "Progress",
                   fractions: tuple[float, ...] | None, by_family: bool) -> None:
    for path in inputs:
        if per_input.get(path, 0) == 0:
            raise PreprocessError(f"{path}: no records found; expected at least one sequence record")
    dropped = ", ".join(f"{count} {reason}" for reason, count in sorted(progress.dropped.items())) or "none"
    split_names = SPLIT_NAMES + INFAMILY_SPLIT_NAMES
    for k, (name, stats) in enumerate(zip(names, progress.stats)):
        if stats.sequences:
            continue
        if fractions is not None and fractions[k] == 0:
            continue  # asked to be empty
        if fractions is None or sum(s.sequences for s in progress.stats) == 0:
            raise PreprocessError(f"{', '.join(inputs)}: no sequence was kept for {name}: {progress.records_read} "
                                  f"record(s) read, dropped: {dropped}")
        if k >= len(SPLIT_NAMES):  # in-family held-out sequences: a fraction of each training family's records
            unit, total = "training-family records", progress.stats[0].sequences
        elif by_family:
            unit, total = "families", len(set().union(*(s.families for s in progress.stats)))
        else:
            unit, total = "records", sum(s.sequences for s in progress.stats)
        raise PreprocessError(
            f"{', '.join(inputs)}: the {split_names[k]} split ({name}) would be empty although it gets "
            f"{fractions[k]:.3g} of the {unit}: the input has only {total} {unit}; use a larger input, another "
            f"--seed, or give that split the fraction 0")


def _preprocess(inputs, formats, output_prefix, split_by_family, split_random, holdout_sequences, seed, workers,
                tokenizer_type, tokenizer_model, min_length, max_length, batch_size, progress) -> dict:
    options = Options(split_by_family, split_random, holdout_sequences, seed, tokenizer_type, tokenizer_model,
                      min_length, max_length, batch_size)
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
    dtype = best_fitting_dtype(tokenizer.vocab_size)
    names = _output_names(output_prefix, options)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    builders: list[MMapIndexedDatasetBuilder] = []
    try:
        for name in names:
            builders.append(MMapIndexedDatasetBuilder(name, dtype=dtype))
    except BaseException:
        for builder in builders:
            builder.abort()
        raise
    converter = _Converter(builders, options)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(unit=" seq", unit_scale=True, desc="preprocess", mininterval=1.0, file=sys.stderr)
    start = time.perf_counter()

    def report(sequences: int) -> None:
        if bar is not None:
            bar.update(sequences)
            residues = sum(s.residues for s in converter.progress.stats)
            bar.set_postfix(residues_per_s=f"{residues / (time.perf_counter() - start):.3g}", refresh=False)

    pool = None
    pending_parts: collections.deque = collections.deque()  # worker tasks, in input order

    per_input: dict[str, int] = collections.Counter()

    def merge_next_part() -> None:
        part_path, future = pending_parts.popleft()
        part_progress, outputs = future.result()
        for builder, (tokens, lengths) in zip(builders, outputs):
            builder.add_documents(tokens, lengths)
        converter.progress.merge(part_progress)
        per_input[part_path] += part_progress.records_read
        report(part_progress.records_read)

    try:
        if workers > 1:
            # concurrent.futures, not multiprocessing.Pool: Pool.terminate() can deadlock joining its handler
            # threads when a task has failed (seen in this repository's tests); the executor's shutdown cancels
            # what has not started and waits for the (small) parts already running.
            pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                                          initializer=_init_worker,
                                                          initargs=(tokenizer_type, tokenizer_model))
        for path, fmt in zip(inputs, formats):
            if pool is not None and fmt in ("fasta", "stockholm") and not is_gzip(path):
                parts = max(workers * PARTITIONS_PER_WORKER, -(-os.path.getsize(path) // PARTITION_BYTES))
                for part in partition_file(path, fmt, parts):
                    pending_parts.append((path, pool.submit(_convert_partition,
                                                            path, fmt, part, options, np.dtype(dtype).name)))
                    # Written in input order; at most 2 x workers parts are in flight or waiting in memory.
                    while len(pending_parts) >= 2 * workers:
                        merge_next_part()
                continue
            while pending_parts:  # keep the output in input order
                merge_next_part()
            batches = _batches(read_records(path, fmt), batch_size)
            if pool is None:
                for batch in batches:
                    converter.add(batch, *tokenizer.encode_batch([r.sequence for r in batch]))
                    per_input[path] += len(batch)
                    report(len(batch))
            else:  # cannot cut this input: read here, encode in the pool, bounded look-ahead
                pending: collections.deque = collections.deque()
                for batch in batches:
                    pending.append((batch, pool.submit(_encode_in_worker, [r.sequence for r in batch])))
                    while len(pending) >= 2 * workers or (pending and pending[0][1].done()):
                        done, result = pending.popleft()
                        converter.add(done, *result.result())
                        per_input[path] += len(done)
                        report(len(done))
                while pending:
                    done, result = pending.popleft()
                    converter.add(done, *result.result())
                    per_input[path] += len(done)
                    report(len(done))
        while pending_parts:
            merge_next_part()
        fractions = split_by_family or split_random
        if fractions is not None and holdout_sequences:
            fractions = tuple(fractions) + tuple(holdout_sequences)
        _check_outputs(inputs, per_input, names, converter.progress, fractions, bool(split_by_family))
        elapsed = time.perf_counter() - start
        p = converter.progress
        total_residues = sum(s.residues for s in p.stats)
        summary = {
            "inputs": list(inputs), "output_prefix": output_prefix, "seed": seed,
            "split": ("by-family" if split_by_family else "random" if split_random else None),
            "fractions": list(split_by_family or split_random or []) or None,
            "holdout_sequences": list(holdout_sequences) if holdout_sequences else None, "tokenizer": tokenizer_type,
            "dtype": np.dtype(dtype).name, "workers": workers, "records_read": p.records_read,
            "dropped": dict(sorted(p.dropped.items())), "seconds": round(elapsed, 3),
            "residues_per_second": round(total_residues / max(elapsed, 1e-9)),
            "outputs": {name: s.as_dict() for name, s in zip(names, p.stats)},
        }
        for builder in builders:
            builder.finalize()
    except BaseException:
        for builder in builders:
            builder.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    summary_path = f"{output_prefix}_summary.json"
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(summary_path) + ".", suffix=".tmp", dir=out_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(summary, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        make_world_readable(tmp)
        fs.replace_durably(tmp, summary_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"read {summary['records_read']:,} records in {summary['seconds']:.1f} s "
             f"({summary['residues_per_second']:,} residues/s)"]
    for reason, count in summary["dropped"].items():
        lines.append(f"  dropped {count:,}: {reason}")
    for name, s in summary["outputs"].items():
        lines.append(f"  {name}: {s['sequences']:,} sequences, {s['residues']:,} residues, "
                     f"{s['unknown_residues']:,} unknown, {s['families']:,} families")
        lines.append("    lengths: " + ", ".join(f"{k}: {v:,}" for k, v in s["length_histogram"].items() if v))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_protein.data.preprocess", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", help="input file(s); FASTA, Stockholm, LMDB dir or JSON")
    p.add_argument("--input-format", choices=FORMATS, default=None, help="default: from the name / first bytes")
    p.add_argument("--output-prefix", required=True)
    split = p.add_mutually_exclusive_group()
    split.add_argument("--split-by-family", default=None, metavar="TRAIN,VALID,TEST",
                       help="hold out whole families, e.g. 0.9,0.05,0.05 (fractions of families)")
    split.add_argument("--split-random", default=None, metavar="TRAIN,VALID,TEST",
                       help="split records at random, e.g. 0.98,0.01,0.01")
    p.add_argument("--holdout-sequences", default=None, metavar="VALID,TEST",
                   help="with --split-by-family: also hold out these fractions of the training families' sequences "
                        "as PREFIX_valid_infamily / PREFIX_test_infamily, e.g. 0.05,0.05")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes (uncompressed FASTA/Stockholm: each parses a part of the file)")
    p.add_argument("--tokenizer-type", choices=("iupac", "sentencepiece"), default="iupac")
    p.add_argument("--tokenizer-model", default=None, help="SentencePiece .model (for --tokenizer-type sentencepiece)")
    p.add_argument("--min-length", type=int, default=1, help="drop sequences with fewer residues")
    p.add_argument("--max-length", type=int, default=None, help="drop sequences with more residues")
    p.add_argument("--batch-size", type=int, default=2048, help="records per encoding batch")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--tensorboard-dir", default=None,
                   help="also log the summary (counts, residues/s, length histogram per split) to TensorBoard")
    return p


def log_summary_to_tensorboard(summary: dict, log_dir: str) -> None:
    """Counts and the length histogram of every output, as TensorBoard scalars, histograms and a text summary."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir) as writer:
        writer.add_scalar("preprocess/records_read", summary["records_read"], 0)
        writer.add_scalar("preprocess/residues_per_second", summary["residues_per_second"], 0)
        for reason, count in summary["dropped"].items():
            writer.add_scalar(f"preprocess/dropped/{reason}", count, 0)
        for name, out in summary["outputs"].items():
            tag = os.path.basename(name)
            for key in ("sequences", "residues", "unknown_residues", "families"):
                writer.add_scalar(f"preprocess/{tag}/{key}", out[key], 0)
            counts = np.array(list(out["length_histogram"].values()), dtype=np.float64)
            if counts.sum():
                edges = np.array(HISTOGRAM_EDGES[1:] + (HISTOGRAM_EDGES[-1] * 2,), dtype=np.float64)
                writer.add_histogram_raw(f"preprocess/{tag}/length", min=float(HISTOGRAM_EDGES[0]),
                                         max=float(edges[-1]), num=int(counts.sum()), sum=float(out["residues"]),
                                         sum_squares=0.0, bucket_limits=edges.tolist(),
                                         bucket_counts=counts.tolist(), global_step=0)
        writer.add_text("preprocess/summary", "```\n" + format_summary(summary) + "\n```", 0)


def main(argv: list[str] | None = None) -> int:
    args = errors.one_line_parse_errors(build_parser()).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    summary = preprocess(
        args.input, args.output_prefix, args.input_format,
        split_by_family=parse_fractions(args.split_by_family, "--split-by-family") if args.split_by_family else None,
        split_random=parse_fractions(args.split_random, "--split-random") if args.split_random else None,
        holdout_sequences=parse_holdout(args.holdout_sequences) if args.holdout_sequences else None,
        seed=args.seed, workers=args.workers, tokenizer_type=args.tokenizer_type,
        tokenizer_model=args.tokenizer_model, min_length=args.min_length, max_length=args.max_length,
        batch_size=args.batch_size, progress=not args.no_progress)
    print(format_summary(summary))
    print(f"summary written to {args.output_prefix}_summary.json")
    if args.tensorboard_dir:
        log_summary_to_tensorboard(summary, args.tensorboard_dir)
        print(f"TensorBoard summary written to {args.tensorboard_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_cli(main))
