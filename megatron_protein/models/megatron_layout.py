"""Megatron-LM's nested BERT state dict and the key names of every Megatron version, in one place.

Megatron-LM's legacy BERT (``megatron/legacy/model/bert_model.py``, ``language_model.py``, ``transformer.py``)
saves ``model`` as what ``BertModel.state_dict_for_save_checkpoint`` returns, a nested dict::

    {'language_model': {'embedding': {'word_embeddings': {'weight': ...},
                                      'position_embeddings': {'weight': ...},
                                      'tokentype_embeddings': {'weight': ...}},        (num_tokentypes > 0)
                        'encoder': {'layers.0.input_layernorm.weight': ..., ..., 'final_layernorm.bias': ...},
                        'pooler': {'dense.weight': ..., 'dense.bias': ...}},             (with a binary head)
     'lm_head': {'bias': ..., 'dense.weight': ..., 'dense.bias': ..., 'layernorm.weight': ..., ...},
     'binary_head': {'weight': ..., 'bias': ...},                                         (with a binary head)
     'word_embeddings_for_head': {'weight': ...}}                                         (last stage, pp > 1)

The embedding nests one level per module (``Embedding.state_dict_for_save_checkpoint``); the encoder, the pooler
and the heads are plain ``state_dict()`` s (flat dotted keys below their name). Our model writes exactly this
(:func:`nest_bert_state`), with the names ``input_layernorm``, ``post_attention_layernorm``, ``final_layernorm``
and ``lm_head.layernorm``: Megatron-LM's own loaders read those in every version (releases since late 2023 write
``input_norm``/``post_attention_norm``/``final_norm``/``lm_head.norm`` and rename ``layernorm`` to ``norm`` when
they load).

:func:`canonical_bert_state` reads every form we know back into our flat names: the nested dicts of any Megatron-LM
version and of ProteinLM (``transformer`` for ``encoder`` and ``attention`` for ``self_attention`` in Megatron-LM
1.x/2.x and ProteinLM, ``*_norm`` in recent releases), flat dotted keys (our checkpoints before the nested layout),
and a leading ``module.`` of DDP/Float16Module wrappers. Non-tensor entries (Transformer Engine's
``_extra_state``) are dropped.
"""
from __future__ import annotations

import re
from typing import Any

import torch

#: Top-level modules of a BERT whose entries are ``state_dict()`` s of one module (flat below the name).
_FLAT_BELOW = ("lm_head", "binary_head", "word_embeddings_for_head")
#: Modules of ``language_model`` whose entries are flat below the name.
_LANGUAGE_MODEL_FLAT = ("encoder", "pooler", "transformer", "output_layer")

_RENAMES = (
    (re.compile(r"^language_model\.transformer\."), "language_model.encoder."),
    (re.compile(r"^(language_model\.encoder\.layers\.\d+\.)attention\."), r"\1self_attention."),
    # Megatron-LM since late 2023 (legacy model): LayerNorm -> "norm" (RMSNorm or LayerNorm).
    (re.compile(r"^(language_model\.encoder\.layers\.\d+\.)input_norm\."), r"\1input_layernorm."),
    (re.compile(r"^(language_model\.encoder\.layers\.\d+\.)post_attention_norm\."), r"\1post_attention_layernorm."),
    (re.compile(r"^language_model\.encoder\.final_norm\."), "language_model.encoder.final_layernorm."),
    (re.compile(r"^lm_head\.norm\."), "lm_head.layernorm."),
)


def flatten_state_dict(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Flatten Megatron's nested ``state_dict_for_save_checkpoint`` dictionaries into dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_state_dict(value, name + "."))
        else:
            flat[name] = value
    return flat


def canonical_key(key: str) -> str:
    """Any Megatron-LM / ProteinLM name -> ours (``transformer`` -> ``encoder``, ``attention`` ->
    ``self_attention``, ``*_norm`` -> ``*_layernorm``); a leading ``module.`` (DDP / Float16Module) is dropped."""
    while key.startswith("module."):
        key = key[len("module."):]
    for pattern, replacement in _RENAMES:
        key = pattern.sub(replacement, key)
    return key


def canonical_bert_state(model: dict) -> dict[str, Any]:
    """Our flat key names for a BERT ``model`` entry of any layout (see the module docstring). Raises
    ``ValueError`` when two entries map to one name."""
    out: dict[str, Any] = {}
    for key, value in flatten_state_dict(model).items():
        if not isinstance(value, torch.Tensor):
            continue  # e.g. '_extra_state' entries of fused modules
        name = canonical_key(key)
        if name in out:
            raise ValueError(f"keys {key!r} and another one both map to {name!r}")
        out[name] = value
    return out


def is_nested(model: dict) -> bool:
    """True for Megatron's nested form (some value is a dict), False for flat dotted keys."""
    return any(isinstance(value, dict) for value in model.values())


def nest_bert_state(flat: dict[str, Any]) -> dict[str, dict]:
    """Our flat BERT state dict -> Megatron-LM's nested ``state_dict_for_save_checkpoint`` form (the layout in the
    module docstring). Key order is kept within every level."""
    nested: dict[str, dict] = {}
    for key, value in flat.items():
        parts = key.split(".")
        if parts[0] == "language_model":
            language_model = nested.setdefault("language_model", {})
            if parts[1] == "embedding":
                # language_model.embedding.<module>.<param>: one level per module
                module = language_model.setdefault("embedding", {}).setdefault(parts[2], {})
                module[".".join(parts[3:])] = value
            elif parts[1] in _LANGUAGE_MODEL_FLAT:
                language_model.setdefault(parts[1], {})[".".join(parts[2:])] = value
            else:
                raise ValueError(f"{key}: no place for it in Megatron's nested BERT layout")
        elif parts[0] in _FLAT_BELOW:
            nested.setdefault(parts[0], {})[".".join(parts[1:])] = value
        else:
            raise ValueError(f"{key}: no place for it in Megatron's nested BERT layout")
    return nested
