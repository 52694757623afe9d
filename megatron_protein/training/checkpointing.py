"""Checkpoints in Megatron-LM's layout, written atomically and durably, never with non-finite weights, resumed
exactly.

Layout (what Megatron-LM and ProteinLM write, so the converter reads theirs and ours alike)::

    SAVE/latest_checkpointed_iteration.txt          "100"
    SAVE/iter_0000100/mp_rank_00/model_optim_rng.pt          pp == 1, one file per tp rank
    SAVE/iter_0000100/mp_rank_01_001/model_optim_rng.pt      pp > 1: mp_rank_{tp:02d}_{pp:03d}

Each file is a dict, Megatron-LM's (``megatron/training/checkpointing.py``): ``args`` (argparse.Namespace with
Megatron's names, including ``consumed_train_samples``), ``checkpoint_version`` (3.0), ``iteration``, ``model``
(this rank's weights; for the protein BERT the nested form Megatron-LM's ``BertModel.state_dict_for_save_checkpoint``
writes, see :mod:`megatron_protein.models.megatron_layout`; a model without that method saves its flat
``state_dict()``; under the interleaved schedule ``model0``, ``model1``, ... instead, one per model chunk of the
rank, as Megatron-LM saves its list of chunks), ``optimizer`` (the AdamW state and, for fp16, the loss scaler), the LR schedule's position under
``opt_param_scheduler`` (newer Megatron's name) and ``lr_scheduler`` (older Megatron's; the same dict, read from
either), and ``rng_state``: Megatron's list with one entry per data-parallel rank (Python, NumPy, torch, CUDA and
the model-parallel tracker's streams), gathered to the writer, each rank restoring its own (replicas draw
different dropout masks, see ``parallel/random.py``). Only data-parallel rank 0 writes: dp replicas hold the same
model and optimizer state.

Loading (:func:`load_checkpoint`) takes our checkpoints of every version (nested, or flat keys as written before),
Megatron-LM's and ProteinLM's: with ``--load`` this rank's file of the same TP/PP layout (weights, and the
optimizer state only when it is this trainer's AdamW state: another's is refused, naming ``--no-load-optim``);
with ``--finetune`` the weights of any TP/PP layout, merged by the converter's reader and split for this run
(:func:`load_bert_weights_for_finetune`).

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

Mixed precision and the distributed optimizer
(:class:`~megatron_protein.training.mixed_precision_optimizer.MixedPrecisionOptimizer`): ``model`` holds the
float32 *main* parameters, not the bf16/fp16 ones the model computes with (Megatron-LM keeps bf16 weights there
and the float32 copies in its optimizer state; one float32 copy here is what resuming, the converter and
``--finetune`` all need, and Megatron-LM's loader casts it to its parameters' dtype). With the distributed
optimizer they are gathered to dp rank 0 for it, and the optimizer state is written by every dp rank, each its
own shard, into ``distrib_optim_dp_rank_{r:03d}.pt`` beside ``model_optim_rng.pt`` (whose ``optimizer`` entry
then lists those files instead of holding tensors). Resuming reads the shards that overlap this rank's (its own
file at the same dp degree; all of them at another), also into a run without the distributed optimizer or in
float32, and a torch AdamW state (float32 or ``--autocast`` runs) into a bf16 one.

Loading: the tracker is read on rank 0 and its iteration broadcast (:func:`read_tracker_on_rank0`), so every rank
loads the same iteration even on a file system that shows ranks different versions of the file; each file is
unpickled by the weights-only loader of :mod:`megatron_protein.utils.safe_load`; and all ranks fail together if
any rank's file is missing, unreadable or refused.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_protein.models import megatron_layout
from megatron_protein.parallel import scg
from megatron_protein.parallel import tensor_parallel as tp_layers
from megatron_protein.training import mixed_precision_optimizer as mpo
from megatron_protein.utils import fs
from megatron_protein.utils.agree import from_rank0, on_all_ranks
from megatron_protein.utils.errors import UserError
from megatron_protein.utils.safe_load import UnsafeFileError, load_torch_file

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 3.0
TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
MODEL_FILENAME = "model_optim_rng.pt"
#: One per dp rank with the distributed optimizer, beside MODEL_FILENAME: that rank's optimizer shard.
SHARD_FILENAME = "distrib_optim_dp_rank_{:03d}.pt"

#: Arguments that fix the shape of every saved tensor; a resume with different values cannot load the files.
SHAPE_ARGS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
              "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "max_position_embeddings",
              "padded_vocab_size")


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


def rng_states_of_replicas(groups: scg.ParallelGroups) -> list[dict]:
    """Every data-parallel rank's :func:`rng_state`, in dp-rank order (an all-gather over the dp group: the
    writer, dp rank 0, gets them all). Megatron-LM gathers the same list under ``--data-parallel-random-init``."""
    mine = rng_state()
    group = groups.group("dp")
    if group is None:
        return [mine]
    gathered: list = [None] * groups.size("dp")
    dist.all_gather_object(gathered, mine, group=group)
    return gathered


def rng_state() -> dict:
    state = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(),
             "rng_tracker_states": tp_layers.get_rng_tracker().get_states()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, path: str = "the checkpoint") -> None:
    """Restore one :func:`rng_state` entry; :class:`CheckpointError` (before anything is set) when its streams
    were saved on another kind of device (a CUDA checkpoint's tracker states on a CPU run)."""
    tracker = tp_layers.get_rng_tracker()
    expected = (torch.cuda.get_rng_state(tracker.device) if tracker.device.type == "cuda"
                else torch.get_rng_state()).numel()
    for name, value in state["rng_tracker_states"].items():
        if torch.as_tensor(value).numel() != expected:
            raise CheckpointError(
                f"{path}: the RNG state of stream '{name}' has {torch.as_tensor(value).numel()} bytes, but a "
                f"{tracker.device.type} generator's has {expected}: it was saved on another kind of device "
                f"(Megatron-LM saves CUDA states); pass --no-load-rng")
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if "cuda_rng_state" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tracker.set_states(state["rng_tracker_states"])


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
    if isinstance(optimizer, mpo.MixedPrecisionOptimizer):  # its float32 main parameters and moments
        return found + optimizer.nonfinite_entries(limit - len(found))
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
    rng_list = rng_states_of_replicas(groups) if save_rng else None  # collective over dp
    mixed = isinstance(optimizer, mpo.MixedPrecisionOptimizer)
    # The float32 main parameters are what the model entry holds (a gather over dp with the distributed
    # optimizer in bf16/fp16: collective); the optimizer's state is this rank's shard.
    main_params = optimizer.gather_main_params() if mixed else None
    optimizer_shard = optimizer.state_dict() if mixed and save_optim else None
    sharded = mixed and optimizer.distributed
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
        }
        state.update(model_entries_for_save(model, main_params))
        if save_optim:
            if sharded:  # the tensors are in every dp rank's shard file
                inner = {key: value for key, value in optimizer_shard.items() if key != "pieces"}
                inner["shard_files"] = [SHARD_FILENAME.format(r) for r in range(groups.size("dp"))]
            else:
                inner = optimizer_shard if mixed else optimizer.state_dict()
            state["optimizer"] = {"optimizer": inner,
                                  "grad_scaler": loss_scaler.state_dict() if loss_scaler is not None else None}
            schedule = scheduler.state_dict()
            state["opt_param_scheduler"] = schedule   # newer Megatron-LM's name
            state["lr_scheduler"] = schedule          # older Megatron-LM's and ProteinLM's
        if save_rng:
            state["rng_state"] = rng_list  # Megatron's list: one entry per data-parallel rank
        rank_dir = os.path.join(tmp_dir, rank_dirname(groups.rank_in("tp"), groups.rank_in("pp"),
                                                      groups.size("pp")))
        os.makedirs(rank_dir, exist_ok=True)
        path = os.path.join(rank_dir, MODEL_FILENAME)
        _save_durably(state, path)
    if sharded and save_optim and all(groups.rank_in(axis) == 0 for axis in groups.axes
                                      if axis not in ("tp", "pp", "dp")):
        # every dp rank (of the first replica over any other axis) writes its own shard of the optimizer state
        rank_dir = os.path.join(tmp_dir, rank_dirname(groups.rank_in("tp"), groups.rank_in("pp"),
                                                      groups.size("pp")))
        os.makedirs(rank_dir, exist_ok=True)
        _save_durably(optimizer_shard, os.path.join(rank_dir, SHARD_FILENAME.format(groups.rank_in("dp"))))
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


def model_entries_for_save(model: torch.nn.Module, main_params: Optional[dict] = None) -> dict:
    """The model entries of a checkpoint file: ``{'model': ...}``, or ``{'model0': ..., 'model1': ...}`` for the
    model chunks of the interleaved schedule (Megatron-LM's names). ``main_params``: see
    :func:`model_state_for_save` (named as in ``model.named_parameters()``: ``chunks.{c}.`` for chunks)."""
    chunks = _chunks(model)
    if chunks is None:
        return {"model": model_state_for_save(model, main_params)}
    entries = {}
    for c, chunk in enumerate(chunks):
        prefix = f"chunks.{c}."
        mine = None if main_params is None else {k[len(prefix):]: v for k, v in main_params.items()
                                                 if k.startswith(prefix)}
        entries[f"model{c}"] = model_state_for_save(chunk, mine)
    return entries


def _chunks(model: torch.nn.Module) -> Optional[list]:
    """The model chunks of the interleaved schedule (``ProteinBertChunks``), or None for one model."""
    return list(model.chunks) if hasattr(model, "state_dicts_for_save_checkpoint") else None


def _load_model_entries(model: torch.nn.Module, state: dict, path: str) -> tuple[list, list]:
    """Load the ``model`` entry (or ``model0``, ``model1``, ... into the chunks of the interleaved schedule) into
    ``model``; return (missing, unexpected) keys, prefixed ``modelN:`` for chunks."""
    chunks = _chunks(model)
    if chunks is None:
        if not isinstance(state.get("model"), dict):
            hint = (" but model0, model1, ...: it was saved with --num-layers-per-virtual-pipeline-stage; resume with "
                    "the same flag, or --finetune" if "model0" in state else f" (keys: {sorted(state)[:8]})")
            raise CheckpointError(f"{path}: no 'model' entry{hint}")
        return model.load_state_dict(state["model"], strict=False)
    missing, unexpected = [], []
    for c, chunk in enumerate(chunks):
        entry = state.get(f"model{c}")
        if not isinstance(entry, dict):
            raise CheckpointError(
                f"{path}: no 'model{c}' entry: this run has {len(chunks)} model chunks per pipeline rank "
                f"(--num-layers-per-virtual-pipeline-stage) but the checkpoint holds "
                f"{sorted(k for k in state if k.startswith('model'))}; resume with the checkpoint's layout, or use "
                f"--finetune, which reads any layout")
        result = chunk.load_state_dict(entry, strict=False)
        missing += [f"model{c}:{k}" for k in result.missing_keys]
        unexpected += [f"model{c}:{k}" for k in result.unexpected_keys]
    extra = sorted(k for k in state if k.startswith("model") and k[5:].isdigit() and int(k[5:]) >= len(chunks))
    if extra:
        raise CheckpointError(f"{path}: holds model chunks {extra} beyond this run's {len(chunks)}; resume with the "
                              f"checkpoint's --num-layers-per-virtual-pipeline-stage")
    return missing, unexpected


def _save_durably(obj: Any, path: str) -> None:
    torch.save(obj, path + ".partial")
    fs.fsync_file(path + ".partial")
    fs.replace_durably(path + ".partial", path)


def model_state_for_save(model: torch.nn.Module, main_params: Optional[dict] = None) -> dict:
    """What ``model`` saves: ``state_dict_for_save_checkpoint()`` when it has one (the protein BERT: Megatron's
    nested layout), else its flat ``state_dict()``. Tensors are cloned, so each is saved alone, not as a view of
    the data-parallel flat buffer. ``main_params`` (parameter name -> float32 tensor, the mixed-precision
    optimizer's main parameters) replace the model's own bf16/fp16 values."""
    flat = dict(model.state_dict())
    if main_params is not None:
        for name, value in main_params.items():
            if name not in flat:
                raise KeyError(f"main parameter {name!r} is not in the model's state_dict")
            flat[name] = value
    if hasattr(model, "state_dict_for_save_checkpoint"):
        return model.state_dict_for_save_checkpoint(flat) if main_params is not None \
            else model.state_dict_for_save_checkpoint()
    return {key: value.detach().clone() for key, value in flat.items()}


def _flat_model_state(model: torch.nn.Module, saved: dict) -> dict:
    """A checkpoint's model entry with this model's flat parameter names."""
    if getattr(model, "megatron_bert", False):
        return megatron_layout.canonical_bert_state(saved)
    return megatron_layout.flatten_state_dict(saved)


def _flat_model_state_of_file(model: torch.nn.Module, state: dict) -> dict:
    """The model entries of a checkpoint file (``model``, or ``model0``, ``model1``, ... for model chunks) with
    this model's flat parameter names (``chunks.{c}.`` before each chunk's)."""
    chunks = _chunks(model)
    if chunks is None:
        return _flat_model_state(model, state["model"])
    return {f"chunks.{c}.{key}": value for c, chunk in enumerate(chunks)
            for key, value in _flat_model_state(chunk, state[f"model{c}"]).items()}


def _optimizer_shards(inner: dict, path: str, groups: scg.ParallelGroups, trust: bool,
                      mine_only: bool) -> list[dict]:
    """The saved shards of a :class:`MixedPrecisionOptimizer` (``inner`` is the ``optimizer`` entry of
    ``path``): the entry itself, or the shard files it names (this dp rank's only when ``mine_only`` and the dp
    degree is the same)."""
    files = inner.get("shard_files")
    if not files:
        return [inner]
    if mine_only and len(files) == groups.size("dp"):
        files = [files[groups.rank_in("dp")]]
    shards = []
    for name in files:
        shard_path = os.path.join(os.path.dirname(path), os.path.basename(name))
        if not os.path.isfile(shard_path):
            raise CheckpointError(f"{shard_path} does not exist: {path} was saved with the distributed optimizer "
                                  f"over {len(inner['shard_files'])} dp ranks and names it (pass --no-load-optim "
                                  f"to resume the weights with a fresh optimizer)")
        try:
            shards.append(load_torch_file(shard_path, trust=trust))
        except UnsafeFileError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported with the path
            raise CheckpointError(f"{shard_path}: cannot read the optimizer shard ({type(exc).__name__}: "
                                  f"{exc})") from exc
    return shards


def _mixed_optimizer_states(saved: Any, optimizer: "mpo.MixedPrecisionOptimizer", path: str, flat_model: dict,
                            groups: scg.ParallelGroups, trust: bool) -> list[dict]:
    """The shards of the saved optimizer state that :meth:`MixedPrecisionOptimizer.load_states` takes, checked:
    ours (any dp degree), or a torch AdamW state of this model converted by name. Raises CheckpointError."""
    inner = saved.get("optimizer") if isinstance(saved, dict) else None
    try:
        if isinstance(inner, dict) and inner.get("format") == mpo.STATE_FORMAT:
            states = _optimizer_shards(inner, path, groups, trust, mine_only=True)
            try:
                optimizer.check_states(states, path)
            except mpo.OptimizerStateError:
                if len(states) == 1 and inner.get("shard_files"):  # another layout at this degree: read all
                    states = _optimizer_shards(inner, path, groups, trust, mine_only=False)
                    optimizer.check_states(states, path)
                else:
                    raise
        elif isinstance(inner, dict) and isinstance(inner.get("state"), dict):
            states = [mpo.pieces_from_torch_adamw(inner, flat_model, optimizer.numels)]
            optimizer.check_states(states, path)
        else:
            raise mpo.OptimizerStateError("it is neither this trainer's AdamW state nor a torch optimizer state")
    except mpo.OptimizerStateError as exc:
        raise CheckpointError(f"{path}: the optimizer state cannot be resumed here: {exc}. Pass --no-load-optim to "
                              f"resume the weights with a fresh optimizer, or --finetune to start a new run from "
                              f"them") from None
    return states


def check_optimizer_state(saved: Any, optimizer: torch.optim.Optimizer, path: str, shards=None,
                          named_parameters=None) -> dict:
    """The torch optimizer state inside ``saved`` (our ``{'optimizer': ..., 'grad_scaler': ...}``) when it is this
    trainer's: the same named parameter groups with the same numbers of parameters, every per-parameter tensor of
    its parameter's shape. Anything else (Megatron-LM's fp16/distributed optimizer state, another model's) raises
    :class:`CheckpointError` naming ``--no-load-optim``: torch would load some of it without complaint."""
    inner = saved.get("optimizer") if isinstance(saved, dict) else None
    if isinstance(inner, dict) and inner.get("format") == mpo.STATE_FORMAT and shards is not None:
        # A mixed-precision or distributed optimizer's state: back to per-parameter torch form, by name.
        names = {}
        for name, param in named_parameters or ():
            names[id(param)] = name
        try:
            return mpo.torch_adamw_state_from_pieces(shards(inner), optimizer, names)
        except mpo.OptimizerStateError as exc:
            raise CheckpointError(f"{path}: the optimizer state cannot be resumed here: {exc}. Pass "
                                  f"--no-load-optim to resume the weights with a fresh optimizer") from None
    ours = optimizer.param_groups
    problem = None
    if not isinstance(inner, dict) or not isinstance(inner.get("param_groups"), list) or not isinstance(
            inner.get("state"), dict):
        problem = "it is not a torch optimizer state wrapped as this trainer writes it"
    elif [g.get("name") for g in inner["param_groups"]] != [g.get("name") for g in ours]:
        problem = (f"its parameter groups {[g.get('name') for g in inner['param_groups']]} are not this "
                   f"trainer's {[g.get('name') for g in ours]}")
    else:
        params = [p for g in ours for p in g["params"]]
        for saved_group, group in zip(inner["param_groups"], ours):
            if len(saved_group.get("params", ())) != len(group["params"]):
                problem = (f"group '{group.get('name')}' holds {len(saved_group.get('params', ()))} parameters, "
                           f"this model {len(group['params'])}")
                break
        for index, entry in (inner["state"].items() if problem is None else ()):
            if not isinstance(index, int) or not 0 <= index < len(params) or not isinstance(entry, dict):
                problem = f"it has state for a parameter index {index!r} this model does not have"
                break
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != params[index].shape:
                    problem = (f"its '{key}' of parameter {index} has shape {tuple(value.shape)}, the parameter "
                               f"{tuple(params[index].shape)}")
                    break
            if problem:
                break
    if problem is not None:
        raise CheckpointError(f"{path}: the optimizer state cannot be resumed here: {problem} (a checkpoint of "
                              f"Megatron-LM or of another optimizer?). Pass --no-load-optim to resume the weights "
                              f"with a fresh optimizer, or --finetune to start a new run from them")
    return inner


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

    if finetune and getattr(model, "megatron_bert", False):
        saved_args = load_bert_weights_for_finetune(load, model, args, groups, iteration, trust_checkpoint,
                                                    optimizer=optimizer)
        return {"iteration": 0, "consumed_train_samples": 0, "consumed_valid_samples": 0, "args": saved_args}

    def read_and_load_weights():
        state, path = load_state(load, groups, iteration, trust_checkpoint=trust_checkpoint)
        saved_args = state.get("args")
        if saved_args is not None:
            check_args_match(saved_args, args, path)
        try:
            missing, unexpected = _load_model_entries(model, state, path)
        except (ValueError, RuntimeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{path}: the weights do not fit this model: {exc}") from None
        if missing or unexpected:
            hint = (" (a checkpoint with a pooler, binary head or token types loads with --finetune, which drops "
                    "them)" if any(k.startswith(("language_model.pooler", "binary_head",
                                                 "language_model.embedding.tokentype")) for k in unexpected)
                    else "")
            raise CheckpointError(f"{path}: model keys do not match this model; missing {list(missing)}, "
                                  f"unexpected {list(unexpected)}{hint}")
        mixed = isinstance(optimizer, mpo.MixedPrecisionOptimizer)
        flat_model = _flat_model_state_of_file(model, state)
        if mixed:  # the float32 values, exactly (the model now holds them rounded to bf16/fp16)
            try:
                optimizer.load_main_params(flat_model, path)
            except mpo.OptimizerStateError as exc:
                raise CheckpointError(str(exc)) from None
        optimizer_state = None
        if not finetune and load_optim and optimizer is not None:
            if "optimizer" not in state:
                raise CheckpointError(f"{path} holds no optimizer state (saved with --no-save-optim); "
                                      f"pass --no-load-optim or --finetune")
            if mixed:
                optimizer_state = _mixed_optimizer_states(state["optimizer"], optimizer, path, flat_model, groups,
                                                          trust_checkpoint)
            else:
                optimizer_state = check_optimizer_state(
                    state["optimizer"], optimizer, path,
                    shards=lambda inner: _optimizer_shards(inner, path, groups, trust_checkpoint, mine_only=False),
                    named_parameters=list(model.named_parameters()))
        rng = None
        if not finetune and load_rng:
            if "rng_state" not in state:
                raise CheckpointError(f"{path} holds no RNG state (saved with --no-save-rng); pass --no-load-rng")
            rng = state["rng_state"]
            if isinstance(rng, list) and len(rng) == groups.size("dp"):
                rng = rng[groups.rank_in("dp")]
            elif isinstance(rng, list) and groups.size("dp") > 1:
                rng = None  # saved with another number of replicas: see below
            elif isinstance(rng, list):
                rng = rng[0]
            if rng is not None:
                set_rng_state(rng, path)
        return state, path, optimizer_state, rng

    state, path, optimizer_state, rng = on_all_ranks(read_and_load_weights, groups, CheckpointError,
                                                     what="loading the checkpoint")
    saved_args = state.get("args")
    if finetune:
        return {"iteration": 0, "consumed_train_samples": 0, "consumed_valid_samples": 0, "args": saved_args}
    if optimizer_state is not None:
        if isinstance(optimizer, mpo.MixedPrecisionOptimizer):
            optimizer.load_states(optimizer_state)
        else:
            optimizer.load_state_dict(optimizer_state)
        if loss_scaler is not None and state["optimizer"].get("grad_scaler") is not None:
            loss_scaler.load_state_dict(state["optimizer"]["grad_scaler"])
        schedule = state.get("opt_param_scheduler", state.get("lr_scheduler"))
        if scheduler is not None and schedule is not None:
            scheduler.load_state_dict(schedule)
    if load_rng and rng is None and groups.rank == 0:
        logger.warning("%s holds %d RNG states but this run has %d data-parallel replicas: the RNG is not restored "
                       "(dropout continues from --seed's streams, so the run does not repeat the original's "
                       "masks)", path, len(state["rng_state"]), groups.size("dp"))
    iteration = state.get("iteration", 0)
    return {"iteration": 0 if iteration == "release" else int(iteration),
            "consumed_train_samples": int(getattr(saved_args, "consumed_train_samples", 0) or 0),
            "consumed_valid_samples": int(getattr(saved_args, "consumed_valid_samples", 0) or 0),
            "args": saved_args}


#: Model sizes that --finetune needs equal between the checkpoint and this run.
FINETUNE_SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "max_position_embeddings")


def load_bert_weights_for_finetune(load: str, model: torch.nn.Module, args: argparse.Namespace,
                                   groups: scg.ParallelGroups, iteration: int | str,
                                   trust_checkpoint: bool = False,
                                   optimizer=None) -> Optional[argparse.Namespace]:
    """``--finetune`` of a protein BERT from any Megatron BERT checkpoint: ours (any version), Megatron-LM's or
    ProteinLM's, saved with any TP/PP degrees. Collective; returns the checkpoint's args.

    Every rank reads all partitions with the converter's reader (:mod:`megatron_protein.conversion.
    megatron_checkpoint`: nested or flat keys, old names, the QKV order of checkpoint versions 0 and 1, merged over
    TP and PP), then: token-type embeddings (Megatron BERT's ``num_tokentypes = 2``) are folded into the position
    embeddings for token type 0, the only one a protein input uses (exact); the pooler and the binary
    (sentence-order) head, which this model does not have, are dropped (logged); a vocabulary other than ours
    (ProteinLM's 31 tokens) has its rows moved to our ids by token name, padding rows zero; then the model is split
    for this run's TP/PP layout (the reshard tool's rules) and this rank loads its part, strictly."""
    from megatron_protein.conversion import megatron_checkpoint as mc
    from megatron_protein.conversion.reshard import repad_vocab, split_full_state
    from megatron_protein.conversion.vocabulary import resolve_source_vocab, tape_rows

    def read():
        source = resolve_iteration_dir(load, iteration)
        checkpoint = mc.load_checkpoint(source, trust=trust_checkpoint)
        full = mc.merge_partitions(checkpoint)
        shape = mc.infer_shape(full, checkpoint.args, checkpoint.source,
                               heads=None if getattr(checkpoint.args, "num_attention_heads", None) else
                               getattr(args, "num_attention_heads", None))
        diffs = [f"{name}: checkpoint {getattr(shape, name)}, arguments {getattr(args, name)}"
                 for name in FINETUNE_SHAPE if getattr(args, name, None) != getattr(shape, name)]
        if diffs:
            raise CheckpointError(f"{checkpoint.source} has another model size than requested:\n  "
                                  + "\n  ".join(diffs) + "\nUse the checkpoint's sizes.")
        dropped = []
        if mc.TOKENTYPE_EMBEDDINGS in full:
            full[mc.POSITION_EMBEDDINGS] = full[mc.POSITION_EMBEDDINGS] + full.pop(mc.TOKENTYPE_EMBEDDINGS)[0]
            dropped.append("tokentype_embeddings (row 0 folded into the position embeddings)")
        for key in [k for k in full if k.startswith(("language_model.pooler.", "binary_head."))]:
            dropped.append(key)
            del full[key]
        vocab_name, tokens = resolve_source_vocab("auto", checkpoint.args)
        padded = int(args.padded_vocab_size)
        if vocab_name != "tape":
            rows = tape_rows(tokens, full[mc.WORD_EMBEDDINGS].shape[0], vocab_name)
            for key in (mc.WORD_EMBEDDINGS, mc.LM_HEAD_BIAS):
                if key in full:
                    full[key] = full[key][rows]
            dropped.append(f"vocabulary rows of {vocab_name} moved to our ids")
        full = repad_vocab(full, padded)
        chunks = _chunks(model)
        # Virtual stage c * pp + r of len(chunks) * pp (one per pipeline stage without chunks) for chunk c.
        stages = split_full_state(full, groups.size("tp"), groups.size("pp") * len(chunks or [model]))
        missing, unexpected, main = [], [], {}
        for c, chunk in enumerate(chunks or [model]):
            part = stages[(groups.rank_in("tp"), c * groups.size("pp") + groups.rank_in("pp"))]
            result = chunk.load_state_dict(part, strict=False)
            missing += list(result.missing_keys)
            unexpected += list(result.unexpected_keys)
            prefix = "" if chunks is None else f"chunks.{c}."
            main.update({prefix + k: v.float() for k, v in megatron_layout.canonical_bert_state(part).items()})
        if missing or unexpected:
            raise CheckpointError(f"{checkpoint.source}: its weights do not fit this model; missing "
                                  f"{list(missing)}, unexpected {list(unexpected)}")
        if isinstance(optimizer, mpo.MixedPrecisionOptimizer):  # the main parameters get the unrounded values
            optimizer.load_main_params(main, checkpoint.source)
        return checkpoint, dropped

    checkpoint, dropped = on_all_ranks(read, groups, CheckpointError, what="loading the weights for --finetune")
    if groups.rank == 0:
        logger.info("--finetune: weights of %s (tp=%d, pp=%d, iteration %s)%s", checkpoint.source,
                    checkpoint.tp_size, checkpoint.pp_size, checkpoint.iteration,
                    f"; not used or adapted: {', '.join(dropped)}" if dropped else "")
    return checkpoint.args
