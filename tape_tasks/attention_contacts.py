"""Unsupervised contacts from attention maps: logistic regression on APC-corrected, symmetrised attention
(Rao, Meier, Sercu, Ovchinnikov & Rives 2021, "Transformer protein language models are unsupervised structure
learners", ICLR; what fair-esm's ``ContactPredictionHead`` computes).

For a protein of L residues the frozen language model's attention probabilities of every layer and head are taken
(``layers x heads`` maps of [L, L] after dropping ``<cls>`` and ``<sep>``), each is symmetrised (``A + A^T``) and
corrected by the average product correction (APC, Dunn et al. 2008: ``F_ij - F_i. F_.j / F..``), and a logistic
regression with an L1 penalty maps the ``layers x heads`` features of a pair (i, j) to P(contact). The regression
is fitted on a few training proteins (the paper uses 20) over the pairs with |i - j| >= 6 whose label is known;
nothing else is trained. Fitting is scikit-learn's ``LogisticRegression(penalty='l1', solver='liblinear')`` with
C = 0.15, the paper's choice, on features standardised over the training pairs (mean 0, variance 1 per map). The
standardisation is ours: an L1 penalty is not scale-free, and the attention of a small model is nearly uniform
(APC-corrected values of order 1/L^2), so unstandardised features made the paper's C zero every coefficient of our
models while ESM-1b's peaked attention leaves them alive; standardised, C means the same for any model.

What this measures is what the language model learned by itself: a random-init network's attention carries no
contact signal, so a pretrained model that beats it here has learned structure from sequences alone; it is
complementary to the supervised contact head of :mod:`tape_tasks.heads`, which finetunes the whole network.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from .datasets import ProteinnetDataset
from .model import ProteinBertModel


def symmetrize(x: torch.Tensor) -> torch.Tensor:
    """``x + x^T`` over the last two dimensions."""
    return x + x.transpose(-1, -2)


def apc(x: torch.Tensor) -> torch.Tensor:
    """Average product correction over the last two dimensions: ``x - rowsum colsum / total``."""
    row = x.sum(-1, keepdim=True)
    col = x.sum(-2, keepdim=True)
    total = x.sum((-1, -2), keepdim=True)
    return x - row * col / total


@torch.no_grad()
def attention_maps(model: ProteinBertModel, input_ids: torch.Tensor,
                   input_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention probabilities of every layer and head, ``[B, layers * heads, T, T]`` for T tokens (specials
    included), from the model's own layers (dropout off: the model is put in eval mode)."""
    model.eval()
    if input_mask is None:
        input_mask = torch.ones_like(input_ids)
    key_masked = ~input_mask.bool()[:, None, None, :]
    x = model.embeddings(input_ids)
    maps = []
    for layer in model.encoder.layer:
        x, probs = layer(x, key_masked)
        maps.append(probs)
    return torch.cat(maps, dim=1)


def pair_features(maps: torch.Tensor, length: int) -> np.ndarray:
    """[C, T, T] attention maps of one protein (``<cls>`` at 0, ``<sep>`` at length + 1) -> [L, L, C] features:
    specials dropped, then symmetrised and APC-corrected per map (ESM's order)."""
    residues = maps[:, 1:length + 1, 1:length + 1].double()
    return apc(symmetrize(residues)).permute(1, 2, 0).numpy()


def _pairs(targets: np.ndarray, min_separation: int) -> tuple[np.ndarray, np.ndarray]:
    length = targets.shape[0]
    i, j = np.triu_indices(length, k=min_separation)
    keep = targets[i, j] != -1
    return i[keep], j[keep]


@dataclass
class AttentionContactRegression:
    """The fitted regression; :meth:`predict` gives [L, L] contact probabilities of a protein's features."""

    C: float = 0.15
    min_separation: int = 6
    coefficients: Optional[np.ndarray] = None
    intercept: float = 0.0
    mean: Optional[np.ndarray] = None   # per-feature standardisation, fitted on the training pairs
    scale: Optional[np.ndarray] = None
    fitted_on: dict = field(default_factory=dict)

    def fit(self, features: Sequence[np.ndarray], targets: Sequence[np.ndarray], seed: int = 0
            ) -> "AttentionContactRegression":
        from sklearn.linear_model import LogisticRegression

        xs, ys = [], []
        for f, t in zip(features, targets):
            i, j = _pairs(t, self.min_separation)
            xs.append(f[i, j])
            ys.append(t[i, j])
        x, y = np.concatenate(xs), np.concatenate(ys)
        self.mean = x.mean(axis=0)
        self.scale = np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
        x = (x - self.mean) / self.scale
        if len(np.unique(y)) < 2:
            raise ValueError("the training proteins hold only one class of pairs; use more proteins")
        import sklearn
        # scikit-learn 1.8 spells the L1 penalty l1_ratio=1 (penalty= is deprecated); older releases need penalty=.
        major_minor = tuple(int(v) for v in sklearn.__version__.split(".")[:2])
        l1 = {"l1_ratio": 1.0} if major_minor >= (1, 8) else {"penalty": "l1"}
        model = LogisticRegression(C=self.C, solver="liblinear", random_state=seed, max_iter=1000, **l1)
        model.fit(x, y)
        self.coefficients = model.coef_[0].astype(np.float64)
        self.intercept = float(model.intercept_[0])
        self.fitted_on = {"proteins": len(xs), "pairs": int(y.size), "contacts": int(y.sum()),
                          "nonzero_coefficients": int(np.count_nonzero(self.coefficients)),
                          "features": int(x.shape[1])}
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        """[L, L] P(contact), symmetric (the features are)."""
        if self.coefficients is None:
            raise ValueError("fit the regression first")
        logits = ((features - self.mean) / self.scale) @ self.coefficients + self.intercept
        return 1.0 / (1.0 + np.exp(-logits))


def protein_features(model: ProteinBertModel, dataset: ProteinnetDataset, indices: Sequence[int]
                     ) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """(features [L, L, layers*heads], contact targets [L, L] with -1 = unknown, length) of each protein."""
    features, targets, lengths = [], [], []
    for index in indices:
        example = dataset[index]
        tokens = torch.as_tensor(example["input_ids"]).long()[None]
        length = tokens.shape[1] - 2
        maps = attention_maps(model, tokens)[0]
        features.append(pair_features(maps, length))
        targets.append(np.asarray(example["targets"]))
        lengths.append(length)
    return features, targets, lengths
