"""``ProteinBertConfig``: TAPE's ``config.json`` fields for the pre-LN protein BERT.

The field names are TAPE's (``tape/models/modeling_bert.py``: vocab_size, hidden_size, num_hidden_layers, ...), so a
TAPE user reads the file as before. Three fields are ours:

* ``pre_layernorm`` (always ``true``): the layers are Megatron/ProteinLM pre-LN layers, not TAPE's post-LN ones.
  A post-LN TAPE checkpoint (``bert-base``) computes a different function and is refused with a clear message.
* ``pooling`` (``"mean"`` or ``"cls"``): how a per-protein vector is made for the pooled tasks. Mean over residues
  is the default because TAPE's own README warns that its CLS pooler was never trained.
* ``model_type`` (``"transformer"`` or ``"onehot"``): which backbone the directory holds.

Unknown fields (TAPE writes ``type_vocab_size``, ``output_attentions``, ``num_labels``, ...) are kept in
``extra`` and written back, so a round trip through this class loses nothing.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from megatron_protein.utils.errors import UserError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "pytorch_model.bin"


class ModelFileError(UserError, ValueError):
    """A model directory is missing a file, or its config and weights disagree."""


@dataclass
class ProteinBertConfig:
    vocab_size: int = 30
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 8096
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    pre_layernorm: bool = True
    pooling: str = "mean"
    model_type: str = "transformer"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act must be 'gelu' (exact erf GeLU, as the pretrained model uses), "
                             f"got {self.hidden_act!r}")
        if not self.pre_layernorm:
            raise ValueError("pre_layernorm is false: this is a post-LN (original TAPE) model, which computes a "
                             "different function; tape_tasks implements the pre-LN protein BERT only")
        if self.model_type not in ("transformer", "onehot"):
            raise ValueError(f"model_type must be 'transformer' or 'onehot', got {self.model_type!r}")
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ProteinBertConfig":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in values.items() if k in known}
        extra = {k: v for k, v in values.items() if k not in known}
        return cls(**kwargs, extra=extra)

    def to_json_file(self, path: str) -> None:
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def from_json_file(cls, path: str) -> "ProteinBertConfig":
        try:
            with open(path) as f:
                values = json.load(f)
        except FileNotFoundError:
            raise ModelFileError(f"{path}: no config.json; a TAPE model directory holds config.json and "
                                 f"pytorch_model.bin") from None
        except json.JSONDecodeError as e:
            raise ModelFileError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as e:
            raise ModelFileError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, model_dir: str) -> "ProteinBertConfig":
        return cls.from_json_file(os.path.join(model_dir, CONFIG_NAME))

    def save_pretrained(self, model_dir: str) -> None:
        os.makedirs(model_dir, exist_ok=True)
        self.to_json_file(os.path.join(model_dir, CONFIG_NAME))
