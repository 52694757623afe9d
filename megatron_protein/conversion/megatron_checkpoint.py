"""Read a Megatron-LM BERT checkpoint as it lies on disk: find its shards, load them, merge TP and PP.

A Megatron save directory looks like::

    SAVE/latest_checkpointed_iteration.txt           "100" (or "release")
    SAVE/iter_0000100/mp_rank_00/model_optim_rng.pt   pp == 1: one directory per tensor-parallel rank
    SAVE/iter_0000100/mp_rank_01_001/model_optim_rng.pt   pp > 1: mp_rank_{tp:02d}_{pp:03d}

Each file holds ``args`` (an ``argparse.Namespace`` with Megatron's argument names), ``checkpoint_version``,
``iteration`` and ``model``: the state dict of one (tp, pp) partition. A checkpoint of the interleaved pipeline
schedule (``--num-layers-per-virtual-pipeline-stage``, ``args.virtual_pipeline_model_parallel_size`` = v) holds
``model0`` ... ``model{v-1}`` instead, chunk c of pipeline rank p being virtual stage ``c * pp + p``; the reader
turns them into ``pp * v`` stage partitions in virtual-stage order (``MegatronCheckpoint.partitions[(tp,
virtual stage)]``), which merge like the stages of a plain pipeline. :func:`load_checkpoint` accepts the save
directory, an ``iter_*`` directory, an ``mp_rank_*`` directory or one ``model_optim_rng.pt`` (whose sibling shards
are picked up when the file's args say the model was split), checks that every partition is present, and
returns the partitions with canonical key names. :func:`merge_partitions` then builds the full, unsplit state dict
(what a single-process model holds) by the tensor-parallel partition rules of Megatron-LM (Shoeybi et al. 2019,
arXiv:1909.08053, section 3) and by renumbering each pipeline stage's local layer indices globally. No separate
"merge the model-parallel partitions" step is needed before conversion.

Canonical names are those of current Megatron BERT checkpoints (``language_model.encoder.layers.N.
self_attention...``, what our pretraining writes); other ones (Megatron-LM 2.x and ProteinLM: ``transformer``,
``attention``, ``model_parallel_size``; recent Megatron-LM: ``input_norm``, ``final_norm``, ``lm_head.norm``; the
nested ``state_dict_for_save_checkpoint`` dictionaries of all of them and our older flat keys, see
:mod:`megatron_protein.models.megatron_layout`) are renamed on load, and the fused QKV rows of checkpoint versions 0 and 1
are reordered into the per-head ``[num_heads, 3, head_dim]`` layout of version >= 2 (the reordering Megatron's own
``fix_query_key_value_ordering`` applies).

Files are read without running code from them (:func:`megatron_protein.utils.safe_load.load_torch_file`: the
weights-only unpickler with the allow-list of what Megatron-LM and ProteinLM checkpoints hold; inert stand-ins for
``megatron.*``/``apex.*`` classes such as old fp16 loss scalers). ``trust=True`` (``--trust-checkpoint``) is the
escape hatch for a file the user vouches for. Merging refuses, unless told otherwise, tensors that should be equal
on every tensor-parallel rank but are not (beyond a tolerance), and any non-finite value: a bit-flipped or
half-trained shard is reported, not converted.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch

from megatron_protein.models.megatron_layout import (canonical_bert_state, canonical_key,  # noqa: F401
                                                     flatten_state_dict)
from megatron_protein.utils.errors import UserError
from megatron_protein.utils.safe_load import UnsafeFileError, load_torch_file

logger = logging.getLogger(__name__)

TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
SHARD_FILENAMES = ("model_optim_rng.pt", "model_rng.pt")
_SHARD_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
_ITER_DIR = re.compile(r"^iter_(\d+)$")

WORD_EMBEDDINGS = "language_model.embedding.word_embeddings.weight"
POSITION_EMBEDDINGS = "language_model.embedding.position_embeddings.weight"
TOKENTYPE_EMBEDDINGS = "language_model.embedding.tokentype_embeddings.weight"
HEAD_WORD_EMBEDDINGS = "word_embeddings_for_head.weight"
FINAL_LAYERNORM = "language_model.encoder.final_layernorm"
LM_HEAD_BIAS = "lm_head.bias"
_LAYER_KEY = re.compile(r"^language_model\.encoder\.layers\.(\d+)\.(.+)$")

# Tensor-parallel partition rules (Megatron-LM section 3, Figure 3). Everything else is replicated across tp.
_COLUMN_PARALLEL = re.compile(r"\.(self_attention\.query_key_value|mlp\.dense_h_to_4h)\.(weight|bias)$")
_ROW_PARALLEL = re.compile(r"\.(self_attention\.dense|mlp\.dense_4h_to_h)\.weight$")
_VOCAB_PARALLEL = frozenset({WORD_EMBEDDINGS, HEAD_WORD_EMBEDDINGS, LM_HEAD_BIAS})


class CheckpointError(UserError, ValueError):
    """The checkpoint is missing, incomplete, unreadable or inconsistent; the message names the file."""


def tensor_parallel_dim(key: str) -> Optional[int]:
    """The dimension along which ``key`` is split over tensor-parallel ranks, or None when it is replicated.

    Column-parallel projections (fused QKV, ``dense_h_to_4h``: weight and bias) are split along their output
    rows (dim 0); row-parallel ones (attention ``dense``, ``dense_4h_to_h``) along their input columns (dim 1,
    their biases are replicated); the word embedding, its head copy and the MLM output bias along the vocabulary.
    """
    if key in _VOCAB_PARALLEL or _COLUMN_PARALLEL.search(key):
        return 0
    if _ROW_PARALLEL.search(key):
        return 1
    return None


def layer_index(key: str) -> Optional[tuple[int, str]]:
    """``(i, rest)`` for ``language_model.encoder.layers.{i}.{rest}``; None for keys outside the layers."""
    match = _LAYER_KEY.match(key)
    return (int(match.group(1)), match.group(2)) if match else None


def shard_dirname(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    """Megatron's partition directory name: ``mp_rank_{tp:02d}`` when pp == 1, else ``mp_rank_{tp:02d}_{pp:03d}``."""
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


# ---------------------------------------------------------------------------------------------------------------
# Finding the shards
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class CheckpointLocation:
    """Where the partitions of one iteration are: ``shards[(tp_rank, pp_rank)] = path``.

    ``explicit_file`` is set when the user named one file; its siblings are used only if the file's own args say
    the model was split.
    """

    iteration_dir: Optional[str]
    shards: dict[tuple[int, int], str]
    explicit_file: Optional[str] = None


def _shard_file_in(directory: str) -> Optional[str]:
    for name in SHARD_FILENAMES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def _scan_iteration_dir(iteration_dir: str) -> dict[tuple[int, int], str]:
    shards: dict[tuple[int, int], str] = {}
    for entry in sorted(os.listdir(iteration_dir)):
        match = _SHARD_DIR.match(entry)
        if not match or not os.path.isdir(os.path.join(iteration_dir, entry)):
            continue
        tp_rank, pp_rank = int(match.group(1)), int(match.group(2) or 0)
        path = _shard_file_in(os.path.join(iteration_dir, entry))
        # A shard directory without its file is recorded with the expected path; loading reports it as missing.
        shards[(tp_rank, pp_rank)] = path or os.path.join(iteration_dir, entry, SHARD_FILENAMES[0])
    return shards


def read_tracker(save_dir: str) -> str:
    """The iteration directory named by ``SAVE/latest_checkpointed_iteration.txt`` (``iter_XXXXXXX`` or
    ``release``)."""
    tracker = os.path.join(save_dir, TRACKER_FILENAME)
    with open(tracker) as f:
        text = f.read().strip()
    if text == "release":
        return os.path.join(save_dir, "release")
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: line 1: expected an iteration number or 'release', got {text!r}")
    directory = os.path.join(save_dir, f"iter_{int(text):07d}")
    if not os.path.isdir(directory) and os.path.isdir(directory + ".old"):
        return directory + ".old"  # a re-save of this iteration is swapping directories (see training/checkpointing)
    return directory


def find_checkpoint(src: str) -> CheckpointLocation:
    """Locate the partitions of the checkpoint named by ``src`` (save dir, ``iter_*`` dir, ``mp_rank_*`` dir or
    one ``.pt`` file)."""
    src = os.path.abspath(src)
    if not os.path.exists(src):
        raise CheckpointError(f"{src}: no such file or directory (expected a Megatron save directory, an iter_* "
                              f"directory or a model_optim_rng.pt file)")
    if os.path.isfile(src):
        parent = os.path.dirname(src)
        if _SHARD_DIR.match(os.path.basename(parent)):
            iteration_dir = os.path.dirname(parent)
            return CheckpointLocation(iteration_dir, _scan_iteration_dir(iteration_dir), explicit_file=src)
        return CheckpointLocation(None, {(0, 0): src}, explicit_file=src)
    if _SHARD_DIR.match(os.path.basename(src)):
        if _shard_file_in(src) is None:
            raise CheckpointError(f"{src}: partition directory without {' or '.join(SHARD_FILENAMES)}")
        iteration_dir = os.path.dirname(src)
        return CheckpointLocation(iteration_dir, _scan_iteration_dir(iteration_dir),
                                  explicit_file=_shard_file_in(src))
    if os.path.isfile(os.path.join(src, TRACKER_FILENAME)):
        iteration_dir = read_tracker(src)
        if not os.path.isdir(iteration_dir):
            raise CheckpointError(f"{os.path.join(src, TRACKER_FILENAME)} names {os.path.basename(iteration_dir)}, "
                                  f"but {iteration_dir} does not exist")
        src = iteration_dir
    shards = _scan_iteration_dir(src)
    if shards:
        return CheckpointLocation(src, shards)
    iterations = sorted((int(m.group(1)), e) for e in os.listdir(src) if (m := _ITER_DIR.match(e)))
    if iterations:
        latest = os.path.join(src, iterations[-1][1])
        logger.warning("%s has no %s; using the newest iteration directory %s", src, TRACKER_FILENAME, latest)
        return CheckpointLocation(latest, _scan_iteration_dir(latest))
    lone = _shard_file_in(src)
    if lone:
        return CheckpointLocation(None, {(0, 0): lone}, explicit_file=lone)
    raise CheckpointError(f"{src}: not a Megatron checkpoint: expected {TRACKER_FILENAME}, iter_* directories, "
                          f"mp_rank_XX[_YYY] directories or a {SHARD_FILENAMES[0]} file")


# ---------------------------------------------------------------------------------------------------------------
# Loading one shard
# ---------------------------------------------------------------------------------------------------------------

def load_shard_file(path: str, trust: bool = False) -> dict[str, Any]:
    """Load one partition file on CPU without running code from it, with errors that name the file and the
    likely cause (``trust``: the full unpickler, see the module docstring).

    Zip-format files (torch >= 1.6) are memory-mapped, so tensors that are never touched (the optimizer state,
    usually twice the model's size) are not read from disk; legacy files are read whole.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing")
    size = os.path.getsize(path)
    try:
        state = load_torch_file(path, trust=trust, mmap=True)
    except UnsafeFileError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, Exception) as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({size} bytes; the file may be "
                              f"truncated or still being written): {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict with 'model' (a Megatron checkpoint), got "
                              f"{type(state).__name__}")
    return state


# ---------------------------------------------------------------------------------------------------------------
# Canonical key names
# ---------------------------------------------------------------------------------------------------------------

def canonical_model_state(model: dict, path: str) -> dict[str, torch.Tensor]:
    try:
        out = canonical_bert_state(model)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if any(k.startswith(("decoder.layers.", "embedding.word_embeddings.")) for k in out):
        raise CheckpointError(f"{path}: this is a Megatron-Core (mcore) model layout (decoder.layers.N...), which "
                              f"this converter does not read; save with the legacy BERT model (or convert with "
                              f"Megatron-LM's tools/checkpoint) first")
    if not any(k.startswith("language_model.") for k in out):
        raise CheckpointError(f"{path}: 'model' has no language_model.* tensors (keys start with "
                              f"{sorted({k.split('.')[0] for k in out})[:5]}); is this a Megatron BERT checkpoint?")
    return out


def fix_qkv_ordering(tensor: torch.Tensor, checkpoint_version: float, local_heads: int) -> torch.Tensor:
    """Reorder one partition's fused QKV rows into the per-head ``[heads, 3, head_dim]`` layout.

    Version 0 stored ``[3, heads, head_dim]`` (all q, then all k, then all v), version 1.0 ``[heads, head_dim,
    3]``; version >= 2 already uses ``[heads, 3, head_dim]``.
    """
    if checkpoint_version >= 2.0:
        return tensor
    rows, rest = tensor.shape[0], tuple(tensor.shape[1:])
    head_dim = rows // (3 * local_heads)
    if checkpoint_version == 0:
        reordered = tensor.reshape((3, local_heads, head_dim) + rest).transpose(0, 1)
    else:
        reordered = tensor.reshape((local_heads, head_dim, 3) + rest).transpose(1, 2)
    return reordered.contiguous().reshape((rows,) + rest)


# ---------------------------------------------------------------------------------------------------------------
# The whole checkpoint
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class MegatronCheckpoint:
    """Every (tp, pp) partition of one iteration, canonical names, QKV in the per-head layout."""

    source: str
    args: Optional[argparse.Namespace]
    iteration: Optional[int]
    checkpoint_version: float
    tp_size: int
    pp_size: int
    partitions: dict[tuple[int, int], dict[str, torch.Tensor]]
    paths: dict[tuple[int, int], str]
    #: Everything but 'model' of each partition (lr_scheduler, rng states, ...); 'optimizer' only if asked.
    extras: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    #: Model chunks per pipeline rank (interleaved schedule); partitions are then keyed (tp, c * pp + p).
    num_chunks: int = 1

    @property
    def num_stages(self) -> int:
        """Pipeline stages of the partitions (virtual stages under the interleaved schedule)."""
        return self.pp_size * self.num_chunks

    def arg(self, name: str, default: Any = None) -> Any:
        return getattr(self.args, name, default) if self.args is not None else default


def _parallel_sizes(state: dict, path: str) -> tuple[int, int]:
    args = state.get("args")
    if args is None:
        return 1, 1
    tp = getattr(args, "tensor_model_parallel_size", None)
    if tp is None:
        tp = getattr(args, "model_parallel_size", 1)  # checkpoint_version < 3
    pp = getattr(args, "pipeline_model_parallel_size", 1)
    return int(tp or 1), int(pp or 1)


def _model_chunks(state: dict, path: str) -> int:
    """How many model chunks (``model0``, ``model1``, ...) a partition file holds: 1 for a plain ``model``."""
    args = state.get("args")
    declared = getattr(args, "virtual_pipeline_model_parallel_size", None) if args is not None else None
    found = sorted(int(k[5:]) for k in state if k.startswith("model") and k[5:].isdigit())
    if not found:
        if declared not in (None, 1):
            raise CheckpointError(f"{path}: its args say virtual_pipeline_model_parallel_size={declared} but it "
                                  f"holds no model0, model1, ... entries")
        return 1
    if "model" in state:
        raise CheckpointError(f"{path}: holds both 'model' and model chunks {['model%d' % c for c in found]}")
    if found != list(range(len(found))) or (declared is not None and int(declared) != len(found)):
        raise CheckpointError(f"{path}: model chunks {['model%d' % c for c in found]} do not match "
                              f"virtual_pipeline_model_parallel_size={declared} (expected model0 .. "
                              f"model{(declared or len(found)) - 1})")
    return len(found)


def load_checkpoint(src: str, keep_optimizer: bool = False, trust: bool = False) -> MegatronCheckpoint:
    """Find and load every partition of the checkpoint at ``src`` (``trust``: see :func:`load_shard_file`).

    Raises :class:`CheckpointError` naming the missing ``mp_rank_*`` partitions when the args ask for more than
    are on disk, naming unexpected partitions when there are more, and naming the file that cannot be read.
    """
    location = find_checkpoint(src)
    if location.explicit_file is not None and location.iteration_dir is not None:
        first_key = next(k for k, v in location.shards.items()
                         if os.path.isfile(v) and os.path.samefile(v, location.explicit_file))
    else:
        present = [k for k, v in location.shards.items() if os.path.isfile(v)]
        if not present:
            raise CheckpointError(f"{location.iteration_dir}: no partition holds a {SHARD_FILENAMES[0]} file")
        first_key = min(present)
    first_path = location.shards[first_key]
    first = load_shard_file(first_path, trust=trust)
    tp_size, pp_size = _parallel_sizes(first, first_path)

    if location.iteration_dir is None and tp_size * pp_size > 1:
        raise CheckpointError(
            f"{first_path}: its args say tensor_model_parallel_size={tp_size}, pipeline_model_parallel_size="
            f"{pp_size}, but the file is not inside an mp_rank_* directory, so its sibling partitions cannot be "
            f"found; pass the iteration directory instead")
    expected = {(t, p) for t in range(tp_size) for p in range(pp_size)}
    iteration_dir = location.iteration_dir or os.path.dirname(first_path)
    if location.iteration_dir is not None:
        # Partitions must be exactly those named by the args (pp == 1 -> mp_rank_XX, pp > 1 -> mp_rank_XX_YYY).
        names_on_disk = {os.path.basename(os.path.dirname(p)) for p in location.shards.values()}
        expected_names = {shard_dirname(t, p, pp_size) for t, p in expected}
        missing = sorted(n for n in expected_names
                         if n not in names_on_disk or not os.path.isfile(
                             location.shards.get(_name_to_ranks(n), "")))
        if missing:
            raise CheckpointError(
                f"{iteration_dir}: missing partition(s) {', '.join(missing)}: the checkpoint's args say "
                f"tensor_model_parallel_size={tp_size} x pipeline_model_parallel_size={pp_size}, so "
                f"{len(expected_names)} partition directories each with {SHARD_FILENAMES[0]} are needed")
        extra = sorted(names_on_disk - expected_names)
        if extra:
            raise CheckpointError(
                f"{iteration_dir}: unexpected partition(s) {', '.join(extra)} for tensor_model_parallel_size="
                f"{tp_size} x pipeline_model_parallel_size={pp_size} (read from {first_path}); the directory mixes "
                f"two layouts")
    files = {key: location.shards[key] for key in sorted(expected)}
    num_chunks = _model_chunks(first, first_path)
    # One partition per (tp rank, virtual stage); without chunks the virtual stage is the pipeline rank.
    paths = {(t, c * pp_size + p): path for (t, p), path in files.items() for c in range(num_chunks)}
    version = float(first.get("checkpoint_version", 0))
    args = first.get("args")
    iteration = first.get("iteration", first.get("total_iters"))

    partitions: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    extras: dict[tuple[int, int], dict[str, Any]] = {}
    started, done_bytes = time.monotonic(), 0
    total_bytes = sum(os.path.getsize(p) for p in files.values())
    for number, ((t, p), path) in enumerate(files.items(), start=1):
        state = first if (t, p) == first_key else load_shard_file(path, trust=trust)
        if (t, p) != first_key and _parallel_sizes(state, path) != (tp_size, pp_size):
            raise CheckpointError(f"{path}: its args say tp x pp = {_parallel_sizes(state, path)}, but "
                                  f"{first_path} says {(tp_size, pp_size)}")
        if num_chunks == 1 and "model" not in state:
            raise CheckpointError(f"{path}: no 'model' entry (keys: {sorted(state)[:8]})")
        if _model_chunks(state, path) != num_chunks:
            raise CheckpointError(f"{path}: holds {_model_chunks(state, path)} model chunk(s), {first_path} "
                                  f"{num_chunks}")
        names = ["model"] if num_chunks == 1 else [f"model{c}" for c in range(num_chunks)]
        for c, name in enumerate(names):
            model = canonical_model_state(state.pop(name), f"{path} ({name})" if num_chunks > 1 else path)
            if version < 2.0:
                heads = getattr(args, "num_attention_heads", None)
                if heads is None:
                    raise CheckpointError(f"{path}: checkpoint_version {version} needs num_attention_heads from "
                                          f"the args to reorder the fused QKV rows, and the args are missing")
                for key in list(model):
                    if key.endswith("query_key_value.weight") or key.endswith("query_key_value.bias"):
                        model[key] = fix_qkv_ordering(model[key], version, heads // tp_size)
            partitions[(t, c * pp_size + p)] = model
        if not keep_optimizer:
            state.pop("optimizer", None)
        for c in range(num_chunks):
            extras[(t, c * pp_size + p)] = state
        del state
        done_bytes += os.path.getsize(path)
        elapsed = time.monotonic() - started
        rate = done_bytes / max(elapsed, 1e-9)
        logger.info("partition %d/%d %s: %d model chunk(s), %.1f MB/s, ETA %.0f s", number, len(files),
                    os.path.basename(os.path.dirname(path)), num_chunks, rate / 1e6,
                    (total_bytes - done_bytes) / max(rate, 1e-9))
    logger.info("loaded %d partition file(s) (tp=%d, pp=%d%s, iteration %s, checkpoint_version %s) from %s",
                len(files), tp_size, pp_size, f", {num_chunks} model chunks each" if num_chunks > 1 else "",
                iteration, version, iteration_dir)
    return MegatronCheckpoint(source=iteration_dir, args=args, iteration=iteration, checkpoint_version=version,
                              tp_size=tp_size, pp_size=pp_size, partitions=partitions, paths=paths, extras=extras,
                              num_chunks=num_chunks)


def _name_to_ranks(name: str) -> tuple[int, int]:
    match = _SHARD_DIR.match(name)
    return int(match.group(1)), int(match.group(2) or 0)


# ---------------------------------------------------------------------------------------------------------------
# Merging partitions
# ---------------------------------------------------------------------------------------------------------------

def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b|; NaN when either holds NaN where the other does not (a NaN never compares as small)."""
    if not a.numel():
        return 0.0
    if a.is_floating_point() or b.is_floating_point():
        a64, b64 = a.double(), b.double()
        same = (a64 == b64) | (torch.isnan(a64) & torch.isnan(b64))
        if bool(same.all()):
            return 0.0
        diff = (a64 - b64).abs()[~same]
        return float("nan") if bool(torch.isnan(diff).any()) else float(diff.max())
    return float((a.long() - b.long()).abs().max())


def _merge_tensor_parallel(key: str, shards: list[torch.Tensor], where: str, replicated_tolerance: float,
                           allow_replicated_mismatch: bool = False, paths: Optional[list[str]] = None
                           ) -> torch.Tensor:
    dim = tensor_parallel_dim(key)
    if dim is not None:
        return torch.cat(shards, dim=dim)
    reference = shards[0]
    for rank, other in enumerate(shards[1:], start=1):
        if other.shape != reference.shape:
            raise CheckpointError(f"{where}: {key} is replicated across tensor-parallel ranks but has shape "
                                  f"{tuple(other.shape)} on tp rank {rank} and {tuple(reference.shape)} on rank 0")
        diff = _max_difference(other, reference)
        if not diff <= replicated_tolerance:  # also true for NaN
            other_path = paths[rank] if paths else f"tp rank {rank}"
            if not allow_replicated_mismatch:
                raise CheckpointError(
                    f"{other_path}: {key} must equal tp rank 0's copy in {where} (it is replicated across "
                    f"tensor-parallel ranks) but differs by up to {diff:.3g} (tolerance {replicated_tolerance:g}); "
                    f"one of the files is corrupt or from another run. Pass --allow-replicated-mismatch to take "
                    f"tp rank 0's copy anyway")
            logger.warning("%s: replicated tensor %s differs across tp ranks by up to %.3g; using tp rank 0's "
                           "(--allow-replicated-mismatch)", where, key, diff)
    return reference


def _check_finite(key: str, tensor: torch.Tensor, where: str, what: str) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"{where}: {what} {key} holds {bad} non-finite value(s) (NaN or inf); a checkpoint "
                              f"with non-finite weights cannot be converted")


def merge_partitions(checkpoint: MegatronCheckpoint, replicated_tolerance: float = 1e-6,
                     provenance: Optional[dict[str, str]] = None,
                     allow_replicated_mismatch: bool = False) -> dict[str, torch.Tensor]:
    """The full (tp = pp = 1) model state dict of ``checkpoint``: canonical names, global layer indices.

    TP: split tensors are concatenated along their partition dim in tp-rank order (:func:`tensor_parallel_dim`);
    replicated ones are taken from tp rank 0 after checking that the others agree. PP: stage ``s``'s local layer
    ``i`` becomes global layer ``i + (layers on stages < s)``; the last stage's ``word_embeddings_for_head`` copy
    of the tied word embedding is dropped after checking it equals the first stage's (it is what a single-process
    model ties to). Every tensor must be finite, and copies that must agree (replicated across tp, the tied
    embedding) must agree within ``replicated_tolerance``, unless ``allow_replicated_mismatch`` (then the first
    copy is taken with a warning); :class:`CheckpointError` names the file and the tensor otherwise.
    """
    full = merge_partition_dicts(checkpoint.partitions, checkpoint.tp_size, checkpoint.num_stages, checkpoint.paths,
                                 replicated_tolerance, provenance=provenance,
                                 allow_replicated_mismatch=allow_replicated_mismatch)
    expected_layers = checkpoint.arg("num_layers")
    found_layers = len(iter_layer_keys(full))
    if expected_layers is not None and found_layers != expected_layers:
        raise CheckpointError(f"{checkpoint.source}: the partitions hold {found_layers} layers but the args say "
                              f"num_layers={expected_layers}")
    return full


def merge_partition_dicts(partitions: dict[tuple[int, int], dict[str, torch.Tensor]], tp_size: int, pp_size: int,
                          paths: dict[tuple[int, int], str], replicated_tolerance: float = 1e-6,
                          what: str = "tensor", provenance: Optional[dict[str, str]] = None,
                          allow_replicated_mismatch: bool = False) -> dict[str, torch.Tensor]:
    """:func:`merge_partitions` on any per-partition dicts keyed like the model (the model itself, or one field of
    the optimizer state such as Adam's ``exp_avg``); the result is in :func:`canonical_order`. ``provenance``,
    if given, receives for each merged key where it came from (stage, local name, how the tp shards were joined)."""
    full: dict[str, torch.Tensor] = {}
    layer_offset = 0
    head_embedding = None
    for pp_rank in range(pp_size):
        shards = [partitions[(t, pp_rank)] for t in range(tp_size)]
        keys = list(shards[0])
        for t, shard in enumerate(shards[1:], start=1):
            if set(shard) != set(keys):
                diff = sorted(set(shard) ^ set(keys))
                raise CheckpointError(f"{paths[(t, pp_rank)]}: its {what} keys differ from "
                                      f"{paths[(0, pp_rank)]}'s: {diff[:6]}")
        local_layers = {layer_index(k)[0] for k in keys if layer_index(k)}
        if local_layers and local_layers != set(range(len(local_layers))):
            raise CheckpointError(f"{paths[(0, pp_rank)]}: local layer indices {sorted(local_layers)} "
                                  f"are not 0..{len(local_layers) - 1}")
        where = paths[(0, pp_rank)]
        stage_paths = [paths[(t, pp_rank)] for t in range(tp_size)]
        for key in keys:
            for t, shard in enumerate(shards):
                _check_finite(key, shard[key], stage_paths[t], what)
            merged = _merge_tensor_parallel(key, [s[key] for s in shards], where, replicated_tolerance,
                                            allow_replicated_mismatch, stage_paths)
            located = layer_index(key)
            local_key = key
            if located is not None:
                key = f"language_model.encoder.layers.{located[0] + layer_offset}.{located[1]}"
            elif key == HEAD_WORD_EMBEDDINGS:
                head_embedding = merged
                continue
            if key in full:
                raise CheckpointError(f"{where}: {key} also appears on an earlier pipeline stage")
            full[key] = merged
            if provenance is not None:
                dim = tensor_parallel_dim(local_key)
                parts = [f"pp stage {pp_rank}"] if pp_size > 1 else []
                if local_key != key:
                    parts.append(f"local layer {located[0]}")
                if tp_size > 1:
                    parts.append(f"{tp_size} tp shards cat dim {dim}" if dim is not None else "replicated over tp")
                provenance[key] = ", ".join(parts)
        layer_offset += len(local_layers)
    if head_embedding is not None:
        if WORD_EMBEDDINGS not in full:
            full[WORD_EMBEDDINGS] = head_embedding
        else:
            first = full[WORD_EMBEDDINGS]
            if first.shape != head_embedding.shape:
                raise CheckpointError(f"{paths[(0, pp_size - 1)]}: word_embeddings_for_head has shape "
                                      f"{tuple(head_embedding.shape)} but the word embedding {tuple(first.shape)}")
            diff = _max_difference(first, head_embedding)
            if not diff <= replicated_tolerance:
                if not allow_replicated_mismatch:
                    raise CheckpointError(
                        f"{paths[(0, pp_size - 1)]}: {HEAD_WORD_EMBEDDINGS} ({what}) must equal the first stage's "
                        f"word embedding in {paths[(0, 0)]} (they are tied) but differs by up to {diff:.3g} "
                        f"(tolerance {replicated_tolerance:g}); pass --allow-replicated-mismatch to take the first "
                        f"stage's anyway")
                logger.warning("the last stage's copy of the tied word embedding (%s) differs from the first "
                               "stage's by up to %.3g; using the first stage's (--allow-replicated-mismatch)",
                               what, diff)
    return {key: full[key] for key in canonical_order(full)}


def canonical_order(keys: Iterable[str]) -> list[str]:
    """Keys in the order a Megatron BERT registers its parameters: embedding, layers by global index (each layer's
    keys in their stored order), final LayerNorm, then everything else (MLM head, pooler, binary head) and the
    tied head embedding copy last. Optimizer states are indexed by this order, so it is fixed here."""
    keys = list(keys)
    position = {k: i for i, k in enumerate(keys)}

    def rank(key: str):
        located = layer_index(key)
        if key.startswith("language_model.embedding."):
            return (0, 0, position[key])
        if located is not None:
            return (1, located[0], position[key])
        if key.startswith(FINAL_LAYERNORM):
            return (2, 0, position[key])
        if key.startswith("language_model."):
            return (3, 0, position[key])
        if key == HEAD_WORD_EMBEDDINGS:
            return (5, 0, position[key])
        return (4, 0, position[key])

    return sorted(keys, key=rank)


# ---------------------------------------------------------------------------------------------------------------
# Shape of the model
# ---------------------------------------------------------------------------------------------------------------

@dataclass
class BertShape:
    """The sizes of the BERT in a checkpoint, read from its tensors and cross-checked with its args."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    padded_vocab_size: int
    max_position_embeddings: int
    layernorm_epsilon: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def infer_shape(full: dict[str, torch.Tensor], args: Optional[argparse.Namespace], source: str,
                hidden: Optional[int] = None, heads: Optional[int] = None, layers: Optional[int] = None
                ) -> BertShape:
    """Sizes of the merged model; ``hidden``/``heads``/``layers`` given by the user must agree with the
    checkpoint (its args and its tensors), and are only needed when the checkpoint carries no args."""
    if WORD_EMBEDDINGS not in full or POSITION_EMBEDDINGS not in full:
        raise CheckpointError(f"{source}: the merged model has no {WORD_EMBEDDINGS if WORD_EMBEDDINGS not in full else POSITION_EMBEDDINGS}")
    padded_vocab, tensor_hidden = full[WORD_EMBEDDINGS].shape
    tensor_layers = len({layer_index(k)[0] for k in full if layer_index(k)})
    ffn_key = "language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"
    if ffn_key not in full:
        raise CheckpointError(f"{source}: no {ffn_key}: the checkpoint has no transformer layers")
    found = {"hidden_size": tensor_hidden, "num_layers": tensor_layers}
    from_args = {name: getattr(args, name, None) for name in ("hidden_size", "num_layers", "num_attention_heads")}
    for name, value in found.items():
        if from_args[name] is not None and from_args[name] != value:
            raise CheckpointError(f"{source}: the checkpoint's args say {name}={from_args[name]} but its tensors "
                                  f"have {value}")
    requested = {"hidden_size": (hidden, "--hidden"), "num_attention_heads": (heads, "--heads"),
                 "num_layers": (layers, "--layers")}
    resolved = {"hidden_size": tensor_hidden, "num_layers": tensor_layers,
                "num_attention_heads": from_args["num_attention_heads"]}
    for name, (value, flag) in requested.items():
        if value is None:
            continue
        if resolved[name] is not None and resolved[name] != value:
            raise CheckpointError(f"{flag} {value} contradicts the checkpoint {source}, which has {name}="
                                  f"{resolved[name]}; leave {flag} out to take it from the checkpoint")
        resolved[name] = value
    if resolved["num_attention_heads"] is None:
        raise CheckpointError(f"{source}: the checkpoint carries no args, so the number of attention heads is "
                              f"unknown; pass --heads")
    if resolved["hidden_size"] % resolved["num_attention_heads"]:
        raise CheckpointError(f"hidden size {resolved['hidden_size']} is not divisible by "
                              f"{resolved['num_attention_heads']} attention heads")
    eps = getattr(args, "layernorm_epsilon", None)
    return BertShape(num_layers=resolved["num_layers"], hidden_size=resolved["hidden_size"],
                     num_attention_heads=resolved["num_attention_heads"],
                     ffn_hidden_size=full[ffn_key].shape[0], padded_vocab_size=padded_vocab,
                     max_position_embeddings=full[POSITION_EMBEDDINGS].shape[0],
                     layernorm_epsilon=float(eps) if eps is not None else 1e-5)


def split_qkv(weight_or_bias: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """De-interleave a merged fused-QKV weight ``[heads * 3 * d, h]`` (or bias ``[heads * 3 * d]``) laid out per
    head as ``[heads, 3, d]`` into q, k, v, each ``[heads * d, h]`` with head-major rows (head 0's d rows first),
    the layout of separate query/key/value projections."""
    rows, rest = weight_or_bias.shape[0], tuple(weight_or_bias.shape[1:])
    head_dim = rows // (3 * num_heads)
    if head_dim * 3 * num_heads != rows:
        raise CheckpointError(f"fused QKV has {rows} rows, not a multiple of 3 x {num_heads} heads")
    per_head = weight_or_bias.reshape((num_heads, 3, head_dim) + rest)
    return tuple(per_head[:, i].reshape((num_heads * head_dim,) + rest).contiguous() for i in range(3))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of :func:`split_qkv`."""
    rest = tuple(q.shape[1:])
    head_dim = q.shape[0] // num_heads
    stacked = torch.stack([t.reshape((num_heads, head_dim) + rest) for t in (q, k, v)], dim=1)
    return stacked.reshape((3 * num_heads * head_dim,) + rest).contiguous()


def iter_layer_keys(full: Iterable[str]) -> list[int]:
    return sorted({layer_index(k)[0] for k in full if layer_index(k)})
