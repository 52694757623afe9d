"""Megatron protein BERT checkpoint -> TAPE model directory (``pytorch_model.bin`` + ``config.json``).

Every tensor of the TAPE ``ProteinBertForMaskedLM`` comes from the checkpoint (ProteinLM's converter left the
MLM head random); the key names are those documented in ``tape_tasks/model.py``::

    language_model.embedding.word_embeddings.weight      -> bert.embeddings.word_embeddings.weight   (rows remapped)
    language_model.embedding.position_embeddings.weight  -> bert.embeddings.position_embeddings.weight
    ...layers.{i}.input_layernorm                         -> bert.encoder.layer.{i}.input_ln
    ...layers.{i}.self_attention.query_key_value          -> ...attention.self.{query,key,value}  (per-head split)
    ...layers.{i}.self_attention.dense                    -> ...attention.output.dense
    ...layers.{i}.post_attention_layernorm                -> ...post_attn_ln
    ...layers.{i}.mlp.dense_h_to_4h / dense_4h_to_h        -> ...intermediate.dense / output.dense
    language_model.encoder.final_layernorm               -> bert.encoder.final_ln
    lm_head.dense / lm_head.layernorm / lm_head.bias      -> mlm.transform.dense / mlm.transform.LayerNorm / mlm.bias
    (tied)                                               -> mlm.decoder.weight = the word embedding

A checkpoint with token-type embeddings (Megatron BERT with ``num_tokentypes`` > 0) is converted exactly for
token type 0 (the only one a single-sequence protein input uses) by adding ``tokentype_embeddings[0]`` to every
position embedding: ``word[t] + pos[i] + type[0] == word[t] + (pos[i] + type[0])``. The pooler and the binary
(sentence-order) head have no TAPE counterpart and are listed as not converted.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence, TextIO

import torch

from megatron_protein.conversion import megatron_checkpoint as mc
from megatron_protein.conversion.output import TableRow, parse_dtype, print_table, staged_directory
from megatron_protein.conversion.vocabulary import dropped_rows, resolve_source_vocab, tape_rows
from megatron_protein.utils.errors import UserError
from megatron_protein.utils.locks import OutputLock
from megatron_protein.utils.safe_load import UnsafeFileError, load_torch_file

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "pytorch_model.bin"
HF_ESM_SUBDIR = "hf-esm"

_LAYER_MAP = {
    "input_layernorm.weight": "input_ln.weight",
    "input_layernorm.bias": "input_ln.bias",
    "self_attention.dense.weight": "attention.output.dense.weight",
    "self_attention.dense.bias": "attention.output.dense.bias",
    "post_attention_layernorm.weight": "post_attn_ln.weight",
    "post_attention_layernorm.bias": "post_attn_ln.bias",
    "mlp.dense_h_to_4h.weight": "intermediate.dense.weight",
    "mlp.dense_h_to_4h.bias": "intermediate.dense.bias",
    "mlp.dense_4h_to_h.weight": "output.dense.weight",
    "mlp.dense_4h_to_h.bias": "output.dense.bias",
}
_QKV = ("query", "key", "value")
_HEAD_MAP = {
    "lm_head.dense.weight": "mlm.transform.dense.weight",
    "lm_head.dense.bias": "mlm.transform.dense.bias",
    "lm_head.layernorm.weight": "mlm.transform.LayerNorm.weight",
    "lm_head.layernorm.bias": "mlm.transform.LayerNorm.bias",
    f"{mc.FINAL_LAYERNORM}.weight": "bert.encoder.final_ln.weight",
    f"{mc.FINAL_LAYERNORM}.bias": "bert.encoder.final_ln.bias",
}


class ConversionError(UserError, ValueError):
    """The conversion cannot be done as asked; nothing was written."""


@dataclass
class MergedBert:
    """A checkpoint's full model (tp = pp = 1, canonical Megatron names) and its sizes."""

    full: dict[str, torch.Tensor]
    shape: mc.BertShape
    args: Optional[argparse.Namespace]
    source: str
    iteration: Optional[int]
    tp_size: int
    pp_size: int
    #: For each merged key: pipeline stage, local layer index and how the tp shards were joined.
    provenance: dict[str, str] = field(default_factory=dict)


def load_merged_bert(src: str, hidden: Optional[int] = None, heads: Optional[int] = None,
                     layers: Optional[int] = None, trust: bool = False,
                     allow_replicated_mismatch: bool = False) -> MergedBert:
    """Load every partition of ``src``, merge TP and PP, and check ``hidden``/``heads``/``layers`` against it
    (``trust``, ``allow_replicated_mismatch``: see :mod:`.megatron_checkpoint`)."""
    checkpoint = mc.load_checkpoint(src, trust=trust)
    provenance: dict[str, str] = {}
    full = mc.merge_partitions(checkpoint, provenance=provenance, allow_replicated_mismatch=allow_replicated_mismatch)
    shape = mc.infer_shape(full, checkpoint.args, checkpoint.source, hidden=hidden, heads=heads, layers=layers)
    return MergedBert(full=full, shape=shape, args=checkpoint.args, source=checkpoint.source,
                      iteration=checkpoint.iteration, tp_size=checkpoint.tp_size, pp_size=checkpoint.pp_size,
                      provenance=provenance)


@dataclass
class TapeConversion:
    """The TAPE state dict, its config values, the table of what went where, and what was left out."""

    state: dict[str, torch.Tensor]
    config: dict
    table: list[TableRow]
    not_converted: list[str] = field(default_factory=list)
    vocab_name: str = "tape"
    verification: list = field(default_factory=list)


def megatron_to_tape(merged: MergedBert, vocab: str = "auto") -> TapeConversion:
    """Map a merged Megatron BERT onto TAPE's ``ProteinBertForMaskedLM`` keys (float tensors, source dtype)."""
    full, shape = merged.full, merged.shape
    vocab_name, tokens = resolve_source_vocab(vocab, merged.args)
    rows = tape_rows(tokens, shape.padded_vocab_size, vocab_name)
    dropped = dropped_rows(tokens, rows, shape.padded_vocab_size)
    vocab_note = f"rows in TAPE id order from the {vocab_name} vocabulary; dropped " + (", ".join(dropped) or "none")
    state: dict[str, torch.Tensor] = {}
    table: list[TableRow] = []
    used: set[str] = set()

    def put(target: str, tensor: torch.Tensor, source: str, note: str = "") -> None:
        state[target] = tensor.contiguous()
        origin = merged.provenance.get(source, "")
        note = "; ".join(n for n in (origin, note) if n)
        table.append(TableRow(target, source, tuple(tensor.shape), tensor.dtype, note))

    word = full[mc.WORD_EMBEDDINGS][rows]
    used.add(mc.WORD_EMBEDDINGS)
    put("bert.embeddings.word_embeddings.weight", word, mc.WORD_EMBEDDINGS, vocab_note)
    position = full[mc.POSITION_EMBEDDINGS]
    used.add(mc.POSITION_EMBEDDINGS)
    note = ""
    if mc.TOKENTYPE_EMBEDDINGS in full:
        position = position + full[mc.TOKENTYPE_EMBEDDINGS][0]
        used.add(mc.TOKENTYPE_EMBEDDINGS)
        note = "+ tokentype_embeddings[0] folded in (exact for token type 0)"
    put("bert.embeddings.position_embeddings.weight", position, mc.POSITION_EMBEDDINGS, note)

    for i in range(shape.num_layers):
        src_prefix = f"language_model.encoder.layers.{i}."
        dst_prefix = f"bert.encoder.layer.{i}."
        for part in ("weight", "bias"):
            key = f"{src_prefix}self_attention.query_key_value.{part}"
            if key not in full:
                raise ConversionError(f"{merged.source}: no {key}")
            used.add(key)
            for name, tensor in zip(_QKV, mc.split_qkv(full[key], shape.num_attention_heads)):
                put(f"{dst_prefix}attention.self.{name}.{part}", tensor, key,
                    f"{name} rows of [heads={shape.num_attention_heads}, 3, head_dim={shape.head_dim}]")
        for src_name, dst_name in _LAYER_MAP.items():
            key = src_prefix + src_name
            if key not in full:
                raise ConversionError(f"{merged.source}: no {key}")
            used.add(key)
            put(dst_prefix + dst_name, full[key], key)

    for src_name, dst_name in _HEAD_MAP.items():
        if src_name in full:
            used.add(src_name)
            put(dst_name, full[src_name], src_name)
    if mc.LM_HEAD_BIAS in full:
        used.add(mc.LM_HEAD_BIAS)
        put("mlm.bias", full[mc.LM_HEAD_BIAS][rows], mc.LM_HEAD_BIAS, "same rows as the word embedding")
    put("mlm.decoder.weight", word, mc.WORD_EMBEDDINGS, "tied to the word embedding")

    args = merged.args
    config = {
        "vocab_size": len(rows),
        "hidden_size": shape.hidden_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_attention_heads,
        "intermediate_size": shape.ffn_hidden_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "layer_norm_eps": shape.layernorm_epsilon,
        "hidden_act": "gelu",
        "pre_layernorm": True,
    }
    for ours, theirs in (("hidden_dropout_prob", "hidden_dropout"), ("attention_probs_dropout_prob",
                                                                     "attention_dropout"),
                         ("initializer_range", "init_method_std")):
        if args is not None and getattr(args, theirs, None) is not None:
            config[ours] = float(getattr(args, theirs))
    if args is not None and getattr(args, "openai_gelu", False):
        logger.warning("the checkpoint was trained with --openai-gelu (tanh approximation); the TAPE model uses the "
                       "exact erf GeLU, so its outputs differ slightly from the Megatron model's")
    not_converted = sorted(set(full) - used)
    return TapeConversion(state=state, config=config, table=table, not_converted=not_converted,
                          vocab_name=vocab_name)


def _load_dst(dst: str) -> tuple[Optional[dict], dict[str, torch.Tensor], str]:
    """``(config dict or None, state dict, weights path)`` of a TAPE model directory or ``pytorch_model.bin``."""
    weights = os.path.join(dst, WEIGHTS_NAME) if os.path.isdir(dst) else dst
    config_path = os.path.join(os.path.dirname(weights), CONFIG_NAME)
    if not os.path.isfile(weights):
        raise ConversionError(f"--dst {dst}: no {weights} (expected a TAPE model directory or its {WEIGHTS_NAME})")
    try:
        state = load_torch_file(weights, what="--dst model")
    except UnsafeFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to read is reported with the file name
        raise ConversionError(f"--dst {weights}: cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise ConversionError(f"--dst {weights}: expected a state dict, got {type(state).__name__}")
    config = None
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                config = json.load(f)
        except json.JSONDecodeError as exc:
            raise ConversionError(f"{config_path}: line {exc.lineno}: not valid JSON ({exc.msg})") from None
    return config, state, weights


def apply_dst(conversion: TapeConversion, dst: str) -> None:
    """Take the config of the TAPE model ``dst`` (its architecture must agree with the checkpoint) and any
    ``ProteinBertForMaskedLM`` parameter the checkpoint lacks (e.g. an MLM head of a checkpoint saved without it)."""
    dst_config, dst_state, weights = _load_dst(dst)
    if dst_config is not None:
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                    "max_position_embeddings"):
            if key in dst_config and dst_config[key] != conversion.config[key]:
                raise ConversionError(f"--dst {dst}: config.json has {key}={dst_config[key]} but the checkpoint has "
                                      f"{conversion.config[key]}")
        merged = dict(dst_config)
        merged.update(conversion.config)
        conversion.config = merged
    for key in _expected_tape_keys(conversion.config):
        if key in conversion.state:
            continue
        candidates = [key, key.removeprefix("bert.")]
        found = next((c for c in candidates if c in dst_state), None)
        if found is not None:
            tensor = dst_state[found]
            conversion.state[key] = tensor
            conversion.table.append(TableRow(key, f"--dst {found}", tuple(tensor.shape), tensor.dtype,
                                             "not in the checkpoint"))


def _expected_tape_keys(config: dict) -> list[str]:
    keys = ["bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight"]
    for i in range(config["num_hidden_layers"]):
        prefix = f"bert.encoder.layer.{i}."
        keys += [f"{prefix}attention.self.{n}.{p}" for n in _QKV for p in ("weight", "bias")]
        keys += [prefix + v for v in _LAYER_MAP.values()]
    keys += list(_HEAD_MAP.values()) + ["mlm.bias", "mlm.decoder.weight"]
    return keys


def check_complete(conversion: TapeConversion, source: str) -> None:
    missing = [k for k in _expected_tape_keys(conversion.config) if k not in conversion.state]
    if missing:
        raise ConversionError(f"{source}: the checkpoint lacks {len(missing)} tensor(s) of the TAPE model, e.g. "
                              f"{missing[:4]}; pass --dst with a TAPE model to take them from")


def write_tape_directory(conversion: TapeConversion, directory: str, dtype: Optional[torch.dtype]) -> None:
    """Write ``config.json`` and ``pytorch_model.bin`` into ``directory`` (an already staged directory)."""
    # mlm.decoder.weight is the word embedding itself: torch.save stores the shared storage once.
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
             for k, v in conversion.state.items()}
    torch.save(state, os.path.join(directory, WEIGHTS_NAME))
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(conversion.config, f, indent=2, sort_keys=True)
        f.write("\n")


def convert(src: str, out: str, dst: Optional[str] = None, dtype: Optional[str] = None,
            hidden: Optional[int] = None, heads: Optional[int] = None, layers: Optional[int] = None,
            vocab: str = "auto", formats: Sequence[str] = ("tape",), table_file: Optional[TextIO] = sys.stdout,
            verify: bool = True, trust: bool = False, allow_replicated_mismatch: bool = False) -> TapeConversion:
    """The whole conversion behind ``converter/megatron-converter.py``; returns what was written.

    All inputs are checked (dtype, checkpoint, sizes, vocabulary, ``dst``) before anything is written, and the
    output directory appears only complete (:func:`staged_directory`). ``formats`` may add ``hf-esm``: a Hugging
    Face ``EsmForMaskedLM`` directory written to ``OUT/hf-esm``. With ``verify`` (the default), the written
    models are loaded back and must reproduce our Megatron model's outputs on the merged weights
    (:mod:`.verify`) before the directory is published. The conversion holds ``OUT.lock`` throughout, so a second
    conversion into the same ``out`` fails at once. ``trust`` and ``allow_replicated_mismatch``: see
    :mod:`.megatron_checkpoint`.
    """
    target_dtype = parse_dtype(dtype)
    unknown = [f for f in formats if f not in ("tape", "hf-esm")]
    if unknown:
        raise ConversionError(f"unknown --format {unknown}; expected 'tape' and/or 'hf-esm'")
    with OutputLock(out, "--out"):
        return _convert(src, out, dst, target_dtype, hidden, heads, layers, vocab, formats, table_file, verify, trust,
                        allow_replicated_mismatch)


def _convert(src, out, dst, target_dtype, hidden, heads, layers, vocab, formats, table_file, verify, trust,
             allow_replicated_mismatch) -> TapeConversion:
    stale = os.path.join(out, HF_ESM_SUBDIR)
    if "hf-esm" not in formats and os.path.exists(stale):
        raise ConversionError(f"{stale} exists from an earlier conversion and would no longer match {out}; remove "
                              f"it or add --format hf-esm to rewrite it")
    merged = load_merged_bert(src, hidden=hidden, heads=heads, layers=layers, trust=trust,
                              allow_replicated_mismatch=allow_replicated_mismatch)
    conversion = megatron_to_tape(merged, vocab=vocab)
    if dst is not None:
        apply_dst(conversion, dst)
    check_complete(conversion, merged.source)
    if target_dtype is not None:
        for row in conversion.table:
            row.dtype = target_dtype if row.dtype.is_floating_point else row.dtype
    if table_file is not None:
        title = (f"{merged.source} (iteration {merged.iteration}, tp={merged.tp_size}, pp={merged.pp_size}) -> "
                 f"{out}")
        print_table(conversion.table, title, file=table_file)
        if conversion.not_converted:
            print(f"not converted (no TAPE counterpart): {', '.join(conversion.not_converted)}", file=table_file)
    with staged_directory(out) as staging:
        write_tape_directory(conversion, staging, target_dtype)
        hf_dir = None
        if "hf-esm" in formats:
            from megatron_protein.conversion.to_hf_esm import write_hf_esm
            hf_dir = os.path.join(staging, HF_ESM_SUBDIR)
            write_hf_esm(conversion.state, conversion.config, hf_dir, target_dtype)
        if verify:
            from megatron_protein.conversion import verify as verification
            reason = verification.can_verify(merged.full, conversion.vocab_name)
            if reason is None:
                conversion.verification = verification.verify_outputs(merged.full, merged.shape, staging, hf_dir,
                                                                      target_dtype)
                for report in conversion.verification:
                    _say(str(report), table_file)
            else:
                _say(f"not verified against our Megatron model: {reason}", table_file)
    return conversion


def loading_note(out: str, formats: Sequence[str] = ("tape",)) -> str:
    """What the converter says last: how to load ``out``, and that songlab's tape-proteins loads it silently
    wrong (its BERT is post-LN; ours is pre-LN)."""
    hf = (f" or {os.path.join(out, HF_ESM_SUBDIR)} with transformers.EsmForMaskedLM.from_pretrained"
          if "hf-esm" in formats else "")
    return (f"note: {out} holds a pre-LN BERT. Load it with this project's TAPE code (from tape_tasks import "
            f"ProteinBertModel, ProteinBertForMaskedLM, TAPETokenizer, in place of from tape import ...; or "
            f"finetune/tape_train.py){hf}. Do not load it with songlab's tape-proteins: its post-LN "
            f"ProteinBertModel.from_pretrained accepts this directory without an error, leaves its own LayerNorms "
            f"and pooler at their initial values, ignores ours (input_ln, post_attn_ln, final_ln) and computes "
            f"another function (docs/tape.md).")


def _say(line: str, file: Optional[TextIO]) -> None:
    if file is not None:
        print(line, file=file)
    else:
        logger.info("%s", line)
