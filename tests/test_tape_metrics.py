"""TAPE metrics against values worked out by hand (contact precision per range) and against scipy (Spearman)."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from tape_tasks import metrics


def _contact_case():
    """Two proteins with hand-placed contact probabilities; every other pair has probability 0 and label 0."""
    L = 30
    prob = np.zeros((L, L))
    label = np.zeros((L, L), dtype=np.int64)
    i, j = np.indices((L, L))
    label[np.abs(i - j) < 6] = -1
    pairs = [  # (i, j, probability, label)    separation
        (0, 6, 0.95, 1),    # 6   short
        (3, 12, 0.90, 0),   # 9   short
        (5, 16, 0.85, 1),   # 11  short
        (0, 12, 0.80, 1),   # 12  medium
        (2, 25, 0.75, 1),   # 23  medium
        (6, 19, 0.72, 1),   # 13  medium
        (4, 20, 0.70, 0),   # 16  medium
        (0, 24, 0.65, 1),   # 24  long
        (1, 29, 0.60, 0),   # 28  long
        (3, 28, 0.55, 0),   # 25  long
        (2, 9, 0.99, -1),   # 7   short, but invalid (-1): never counted
    ]
    for a, b, p, y in pairs:
        prob[a, b] = prob[b, a] = p
        label[a, b] = label[b, a] = y
    L2 = 10
    prob2 = np.zeros((L2, L2))
    label2 = np.zeros((L2, L2), dtype=np.int64)
    i, j = np.indices((L2, L2))
    label2[np.abs(i - j) < 6] = -1
    prob2[1, 8] = prob2[8, 1] = 0.9
    label2[1, 8] = label2[8, 1] = 1
    prob2[0, 9] = prob2[9, 0] = 0.8
    return [prob, prob2], [label, label2], [L, L2]


# Worked by hand from the table above. Protein 1 (L = 30): L/5 = 6 pairs per range, zeros fill the rest (label 0).
#   short:  .95(1) .90(0) .85(1) + 3 zeros                      -> 2/6
#   medium: .80(1) .75(1) .72(1) .70(0) + 2 zeros               -> 3/6
#   long:   .65(1) .60(0) .55(0) + 3 zeros                      -> 1/6
#   medium_long: .80 .75 .72 .70 .65 .60 -> 1 1 1 0 1 0         -> 4/6
#   all:    .95 .90 .85 .80 .75 .72 -> 1 0 1 1 1 1 (.99 is -1)  -> 5/6
# Protein 2 (L = 10): L/5 = 2; all its valid pairs have separation 6-9 (short): .9(1) .8(0) -> 1/2;
# no medium or long pairs, so it adds nothing there. Pooled as TAPE pools: sum(correct) / sum(selected).
EXPECTED_L5 = {"short": 3 / 8, "medium": 3 / 6, "long": 1 / 6, "medium_long": 4 / 6, "all": 6 / 8}


@pytest.mark.parametrize("separation", list(EXPECTED_L5))
def test_precision_at_l5_by_hand(separation):
    probs, labels, lengths = _contact_case()
    correct, selected = metrics.contact_precision(probs, labels, lengths, 5, separation)
    assert correct / selected == pytest.approx(EXPECTED_L5[separation])


def test_precision_at_l2_and_logits_and_names():
    probs, labels, lengths = _contact_case()
    # L/2 = 15 for protein 1 over all ranges: the 10 valid hand-placed pairs (6 contacts) + 5 zeros -> 6/15;
    # protein 2: L/2 = 5 -> .9(1) .8(0) + 3 zeros -> 1/5. Pooled: 7/20.
    logits = [np.stack([np.zeros_like(p), np.log(np.clip(p, 1e-12, None) / np.clip(1 - p, 1e-12, None))], -1)
              for p in probs]
    out = metrics.compute(["precision_at_l2", "precision_at_l5"], logits, labels, lengths,
                          contact_ranges=["all", "long"])
    assert out["precision_at_l2[all 6+]"] == pytest.approx(7 / 20)
    assert out["precision_at_l5[long 24+]"] == pytest.approx(1 / 6)
    assert set(out) == {"precision_at_l2[all 6+]", "precision_at_l2[long 24+]", "precision_at_l5[all 6+]",
                        "precision_at_l5[long 24+]"}
    assert metrics.range_label("short") == "short 6-11" and metrics.range_label("medium") == "medium 12-23"


def test_spearman_equals_scipy_and_the_rank_formula():
    rng = np.random.default_rng(0)
    preds = rng.normal(size=50)
    targets = preds + rng.normal(size=50)
    got = metrics.spearmanr([np.array([p]) for p in preds], [np.array([t]) for t in targets])["spearmanr"]
    assert got == pytest.approx(scipy.stats.spearmanr(preds, targets).statistic, abs=1e-12)
    # Without ties, 1 - 6 sum(d^2) / (n (n^2 - 1)).
    rank_p, rank_t = preds.argsort().argsort(), targets.argsort().argsort()
    n = len(preds)
    assert got == pytest.approx(1 - 6 * ((rank_p - rank_t) ** 2).sum() / (n * (n * n - 1)), abs=1e-12)
    # With ties, average ranks (scipy's definition).
    tied_p, tied_t = np.array([1, 1, 2, 3, 3, 3.0]), np.array([2, 1, 2, 5, 4, 6.0])
    got = metrics.spearmanr(list(tied_p[:, None]), list(tied_t[:, None]))["spearmanr"]
    assert got == pytest.approx(scipy.stats.spearmanr(tied_p, tied_t).statistic, abs=1e-12)


def test_accuracy_ignores_minus_one_and_regression_errors():
    logits = [np.array([[0, 1.0], [2, 0], [0, 3]]), np.array([[5, 0.0], [0, 1]])]
    labels = [np.array([1, 1, -1]), np.array([0, -1])]
    assert metrics.accuracy(logits, labels)["accuracy"] == pytest.approx(2 / 3)
    pooled = [np.array([0.2, 0.9, 0.1]), np.array([0.6, 0.3, 0.1])]
    assert metrics.accuracy(pooled, [np.array(1), np.array(2)])["accuracy"] == pytest.approx(0.5)
    preds, targets = [np.array([1.0]), np.array([3.0])], [np.array([2.0]), np.array([0.0])]
    assert metrics.mse(preds, targets)["mse"] == pytest.approx((1 + 9) / 2)
    assert metrics.mae(preds, targets)["mae"] == pytest.approx((1 + 3) / 2)
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.compute(["precision_at_l3"], preds, targets, [1, 1])
    with pytest.raises(ValueError, match="unknown contact range"):
        metrics.compute(["precision_at_l5"], preds, targets, [1, 1], contact_ranges=["longest"])
