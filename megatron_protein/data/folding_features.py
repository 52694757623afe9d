"""AlphaFold2 input features and training targets for one chain (numpy, unbatched).

The pipeline of the AlphaFold2 supplementary information, sections 1.2 and 1.3, in the order AlphaFold2 applies it
to one training example (its ``ensembled`` transforms, one ensemble member):

1. Sequence and MSA features (1.2.9, Table 1): ``aatype``, ``residue_index``, ``seq_mask``, ``seq_length``;
   ``msa`` (query first, identical rows removed), ``deletion_matrix``, ``msa_mask``.
2. Targets: ``all_atom_positions``/``all_atom_mask`` (atom37), ``backbone_rigid_tensor``/``backbone_rigid_mask``
   (the frame of N, CA, C by Algorithm 21, through :class:`megatron_protein.structure.rigid.Rigid`),
   ``pseudo_beta``/``pseudo_beta_mask`` (CB, CA for glycine; used by the distogram, 1.9.8).
3. MSA sampling and clustering (1.2.7; Algorithm 1, MSABlockDeletion, is not built): the query stays row 0; the
   other rows are shuffled; the first ``max_msa_clusters`` rows are the cluster centres; the rest is the extra MSA.
4. Masked MSA (1.2.7, BERT-style): 15% of the centres' entries are replaced; a replaced entry becomes the mask
   token (22) with probability 0.7, a uniformly random amino acid with 0.1, a residue drawn from the MSA's profile
   with 0.1, and stays unchanged with 0.1. ``true_msa`` keeps the originals, ``bert_mask`` marks the replaced
   entries (the masked-MSA loss is taken there).
5. Cluster assignment (1.2.7): every extra sequence joins the centre with which it agrees at the most positions,
   counting matching residues (amino acids and X) and ignoring gaps and the mask token (AlphaFold2's
   ``nearest_neighbor_clusters`` with gap agreement weight 0; ties go to the lower row, so the query wins them).
   ``cluster_profile`` is the mean one-hot (23 classes) of a centre and its members, ``cluster_deletion_mean`` the
   mean deletion count (``summarize_clusters``).
6. The extra MSA is cut to ``max_extra_msa`` rows (a random subset: its order is already random).
7. ``msa_feat`` [N_clust, L, 49] = one-hot of the (masked) centre (23), has_deletion (1), deletion_value =
   2/pi * arctan(d / 3) (1), cluster_profile (23), deletion_mean_value = 2/pi * arctan(mean / 3) (1);
   ``target_feat`` [L, 22] = between-segment-residue flag (channel 0, always 0 for one chain) then the one-hot of
   ``aatype`` with X (channels 1-21), AlphaFold2's order (``make_msa_feat``); extra MSA: ``extra_msa``,
   ``extra_has_deletion``, ``extra_deletion_value``, ``extra_msa_mask``.
8. Training crop (1.2.8 / 1.11.3): a random contiguous window of ``crop_size`` residues, the same window for every
   per-residue feature, every MSA column and every target (:func:`crop_features`).

Sequence profiles (an addition of this project; AlphaFold2 has none). A chain may come with a profile
(``[L, 20]`` residue frequencies in restype order, e.g. the HHblits-derived profiles of ``chains.npz``). It is
offered two ways: the ``profile`` feature (``[L, 20]``, with ``profile_mask`` [L]) for a model that embeds it, and,
when the MSA holds only the query (single-sequence mode), as the query cluster's ``cluster_profile`` (channels
0-19 of that block; X, gap and mask 0), because a cluster profile is the residue distribution of a cluster's
homologues, which is what the profile estimates, so the AlphaFold2 input path carries it with no new weights.
With probability ``profile_dropout`` a training example is sequence-only: its MSA is cut to the query row and it
gets no profile (``profile`` zeros, ``profile_mask`` 0, the query's cluster profile its one-hot), exactly what
``folding/predict.py --fasta`` gives the model without an MSA, so the model also learns to fold from the sequence
alone. See docs/folding_data.md.

Every random choice takes a ``numpy.random.Generator``: the same generator state gives the same example.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Dict, Mapping, Optional

import numpy as np

from megatron_protein.structure import residue_constants as rc

Features = Dict[str, np.ndarray]

MSA_CLASSES = rc.msa_num_classes  # 23: 20 amino acids, X, gap, mask
MSA_FEAT_DIM = 49
TARGET_FEAT_DIM = 22
EXTRA_MSA_FEAT_DIM = 25  # one-hot 23 + has_deletion + deletion_value, assembled by the model
#: Channel slices of ``msa_feat`` (supplement 1.2.9, Table 1).
MSA_FEAT_CHANNELS = {
    "cluster_msa": slice(0, 23),
    "has_deletion": slice(23, 24),
    "deletion_value": slice(24, 25),
    "cluster_profile": slice(25, 48),
    "deletion_mean_value": slice(48, 49),
}
#: Channel slices of ``target_feat``: the between-segment flag first, then the 21-class aatype one-hot.
TARGET_FEAT_CHANNELS = {"between_segment_residues": slice(0, 1), "aatype": slice(1, 22)}

#: Features with a residue axis, and which axis it is (everything else has none). Cropping and padding use it.
RESIDUE_AXIS = {
    "aatype": 0, "residue_index": 0, "seq_mask": 0, "target_feat": 0,
    "all_atom_positions": 0, "all_atom_mask": 0, "backbone_rigid_tensor": 0, "backbone_rigid_mask": 0,
    "pseudo_beta": 0, "pseudo_beta_mask": 0, "profile": 0, "profile_mask": 0,
    "msa": 1, "deletion_matrix": 1, "msa_mask": 1, "msa_feat": 1, "true_msa": 1, "bert_mask": 1,
    "extra_msa": 1, "extra_has_deletion": 1, "extra_deletion_value": 1, "extra_msa_mask": 1,
}
#: Features with an MSA-row axis (axis 0): the cluster centres and the extra MSA.
CLUSTER_ROW_KEYS = ("msa", "deletion_matrix", "msa_mask", "msa_feat", "true_msa", "bert_mask")
EXTRA_ROW_KEYS = ("extra_msa", "extra_has_deletion", "extra_deletion_value", "extra_msa_mask")
#: Extra-MSA rows one-hot encoded at a time in clustering (bounds the temporaries for deep MSAs).
EXTRA_CHUNK = 1024


@dataclass(frozen=True)
class FeatureConfig:
    """Sizes and rates of the feature pipeline. Defaults are AlphaFold2's initial training (supplement 1.11.3,
    Table 4: crop 256, 128 cluster centres, 1024 extra sequences; 1.2.7: masked MSA 15%, 10/10/10/70)."""
    crop_size: int = 256
    max_msa_clusters: int = 128
    max_extra_msa: int = 1024
    #: Rows kept from the MSA (after removing identical rows) before sampling; None keeps all.
    max_msa_sequences: Optional[int] = None
    masked_msa_fraction: float = 0.15
    masked_msa_uniform_prob: float = 0.1
    masked_msa_profile_prob: float = 0.1
    masked_msa_same_prob: float = 0.1
    #: Emit ``profile``/``profile_mask`` (zeros when the chain has none).
    use_profile: bool = True
    #: In single-sequence mode, put the chain's profile into the query cluster's ``cluster_profile``.
    profile_in_cluster_profile: bool = True
    #: Probability that a training example gets no profile at all (sequence-only training).
    profile_dropout: float = 0.2

    def __post_init__(self):
        rates = self.masked_msa_uniform_prob + self.masked_msa_profile_prob + self.masked_msa_same_prob
        if not 0.0 <= rates <= 1.0 or not 0.0 <= self.masked_msa_fraction <= 1.0:
            raise ValueError("masked-MSA probabilities must lie in [0, 1] and sum to at most 1")
        if not 0.0 <= self.profile_dropout <= 1.0:
            raise ValueError(f"profile_dropout={self.profile_dropout}: expected a probability in [0, 1]")
        if self.crop_size < 1 or self.max_msa_clusters < 1 or self.max_extra_msa < 0:
            raise ValueError("crop_size and max_msa_clusters must be >= 1, max_extra_msa >= 0")

    @classmethod
    def from_dict(cls, values: Mapping) -> "FeatureConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown feature settings {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(**values)


# ---------------------------------------------------------------------------------------------------- basics
def one_hot(indices: np.ndarray, classes: int) -> np.ndarray:
    return np.eye(classes, dtype=np.float32)[indices]


def deletion_value(deletions: np.ndarray) -> np.ndarray:
    """AlphaFold2's squashing of deletion counts into [0, 1): 2/pi * arctan(d / 3) (supplement 1.2.9)."""
    return (np.arctan(np.asarray(deletions, np.float32) / 3.0) * (2.0 / math.pi)).astype(np.float32)


def sequence_features(sequence: str, residue_index: Optional[np.ndarray] = None) -> Features:
    """``aatype`` int64 [L] (restype order, X = 20), ``residue_index`` int64 [L] (default 0..L-1),
    ``seq_mask`` float32 [L] (ones), ``seq_length`` int64 []."""
    aatype = rc.sequence_to_aatype(sequence)
    length = len(aatype)
    if residue_index is None:
        residue_index = np.arange(length)
    residue_index = np.asarray(residue_index, dtype=np.int64)
    if residue_index.shape != (length,):
        raise ValueError(f"residue_index has shape {residue_index.shape}; expected ({length},)")
    return {"aatype": aatype, "residue_index": residue_index, "seq_mask": np.ones(length, np.float32),
            "seq_length": np.array(length, dtype=np.int64)}


def msa_features(msa, max_sequences: Optional[int] = None) -> Features:
    """``msa`` int64 [N, L], ``deletion_matrix`` float32 [N, L], ``msa_mask`` float32 [N, L] from an
    :class:`~megatron_protein.data.msa.Msa`: identical rows removed (first kept, query first), then at most
    ``max_sequences`` rows."""
    msa = msa.deduplicate()
    if max_sequences is not None:
        msa = msa.truncate(max_sequences)
    return {"msa": msa.msa.astype(np.int64), "deletion_matrix": msa.deletion_matrix.astype(np.float32),
            "msa_mask": np.ones(msa.msa.shape, np.float32)}


def structure_targets(aatype: np.ndarray, all_atom_positions: np.ndarray, all_atom_mask: np.ndarray) -> Features:
    """Backbone frames and pseudo-beta positions from atom37 coordinates.

    ``backbone_rigid_tensor`` float32 [L, 4, 4]: ``Rigid.from_3_points(N, CA, C)`` (supplement Algorithm 21:
    origin CA, x axis towards C, N in the xy plane), ``backbone_rigid_mask`` = mask(N) * mask(CA) * mask(C)
    (frames of residues with a missing backbone atom are identity and masked out);
    ``pseudo_beta`` float32 [L, 3] = CB, or CA for glycine, ``pseudo_beta_mask`` its atom's mask.
    """
    import torch

    from megatron_protein.structure.rigid import Rigid

    n, ca, c, cb = (rc.atom_order[a] for a in ("N", "CA", "C", "CB"))
    positions = np.asarray(all_atom_positions, np.float32)
    mask = np.asarray(all_atom_mask, np.float32)
    backbone_mask = mask[:, n] * mask[:, ca] * mask[:, c]
    frames = Rigid.from_3_points(torch.from_numpy(positions[:, n]), torch.from_numpy(positions[:, ca]),
                                 torch.from_numpy(positions[:, c])).to_tensor_4x4().numpy().astype(np.float32)
    frames[backbone_mask == 0] = np.eye(4, dtype=np.float32)
    is_gly = np.asarray(aatype) == rc.restype_order["G"]
    pseudo_beta = np.where(is_gly[:, None], positions[:, ca], positions[:, cb]).astype(np.float32)
    pseudo_beta_mask = np.where(is_gly, mask[:, ca], mask[:, cb]).astype(np.float32)
    return {"backbone_rigid_tensor": frames, "backbone_rigid_mask": backbone_mask.astype(np.float32),
            "pseudo_beta": pseudo_beta, "pseudo_beta_mask": pseudo_beta_mask}


# ------------------------------------------------------------------------------------------- MSA sampling
def sample_msa(features: Features, max_msa_clusters: int, rng: np.random.Generator) -> Features:
    """Cluster centres and extra MSA (supplement 1.2.7): row 0 stays first, the rest is shuffled; the first
    ``max_msa_clusters`` rows become ``msa``/``deletion_matrix``/``msa_mask``, the others ``extra_*``."""
    depth = features["msa"].shape[0]
    order = np.concatenate([[0], 1 + rng.permutation(depth - 1)]).astype(np.int64)
    centres, extra = order[:max_msa_clusters], order[max_msa_clusters:]
    out = dict(features)
    for key in ("msa", "deletion_matrix", "msa_mask"):
        out[key] = features[key][centres]
        out[f"extra_{key}"] = features[key][extra]
    return out


def msa_residue_profile(msa: np.ndarray, msa_mask: np.ndarray) -> np.ndarray:
    """float32 [L, 22]: the frequency of each MSA class (amino acids, X, gap) per column over the rows
    (AlphaFold2's ``hhblits_profile``, computed from the MSA it is given)."""
    # Per class rather than through a one-hot [N, L, 22], so deep MSAs (10^4 rows) need no large temporary.
    counts = np.stack([((msa == c) * msa_mask).sum(0) for c in range(22)], axis=-1)
    return (counts / np.maximum(msa_mask.sum(0), 1e-10)[:, None]).astype(np.float32)


def sample_categorical(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of ``probs`` [..., K] (rows sum to 1): int64 [...]."""
    cumulative = np.cumsum(probs, axis=-1)
    draws = rng.random(probs.shape[:-1])[..., None]
    return np.minimum((draws >= cumulative).sum(-1), probs.shape[-1] - 1).astype(np.int64)


def make_masked_msa(features: Features, profile: np.ndarray, config: FeatureConfig,
                    rng: np.random.Generator) -> Features:
    """BERT-style masking of the cluster centres (supplement 1.2.7, ``make_masked_msa``).

    ``profile``: [L, 22] residue frequencies of the whole MSA (:func:`msa_residue_profile`). An entry is chosen
    with probability ``masked_msa_fraction``; a chosen entry is replaced by a draw from
    ``uniform * U(20 amino acids) + profile_prob * profile + same * onehot(itself) + rest * onehot(mask)``.
    Rows with ``msa_mask`` 0 are never chosen. Sets ``true_msa`` (originals), ``bert_mask`` and the new ``msa``.
    """
    msa = features["msa"]
    uniform = np.concatenate([np.full(20, 0.05, np.float32), np.zeros(3, np.float32)])
    probs = (config.masked_msa_uniform_prob * uniform
             + config.masked_msa_profile_prob * np.pad(profile, ((0, 0), (0, 1)))[None]
             + config.masked_msa_same_prob * one_hot(msa, MSA_CLASSES))
    mask_prob = 1.0 - config.masked_msa_uniform_prob - config.masked_msa_profile_prob - config.masked_msa_same_prob
    probs[..., rc.msa_mask_index] += mask_prob
    chosen = (rng.random(msa.shape) < config.masked_msa_fraction) & (features["msa_mask"] > 0)
    replacement = sample_categorical(probs, rng)
    out = dict(features)
    out["true_msa"] = msa.copy()
    out["bert_mask"] = chosen.astype(np.float32)
    out["msa"] = np.where(chosen, replacement, msa).astype(np.int64)
    return out


def nearest_neighbor_clusters(features: Features) -> np.ndarray:
    """int64 [N_extra]: for each extra sequence, the centre with the most agreeing positions (supplement 1.2.7).

    Agreement counts positions where both hold the same amino acid or X; gaps (weight 0, AlphaFold2's
    ``gap_agreement_weight``) and the mask token do not count; masked-out entries do not count. Ties go to the
    lowest centre index (``argmax``), so the query wins a tie.
    """
    weights = np.concatenate([np.ones(21, np.float32), np.zeros(2, np.float32)])
    centres = one_hot(features["msa"], MSA_CLASSES) * features["msa_mask"][..., None] * weights
    centres = centres.reshape(centres.shape[0], -1).T  # [L * 23, N_clust]
    assignment = np.zeros(features["extra_msa"].shape[0], np.int64)
    for start in range(0, len(assignment), EXTRA_CHUNK):  # in blocks of rows: no [N_extra, L, 23] temporary
        rows = slice(start, start + EXTRA_CHUNK)
        extra = one_hot(features["extra_msa"][rows], MSA_CLASSES) * features["extra_msa_mask"][rows][..., None]
        agreement = extra.reshape(extra.shape[0], -1) @ centres  # [rows, N_clust]
        assignment[rows] = np.argmax(agreement, axis=1)
    return assignment


def summarize_clusters(features: Features, assignment: np.ndarray) -> Features:
    """``cluster_profile`` float32 [N_clust, L, 23] and ``cluster_deletion_mean`` [N_clust, L]: means over each
    centre and the extra sequences assigned to it, per position, over entries whose mask is 1 (the centre's own
    entry enters with weight 1, as AlphaFold2's ``summarize_clusters``)."""
    num_clusters = features["msa"].shape[0]
    extra_mask = features["extra_msa_mask"]

    def segment_sum(values: np.ndarray) -> np.ndarray:
        out = np.zeros((num_clusters,) + values.shape[1:], np.float32)
        np.add.at(out, assignment, values)
        return out

    counts = 1e-6 + features["msa_mask"] + segment_sum(extra_mask)
    profile_sum = one_hot(features["msa"], MSA_CLASSES)
    for start in range(0, len(assignment), EXTRA_CHUNK):
        rows = slice(start, start + EXTRA_CHUNK)
        np.add.at(profile_sum, assignment[rows],
                  extra_mask[rows][..., None] * one_hot(features["extra_msa"][rows], MSA_CLASSES))
    deletion_sum = segment_sum(extra_mask * features["extra_deletion_matrix"]) + features["deletion_matrix"]
    out = dict(features)
    out["cluster_profile"] = (profile_sum / counts[..., None]).astype(np.float32)
    out["cluster_deletion_mean"] = (deletion_sum / counts).astype(np.float32)
    return out


def make_msa_feat(features: Features) -> Features:
    """``msa_feat`` [N_clust, L, 49], ``target_feat`` [L, 22] and the extra-MSA deletion features (1.2.9)."""
    deletions = features["deletion_matrix"]
    msa_feat = np.concatenate([
        one_hot(features["msa"], MSA_CLASSES),
        np.clip(deletions, 0.0, 1.0)[..., None],
        deletion_value(deletions)[..., None],
        features["cluster_profile"],
        deletion_value(features["cluster_deletion_mean"])[..., None],
    ], axis=-1).astype(np.float32)
    aatype = features["aatype"]
    target_feat = np.concatenate([np.zeros((len(aatype), 1), np.float32), one_hot(aatype, 21)], axis=-1)
    out = dict(features)
    out["msa_feat"] = msa_feat
    out["target_feat"] = target_feat.astype(np.float32)
    extra_deletions = features["extra_deletion_matrix"]
    out["extra_has_deletion"] = np.clip(extra_deletions, 0.0, 1.0).astype(np.float32)
    out["extra_deletion_value"] = deletion_value(extra_deletions)
    return out


# ---------------------------------------------------------------------------------------------------- crops
def random_crop_start(length: int, crop_size: int, rng: np.random.Generator) -> int:
    """Start of a uniformly random contiguous window of ``min(crop_size, length)`` residues (1.2.8)."""
    return int(rng.integers(0, length - crop_size + 1)) if length > crop_size else 0


def crop_features(features: Features, start: int, size: int) -> Features:
    """The window ``[start, start + size)`` of every feature with a residue axis (:data:`RESIDUE_AXIS`); MSA rows,
    atoms and channels are kept; ``seq_length`` becomes the window's length."""
    out = {}
    for key, value in features.items():
        axis = RESIDUE_AXIS.get(key)
        if axis is None:
            out[key] = value
        else:
            index = [slice(None)] * value.ndim
            index[axis] = slice(start, start + size)
            out[key] = value[tuple(index)]
    out["seq_length"] = np.array(out["aatype"].shape[0], dtype=np.int64)
    return out


# ------------------------------------------------------------------------------------------------ pipeline
def make_example(
    sequence_feats: Features,
    msa_feats: Features,
    targets: Optional[Features],
    config: FeatureConfig,
    rng: np.random.Generator,
    crop: bool,
    profile: Optional[np.ndarray] = None,
    drop_profile: Optional[bool] = None,
) -> Features:
    """One model input with targets, in the feature dict of CONTRACTS.md.

    ``sequence_feats``: :func:`sequence_features`; ``msa_feats``: :func:`msa_features` (query first, must match
    ``aatype`` in row 0 up to X); ``targets``: ``all_atom_positions``/``all_atom_mask`` plus
    :func:`structure_targets` (None for prediction without a structure); ``profile``: [L, 20] restype order or
    None; ``crop``: random contiguous crop to ``config.crop_size`` (training) or the whole chain (evaluation);
    ``drop_profile``: the example is *sequence-only*, what a bare FASTA gives at prediction: the MSA cut to its
    query row and no profile. None draws it with ``config.profile_dropout`` (first, before any other draw), True /
    False forces it.
    """
    length = len(sequence_feats["aatype"])
    if msa_feats["msa"].shape[1] != length:
        raise ValueError(f"MSA has {msa_feats['msa'].shape[1]} columns; expected {length}, the chain's length")
    if drop_profile is None:
        drop_profile = bool(config.profile_dropout > 0 and rng.random() < config.profile_dropout)
    if drop_profile:  # what a bare FASTA gives the model: the query row alone and no profile
        msa_feats = {key: value[:1] for key, value in msa_feats.items()}
    features: Features = {**sequence_feats, **msa_feats}
    if targets is not None:
        features.update(targets)
    residue_profile = msa_residue_profile(features["msa"], features["msa_mask"])  # full MSA, before sampling
    single_sequence = features["msa"].shape[0] == 1
    features = sample_msa(features, config.max_msa_clusters, rng)
    features = make_masked_msa(features, residue_profile, config, rng)
    assignment = nearest_neighbor_clusters(features)
    features = summarize_clusters(features, assignment)
    for key in ("msa", "deletion_matrix", "msa_mask"):
        features[f"extra_{key}"] = features[f"extra_{key}"][: config.max_extra_msa]

    have_profile = profile is not None and not drop_profile
    if have_profile:
        profile = np.asarray(profile, np.float32)
        if profile.shape != (length, 20):
            raise ValueError(f"profile has shape {profile.shape}; expected ({length}, 20)")
    if have_profile and single_sequence and config.profile_in_cluster_profile:
        query_profile = np.zeros((length, MSA_CLASSES), np.float32)
        query_profile[:, :20] = profile
        features["cluster_profile"][0] = query_profile
    features = make_msa_feat(features)
    if config.use_profile:
        features["profile"] = profile if have_profile else np.zeros((length, 20), np.float32)
        features["profile_mask"] = np.full(length, 1.0 if have_profile else 0.0, np.float32)

    for key in ("cluster_profile", "cluster_deletion_mean", "extra_deletion_matrix"):
        features.pop(key)
    if crop:
        start = random_crop_start(length, config.crop_size, rng)
        features = crop_features(features, start, min(config.crop_size, length))
    return features


#: dtype of every feature of an example (CONTRACTS.md); shapes are checked by :func:`check_example`.
FEATURE_DTYPES = {
    "aatype": np.int64, "residue_index": np.int64, "seq_mask": np.float32, "seq_length": np.int64,
    "msa": np.int64, "deletion_matrix": np.float32, "msa_mask": np.float32,
    "msa_feat": np.float32, "target_feat": np.float32, "true_msa": np.int64, "bert_mask": np.float32,
    "extra_msa": np.int64, "extra_has_deletion": np.float32, "extra_deletion_value": np.float32,
    "extra_msa_mask": np.float32,
    "all_atom_positions": np.float32, "all_atom_mask": np.float32, "backbone_rigid_tensor": np.float32,
    "backbone_rigid_mask": np.float32, "pseudo_beta": np.float32, "pseudo_beta_mask": np.float32,
    "profile": np.float32, "profile_mask": np.float32,
}


def feature_shapes(length: int, num_clusters: int, num_extra: int) -> Dict[str, tuple]:
    """The shape of every feature for an example of ``length`` residues (CONTRACTS.md)."""
    L, N, E = length, num_clusters, num_extra
    return {
        "aatype": (L,), "residue_index": (L,), "seq_mask": (L,), "seq_length": (),
        "msa": (N, L), "deletion_matrix": (N, L), "msa_mask": (N, L), "msa_feat": (N, L, MSA_FEAT_DIM),
        "target_feat": (L, TARGET_FEAT_DIM), "true_msa": (N, L), "bert_mask": (N, L),
        "extra_msa": (E, L), "extra_has_deletion": (E, L), "extra_deletion_value": (E, L),
        "extra_msa_mask": (E, L),
        "all_atom_positions": (L, rc.atom_type_num, 3), "all_atom_mask": (L, rc.atom_type_num),
        "backbone_rigid_tensor": (L, 4, 4), "backbone_rigid_mask": (L,), "pseudo_beta": (L, 3),
        "pseudo_beta_mask": (L,), "profile": (L, 20), "profile_mask": (L,),
    }


def check_example(features: Features) -> None:
    """Raise ValueError unless every feature has the dtype and shape of the contract (targets optional)."""
    length = features["aatype"].shape[0]
    shapes = feature_shapes(length, features["msa"].shape[0], features["extra_msa"].shape[0])
    for key, value in features.items():
        if key not in shapes:
            raise ValueError(f"unexpected feature {key!r}")
        if value.dtype != FEATURE_DTYPES[key] or value.shape != shapes[key]:
            raise ValueError(f"feature {key!r}: {value.dtype} {value.shape}; expected "
                             f"{np.dtype(FEATURE_DTYPES[key])} {shapes[key]}")
