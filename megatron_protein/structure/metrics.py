"""Structure-comparison metrics on C-alpha coordinates: lDDT-CA, TM-score, GDT-TS/GDT-HA, RMSD.

Every function takes the prediction and the reference as ``[L, 3]`` arrays whose rows correspond (residue ``i`` of
one is residue ``i`` of the other) and an optional ``mask [L]`` of pairs to use (1 where both have a CA). Matching
residues of two files is the caller's job (:mod:`megatron_protein.structure.scoring`). Units: Angstrom.

Definitions (see ``docs/structure.md`` for the references each was checked against):

* **lDDT-CA** (Mariani et al. 2013, as AlphaFold2 computes it, supplement 1.9.6 / Algorithm 29's target and
  ``lddt.py``): for every pair (i, j), i != j, whose *reference* distance is below 15 A, the fraction of the
  thresholds 0.5, 1, 2, 4 A that the absolute difference between predicted and reference distance stays below;
  averaged over the pairs of a residue (per residue) or over all pairs (global). Superposition-free.
* **TM-score** (Zhang & Skolnick 2004): ``max over superpositions of 1/L_ref * sum_i 1 / (1 + (d_i / d0)^2)``,
  ``d0 = 1.24 (L_ref - 15)^(1/3) - 1.8`` (0.5 for L_ref <= 21, never below 0.5). The maximum is searched as the
  TM-score program does: superpositions of contiguous fragments of L, L/2, L/4, ... 4 aligned residues (every
  start) as seeds, each refined up to 20 times by re-superposing on the pairs closer than ``d0_search - 1``
  (first step) and then ``d0_search + 1`` (``d0_search`` = d0 clipped to [4.5, 8]).
* **GDT-TS / GDT-HA** (Zemla 2003, LGA): mean over the cutoffs (1, 2, 4, 8 A) / (0.5, 1, 2, 4 A) of the largest
  fraction of reference residues within the cutoff under any superposition, searched per cutoff from the same
  fragment seeds (plus the all-residue and TM-score superpositions), refined on the pairs within the cutoff.
* **RMSD**: root-mean-square deviation after the optimal (Kabsch 1976) superposition of all masked pairs.

A batched torch lDDT-CA (:func:`lddt_ca_torch`) serves as the pLDDT head's target (supplement 1.9.6).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

LDDT_CUTOFF = 15.0
LDDT_THRESHOLDS = (0.5, 1.0, 2.0, 4.0)
GDT_TS_CUTOFFS = (1.0, 2.0, 4.0, 8.0)
GDT_HA_CUTOFFS = (0.5, 1.0, 2.0, 4.0)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def _pairs(pred, true, mask) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 2 or pred.shape[-1] != 3:
        raise ValueError(f"expected two [L, 3] coordinate arrays of the same shape, got {pred.shape} and {true.shape}")
    if mask is None:
        mask = np.ones(pred.shape[0], dtype=bool)
    mask = np.asarray(mask).astype(bool).reshape(-1)
    if mask.shape[0] != pred.shape[0]:
        raise ValueError(f"mask has {mask.shape[0]} entries for {pred.shape[0]} residues")
    return pred, true, mask


def tm_d0(reference_length: int) -> float:
    """Zhang & Skolnick's distance scale ``d0 = 1.24 (L - 15)^(1/3) - 1.8``, at least 0.5 (the TM-score
    program uses 0.5 for L <= 21, where the formula drops below it)."""
    if reference_length <= 21:
        return 0.5
    return max(0.5, 1.24 * (reference_length - 15) ** (1.0 / 3.0) - 1.8)


def kabsch(mobile: np.ndarray, target: np.ndarray, weights: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Rotation ``R [3, 3]`` and translation ``t [3]`` minimising ``sum_i w_i |R x_i + t - y_i|^2`` (Kabsch 1976),
    a proper rotation (det +1). ``mobile``/``target`` ``[L, 3]``, ``weights [L]`` (default all 1)."""
    x, y = np.asarray(mobile, np.float64), np.asarray(target, np.float64)
    if weights is not None:
        rot, trans = _kabsch_batched(x, y, np.asarray(weights, dtype=np.float64)[None])
        return rot[0], trans[0]
    cx, cy = x.mean(0), y.mean(0)
    u, _, vt = np.linalg.svd((x - cx).T @ (y - cy))
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return rot, cy - rot @ cx


def _kabsch_batched(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Kabsch for one pair of point sets ``x, y [L, 3]`` under many weightings ``w [B, L]``: ``R [B,3,3]``, ``t [B,3]``."""
    wsum = np.maximum(w.sum(-1), 1e-12)[:, None]  # [B, 1]
    cx = (w @ x) / wsum  # [B, 3]
    cy = (w @ y) / wsum
    # H = sum_i w_i (x_i - cx)(y_i - cy)^T = sum_i w_i x_i y_i^T - wsum cx cy^T
    xy = (x[:, :, None] * y[:, None, :]).reshape(len(x), 9)  # one GEMM for all B covariances
    h = (w @ xy).reshape(-1, 3, 3) - wsum[:, :, None] * cx[:, :, None] * cy[:, None, :]
    u, _, vt = np.linalg.svd(h)
    # R = V diag(1, 1, sign(det(V U^T))) U^T
    det = np.sign(np.linalg.det(vt.transpose(0, 2, 1) @ u.transpose(0, 2, 1)))
    det[det == 0] = 1.0
    vt = vt.copy()
    vt[:, 2, :] *= det[:, None]
    rot = vt.transpose(0, 2, 1) @ u.transpose(0, 2, 1)
    trans = cy - np.einsum("bij,bj->bi", rot, cx)
    return rot, trans


def _transform(rot: np.ndarray, trans: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``R_b x_l + t_b`` for ``rot [B,3,3]``, ``trans [B,3]``, ``x [L,3]`` -> ``[B, L, 3]``."""
    return x[None] @ rot.transpose(0, 2, 1) + trans[:, None, :]


def _sq_dists(rot: np.ndarray, trans: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``|R_b x_l + t_b - y_l|^2 -> [B, L]`` as one GEMM ``[B, 15] @ [15, L]``.

    Expanded with ``|R x|^2 = |x|^2``: ``|x|^2 + |y|^2 + |t|^2 - 2 vec(R).(y (x) x) + 2 (R^T t).x - 2 t.y``. The
    search centres both point sets first, so the cancellation costs ~1e-13 A^2 in float64."""
    b = rot.shape[0]
    left = np.concatenate([rot.reshape(b, 9), np.einsum("bji,bj->bi", rot, trans), trans], axis=1)  # [B, 15]
    right = np.concatenate([-2.0 * (y[:, :, None] * x[:, None, :]).reshape(len(x), 9), 2.0 * x, -2.0 * y], axis=1)
    d2 = left @ right.T
    d2 += ((x * x).sum(-1) + (y * y).sum(-1))[None, :]
    d2 += (trans * trans).sum(-1)[:, None]
    return np.maximum(d2, 0.0)


def superpose(mobile: np.ndarray, target: np.ndarray, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """``mobile`` moved onto ``target`` by the Kabsch superposition of the masked pairs (all rows moved)."""
    mobile, target, mask = _pairs(mobile, target, mask)
    rot, trans = kabsch(mobile[mask], target[mask])
    return mobile @ rot.T + trans


# ----------------------------------------------------------------------------------------------------------------
# RMSD
# ----------------------------------------------------------------------------------------------------------------


def rmsd(pred: np.ndarray, true: np.ndarray, mask: Optional[np.ndarray] = None, superpose_first: bool = True) -> float:
    """CA RMSD [A] over the masked pairs, after the Kabsch superposition of those pairs (unless told not to)."""
    pred, true, mask = _pairs(pred, true, mask)
    p, t = pred[mask], true[mask]
    if len(p) == 0:
        return float("nan")
    if superpose_first:
        rot, trans = kabsch(p, t)
        p = p @ rot.T + trans
    return float(np.sqrt(np.mean(np.sum((p - t) ** 2, axis=-1))))


# ----------------------------------------------------------------------------------------------------------------
# lDDT-CA
# ----------------------------------------------------------------------------------------------------------------


def lddt_ca(
    pred: np.ndarray,
    true: np.ndarray,
    mask: Optional[np.ndarray] = None,
    per_residue: bool = False,
    cutoff: float = LDDT_CUTOFF,
    thresholds: Sequence[float] = LDDT_THRESHOLDS,
    pred_mask: Optional[np.ndarray] = None,
    min_separation: int = 1,
    max_separation: Optional[int] = None,
):
    """lDDT on CA atoms as AlphaFold2 defines it (see the module docstring); numpy.

    ``min_separation`` / ``max_separation`` (positions along the arrays, inclusive; default every pair) restrict
    the scored pairs to a band of sequence separation, to tell local geometry (``|i - j| < 12``) from the
    arrangement of distant parts of the chain (``|i - j| >= 12``): not part of the standard score, which is the
    default.

    Pairs are scored where the reference has both atoms (``mask``) and their reference distance is below
    ``cutoff``. ``pred_mask`` (default: all present) marks predicted atoms that exist; a scored pair with a
    missing predicted atom counts as not preserved (as OpenStructure's lDDT treats missing model atoms). Returns
    the global score (mean over all scored pairs) or, with ``per_residue``, ``[L]`` scores (mean over the pairs of
    each residue; NaN for a residue with no scored pair, where AF2's ``eps`` convention would give 1). Global is
    NaN when no pair is scored.
    """
    pred, true, mask = _pairs(pred, true, mask)
    present = np.ones(len(pred), dtype=bool) if pred_mask is None else np.asarray(pred_mask).astype(bool)
    pred = np.where(present[:, None], pred, np.nan)  # NaN distances fail every threshold
    score_sum, n_pairs = _lddt_sums(pred, true, mask, cutoff, thresholds, min_separation, max_separation)
    if per_residue:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n_pairs > 0, score_sum / np.maximum(n_pairs, 1), np.nan)
    total = n_pairs.sum()
    return float(score_sum.sum() / total) if total > 0 else float("nan")


def _lddt_sums(pred, true, mask, cutoff, thresholds, min_separation=1, max_separation=None):
    d_true = np.sqrt(((true[:, None, :] - true[None, :, :]) ** 2).sum(-1))
    d_pred = np.sqrt(((pred[:, None, :] - pred[None, :, :]) ** 2).sum(-1))
    scored = (d_true < cutoff) & mask[:, None] & mask[None, :]
    np.fill_diagonal(scored, False)
    if min_separation > 1 or max_separation is not None:
        index = np.arange(len(true))
        separation = np.abs(index[:, None] - index[None, :])
        scored &= separation >= min_separation
        if max_separation is not None:
            scored &= separation <= max_separation
    with np.errstate(invalid="ignore"):
        dev = np.abs(d_true - d_pred)
        frac = np.mean([dev < t for t in thresholds], axis=0)
    return (frac * scored).sum(-1), scored.sum(-1)


def radius_of_gyration(x: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """Root mean square distance of the (masked) points ``[L, 3]`` from their centroid, in the points' unit. The
    ratio of a prediction's to the reference's says whether a predicted chain is collapsed (< 1) or too extended
    (> 1), which neither lDDT nor TM-score shows by itself."""
    x = np.asarray(x, dtype=np.float64)
    keep = np.ones(len(x), dtype=bool) if mask is None else np.asarray(mask).astype(bool)
    if not keep.any():
        return float("nan")
    x = x[keep]
    return float(np.sqrt(((x - x.mean(0)) ** 2).sum(-1).mean()))


def lddt_ca_torch(pred_ca, true_ca, mask, per_residue: bool = True, cutoff: float = LDDT_CUTOFF, eps: float = 1e-10):
    """Batched lDDT-CA in torch, AlphaFold2's formula exactly (the pLDDT head's target, supplement 1.9.6).

    ``pred_ca, true_ca [B, L, 3]``, ``mask [B, L]`` (1 where the reference has a CA). Returns ``[B, L]`` (per
    residue) or ``[B]``. As in AF2's ``lddt``: distances carry ``sqrt(eps + d^2)``, pairs need a reference distance
    below ``cutoff`` and both ends in ``mask``, self pairs are excluded, and the per-residue score is
    ``(eps + sum score) / (eps + n_pairs)``, so a residue with no scored pair gets 1 (masked rows are expected to be
    masked out of the loss by the caller). Computed in fp32 (fp64 kept) whatever the input dtype; the result is a
    step function of the coordinates, so its gradient is zero: use it as a target (it is returned detached).
    """
    import torch

    with torch.no_grad():
        dtype = torch.float64 if true_ca.dtype == torch.float64 else torch.float32
        pred = pred_ca.to(dtype)
        true = true_ca.to(dtype)
        m = mask.to(dtype)
        d_true = torch.sqrt(eps + ((true[..., :, None, :] - true[..., None, :, :]) ** 2).sum(-1))
        d_pred = torch.sqrt(eps + ((pred[..., :, None, :] - pred[..., None, :, :]) ** 2).sum(-1))
        n = true.shape[-2]
        eye = torch.eye(n, dtype=dtype, device=true.device)
        scored = (d_true < cutoff).to(dtype) * m[..., :, None] * m[..., None, :] * (1.0 - eye)
        dev = torch.abs(d_true - d_pred)
        score = 0.25 * sum((dev < t).to(dtype) for t in LDDT_THRESHOLDS)
        dims = (-1,) if per_residue else (-2, -1)
        norm = 1.0 / (eps + scored.sum(dim=dims))
        return norm * (eps + (scored * score).sum(dim=dims))


# ----------------------------------------------------------------------------------------------------------------
# TM-score and GDT: the fragment-seeded superposition search of the TM-score program
# ----------------------------------------------------------------------------------------------------------------


def _fragment_lengths(n_aligned: int) -> list:
    """Seed fragment lengths L, L/2, L/4, ... down to 4 (at most 6 lengths), as TM-score's search uses."""
    min_len = min(4, n_aligned)
    lengths = []
    for i in range(5):
        length = int(n_aligned / 2**i)
        if length <= min_len:
            lengths.append(min_len)
            break
        lengths.append(length)
    else:
        lengths.append(min_len)
    return lengths


def _fragment_weights(n_aligned: int, step: int) -> np.ndarray:
    """``[B, n]`` 0/1 weights, one row per seed fragment (contiguous in the aligned pairs)."""
    rows = []
    for length in _fragment_lengths(n_aligned):
        last = n_aligned - length
        starts = list(range(0, last + 1, step))
        if starts[-1] != last:
            starts.append(last)
        for s in starts:
            w = np.zeros(n_aligned)
            w[s : s + length] = 1.0
            rows.append(w)
    rows = np.stack(rows)
    return rows[_unique_rows(rows.astype(bool))]


def _select(d2: np.ndarray, cut, min_pairs: int = 3) -> np.ndarray:
    """Pairs with ``d < cut`` (a scalar or one cut per row); where fewer than ``min_pairs`` qualify, relax that
    row's cut by 0.5 A until they do (TM-score's ``score_fun8``)."""
    cut = np.broadcast_to(np.asarray(cut, dtype=np.float64), d2.shape[:1])[:, None]
    sel = d2 < cut * cut
    n = d2.shape[-1]
    if n <= min_pairs:
        return np.ones_like(sel)
    inc = 0
    short = sel.sum(-1) < min_pairs
    while short.any():
        inc += 1
        relaxed = cut[short] + 0.5 * inc
        sel[short] = d2[short] < relaxed * relaxed
        short = sel.sum(-1) < min_pairs
    return sel


_ROW_HASH = np.random.default_rng(20261201).uniform(1.0, 2.0, size=4096)


def _unique_rows(sel: np.ndarray, groups: Optional[np.ndarray] = None) -> np.ndarray:
    """Indices of the distinct rows of a boolean ``[B, n]`` selection (within each group, if given).

    Rows are told apart by a random subset-sum hash (one GEMV with random weights in [1, 2)), which is far cheaper
    than sorting the rows; two different subsets would need equal float sums to collide, and a collision would
    only drop a seed."""
    n = sel.shape[1]
    weights = _ROW_HASH[:n] if n <= len(_ROW_HASH) else np.resize(_ROW_HASH, n) * (1 + np.arange(n) / n)
    keys = sel.astype(np.float64) @ weights
    if groups is not None:
        keys = keys + groups.astype(np.float64) * (4.0 * n)  # groups far apart
    _, first = np.unique(keys, return_index=True)
    return np.sort(first)


@dataclass
class Superposition:
    """``x' = rotation @ x + translation`` moves the prediction onto the reference."""

    rotation: np.ndarray
    translation: np.ndarray


def _one_blas_thread(fn):
    """Run ``fn`` with BLAS limited to one thread: the search is thousands of [B, L] x [L, 9] GEMMs, where
    threads only add synchronisation (6-8x slower with two threads on a loaded 2-core machine)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper


def _search(x, y, objective, select, seeds_w, groups=None, n_groups=1, n_iter=20):
    """Best value of ``objective(d2, groups) -> [B]`` per group, over the seed superpositions and their refinements.

    Each seed (a weighting of the aligned pairs, in group ``groups[b]``, e.g. one group per GDT cutoff) is
    superposed (Kabsch), scored, and refined ``n_iter`` times by re-superposing on ``select(d2, iteration,
    groups)``. Refinement of a seed whose selection no longer changes is idempotent, so running every seed for all
    ``n_iter`` steps gives the same maximum as the program's early exit; seeds of a group whose selections
    coincide are merged, which is what makes the exhaustive seeding affordable in numpy. Returns ``(values
    [n_groups], [(R, t)] per group)``.
    """
    # Centre both sets (distances do not change; returned translations are mapped back below).
    cx, cy = x.mean(0), y.mean(0)
    x, y = x - cx, y - cy
    groups_all = np.zeros(len(seeds_w), dtype=np.int64) if groups is None else np.asarray(groups, np.int64)
    best_val = np.full(n_groups, -np.inf)
    best_rt = [None] * n_groups
    chunk = max(64, int(4e6 // max(1, x.shape[0])))  # ~32 MB per [chunk, L] float64 array
    for start in range(0, len(seeds_w), chunk):
        w = seeds_w[start : start + chunk]
        g = groups_all[start : start + chunk]
        for it in range(n_iter + 1):
            rot, trans = _kabsch_batched(x, y, w)
            d2 = _sq_dists(rot, trans, x, y)
            val = objective(d2, g)
            order = np.lexsort((-val, g))  # per group, the best row first
            heads = order[np.r_[True, g[order][1:] != g[order][:-1]]]
            for b in heads:
                if val[b] > best_val[g[b]]:
                    best_val[g[b]], best_rt[g[b]] = float(val[b]), (rot[b], trans[b])
            if it < n_iter:
                sel = select(d2, it, g)
                keep = _unique_rows(sel, g)
                new_w, new_g = sel[keep].astype(np.float64), g[keep]
                if new_w.shape == w.shape and np.array_equal(new_w, w):
                    break
                w, g = new_w, new_g
    # x' = R (x - cx) + t + cy = R x + (t + cy - R cx)
    best_rt = [None if rt is None else (rt[0], rt[1] + cy - rt[0] @ cx) for rt in best_rt]
    return best_val, best_rt


@_one_blas_thread
def tm_score(
    pred: np.ndarray,
    true: np.ndarray,
    mask: Optional[np.ndarray] = None,
    reference_length: Optional[int] = None,
    step: int = 1,
    return_superposition: bool = False,
):
    """TM-score of ``pred`` against ``true`` (see the module docstring), normalised by ``reference_length``.

    ``reference_length`` defaults to the number of masked pairs; pass the number of residues of the reference
    chain when some of them have no partner in the prediction (they then count as 0). ``step`` is the spacing of
    seed fragment starts (1 as in the TM-score program; larger is faster and may find a slightly lower maximum).
    With ``return_superposition`` returns ``(score, Superposition)``.
    """
    pred, true, mask = _pairs(pred, true, mask)
    x, y = pred[mask], true[mask]
    l_ref = int(reference_length) if reference_length is not None else len(x)
    if len(x) == 0 or l_ref == 0:
        return (0.0, None) if return_superposition else 0.0
    d0 = tm_d0(l_ref)
    d0_search = min(max(d0, 4.5), 8.0)
    if len(x) < 3:  # no unique superposition: TM-score of the best possible, one pair at distance 0 each
        score = len(x) / l_ref
        return (score, None) if return_superposition else score

    def objective(d2, groups):
        return (1.0 / (1.0 + d2 / (d0 * d0))).sum(-1) / l_ref

    # TM-score's search: the pairs closer than d0_search - 1 after the seed's superposition, then d0_search + 1.
    seeds = _fragment_weights(len(x), step)
    vals, rts = _search(
        x, y, objective, lambda d2, it, g: _select(d2, d0_search - 1.0 if it == 0 else d0_search + 1.0), seeds
    )
    val, (rot, trans) = float(vals[0]), rts[0]
    if return_superposition:
        return val, Superposition(rot, trans)
    return val


@_one_blas_thread
def gdt_fractions(
    pred: np.ndarray,
    true: np.ndarray,
    mask: Optional[np.ndarray] = None,
    cutoffs: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0),
    reference_length: Optional[int] = None,
    step: int = 1,
) -> Dict[float, float]:
    """``{cutoff: largest fraction of the reference_length residues within cutoff under one superposition}``.

    Searched per cutoff from the TM-score fragment seeds, the all-residue superposition and the pairs within 5 A
    under the TM-score superposition, each refined on the pairs within the cutoff (LGA's GDT iteration, TM-score's
    seeding); the TM-score superposition itself also counts as a candidate.
    """
    pred, true, mask = _pairs(pred, true, mask)
    x, y = pred[mask], true[mask]
    l_ref = int(reference_length) if reference_length is not None else len(x)
    if len(x) == 0 or l_ref == 0:
        return {float(c): 0.0 for c in cutoffs}
    if len(x) < 3:
        return {float(c): len(x) / l_ref for c in cutoffs}
    seeds = [_fragment_weights(len(x), step), np.ones((1, len(x)))]
    _, sup = tm_score(pred, true, mask, reference_length=l_ref, step=step, return_superposition=True)
    if sup is not None:
        d2 = ((x @ sup.rotation.T + sup.translation - y) ** 2).sum(-1)
        seeds.append(_select(d2[None], 5.0).astype(np.float64))
    seeds = np.concatenate(seeds)
    # One batched search for all cutoffs: group k refines on (and counts) the pairs within cutoff k.
    cuts = np.array(sorted(set(float(c) for c in cutoffs)))
    groups = np.repeat(np.arange(len(cuts)), len(seeds))
    counts, _ = _search(
        x, y,
        lambda d2, g: (d2 < (cuts[g] ** 2)[:, None]).sum(-1).astype(np.float64),
        lambda d2, it, g: _select(d2, cuts[g]),
        np.tile(seeds, (len(cuts), 1)), groups, len(cuts),
    )
    if sup is not None:  # the TM-score superposition itself is a candidate too
        counts = np.maximum(counts, [(d2 < c * c).sum() for c in cuts])
    return {float(c): float(n) / l_ref for c, n in zip(cuts, counts)}


def gdt(
    pred: np.ndarray,
    true: np.ndarray,
    mask: Optional[np.ndarray] = None,
    cutoffs: Sequence[float] = GDT_TS_CUTOFFS,
    reference_length: Optional[int] = None,
    step: int = 1,
) -> float:
    """Mean over ``cutoffs`` of :func:`gdt_fractions` (GDT-TS with the default cutoffs)."""
    fractions = gdt_fractions(pred, true, mask, cutoffs, reference_length, step)
    return float(np.mean([fractions[float(c)] for c in cutoffs]))


def gdt_ts_ha(pred, true, mask=None, reference_length=None, step: int = 1) -> Tuple[float, float]:
    """(GDT-TS, GDT-HA) from one search over the five cutoffs 0.5, 1, 2, 4, 8 A."""
    f = gdt_fractions(pred, true, mask, (0.5, 1.0, 2.0, 4.0, 8.0), reference_length, step)
    return (float(np.mean([f[c] for c in GDT_TS_CUTOFFS])), float(np.mean([f[c] for c in GDT_HA_CUTOFFS])))


def gdt_ts(pred, true, mask=None, reference_length=None, step: int = 1) -> float:
    """GDT-TS: cutoffs 1, 2, 4, 8 A."""
    return gdt(pred, true, mask, GDT_TS_CUTOFFS, reference_length, step)


def gdt_ha(pred, true, mask=None, reference_length=None, step: int = 1) -> float:
    """GDT-HA (high accuracy): cutoffs 0.5, 1, 2, 4 A."""
    return gdt(pred, true, mask, GDT_HA_CUTOFFS, reference_length, step)
