"""Rewrite a Megatron BERT checkpoint for other tensor- and pipeline-parallel degrees.

The checkpoint is merged to the full model (:func:`megatron_checkpoint.merge_partitions`) and split again by the
same partition rules (:func:`megatron_checkpoint.tensor_parallel_dim`): column-parallel tensors along dim 0,
row-parallel weights along dim 1, the vocabulary along dim 0, everything else replicated; pipeline stage ``s`` of
``pp`` holds layers ``[s L / pp, (s + 1) L / pp)`` renumbered from 0, the embeddings on the first stage, and the
final LayerNorm, MLM head and (pp > 1) the tied ``word_embeddings_for_head`` copy on the last, as Megatron saves
them. The fused QKV weight keeps its per-head ``[heads, 3, head_dim]`` rows, so a dim-0 split hands each rank
whole heads.

The vocabulary is re-padded to what Megatron computes for the new layout (``vocab_size`` rounded up to a multiple
of ``make_vocab_size_divisible_by x tp``), so a run started with the new degrees builds a model of the same shape.
Padding rows that both layouts have are kept; rows only the new layout has are zero (embedding and MLM bias).
With the project's defaults (30 tokens, divisible by 8) TP 1, 2 and 4 all pad to 32 and nothing changes.

What is carried: model (written in Megatron-LM's nested layout, whatever the source's), args (with the new degrees and padded vocabulary, and the consumed-samples data
position), iteration, ``lr_scheduler``, the loss scaler, and the optimizer state when it is a per-parameter
``torch.optim`` state dict (this project's AdamW: ``exp_avg``/``exp_avg_sq`` have their parameter's shape and are
merged and split exactly like it, so a resumed run continues as the original would have) or the state of the
mixed-precision / distributed optimizer of bf16, fp16 and ``--use-distributed-optimizer`` runs (pieces of each
named parameter, in per-dp-rank ``distrib_optim_dp_rank_*.pt`` files with the distributed optimizer), which is
joined into that per-parameter form first (and written in it: the trainer converts it back by name). What is not: per-rank
RNG states (resume with ``--no-load-rng``; with dropout on, the masks of the resumed run differ from the original's)
and an optimizer state of another form (e.g. Megatron-LM's fp16 optimizer with fp32 master copies), which is
dropped with a warning (resume with ``--no-load-optim``). The new files record this in ``'resharded_from'``.

Optimizer indices: ``torch.optim`` numbers parameters in parameter-group order. The pretraining's groups
(``training/optimizer.py:param_groups``) are ``decay`` (matrices and embeddings) and ``no_decay`` (biases and
1-D parameters), each in the model's registration order (:func:`megatron_checkpoint.canonical_order`); every
index is mapped to its parameter name that way and checked against the parameter's shape before anything is
moved.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
from typing import Optional

import torch

from megatron_protein.conversion import megatron_checkpoint as mc
from megatron_protein.conversion.output import staged_directory
from megatron_protein.conversion.vocabulary import resolve_source_vocab
from megatron_protein.models.megatron_layout import nest_bert_state
from megatron_protein.utils.errors import UserError
from megatron_protein.utils.locks import OutputLock

logger = logging.getLogger(__name__)

#: Entries of a partition file that are carried over unchanged (the rest is per-rank state that cannot be split).
CARRIED_ENTRIES = ("lr_scheduler", "opt_param_scheduler", "consumed_samples", "data_position", "scheduler")


class ReshardError(UserError, ValueError):
    """The model cannot be split into the requested degrees; nothing was written."""


def pad_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    multiple = divisible_by * tp_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def repad_vocab(full: dict[str, torch.Tensor], new_padded: int) -> dict[str, torch.Tensor]:
    """Cut or zero-extend the vocabulary rows of the word embedding and the MLM bias to ``new_padded``."""
    out = dict(full)
    for key in (mc.WORD_EMBEDDINGS, mc.LM_HEAD_BIAS):
        if key not in out:
            continue
        tensor = out[key]
        if tensor.shape[0] >= new_padded:
            out[key] = tensor[:new_padded].clone()
        else:
            extra = torch.zeros((new_padded - tensor.shape[0],) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
            out[key] = torch.cat([tensor, extra])
    return out


def split_full_state(full: dict[str, torch.Tensor], tp: int, pp: int) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """Partition a full (canonical) model state dict into ``tp x pp`` Megatron partitions."""
    layers = mc.iter_layer_keys(full)
    num_layers = len(layers)
    if num_layers % pp:
        raise ReshardError(f"pipeline_model_parallel_size {pp} does not divide num_layers {num_layers}")
    per_stage = num_layers // pp
    stage_of: dict[str, tuple[int, str]] = {}
    for key in full:
        located = mc.layer_index(key)
        if located is not None:
            index, rest = located
            stage_of[key] = (index // per_stage, f"language_model.encoder.layers.{index % per_stage}.{rest}")
        elif key.startswith("language_model.embedding."):
            stage_of[key] = (0, key)
        else:  # final LayerNorm, MLM head, pooler, binary head: the last stage, as Megatron builds them
            stage_of[key] = (pp - 1, key)
    partitions = {(t, p): {} for t in range(tp) for p in range(pp)}
    items = [(key, stage_of[key][0], stage_of[key][1], tensor) for key, tensor in full.items()]
    if pp > 1 and mc.WORD_EMBEDDINGS in full:
        items.append((mc.HEAD_WORD_EMBEDDINGS, pp - 1, mc.HEAD_WORD_EMBEDDINGS, full[mc.WORD_EMBEDDINGS]))
    for key, stage, local_key, tensor in items:
        dim = mc.tensor_parallel_dim(local_key)
        if dim is None:
            for t in range(tp):
                partitions[(t, stage)][local_key] = tensor.clone()
            continue
        if tensor.shape[dim] % tp:
            raise ReshardError(f"{key} has {tensor.shape[dim]} entries along dim {dim}, not divisible by "
                               f"tensor_model_parallel_size {tp}")
        for t, chunk in enumerate(torch.chunk(tensor, tp, dim=dim)):
            partitions[(t, stage)][local_key] = chunk.clone()
    return partitions


def _is_no_decay(key: str, tensor: torch.Tensor) -> bool:
    """The pretraining's weight-decay rule (training/optimizer.py): biases and 1-D parameters are not decayed."""
    return tensor.ndim == 1 or key.endswith(".bias")


def optimizer_index_keys(model: dict[str, torch.Tensor], optimizer_state: dict) -> Optional[dict[int, str]]:
    """Map each ``torch.optim`` parameter index of one partition to its model key; None if the state is not of
    the per-parameter form described in the module docstring (then it cannot be resharded)."""
    groups = optimizer_state.get("param_groups") if isinstance(optimizer_state, dict) else None
    if not groups or not isinstance(optimizer_state.get("state"), dict):
        return None
    order = mc.canonical_order(model)
    by_name = {"decay": [k for k in order if not _is_no_decay(k, model[k])],
               "no_decay": [k for k in order if _is_no_decay(k, model[k])]}
    names = [g.get("name") for g in groups]
    if len(groups) == 1 and names[0] is None:
        by_name[None] = order
    index_keys: dict[int, str] = {}
    for group in groups:
        keys = by_name.get(group.get("name"))
        if keys is None or len(keys) != len(group["params"]):
            return None
        index_keys.update(zip(group["params"], keys))
    for index, entry in optimizer_state["state"].items():
        key = index_keys.get(index)
        if key is None:
            return None
        for value in entry.values():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and tuple(value.shape) != tuple(model[key].shape):
                return None
    return index_keys


def _as_torch_state(inner, checkpoint: mc.MegatronCheckpoint, key: tuple[int, int], trust: bool = False):
    """A mixed-precision or distributed optimizer's state (bf16/fp16 runs, ``--use-distributed-optimizer``: pieces
    of each named parameter, possibly in per-dp-rank shard files beside the partition) as the per-parameter torch
    AdamW state the resharding below moves; anything else unchanged."""
    from megatron_protein.conversion import optimizer_state as mpo

    if not isinstance(inner, dict) or inner.get("format") != mpo.STATE_FORMAT:
        return inner
    directory = os.path.dirname(checkpoint.paths[key])
    states = [inner] if not inner.get("shard_files") else [
        mc.load_shard_file(os.path.join(directory, os.path.basename(name)), trust=trust)
        for name in inner["shard_files"]]
    model = checkpoint.partitions[key]
    try:
        return mpo.torch_adamw_state_by_order(states, model, mc.canonical_order(model), _is_no_decay)
    except (mpo.OptimizerStateError, KeyError) as exc:
        logger.warning("%s: the mixed-precision optimizer state cannot be read (%s)", checkpoint.paths[key], exc)
        return None


def reshard_optimizer(checkpoint: mc.MegatronCheckpoint, new_models: dict[tuple[int, int], dict[str, torch.Tensor]],
                      tp: int, pp: int, new_padded: int,
                      allow_mismatch: bool = False, trust: bool = False) -> Optional[dict[tuple[int, int], dict]]:
    """The optimizer state of every new partition, or None (with a warning) when it cannot be carried."""
    if checkpoint.num_chunks > 1:
        logger.warning("%s: the optimizer state of an interleaved checkpoint (%d model chunks per rank) is not "
                       "carried (resume with --no-load-optim)", checkpoint.source, checkpoint.num_chunks)
        return None
    wrapped = [checkpoint.extras[key].get("optimizer") for key in sorted(checkpoint.partitions)]
    if any(w is None for w in wrapped):
        return None
    # The pretraining nests the torch state dict as {'optimizer': ..., 'grad_scaler': ...}.
    inner = [w.get("optimizer", w) if isinstance(w, dict) else None for w in wrapped]
    inner = [_as_torch_state(state, checkpoint, key, trust) for state, key in zip(inner, sorted(checkpoint.partitions))]
    mappings = {}
    for key, state in zip(sorted(checkpoint.partitions), inner):
        mapping = optimizer_index_keys(checkpoint.partitions[key], state) if state is not None else None
        if mapping is None:
            logger.warning("%s: the optimizer state is not a per-parameter torch.optim state of this model; it is "
                           "not carried (resume with --no-load-optim)", checkpoint.paths[key])
            return None
        mappings[key] = mapping
    first = inner[0]
    # One merged tensor per (state field, parameter); scalar fields ('step') are taken from the first partition.
    fields = sorted({name for state in inner for entry in state["state"].values() for name, value in entry.items()
                     if isinstance(value, torch.Tensor) and value.ndim > 0})
    scalars = {name: value for entry in first["state"].values() for name, value in entry.items()
               if not (isinstance(value, torch.Tensor) and value.ndim > 0)}
    split_fields = {}
    for name in fields:
        per_partition = {}
        for key, state in zip(sorted(checkpoint.partitions), inner):
            per_partition[key] = {mappings[key][index]: entry[name] for index, entry in state["state"].items()
                                  if name in entry}
        full = mc.merge_partition_dicts(per_partition, checkpoint.tp_size, checkpoint.pp_size, checkpoint.paths,
                                        what=f"optimizer {name}", allow_replicated_mismatch=allow_mismatch)
        full = repad_vocab(full, new_padded) if mc.WORD_EMBEDDINGS in full else full
        split_fields[name] = split_full_state(full, tp, pp)
    group_settings = [{k: v for k, v in g.items() if k != "params"} for g in first["param_groups"]]
    result = {}
    for part, model in new_models.items():
        order = mc.canonical_order(model)
        by_name = {"decay": [k for k in order if not _is_no_decay(k, model[k])],
                   "no_decay": [k for k in order if _is_no_decay(k, model[k])], None: order}
        param_groups, state, index = [], {}, 0
        for settings in group_settings:
            keys = by_name[settings.get("name")]
            param_groups.append(dict(settings, params=list(range(index, index + len(keys)))))
            for key in keys:
                entry = {name: split_fields[name][part][key] for name in fields if key in split_fields[name][part]}
                if entry:
                    entry.update(copy.deepcopy(scalars))
                    state[index] = entry
                index += 1
        result[part] = {"state": state, "param_groups": param_groups}
    wrapper_extra = {k: v for k, v in wrapped[0].items() if k != "optimizer"} if "optimizer" in wrapped[0] else None
    if wrapper_extra is not None:
        result = {part: dict(copy.deepcopy(wrapper_extra), optimizer=opt) for part, opt in result.items()}
    return result


def _check_divisible(args: Optional[argparse.Namespace], full: dict[str, torch.Tensor], tp: int) -> None:
    heads = getattr(args, "num_attention_heads", None)
    if heads is not None and heads % tp:
        raise ReshardError(f"tensor_model_parallel_size {tp} does not divide num_attention_heads {heads}")
    ffn = full.get("language_model.encoder.layers.0.mlp.dense_h_to_4h.weight")
    if ffn is not None and ffn.shape[0] % tp:
        raise ReshardError(f"tensor_model_parallel_size {tp} does not divide the MLP width {ffn.shape[0]}")


def reshard(src: str, out: str, tp: int, pp: int, vocab_size: Optional[int] = None,
            vocab: str = "auto", trust: bool = False,
            allow_replicated_mismatch: bool = False) -> dict[tuple[int, int], str]:
    """Rewrite the checkpoint ``src`` as a Megatron save directory ``out`` with degrees ``tp`` x ``pp``.

    Returns the written partition paths. ``vocab_size`` (the unpadded vocabulary) defaults to the args'
    ``vocab_size`` or the size of the detected vocabulary (``vocab``: see
    :func:`vocabulary.resolve_source_vocab`). Holds ``OUT.lock`` throughout; ``trust`` and
    ``allow_replicated_mismatch``: see :mod:`.megatron_checkpoint`.
    """
    if tp < 1 or pp < 1:
        raise ReshardError(f"degrees must be positive, got tp={tp}, pp={pp}")
    with OutputLock(out, "--out"):
        return _reshard(src, out, tp, pp, vocab_size, vocab, trust, allow_replicated_mismatch)


def _reshard(src, out, tp, pp, vocab_size, vocab, trust, allow_replicated_mismatch) -> dict[tuple[int, int], str]:
    checkpoint = mc.load_checkpoint(src, keep_optimizer=True, trust=trust)
    source_root = os.path.realpath(checkpoint.source)
    out_root = os.path.realpath(out)
    if source_root == out_root or source_root.startswith(out_root + os.sep):
        raise ReshardError(f"--out {out} holds the source checkpoint {checkpoint.source}; write to a new directory")
    full = mc.merge_partitions(checkpoint, allow_replicated_mismatch=allow_replicated_mismatch)
    args = copy.deepcopy(checkpoint.args) if checkpoint.args is not None else argparse.Namespace()
    _check_divisible(args, full, tp)
    old_padded = full[mc.WORD_EMBEDDINGS].shape[0]
    if vocab_size is None:
        vocab_size = getattr(args, "vocab_size", None) or len(resolve_source_vocab(vocab, checkpoint.args)[1])
    divisible_by = getattr(args, "make_vocab_size_divisible_by", None)
    if divisible_by is None:
        new_padded = old_padded if old_padded % tp == 0 else pad_vocab_size(old_padded, 1, tp)
    else:
        new_padded = pad_vocab_size(vocab_size, divisible_by, tp)
    if new_padded < vocab_size:
        raise ReshardError(f"padded vocabulary {new_padded} is smaller than vocab_size {vocab_size}")
    if new_padded != old_padded:
        logger.info("vocabulary padding %d -> %d rows for tp=%d", old_padded, new_padded, tp)
        full = repad_vocab(full, new_padded)
    partitions = split_full_state(full, tp, pp)
    optimizers = reshard_optimizer(checkpoint, partitions, tp, pp, new_padded, allow_replicated_mismatch, trust)

    args.tensor_model_parallel_size = tp
    args.pipeline_model_parallel_size = pp
    args.padded_vocab_size = new_padded
    if hasattr(args, "model_parallel_size"):
        args.model_parallel_size = tp
    release = checkpoint.iteration is None
    iteration = 0 if release else int(checkpoint.iteration)
    carried = {k: v for k, v in checkpoint.extras[min(checkpoint.extras)].items() if k in CARRIED_ENTRIES}
    written: dict[tuple[int, int], str] = {}
    iteration_name = "release" if release else f"iter_{iteration:07d}"
    with staged_directory(out) as staging:
        for (t, p), model in sorted(partitions.items()):
            relative = os.path.join(iteration_name, mc.shard_dirname(t, p, pp), mc.SHARD_FILENAMES[0])
            path = os.path.join(staging, relative)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            state = {"args": args, "checkpoint_version": 3.0, "iteration": iteration,
                     "model": nest_bert_state(model),  # Megatron-LM's nested layout, as the pretraining saves
                     "resharded_from": {"source": checkpoint.source, "tp": checkpoint.tp_size,
                                        "pp": checkpoint.pp_size,
                                        "optimizer": "resharded" if optimizers else "not carried",
                                        "rng_state": "not carried"}}
            state.update(copy.deepcopy(carried))
            if optimizers is not None:
                state["optimizer"] = optimizers[(t, p)]
            torch.save(state, path)
            written[(t, p)] = os.path.join(os.path.abspath(out), relative)
        with open(os.path.join(staging, mc.TRACKER_FILENAME), "w") as f:
            f.write("release" if release else str(iteration))
    logger.info("resharded %s (tp=%d, pp=%d) -> %s (tp=%d, pp=%d)", checkpoint.source, checkpoint.tp_size,
                checkpoint.pp_size, out, tp, pp)
    return written
