"""Task heads of TAPE (Rao et al. 2019, "Evaluating Protein Transfer Learning with TAPE") on top of a backbone.

Heads and their state-dict names follow TAPE's ``modeling_utils`` so a TAPE user recognises them:

* ``ValuePredictionHead`` (fluorescence, stability): pooled vector -> ``value_prediction`` MLP -> 1 value, MSE loss.
* ``SequenceClassificationHead`` (remote homology): pooled vector -> ``classify`` MLP -> fold logits, CE loss.
* ``SequenceToSequenceClassificationHead`` (secondary structure): per-token ``classify`` convolution -> class
  logits, CE loss ignoring -1 (the <cls>/<sep> positions and padding).
* ``PairwiseContactPredictionHead`` (contact prediction): for residues i, j the features
  [h_i * h_j, h_i - h_j] -> linear -> 2 logits, symmetrised ((P + P^T) / 2), then the <cls>/<sep> row and column
  stripped, CE loss ignoring -1 (computed without the [L, L, 2H] features when dropout is off; see the class).

The MLPs and convolutions are weight-normalised (Salimans & Kingma 2016) with one scalar gain per weight, as TAPE
does with ``weight_norm(..., dim=None)``; the parameters are ``weight_g`` and ``weight_v`` as there.

One TAPE bug is not reproduced: TAPE's ``SimpleConv`` starts with a BatchNorm1d over all positions, padding
included, so a protein's prediction depended on the lengths of the other proteins in its batch. Here padding
positions are zeroed before the convolution and there is no batch statistic.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ProteinBertConfig
from .model import BACKBONES, ProteinModel


class WeightNormLinear(nn.Module):
    """y = x (g v / ||v||_F)^T + b with a scalar gain g: TAPE's ``weight_norm(nn.Linear(...), dim=None)``."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        linear = nn.Linear(in_features, out_features)
        self.weight_v = nn.Parameter(linear.weight.detach().clone())
        self.weight_g = nn.Parameter(linear.weight.detach().norm())
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)


class WeightNormConv1d(nn.Module):
    """1-D convolution with a weight-normalised kernel (scalar gain), 'same' padding for odd kernel sizes."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.padding = kernel_size // 2
        self.weight_v = nn.Parameter(conv.weight.detach().clone())
        self.weight_g = nn.Parameter(conv.weight.detach().norm())
        self.bias = nn.Parameter(conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm()
        return F.conv1d(x, weight, self.bias, padding=self.padding)


class SimpleMLP(nn.Module):
    def __init__(self, in_dim: int, hid_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.main = nn.Sequential(WeightNormLinear(in_dim, hid_dim), nn.ReLU(), nn.Dropout(dropout),
                                  WeightNormLinear(hid_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class SimpleConv(nn.Module):
    """[B, L, in] -> conv(5) -> ReLU -> dropout -> conv(3) -> [B, L, out]; padding positions zeroed first."""

    def __init__(self, in_dim: int, hid_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.main = nn.Sequential(WeightNormConv1d(in_dim, hid_dim, 5), nn.ReLU(), nn.Dropout(dropout),
                                  WeightNormConv1d(hid_dim, out_dim, 3))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is not None:
            x = x * mask.unsqueeze(-1).to(x.dtype)
        return self.main(x.transpose(1, 2)).transpose(1, 2)


def _accuracy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    valid = targets != ignore_index
    correct = (logits.argmax(-1) == targets) & valid
    return correct.sum().float() / valid.sum().clamp(min=1).float()


class ValuePredictionHead(nn.Module):
    def __init__(self, hidden_size: int, dropout: float = 0.0):
        super().__init__()
        self.value_prediction = SimpleMLP(hidden_size, 512, 1, dropout)

    def forward(self, pooled: torch.Tensor, targets: Optional[torch.Tensor] = None):
        prediction = self.value_prediction(pooled)                       # [B, 1]
        if targets is None:
            return (prediction,)
        loss = F.mse_loss(prediction.float(), targets.float())
        return (loss, {"mse": loss.detach()}), prediction


class SequenceClassificationHead(nn.Module):
    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.0):
        super().__init__()
        self.classify = SimpleMLP(hidden_size, 512, num_labels, dropout)

    def forward(self, pooled: torch.Tensor, targets: Optional[torch.Tensor] = None):
        logits = self.classify(pooled)                                   # [B, num_labels]
        if targets is None:
            return (logits,)
        loss = F.cross_entropy(logits.float(), targets)
        return (loss, {"accuracy": _accuracy(logits, targets)}), logits


class SequenceToSequenceClassificationHead(nn.Module):
    def __init__(self, hidden_size: int, num_labels: int, ignore_index: int = -1, dropout: float = 0.0):
        super().__init__()
        self.classify = SimpleConv(hidden_size, 512, num_labels, dropout)
        self.ignore_index = ignore_index

    def forward(self, sequence_output: torch.Tensor, targets: Optional[torch.Tensor] = None,
                input_mask: Optional[torch.Tensor] = None):
        logits = self.classify(sequence_output, input_mask)              # [B, L, num_labels]
        if targets is None:
            return (logits,)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                               ignore_index=self.ignore_index)
        return (loss, {"accuracy": _accuracy(logits, targets, self.ignore_index)}), logits


class PairwiseContactPredictionHead(nn.Module):
    """TAPE's contact head: logits_ij = W [h_i * h_j ; h_i - h_j] + b, symmetrised, specials stripped.

    Without dropout the difference features cancel exactly in the symmetrisation (W_d (h_i - h_j) +
    W_d (h_j - h_i) = 0), so the symmetric logits are sum_d h_id h_jd W_pd + b: that is computed as one batched
    matrix product with O(L^2) memory instead of materialising the [B, L, L, 2H] pair features (1.5 GB per
    protein at L = 500, H = 768). With dropout active (training) the masks of (i, j) and (j, i) differ, so the
    features are built in full as TAPE does.
    """

    def __init__(self, hidden_size: int, ignore_index: int = -1, dropout: float = 0.0):
        super().__init__()
        self.predict = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * hidden_size, 2))
        self.ignore_index = ignore_index

    def pair_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Symmetrised [B, L, L, 2] logits of all pairs (specials included)."""
        linear = self.predict[1]
        hidden = h.size(-1)
        if self.training and self.predict[0].p > 0:
            # [B, L, 1, H] and [B, 1, L, H] -> [B, L, L, 2H]
            pairwise = torch.cat([h[:, :, None] * h[:, None, :], h[:, :, None] - h[:, None, :]], dim=-1)
            logits = self.predict(pairwise)
            return (logits + logits.transpose(1, 2)) / 2
        w_product = linear.weight[:, :hidden]                                      # [2, H]
        # [B, 2, L, H] @ [B, 1, H, L] -> [B, 2, L, L]
        logits = torch.matmul(h.unsqueeze(1) * w_product[None, :, None, :], h.transpose(1, 2).unsqueeze(1))
        return logits.permute(0, 2, 3, 1) + linear.bias

    def forward(self, sequence_output: torch.Tensor, targets: Optional[torch.Tensor] = None):
        logits = self.pair_logits(sequence_output)[:, 1:-1, 1:-1].contiguous()   # strip <cls> and last position
        if targets is None:
            return (logits,)
        loss = F.cross_entropy(logits.reshape(-1, 2).float(), targets.reshape(-1), ignore_index=self.ignore_index)
        return (loss, {}), logits


HEAD_KINDS = ("value", "sequence_classification", "token_classification", "contact")


class ProteinModelForTask(ProteinModel):
    """A backbone (``bert``: the transformer or the one-hot baseline) plus the head of one task kind.

    ``forward(input_ids, input_mask=None, targets=None, protein_length=None)`` returns ``((loss, metrics),
    prediction)`` with targets and ``(prediction,)`` without, as TAPE's task models do.
    """

    def __init__(self, config: ProteinBertConfig, head: str = "value", num_labels: int = 1, dropout: float = 0.0):
        super().__init__(config)
        if head not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {head!r}; expected one of {HEAD_KINDS}")
        self.head_kind = head
        self.bert = BACKBONES[config.model_type](config)
        width = self.bert.output_size
        if head == "value":
            self.predict = ValuePredictionHead(width, dropout)
        elif head == "sequence_classification":
            self.classify = SequenceClassificationHead(width, num_labels, dropout)
        elif head == "token_classification":
            self.classify = SequenceToSequenceClassificationHead(width, num_labels, dropout=dropout)
        else:
            self.predict = PairwiseContactPredictionHead(width, dropout=dropout)

    @staticmethod
    def is_backbone_key(key: str) -> bool:
        return key.startswith(("embeddings.", "encoder."))

    @classmethod
    def from_pretrained(cls, model_dir: str, head: str = "value", num_labels: int = 1, dropout: float = 0.0,
                        **config_overrides) -> "ProteinModelForTask":
        config = ProteinBertConfig.from_pretrained(model_dir)
        if config_overrides:
            values = config.to_dict()
            values.update(config_overrides)
            config = ProteinBertConfig.from_dict(values)
        model = cls(config, head=head, num_labels=num_labels, dropout=dropout)
        model.load_pretrained_weights(model_dir)
        return model

    def forward(self, input_ids: torch.Tensor, input_mask: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None, protein_length: Optional[torch.Tensor] = None):
        sequence_output, pooled = self.bert(input_ids, input_mask)
        if self.head_kind == "value":
            return self.predict(pooled, targets)
        if self.head_kind == "sequence_classification":
            return self.classify(pooled, targets)
        if self.head_kind == "token_classification":
            return self.classify(sequence_output, targets, input_mask)
        return self.predict(sequence_output, targets)
