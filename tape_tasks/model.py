"""The pre-LN protein BERT in TAPE's file format, and the one-hot baseline.

This computes the same function as ``megatron_protein/models/bert.py`` (Megatron-LM / ProteinLM pre-LN BERT):

    x   = dropout(word_embeddings[tokens] + position_embeddings[positions])      # no embedding LayerNorm
    h   = x + dropout(attention.output.dense(self_attention(input_ln(x))))
    x   = h + dropout(output.dense(gelu(intermediate.dense(post_attn_ln(h)))))   # exact erf GeLU
    out = final_ln(x)                                                            # after the last layer
    attention = softmax(Q K^T / sqrt(head_dim), padding keys masked) V

State-dict keys (TAPE's ``modeling_bert`` names plus the pre-LN LayerNorms), here for ``ProteinBertForMaskedLM``;
a bare ``ProteinBertModel`` has the same keys without the ``bert.`` prefix. ``{i}`` runs over
``num_hidden_layers``; shapes use H = hidden_size, F = intermediate_size, V = vocab_size (30), P =
max_position_embeddings::

    bert.embeddings.word_embeddings.weight                  [V, H]
    bert.embeddings.position_embeddings.weight              [P, H]
    bert.encoder.layer.{i}.input_ln.{weight,bias}           [H]
    bert.encoder.layer.{i}.attention.self.query.{weight,bias}   [H, H], [H]
    bert.encoder.layer.{i}.attention.self.key.{weight,bias}     [H, H], [H]
    bert.encoder.layer.{i}.attention.self.value.{weight,bias}   [H, H], [H]
    bert.encoder.layer.{i}.attention.output.dense.{weight,bias} [H, H], [H]
    bert.encoder.layer.{i}.post_attn_ln.{weight,bias}       [H]
    bert.encoder.layer.{i}.intermediate.dense.{weight,bias} [F, H], [F]
    bert.encoder.layer.{i}.output.dense.{weight,bias}       [H, F], [H]
    bert.encoder.final_ln.{weight,bias}                     [H]
    mlm.transform.dense.{weight,bias}                       [H, H], [H]
    mlm.transform.LayerNorm.{weight,bias}                   [H]
    mlm.decoder.weight                                      [V, H]   (tied to bert.embeddings.word_embeddings)
    mlm.bias                                                [V]

Query/key/value rows are in head order (rows ``h*head_dim:(h+1)*head_dim`` of ``query.weight`` belong to head h),
which is how Megatron's per-head ``[num_heads, 3, head_dim]`` fused QKV splits into three matrices. The converter
(``converter/``) maps Megatron names onto these: ``input_layernorm`` -> ``input_ln``, ``post_attention_layernorm``
-> ``post_attn_ln``, ``self_attention.dense`` -> ``attention.output.dense``, ``mlp.dense_h_to_4h`` ->
``intermediate.dense``, ``mlp.dense_4h_to_h`` -> ``output.dense``, ``final_layernorm`` -> ``final_ln``,
``lm_head.dense``/``lm_head.layernorm``/``lm_head.bias`` -> ``mlm.transform.dense``/``mlm.transform.LayerNorm``/
``mlm.bias``.

Not songlab's ``tape-proteins``: its ``ProteinBertModel`` is post-LN (an embedding LayerNorm, a LayerNorm after
each residual) and ``from_pretrained`` of one of our directories loads WITHOUT an error while leaving its
LayerNorms and pooler at their initial values and ignoring ours, so it computes another function. TAPE code uses
ours by importing from here: ``from tape_tasks import ProteinBertModel, ProteinBertForMaskedLM, TAPETokenizer``
in place of ``from tape import ...`` (same classes' names, ``from_pretrained`` signature, tokenizer and outputs;
docs/tape.md). The pooled output is the residue mean, not TAPE's (untrained) tanh pooler.

Call conventions are TAPE's: ``model(input_ids, input_mask=None)`` returns ``(sequence_output, pooled_output)``;
``ProteinBertForMaskedLM(input_ids, input_mask=None, targets=None)`` returns ``((loss, metrics), logits)`` when
targets are given and ``(logits,)`` otherwise. ``input_mask`` is 1 at real tokens and 0 at padding.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_protein.utils.safe_load import UnsafeFileError, load_torch_file

from .config import CONFIG_NAME, WEIGHTS_NAME, ModelFileError, ProteinBertConfig
from .tokenizer import IUPAC_VOCAB

logger = logging.getLogger(__name__)

PAD_ID = IUPAC_VOCAB["<pad>"]
CLS_ID = IUPAC_VOCAB["<cls>"]
SEP_ID = IUPAC_VOCAB["<sep>"]


def residue_mask(input_ids: torch.Tensor, input_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool [B, L]: True at amino-acid positions (not <cls>, <sep>, <pad>, nor outside ``input_mask``)."""
    mask = (input_ids != CLS_ID) & (input_ids != SEP_ID) & (input_ids != PAD_ID)
    if input_mask is not None:
        mask &= input_mask.bool()
    return mask


def pool(sequence_output: torch.Tensor, input_ids: torch.Tensor, input_mask: Optional[torch.Tensor],
         mode: str) -> torch.Tensor:
    """Per-protein vector [B, H]: mean over residue positions (``mode='mean'``) or the <cls> state (``'cls'``).

    The mean excludes <cls>, <sep> and padding, so a protein's vector does not depend on how much padding its batch
    needed. ``'cls'`` takes position 0 as is: there is no tanh pooler (TAPE's is untrained in its released models).
    """
    if mode == "cls":
        return sequence_output[:, 0]
    weights = residue_mask(input_ids, input_mask).to(sequence_output.dtype).unsqueeze(-1)  # [B, L, 1]
    return (sequence_output * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class ProteinModel(nn.Module):
    """Base class: TAPE's ``save_pretrained`` / ``from_pretrained`` on a directory holding config.json and
    pytorch_model.bin.

    Loading is strict about the backbone and lenient about heads, as finetuning needs: every backbone weight must be
    in the file with the shape the config implies (otherwise :class:`ModelFileError` names the key, both shapes and
    the directory), head weights missing from the file keep their fresh initialisation (logged), and weights of other
    heads in the file (e.g. ``mlm.*`` when finetuning a task head) are ignored (logged).
    """

    #: Prefix of the backbone's keys in models that wrap it (``bert.embeddings...``).
    base_model_prefix = "bert"

    def __init__(self, config: ProteinBertConfig):
        super().__init__()
        self.config = config

    def init_weights(self) -> None:
        """TAPE/BERT initialisation: N(0, initializer_range) for Linear and Embedding, zero biases, unit LayerNorm."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def backbone_keys(self) -> set[str]:
        """Keys that must come from the file (the pretrained part)."""
        return {k for k in self.state_dict() if k.startswith(self.base_model_prefix + ".")}

    def save_pretrained(self, model_dir: str) -> None:
        """Write config.json and pytorch_model.bin to ``model_dir`` (each to a temporary name, then renamed)."""
        os.makedirs(model_dir, exist_ok=True)
        self.config.save_pretrained(model_dir)
        path = os.path.join(model_dir, WEIGHTS_NAME)
        tmp = f"{path}.tmp.{os.getpid()}"
        torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, tmp)
        os.replace(tmp, path)

    @classmethod
    def from_pretrained(cls, model_dir: str, *, cache_dir: Optional[str] = None, force_download: bool = False,
                        output_loading_info: bool = False, **config_overrides):
        """Build from ``model_dir/config.json`` (fields overridden by ``config_overrides``) and load the weights.

        TAPE's signature (``tape.ProteinBertModel.from_pretrained``), so TAPE code runs unchanged with
        ``from tape_tasks import ...``: ``cache_dir`` and ``force_download`` are accepted and unused (nothing is
        downloaded: ``model_dir`` is a directory), ``output_loading_info=True`` returns ``(model, info)`` with
        TAPE's ``missing_keys``/``unexpected_keys``/``error_msgs``."""
        if not os.path.isdir(model_dir):
            raise ModelFileError(f"{model_dir}: not a model directory (config.json + {WEIGHTS_NAME}); TAPE's "
                                 f"pretrained names such as 'bert-base' are post-LN models this code does not "
                                 f"load, and nothing is downloaded here")
        config = ProteinBertConfig.from_pretrained(model_dir)
        if config_overrides:
            values = config.to_dict()
            values.update(config_overrides)
            config = ProteinBertConfig.from_dict(values)
        model = cls(config)
        info = model.load_pretrained_weights(model_dir)
        return (model, info) if output_loading_info else model

    def load_pretrained_weights(self, model_dir: str) -> None:
        path = os.path.join(model_dir, WEIGHTS_NAME)
        if not os.path.exists(path):
            raise ModelFileError(f"{model_dir}: no {WEIGHTS_NAME} (found: {sorted(os.listdir(model_dir))})")
        try:
            state = load_torch_file(path, what="model weights")
        except UnsafeFileError:
            raise
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file, reported with its name
            raise ModelFileError(f"{path}: cannot be read as PyTorch weights ({type(exc).__name__}: {exc})") from None
        return load_checked(self, state, model_dir)


def _candidate_names(key: str, prefix: str) -> list[str]:
    """Names under which ``key`` of a model may be stored: as is, or with the backbone prefix added/removed."""
    names = [key]
    if key.startswith(prefix + "."):
        names.append(key[len(prefix) + 1:])
    else:
        names.append(f"{prefix}.{key}")
    return names


def load_checked(model: ProteinModel, state: dict[str, torch.Tensor], source: str) -> dict:
    """Load ``state`` into ``model`` under the rules of :class:`ProteinModel`; raise naming the first mismatch."""
    own = model.state_dict()
    post_ln = [k for k in state if k.endswith(("embeddings.LayerNorm.weight", "attention.output.LayerNorm.weight"))]
    if post_ln:
        raise ModelFileError(
            f"{source}: {WEIGHTS_NAME} holds post-LN weights ({post_ln[0]}): an original TAPE (post-LN) checkpoint "
            f"computes a different function and is not supported; convert a pre-LN Megatron checkpoint instead")
    backbone = model.backbone_keys()
    config_path = os.path.join(source, CONFIG_NAME)
    to_load, used, missing = {}, set(), []
    for key, param in own.items():
        found = next((n for n in _candidate_names(key, model.base_model_prefix) if n in state), None)
        if found is None:
            missing.append(key)
            continue
        tensor = state[found]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ModelFileError(
                f"{source}: weight '{found}' has shape {tuple(tensor.shape)} in {WEIGHTS_NAME} but {config_path} "
                f"implies {tuple(param.shape)} for '{key}': the config does not match the weights")
        to_load[key] = tensor
        used.add(found)
    missing_backbone = [k for k in missing if k in backbone]
    if missing_backbone:
        raise ModelFileError(
            f"{source}: {WEIGHTS_NAME} lacks {len(missing_backbone)} weight(s) that {config_path} implies, e.g. "
            f"{missing_backbone[:3]}: the config does not match the weights")
    leftover = sorted(set(state) - used)
    extra_backbone = [k for k in leftover if model.is_backbone_key(k.removeprefix(model.base_model_prefix + "."))]
    if extra_backbone:
        raise ModelFileError(
            f"{source}: {WEIGHTS_NAME} holds backbone weight(s) that {config_path} does not describe, e.g. "
            f"{extra_backbone[:3]} (more layers than num_hidden_layers?): the config does not match the weights")
    model.load_state_dict(to_load, strict=False)
    info = {"missing_keys": missing, "unexpected_keys": leftover, "error_msgs": []}
    if missing:
        logger.info("%s: %d head weight(s) not in the file, newly initialised: %s", source, len(missing), missing)
    if leftover:
        logger.info("%s: %d weight(s) in the file not used by %s: %s", source, len(leftover),
                    type(model).__name__, leftover[:8])
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return info


class ProteinBertEmbeddings(nn.Module):
    """word + learned absolute position embeddings, then dropout (no token types, no LayerNorm: pre-LN BERT)."""

    def __init__(self, config: ProteinBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        length = input_ids.size(1)
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence of {length} tokens (with <cls>/<sep>) exceeds max_position_embeddings "
                             f"{self.position_embeddings.num_embeddings}")
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device).unsqueeze(0)
        return self.dropout(self.word_embeddings(input_ids) + self.position_embeddings(position_ids))


class ProteinBertSelfAttention(nn.Module):
    """softmax(Q K^T / sqrt(d) + mask) V over heads, with TAPE's separate query/key/value projections."""

    def __init__(self, config: ProteinBertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, L, H] -> [B, heads, L, head_dim]
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, key_masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``key_masked``: bool [B, 1, 1|L, L], True where a key must not be attended to."""
        q, k, v = self._heads(self.query(hidden)), self._heads(self.key(hidden)), self._heads(self.value(hidden))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)      # [B, heads, L, L]
        scores = scores.masked_fill(key_masked, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        context = torch.matmul(self.dropout(probs), v)                                 # [B, heads, L, head_dim]
        b, _, length, _ = context.shape
        return context.transpose(1, 2).reshape(b, length, -1), probs


class ProteinBertSelfOutput(nn.Module):
    def __init__(self, config: ProteinBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)


class ProteinBertAttention(nn.Module):
    def __init__(self, config: ProteinBertConfig):
        super().__init__()
        self.self = ProteinBertSelfAttention(config)
        self.output = ProteinBertSelfOutput(config)


class ProteinBertIntermediate(nn.Module):
    def __init__(self, config: ProteinBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)


class ProteinBertOutput(nn.Module):
    def __init__(self, config: ProteinBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)


class ProteinBertLayer(nn.Module):
    """One pre-LN transformer layer (Megatron-LM / ProteinLM order; see the module docstring)."""

    def __init__(self, config: ProteinBertConfig):
        super().__init__()
        self.input_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ProteinBertAttention(config)
        self.post_attn_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = ProteinBertIntermediate(config)
        self.output = ProteinBertOutput(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, key_masked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context, probs = self.attention.self(self.input_ln(x), key_masked)
        h = x + self.dropout(self.attention.output.dense(context))
        mlp = self.output.dense(F.gelu(self.intermediate.dense(self.post_attn_ln(h))))  # erf GeLU
        return h + self.dropout(mlp), probs


class ProteinBertEncoder(nn.Module):
    def __init__(self, config: ProteinBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(ProteinBertLayer(config) for _ in range(config.num_hidden_layers))
        self.final_ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, key_masked: torch.Tensor, output_hidden_states: bool = False):
        hidden_states = []
        for layer in self.layer:
            if output_hidden_states:
                hidden_states.append(x)
            x, _ = layer(x, key_masked)
        x = self.final_ln(x)
        if output_hidden_states:
            hidden_states.append(x)
        return x, hidden_states


class ProteinBertModel(ProteinModel):
    """The backbone. ``forward(input_ids, input_mask=None)`` -> ``(sequence_output [B, L, H], pooled [B, H])``."""

    base_model_prefix = "bert"

    def __init__(self, config: ProteinBertConfig):
        super().__init__(config)
        self.embeddings = ProteinBertEmbeddings(config)
        self.encoder = ProteinBertEncoder(config)
        self.init_weights()

    @property
    def output_size(self) -> int:
        return self.config.hidden_size

    @staticmethod
    def is_backbone_key(key: str) -> bool:
        return key.startswith(("embeddings.", "encoder."))

    def backbone_keys(self) -> set[str]:
        return set(self.state_dict())

    def forward(self, input_ids: torch.Tensor, input_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None):
        if input_mask is None:
            input_mask = torch.ones_like(input_ids)
        key_masked = ~input_mask.bool()[:, None, None, :]                                 # [B, 1, 1, L]
        sequence_output, _ = self.encoder(self.embeddings(input_ids, position_ids), key_masked)
        return sequence_output, pool(sequence_output, input_ids, input_mask, self.config.pooling)


class MLMHead(nn.Module):
    """TAPE's masked-LM head: dense -> gelu -> LayerNorm -> decoder (tied to the word embeddings) + bias."""

    def __init__(self, config: ProteinBertConfig, ignore_index: int = -1):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.ignore_index = ignore_index

    def forward(self, hidden: torch.Tensor, targets: Optional[torch.Tensor] = None):
        hidden = self.transform.LayerNorm(F.gelu(self.transform.dense(hidden)))
        logits = self.decoder(hidden) + self.bias
        if targets is None:
            return (logits,)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                               ignore_index=self.ignore_index)
        return (loss, {"perplexity": torch.exp(loss.detach())}), logits


class ProteinBertForMaskedLM(ProteinModel):
    """Backbone + MLM head; ``forward(input_ids, input_mask=None, targets=None)`` (targets: -1 = not predicted)."""

    def __init__(self, config: ProteinBertConfig):
        super().__init__(config)
        self.bert = ProteinBertModel(config)
        self.mlm = MLMHead(config)
        self.init_weights()
        self.tie_weights()

    @staticmethod
    def is_backbone_key(key: str) -> bool:
        return ProteinBertModel.is_backbone_key(key)

    def tie_weights(self) -> None:
        self.mlm.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids, input_mask=None, targets=None, protein_length=None):
        sequence_output, _ = self.bert(input_ids, input_mask)
        return self.mlm(sequence_output, targets)


class OneHotModel(ProteinModel):
    """The baseline that learned nothing: each token becomes its one-hot vector (TAPE's ``onehot`` model).

    ``forward`` returns ``(one_hot [B, L, V], pooled [B, V])`` with the same pooling as the transformer, so a task
    head sees the same interface and any gain of a pretrained model over this one is what pretraining taught it.
    It has no parameters; its directory holds a config.json and an empty pytorch_model.bin.
    """

    def __init__(self, config: ProteinBertConfig):
        super().__init__(config)

    @property
    def output_size(self) -> int:
        return self.config.vocab_size

    @staticmethod
    def is_backbone_key(key: str) -> bool:
        return False

    def backbone_keys(self) -> set[str]:
        return set()

    def forward(self, input_ids: torch.Tensor, input_mask: Optional[torch.Tensor] = None, position_ids=None):
        if input_mask is None:
            input_mask = torch.ones_like(input_ids)
        sequence_output = F.one_hot(input_ids, self.config.vocab_size).float()
        sequence_output = sequence_output * input_mask.unsqueeze(-1).to(sequence_output.dtype)
        return sequence_output, pool(sequence_output, input_ids, input_mask, self.config.pooling)


def onehot_config(**overrides) -> ProteinBertConfig:
    """Config of the one-hot baseline (no layers; hidden size = vocabulary size)."""
    values = dict(model_type="onehot", vocab_size=30, hidden_size=30, num_hidden_layers=0, num_attention_heads=1,
                  intermediate_size=0)
    values.update(overrides)
    return ProteinBertConfig(**values)


#: Backbones by the MODEL name of ``tape_train.py MODEL TASK`` (and ``config.json``'s model_type).
BACKBONES = {"transformer": ProteinBertModel, "onehot": OneHotModel}


def compile_transformer_layers(model: nn.Module) -> int:
    """Put every :class:`ProteinBertLayer` of ``model`` through one shared ``torch.compile`` of its forward for
    training steps (:func:`megatron_protein.kernels.compiled.compile_modules`); return how many. The function is the
    eager layer's (same outputs and gradients to rounding); attention and hidden dropout then draw from inductor's
    generator (other masks, the same distribution). A model without transformer layers (the one-hot baseline): a
    no-op returning 0."""
    from megatron_protein.kernels.compiled import compile_modules
    layers = [m for m in model.modules() if isinstance(m, ProteinBertLayer)]
    compile_modules(layers, "tape_layer")
    return len(layers)

