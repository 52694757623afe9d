"""Checkpoints in Megatron-LM's layout, written atomically and durably, never with non-finite weights, resumed
exactly.

Layout (what Megatron-LM and ProteinLM write, so the converter reads theirs and ours alike)::

    SAVE/latest_checkpointed_iteration.txt          "100"
    SAVE/iter_0000100/mp_rank_00/model_optim_rng.pt          pp == 1, one file per tp rank
    SAVE/iter_0000100/mp_rank_01_001/model_optim_rng.pt      pp > 1: mp_rank_{tp:02d}_{pp:03d}

Each file is a dict: ``args`` (argparse.Namespace with Megatron's names, including ``consumed_train_samples``),
``checkpoint_version`` (3.0), ``iteration``, ``model`` (this rank's flat state dict in Megatron key names),
``optimizer`` (the AdamW state and, for fp16, the loss scaler), ``lr_scheduler`` and ``rng_state`` (Python,
NumPy, torch, CUDA and the model-parallel tracker's streams). Only data-parallel rank 0 writes: dp replicas hold
the same model, optimizer and RNG state.

Atomicity: every rank writes into ``SAVE/iter_0000100.tmp/``; after a barrier rank 0 renames that directory to
``iter_0000100`` (one ``os.replace``) and only then replaces ``latest_checkpointed_iteration.txt`` (written to a
temporary name, fsynced, ``os.replace``d). Every rename is followed by an fsync of the directory that holds it, so
the order survives a power cut too. A process killed at any moment leaves either the old tracker file pointing at
the last complete checkpoint or the new one pointing at a complete directory; a leftover ``.tmp`` directory is
ignored and cleaned up by the next save. Saving an iteration that already exists swaps the new directory for the
old one in one ``renameat2(RENAME_EXCHANGE)`` (Linux), so the tracker never names a missing directory; where the
system cannot (NFS, other kernels) the old directory is first renamed to ``iter_0000100.old`` and readers take that
one while ``iter_0000100`` is missing (:func:`resolve_iteration_dir`).

Before anything is written, every rank checks that its weights and optimizer moments are finite, and all ranks
agree: a checkpoint with NaN or inf is refused (:class:`CheckpointError`), whatever the caller.

Loading: the tracker is read on rank 0 and its iteration broadcast (:func:`read_tracker_on_rank0`), so every rank
loads the same iteration even on a file system that shows ranks different versions of the file; each file is
unpickled by the weights-only loader of :mod:`megatron_protein.utils.safe_load`; and all ranks fail together if
any rank's file is missing, unreadable or refused.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_protein.parallel import scg
from megatron_protein.parallel import tensor_parallel as tp_layers
from megatron_protein.utils import fs
from megatron_protein.utils.agree import from_rank0, on_all_ranks
from megatron_protein.utils.errors import UserError
from megatron_protein.utils.safe_load import UnsafeFileError, load_torch_file

CHECKPOINT_VERSION = 3.0
TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
MODEL_FILENAME = "model_optim_rng.pt"

#: Arguments that fix the shape of every saved tensor; a resume with different values cannot load the files.
SHAPE_ARGS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers", "hidden_size",
              "num_attention_heads", "ffn_hidden_size", "max_position_embeddings", "padded_vocab_size")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable or does not match the current arguments."""


def iteration_dir(save: str, iteration: int | str) -> str:
    name = "release" if iteration == "release" else f"iter_{int(iteration):07d}"
    return os.path.join(save, name)


def rank_dirname(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    """Megatron's per-rank directory name: mp_rank_{tp:02d} when pp == 1, mp_rank_{tp:02d}_{pp:03d} otherwise."""
    if pp_size == 1:
        return f"mp_rank_{tp_rank:02d}"
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def resolve_iteration_dir(save: str, iteration: int | str) -> str:
    """The directory of ``iteration``, or its ``.old`` copy while a re-save of the same iteration (on a system
    without an atomic directory swap) has moved the old one aside and not yet put the new one in place."""
    final = iteration_dir(save, iteration)
    if not os.path.isdir(final) and os.path.isdir(final + ".old"):
        return final + ".old"
    return final


def checkpoint_file(save: str, iteration: int | str, tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return os.path.join(resolve_iteration_dir(save, iteration), rank_dirname(tp_rank, pp_rank, pp_size),
                        MODEL_FILENAME)


def read_tracker(load: str) -> Optional[int | str]:
    """The iteration named by ``latest_checkpointed_iteration.txt``, 'release', or None when there is none."""
    path = os.path.join(load, TRACKER_FILENAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    if text == "release":
        return "release"
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{path}: expected an iteration number or 'release', found {text!r}") from None


def read_tracker_on_rank0(load: str, groups: Optional[scg.ParallelGroups] = None) -> Optional[int | str]:
    """:func:`read_tracker` on global rank 0, its result (or its error) on every rank. Collective."""
    groups = groups if groups is not None else scg.current()
    return from_rank0(lambda: read_tracker(load), groups, CheckpointError, what=f"reading {TRACKER_FILENAME}")


def rng_state() -> dict:
    state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(),
             "rng_tracker_states": tp_layers.get_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if "cuda_rng_state" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tp_layers.get_rng_tracker().set_states(state["rng_tracker_states"])


def _barrier(groups: scg.ParallelGroups) -> None:
    if groups.world_size > 1 and dist.is_initialized():
        dist.barrier()


def _write_text_atomically(path: str, text: str) -> None:
    fs.write_text_durably(path, text)


def nonfinite_entries(model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                      limit: int = 4) -> list[str]:
    """Names of (up to ``limit``) floating-point weights or optimizer moments of this rank holding NaN or inf."""
    found = []
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            found.append(name)
            if len(found) >= limit:
                return found
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for param, state in optimizer.state.items():
            for key, value in state.items():
                if (isinstance(value, torch.Tensor) and value.is_floating_point()
                        and not bool(torch.isfinite(value).all())):
                    found.append(f"optimizer {key} of {names.get(id(param), '?')}")
                    if len(found) >= limit:
                        return found
    return found


def save_checkpoint(save: str, iteration: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler, args: argparse.Namespace, loss_scaler=None,
                    groups: Optional[scg.ParallelGroups] = None, save_optim: bool = True,
                    save_rng: bool = True) -> str:
    """Write this rank's part of the checkpoint of ``iteration`` into ``save``; return the iteration directory.

    Collective over the world: every rank must call it (only the first replica of each tp/pp shard writes files:
    dp rank 0, and rank 0 of any other axis that replicates the weights, such as the folding model's dap and bp).
    Raises :class:`CheckpointError` on every rank, having written nothing, when any rank's weights or optimizer
    moments are not finite.
    """
    groups = groups if groups is not None else scg.current()
    final_dir = iteration_dir(save, iteration)
    tmp_dir = final_dir + ".tmp"

    def check_finite() -> None:
        bad = nonfinite_entries(model, optimizer if save_optim else None)
        if bad:
            raise CheckpointError(
                f"{final_dir}: refusing to save a checkpoint with non-finite values (rank {groups.rank}: "
                f"{', '.join(bad)}); the last complete checkpoint in {save} is unchanged")

    on_all_ranks(check_finite, groups, CheckpointError, what="the finiteness check of a save")
    if groups.rank == 0:
        os.makedirs(save, exist_ok=True)
        if os.path.exists(tmp_dir):  # left by a save that was interrupted
            shutil.rmtree(tmp_dir)
        os.makedirs(tmp_dir)
    _barrier(groups)

    if all(groups.rank_in(axis) == 0 for axis in groups.axes if axis not in ("tp", "pp")):
        state: dict[str, Any] = {
            "args": args,
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": iteration,
            # Cloned so that each tensor is saved alone, not as a view of the data-parallel flat buffer.
            "model": {key: value.detach().clone() for key, value in model.state_dict().items()},
        }
        if save_optim:
            state["optimizer"] = {"optimizer": optimizer.state_dict(),
                                  "grad_scaler": loss_scaler.state_dict() if loss_scaler is not None else None}
            state["lr_scheduler"] = scheduler.state_dict()
        if save_rng:
            # Megatron keeps a list with one entry per dp rank; dp replicas draw the same streams here.
            state["rng_state"] = [rng_state()]
        rank_dir = os.path.join(tmp_dir, rank_dirname(groups.rank_in("tp"), groups.rank_in("pp"),
                                                      groups.size("pp")))
        os.makedirs(rank_dir, exist_ok=True)
        path = os.path.join(rank_dir, MODEL_FILENAME)
        torch.save(state, path + ".partial")
        fs.fsync_file(path + ".partial")
        fs.replace_durably(path + ".partial", path)
    _barrier(groups)

    if groups.rank == 0:
        fs.fsync_dir(tmp_dir)  # the rank directories made by every writer
        stale = final_dir + ".old"
        if os.path.exists(stale) and os.path.isdir(final_dir):
            shutil.rmtree(stale)  # left by a re-save that was interrupted after the new directory was in place
        if os.path.isdir(final_dir):  # saving the same iteration again
            if fs.exchange(tmp_dir, final_dir):  # one atomic swap: the name always holds a complete checkpoint
                shutil.rmtree(tmp_dir)
            else:  # readers take iter_N.old while iter_N is missing (resolve_iteration_dir)
                fs.replace_durably(final_dir, stale)
                fs.replace_durably(tmp_dir, final_dir)
                shutil.rmtree(stale)
        else:
            fs.replace_durably(tmp_dir, final_dir)
        fs.write_text_durably(os.path.join(save, TRACKER_FILENAME), str(iteration))
    _barrier(groups)
    return final_dir


def check_args_match(saved: argparse.Namespace, current: argparse.Namespace, path: str) -> None:
    """Raise :class:`CheckpointError` listing every shape argument that differs between checkpoint and run."""
    diffs = []
    for name in SHAPE_ARGS:
        old, new = getattr(saved, name, None), getattr(current, name, None)
        if old is not None and new is not None and old != new:
            diffs.append(f"{name}: checkpoint {old}, arguments {new}")
    if diffs:
        raise CheckpointError(f"{path} was saved with a different layout or model size than requested:\n  "
                              + "\n  ".join(diffs)
                              + "\nUse the checkpoint's values, or convert the checkpoint to the new TP/PP degrees.")


def load_state(load: str, groups: scg.ParallelGroups, iteration: Optional[int | str] = None,
               trust_checkpoint: bool = False) -> tuple[dict, str]:
    """Read this rank's checkpoint file (latest iteration unless given) and return (state, path).

    The file is unpickled by PyTorch's weights-only unpickler with the allow-list of
    :mod:`megatron_protein.utils.safe_load` (the ``args`` Namespace, RNG states, NumPy arrays): a file that asks
    for anything else is refused with :class:`~megatron_protein.utils.safe_load.UnsafeFileError` naming the
    global. ``trust_checkpoint`` (``--trust-checkpoint``) loads with the full unpickler instead, for old files the
    user vouches for."""
    if iteration is None:
        iteration = read_tracker(load)
        if iteration is None:
            raise CheckpointError(f"{load}: no {TRACKER_FILENAME}; nothing to resume from (was a checkpoint "
                                  f"ever completed in this directory?)")
    path = checkpoint_file(load, iteration, groups.rank_in("tp"), groups.rank_in("pp"), groups.size("pp"))
    if not os.path.isfile(path):
        it_dir = resolve_iteration_dir(load, iteration)
        present = sorted(os.listdir(it_dir)) if os.path.isdir(it_dir) else []
        raise CheckpointError(
            f"{path} does not exist; {it_dir} holds {present or 'nothing'}. This run has tensor-model-parallel "
            f"size {groups.size('tp')} and pipeline-model-parallel size {groups.size('pp')}: the checkpoint was "
            f"probably saved with other degrees.")
    try:
        state = load_torch_file(path, trust=trust_checkpoint)
    except UnsafeFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported with the path
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from exc
    return state, path


def load_checkpoint(load: str, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], scheduler,
                    args: argparse.Namespace, loss_scaler=None, groups: Optional[scg.ParallelGroups] = None,
                    load_optim: bool = True, load_rng: bool = True, finetune: bool = False,
                    iteration: Optional[int | str] = None, trust_checkpoint: bool = False) -> dict:
    """Restore model (and, unless told otherwise, optimizer, scheduler, loss scale, RNG) from ``load``.

    Collective over the world: every rank must call it. ``iteration`` defaults to the tracker's, read on rank 0
    (:func:`read_tracker_on_rank0`). If any rank cannot read, is refused or does not match its file, every rank
    raises :class:`CheckpointError` with the first failing rank's message. ``trust_checkpoint`` loads with the
    full unpickler (see :func:`load_state`).

    Returns ``{'iteration', 'consumed_train_samples', 'consumed_valid_samples', 'args'}`` (zeros with
    ``finetune``, which loads only the weights and starts a new run, as Megatron's --finetune; ``args`` is the
    checkpoint's Namespace, or None).
    """
    groups = groups if groups is not None else scg.current()
    if iteration is None:
        iteration = read_tracker_on_rank0(load, groups)
        if iteration is None:
            raise CheckpointError(f"{load}: no {TRACKER_FILENAME}; nothing to resume from (was a checkpoint "
                                  f"ever completed in this directory?)")

    def read_and_load_weights():
        state, path = load_state(load, groups, iteration, trust_checkpoint=trust_checkpoint)
        saved_args = state.get("args")
        if saved_args is not None:
            check_args_match(saved_args, args, path)
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{path}: model keys do not match this model; missing {list(missing)}, "
                                  f"unexpected {list(unexpected)}")
        return state, path

    state, path = on_all_ranks(read_and_load_weights, groups, CheckpointError, what="loading the checkpoint")
    saved_args = state.get("args")
    if finetune:
        return {"iteration": 0, "consumed_train_samples": 0, "consumed_valid_samples": 0, "args": saved_args}
    if load_optim and optimizer is not None:
        if "optimizer" not in state:
            raise CheckpointError(f"{path} holds no optimizer state (saved with --no-save-optim); "
                                  f"pass --no-load-optim or --finetune")
        optimizer.load_state_dict(state["optimizer"]["optimizer"])
        if loss_scaler is not None and state["optimizer"].get("grad_scaler") is not None:
            loss_scaler.load_state_dict(state["optimizer"]["grad_scaler"])
        if scheduler is not None and "lr_scheduler" in state:
            scheduler.load_state_dict(state["lr_scheduler"])
    if load_rng:
        if "rng_state" not in state:
            raise CheckpointError(f"{path} holds no RNG state (saved with --no-save-rng); pass --no-load-rng")
        rng = state["rng_state"]
        set_rng_state(rng[0] if isinstance(rng, list) else rng)
    iteration = state.get("iteration", 0)
    return {"iteration": 0 if iteration == "release" else int(iteration),
            "consumed_train_samples": int(getattr(saved_args, "consumed_train_samples", 0) or 0),
            "consumed_valid_samples": int(getattr(saved_args, "consumed_valid_samples", 0) or 0),
            "args": saved_args}
