"""TAPE protein BERT -> Hugging Face ``EsmForMaskedLM`` directory (optional ``transformers`` extra).

Why ESM: Hugging Face's ESM (Rives et al. 2021; Lin et al. 2023) is the one transformers architecture whose layers
are pre-LN exactly like ours (``attention.LayerNorm`` before self-attention, ``LayerNorm`` before the MLP, residual
adds after each), that has a LayerNorm after the last layer (``emb_layer_norm_after``), no embedding LayerNorm
(``emb_layer_norm_before=False``), exact erf GeLU, an MLM head of dense -> gelu -> LayerNorm -> tied decoder + bias,
and learned absolute positions (``position_embedding_type='absolute'``). With ``token_dropout=False`` the model
computes the same function as ours, up to two conventions handled here:

* Positions: ESM numbers a token's position as in fairseq, ``padding_idx + 1 + i`` for the i-th real token
  (``create_position_ids_from_input_ids``), and ``padding_idx`` for padding. With ``pad_token_id`` 0 that is
  ``1 + i``, so ESM's position row ``1 + i`` holds our row ``i``, row 0 is zero (padding), and
  ``max_position_embeddings`` is ours + 1.
* Vocabulary: ESM's alphabet orders tokens differently (``<cls> <pad> <eos> <unk> L A G ...``). We keep TAPE's ids
  and ship a ``vocab.txt`` in TAPE order, with ``<sep>`` as the tokenizer's end token, so
  ``AutoTokenizer.from_pretrained(dir)`` yields TAPE ids and no embedding row is permuted: the same ids mean the
  same thing in the TAPE model, the Megatron checkpoint and the Hugging Face one. (Permuting rows into ESM's
  alphabet would let ESM's own tokenizer be used, but would silently change ids between the three copies.)

ESM's padding is handled by ``attention_mask`` (1 = real token) as in any transformers model; the embedding of a
padding position is zeroed by ESM, which does not change real positions' outputs because padding keys are masked.
ESM's unsupervised contact head (a regression on attention maps) has no counterpart: it is written as zeros.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_protein.conversion.vocabulary import TAPE_VOCAB

_LAYER_MAP = {
    "input_ln": "attention.LayerNorm",
    "attention.self.query": "attention.self.query",
    "attention.self.key": "attention.self.key",
    "attention.self.value": "attention.self.value",
    "attention.output.dense": "attention.output.dense",
    "post_attn_ln": "LayerNorm",
    "intermediate.dense": "intermediate.dense",
    "output.dense": "output.dense",
}


def esm_config(tape_config: dict):
    """The ``EsmConfig`` computing the same function as the TAPE config."""
    from transformers import EsmConfig
    return EsmConfig(
        vocab_size=tape_config["vocab_size"],
        hidden_size=tape_config["hidden_size"],
        num_hidden_layers=tape_config["num_hidden_layers"],
        num_attention_heads=tape_config["num_attention_heads"],
        intermediate_size=tape_config["intermediate_size"],
        hidden_dropout_prob=tape_config.get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=tape_config.get("attention_probs_dropout_prob", 0.1),
        max_position_embeddings=tape_config["max_position_embeddings"] + 1,
        initializer_range=tape_config.get("initializer_range", 0.02),
        layer_norm_eps=tape_config["layer_norm_eps"],
        position_embedding_type="absolute",
        emb_layer_norm_before=False,
        token_dropout=False,
        pad_token_id=TAPE_VOCAB.index("<pad>"),
        mask_token_id=TAPE_VOCAB.index("<mask>"),
        eos_token_id=TAPE_VOCAB.index("<sep>"),
        vocab_list=list(TAPE_VOCAB),
        tie_word_embeddings=True,
    )


def tape_to_esm_state_dict(tape_state: dict[str, torch.Tensor], tape_config: dict) -> dict[str, torch.Tensor]:
    """TAPE ``ProteinBertForMaskedLM`` keys -> ``EsmForMaskedLM`` keys (every tensor of the ESM model)."""
    out: dict[str, torch.Tensor] = {}
    word = tape_state["bert.embeddings.word_embeddings.weight"]
    position = tape_state["bert.embeddings.position_embeddings.weight"]
    out["esm.embeddings.word_embeddings.weight"] = word
    # Row 0 is ESM's padding position (padding_idx = pad_token_id = 0); row 1 + i is our position i.
    out["esm.embeddings.position_embeddings.weight"] = torch.cat([torch.zeros_like(position[:1]), position])
    for i in range(tape_config["num_hidden_layers"]):
        for ours, theirs in _LAYER_MAP.items():
            for part in ("weight", "bias"):
                out[f"esm.encoder.layer.{i}.{theirs}.{part}"] = tape_state[f"bert.encoder.layer.{i}.{ours}.{part}"]
    for part in ("weight", "bias"):
        out[f"esm.encoder.emb_layer_norm_after.{part}"] = tape_state[f"bert.encoder.final_ln.{part}"]
        out[f"lm_head.dense.{part}"] = tape_state[f"mlm.transform.dense.{part}"]
        out[f"lm_head.layer_norm.{part}"] = tape_state[f"mlm.transform.LayerNorm.{part}"]
    out["lm_head.bias"] = tape_state["mlm.bias"]
    out["lm_head.decoder.weight"] = word
    layers, heads = tape_config["num_hidden_layers"], tape_config["num_attention_heads"]
    out["esm.contact_head.regression.weight"] = torch.zeros(1, layers * heads, dtype=word.dtype)
    out["esm.contact_head.regression.bias"] = torch.zeros(1, dtype=word.dtype)
    return out


def write_vocab(directory: str) -> str:
    path = os.path.join(directory, "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(TAPE_VOCAB) + "\n")
    return path


def write_hf_esm(tape_state: dict[str, torch.Tensor], tape_config: dict, directory: str,
                 dtype: Optional[torch.dtype] = None) -> None:
    """Build the ``EsmForMaskedLM``, load every tensor strictly, and ``save_pretrained`` it with a TAPE-order
    tokenizer into ``directory``."""
    try:
        from transformers import EsmForMaskedLM, EsmTokenizer
    except ImportError as exc:
        raise ImportError("--format hf-esm needs the optional 'transformers' package: pip install "
                          "'megatron_protein[hf]'") from exc
    os.makedirs(directory, exist_ok=True)
    config = esm_config(tape_config)
    model = EsmForMaskedLM(config)
    state = tape_to_esm_state_dict(tape_state, tape_config)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise RuntimeError(f"EsmForMaskedLM of this transformers version expects other keys: missing {missing[:4]}, "
                           f"unexpected {unexpected[:4]}")
    for key, tensor in state.items():
        if tuple(own[key].shape) != tuple(tensor.shape):
            raise RuntimeError(f"{key}: shape {tuple(tensor.shape)} but EsmForMaskedLM has {tuple(own[key].shape)}")
    model.load_state_dict(state, strict=True)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(directory)
    vocab_file = write_vocab(directory)
    tokenizer = EsmTokenizer(vocab_file, unk_token="<unk>", cls_token="<cls>", pad_token="<pad>",
                             mask_token="<mask>", eos_token="<sep>", model_max_length=tape_config[
                                 "max_position_embeddings"])
    tokenizer.save_pretrained(directory)
