"""Honest masked-LM metrics: the loss where the input was ``<mask>``, apart from where it showed the answer.

BERT's masking (Devlin et al. 2019, section 3.1) predicts 15% of the residues, of which 80% are shown as
``<mask>``, 10% as a random residue and 10% as themselves. The usual MLM loss averages over all three, and the
kept 10% are nearly free: the input shows the residue, so a model that only copies its input and otherwise
guesses the residue frequencies reaches a perplexity well below the unigram one without having learned anything
about proteins. What a protein LM is worth is its prediction where it cannot see the residue, so evaluation reports
per kind of predicted position (``mlm_dataset.prediction_kind``):

* ``masked``: input ``<mask>``, the headline number ("masked-position perplexity", what ESM and ProtTrans report);
* ``randomised``: input a random residue (may by chance be the right one, as in BERT);
* ``kept``: input the residue itself;
* ``all``: the three together (the training objective, what Megatron BERT logs).

Beside each, two context-free baselines on the *same* residues (the labels of those positions):

* ``unigram_train``: cross-entropy of the training set's residue frequencies (add-one smoothed over the residue
  letters), exp'd: what a model that learned only the frequencies would score;
* ``unigram_own``: exp of the entropy of the scored residues' own frequencies: the best any context-free model can
  do on them (an oracle fitted on the very residues it is scored on; always <= ``unigram_train``).

A model has learned something about proteins only when its masked-position perplexity is below both;
``masked_below_unigram_own`` is ``1 - masked_perplexity / masked_unigram_own_perplexity``.

Parallel reduction: the per-token cross-entropy comes from
:func:`~megatron_protein.parallel.tensor_parallel.vocab_parallel_cross_entropy`, already complete (and equal) on
every tensor-parallel rank, so nothing is summed over tp; the totals live on the last pipeline stage and are
broadcast over pp, then summed over dp (each dp rank scored different samples).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_protein.data.mlm_dataset import (IGNORE_INDEX, NUM_SPECIAL_TOKENS, PREDICTED_AS_KEPT,
                                               PREDICTED_AS_MASK, PREDICTED_AS_RANDOM)
from megatron_protein.parallel import scg
from megatron_protein.parallel import tensor_parallel as tp_layers
from megatron_protein.training.logging_utils import perplexity

#: Row of each kind in the totals; row 0 is every predicted position.
KINDS = {"all": 0, "masked": PREDICTED_AS_MASK, "randomised": PREDICTED_AS_RANDOM, "kept": PREDICTED_AS_KEPT}


def training_frequencies(residue_counts: np.ndarray, vocab_size: int) -> np.ndarray:
    """Residue distribution over ``vocab_size`` ids from training counts: add-one over the residue letters (ids
    >= NUM_SPECIAL_TOKENS), zero on special tokens, so every residue a held-out set may hold has a probability."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    n = min(vocab_size, len(residue_counts))
    counts[:n] = np.asarray(residue_counts[:n], dtype=np.float64)
    counts[:NUM_SPECIAL_TOKENS] = 0.0
    counts[NUM_SPECIAL_TOKENS:] += 1.0
    return counts / counts.sum()


class MLMMetrics:
    """Sums, per kind of predicted position, of the cross-entropy, the count and the label histogram.

    ``add`` takes aligned flat (or equally shaped) per-token losses, labels and kinds; positions with kind 0 (not
    predicted) are ignored. ``reduce`` combines the ranks; ``summary`` turns the sums into the reported numbers.
    """

    def __init__(self, vocab_size: int, device: Optional[torch.device] = None):
        self.vocab_size = int(vocab_size)
        self.device = device if device is not None else torch.device("cpu")
        rows = max(KINDS.values()) + 1
        # float64 on purpose: exact integer counts and no drift over many batches
        self.loss_sum = torch.zeros(rows, dtype=torch.float64, device=self.device)
        self.label_counts = torch.zeros(rows, self.vocab_size, dtype=torch.float64, device=self.device)

    @property
    def counts(self) -> torch.Tensor:
        return self.label_counts.sum(dim=1)

    @torch.no_grad()
    def add(self, per_token_loss: torch.Tensor, labels: torch.Tensor, kinds: torch.Tensor) -> None:
        if not (per_token_loss.shape == labels.shape == kinds.shape):
            raise ValueError(f"per-token loss {tuple(per_token_loss.shape)}, labels {tuple(labels.shape)} and "
                             f"prediction kinds {tuple(kinds.shape)} must have the same shape")
        kinds = kinds.reshape(-1).to(self.device)
        predicted = kinds > 0
        if bool((labels.reshape(-1).to(self.device)[predicted] == IGNORE_INDEX).any()):
            raise ValueError("a position marked as predicted has the ignore label -100: kinds and labels disagree")
        kinds = kinds[predicted].long()
        loss = per_token_loss.reshape(-1).to(self.device, torch.float64)[predicted]
        labels = labels.reshape(-1).to(self.device)[predicted].long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.vocab_size):
            raise ValueError(f"label outside the vocabulary [0, {self.vocab_size})")
        for row, selected in ((0, slice(None)), *((k, kinds == k) for k in KINDS.values() if k)):
            self.loss_sum[row] += loss[selected].sum()
            self.label_counts[row] += torch.bincount(labels[selected], minlength=self.vocab_size).double()

    def add_logits(self, logits_shard: torch.Tensor, labels: torch.Tensor, kinds: torch.Tensor,
                   groups: Optional[scg.ParallelGroups] = None) -> torch.Tensor:
        """Score the vocab-parallel logits shard against ``labels`` and add; returns the per-token losses.

        Only the ``vocab_size`` real tokens compete: the rows that pad the vocabulary to a multiple of the tp
        degree (Megatron's ``padded_vocab_size``) are left out of the softmax, as every converted model (TAPE, HF)
        leaves them out, so a converted model scores what the trainer reports (``tests/test_evaluate_mlm.py``)."""
        groups = groups if groups is not None else scg.current()
        shard = logits_shard.shape[-1]
        first_padding = self.vocab_size - groups.rank_in("tp") * shard  # local index of the first padding row
        if first_padding < shard:
            logits_shard = logits_shard.clone()
            logits_shard[..., max(first_padding, 0):] = float("-inf")
        per_token = tp_layers.vocab_parallel_cross_entropy(logits_shard, labels, groups=groups,
                                                           ignore_index=IGNORE_INDEX)
        self.add(per_token.detach(), labels, kinds)
        return per_token

    def reduce(self, groups: scg.ParallelGroups) -> "MLMMetrics":
        """Make the totals global on every rank: broadcast from the last pp stage, sum over dp. In place."""
        flat = torch.cat([self.loss_sum[:, None], self.label_counts], dim=1)
        if groups.group("pp") is not None:
            dist.broadcast(flat, src=groups.ranks("pp")[-1], group=groups.group("pp"))
        if groups.group("dp") is not None:
            dist.all_reduce(flat, group=groups.group("dp"))
        self.loss_sum.copy_(flat[:, 0])
        self.label_counts.copy_(flat[:, 1:])
        return self

    def summary(self, train_frequencies: Optional[np.ndarray] = None) -> dict[str, float]:
        """``{kind}_loss``, ``{kind}_perplexity``, ``{kind}_tokens``, ``{kind}_unigram_own_perplexity`` and (with
        training frequencies) ``{kind}_unigram_train_perplexity`` for kind in all/masked/randomised/kept, plus
        ``masked_below_unigram_own`` (and ``_train``): the fraction by which the masked-position perplexity is
        below the baseline. ``loss``/``perplexity``/``tokens`` repeat the all-positions numbers."""
        out: dict[str, float] = {}
        counts = self.label_counts.cpu().numpy()
        sums = self.loss_sum.cpu().numpy()
        log_q = None
        if train_frequencies is not None:
            q = np.asarray(train_frequencies, dtype=np.float64)
            if q.shape != (self.vocab_size,):
                raise ValueError(f"training frequencies have shape {q.shape}, expected ({self.vocab_size},)")
            with np.errstate(divide="ignore"):
                log_q = np.log(q)
        for name, row in KINDS.items():
            n = counts[row].sum()
            loss = float(sums[row] / n) if n else float("nan")
            out[f"{name}_loss"] = loss
            out[f"{name}_perplexity"] = perplexity(loss)
            out[f"{name}_tokens"] = int(n)
            if n:
                p = counts[row][counts[row] > 0] / n
                out[f"{name}_unigram_own_perplexity"] = math.exp(float(-(p * np.log(p)).sum()))
            else:
                out[f"{name}_unigram_own_perplexity"] = float("nan")
            if log_q is not None:
                seen = counts[row] > 0
                cross = float(-(counts[row][seen] * log_q[seen]).sum() / n) if n else float("nan")
                out[f"{name}_unigram_train_perplexity"] = perplexity(cross)
        out["loss"], out["perplexity"], out["tokens"] = out["all_loss"], out["all_perplexity"], out["all_tokens"]
        for baseline in ("own", "train"):
            key = f"masked_unigram_{baseline}_perplexity"
            if key in out:
                out[f"masked_below_unigram_{baseline}"] = 1.0 - out["masked_perplexity"] / out[key]
        return out
