"""AlphaFold2 features (supplement 1.2-1.3) on real embedded chains and their shipped MSAs."""
import dataclasses
import math
import os
import sys

import numpy as np
import pytest
import torch

from megatron_protein.data import folding_features as ff
from megatron_protein.data.folding_dataset import FoldingDataset, NpzChains
from megatron_protein.structure import residue_constants as rc
from megatron_protein.structure.rigid import Rigid

CHAIN_WITH_MSA = "4XP8_A"  # 88 residues, 25 homologues in data/structures/msas (see summary.json)
CHAIN_ALONE = "2G0C_A"  # 50 residues, no homologue: single-sequence mode
CONTRACT_KEYS = {
    "aatype", "residue_index", "seq_mask", "seq_length", "msa", "deletion_matrix", "msa_mask", "msa_feat",
    "target_feat", "true_msa", "bert_mask", "extra_msa", "extra_has_deletion", "extra_deletion_value",
    "extra_msa_mask", "all_atom_positions", "all_atom_mask", "backbone_rigid_tensor", "backbone_rigid_mask",
    "pseudo_beta", "pseudo_beta_mask", "profile", "profile_mask",
}


@pytest.fixture(scope="module")
def dataset():
    return FoldingDataset(NpzChains(), seed=3)


def index_of(dataset, chain_id):
    return dataset.chains.ids.index(chain_id)


def raw(dataset, chain_id):
    return dataset.raw_features(index_of(dataset, chain_id))


def example(dataset, chain_id, seed=0, crop=False, config=None, drop_profile=False):
    sequence_feats, msa_feats, targets, profile, _ = raw(dataset, chain_id)
    return ff.make_example(sequence_feats, msa_feats, targets, config or dataset.config,
                           np.random.default_rng(seed), crop=crop, profile=profile, drop_profile=drop_profile)


# ----------------------------------------------------------------------------------------------- contract
def test_feature_dict_is_the_contract(dataset):
    assert dataset.msa_depth(index_of(dataset, CHAIN_WITH_MSA)) == 26
    for chain_id in (CHAIN_WITH_MSA, CHAIN_ALONE):
        for crop in (False, True):
            features = example(dataset, chain_id, crop=crop,
                               config=dataclasses.replace(dataset.config, crop_size=40, max_msa_clusters=8))
            assert set(features) == CONTRACT_KEYS
            ff.check_example(features)  # every dtype and shape of CONTRACTS.md
            assert int(features["seq_length"]) == features["aatype"].shape[0] == (40 if crop else
                                                                                  len(raw(dataset, chain_id)[0]["aatype"]))
    features = example(dataset, CHAIN_WITH_MSA, config=dataclasses.replace(dataset.config, max_msa_clusters=8))
    assert features["msa_feat"].shape == (8, 88, 49) and features["extra_msa"].shape == (18, 88)
    assert features["target_feat"].shape == (88, 22)


# ----------------------------------------------------------------------------------------- MSA sampling
def test_sampling_keeps_query_first_and_partitions_rows(dataset):
    _, msa_feats, _, _, depth = raw(dataset, CHAIN_WITH_MSA)
    tagged = dict(msa_feats, deletion_matrix=np.broadcast_to(np.arange(depth, dtype=np.float32)[:, None],
                                                             msa_feats["msa"].shape).copy())
    for seed in range(5):
        sampled = ff.sample_msa(tagged, 8, np.random.default_rng(seed))
        centres = sampled["deletion_matrix"][:, 0].astype(int)
        extra = sampled["extra_deletion_matrix"][:, 0].astype(int)
        assert centres[0] == 0  # the query stays first
        assert sorted(centres.tolist() + extra.tolist()) == list(range(depth))  # each row exactly once
        np.testing.assert_array_equal(sampled["msa"], msa_feats["msa"][centres])
        np.testing.assert_array_equal(sampled["extra_msa"], msa_feats["msa"][extra])


def brute_force_assignment(centres, centre_mask, extra, extra_mask):
    """Nearest centre by counting equal residues (amino acid or X) where both entries are present."""
    out = []
    for row, row_mask in zip(extra, extra_mask):
        scores = [sum(1 for a, b, ma, mb in zip(row, centre, row_mask, cmask)
                      if ma and mb and a == b and a <= rc.unk_restype_index)
                  for centre, cmask in zip(centres, centre_mask)]
        out.append(int(np.argmax(scores)))  # first maximum: the lowest centre wins ties
    return np.array(out)


def test_every_extra_sequence_joins_exactly_one_cluster(dataset):
    sequence_feats, msa_feats, _, _, depth = raw(dataset, CHAIN_WITH_MSA)
    config = dataclasses.replace(dataset.config, max_msa_clusters=6)
    rng = np.random.default_rng(11)
    features = ff.sample_msa({**sequence_feats, **msa_feats}, config.max_msa_clusters, rng)
    features = ff.make_masked_msa(features, ff.msa_residue_profile(msa_feats["msa"], msa_feats["msa_mask"]),
                                  config, rng)
    features["extra_msa_mask"][3, :10] = 0  # masked-out entries must not count
    assignment = ff.nearest_neighbor_clusters(features)
    assert assignment.shape == (depth - 6,) and assignment.min() >= 0 and assignment.max() < 6
    np.testing.assert_array_equal(assignment, brute_force_assignment(
        features["msa"], features["msa_mask"], features["extra_msa"], features["extra_msa_mask"]))

    summary = ff.summarize_clusters(features, assignment)
    for c in range(6):
        members = np.flatnonzero(assignment == c)
        onehot = ff.one_hot(features["msa"][c], 23) + sum(
            (ff.one_hot(features["extra_msa"][m], 23) * features["extra_msa_mask"][m][:, None] for m in members),
            np.zeros((88, 23), np.float32))
        counts = 1 + sum((features["extra_msa_mask"][m] for m in members), np.zeros(88, np.float32))
        np.testing.assert_allclose(summary["cluster_profile"][c], onehot / counts[:, None], atol=1e-5)
        deletions = features["deletion_matrix"][c] + sum(
            (features["extra_deletion_matrix"][m] * features["extra_msa_mask"][m] for m in members), 0.0)
        np.testing.assert_allclose(summary["cluster_deletion_mean"][c], deletions / counts, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(summary["cluster_profile"].sum(-1), 1.0, atol=1e-4)


def test_clustering_in_row_blocks_is_the_same(dataset, monkeypatch):
    """Deep MSAs are one-hot encoded in blocks of extra rows; the block size must not change the result."""
    config = dataclasses.replace(dataset.config, max_msa_clusters=4)
    whole = example(dataset, CHAIN_WITH_MSA, seed=4, config=config)
    monkeypatch.setattr(ff, "EXTRA_CHUNK", 3)
    blocks = example(dataset, CHAIN_WITH_MSA, seed=4, config=config)
    np.testing.assert_allclose(blocks["msa_feat"], whole["msa_feat"], rtol=1e-6, atol=1e-7)


def test_masked_msa_rates():
    """15% of entries chosen; a chosen entry becomes the mask token with p 0.7 (supplement 1.2.7)."""
    rng = np.random.default_rng(0)
    msa = rng.integers(0, 22, size=(300, 200))
    msa_mask = np.ones(msa.shape, np.float32)
    msa_mask[-20:] = 0  # padding rows are never chosen
    features = {"msa": msa, "msa_mask": msa_mask}
    config = ff.FeatureConfig()
    out = ff.make_masked_msa(features, ff.msa_residue_profile(msa, msa_mask), config, rng)
    chosen = out["bert_mask"] > 0
    np.testing.assert_array_equal(out["true_msa"], msa)
    assert not chosen[-20:].any()
    assert abs(chosen[:-20].mean() - 0.15) < 0.005
    np.testing.assert_array_equal(out["msa"][~chosen], msa[~chosen])
    replaced = out["msa"][chosen]
    assert abs((replaced == rc.msa_mask_index).mean() - 0.7) < 0.015
    # Unchanged: 0.1 (same) + 0.1 * 1/20 (uniform, amino acids) + 0.1 * profile of that residue (~1/22 here).
    unchanged = (replaced == msa[chosen]).mean()
    assert abs(unchanged - (0.1 + 0.1 * (20 / 22) / 20 + 0.1 / 22)) < 0.015


# ------------------------------------------------------------------------------------------- msa_feat
def test_msa_feat_channels_decode_to_their_inputs(dataset):
    features = example(dataset, CHAIN_WITH_MSA, config=dataclasses.replace(dataset.config, max_msa_clusters=8))
    msa_feat = features["msa_feat"]
    channels = ff.MSA_FEAT_CHANNELS
    cluster = msa_feat[..., channels["cluster_msa"]]
    assert set(np.unique(cluster)) == {0.0, 1.0} and (cluster.sum(-1) == 1).all()
    np.testing.assert_array_equal(cluster.argmax(-1), features["msa"])
    deletions = features["deletion_matrix"]
    assert deletions.max() > 0  # real insertions are present in this MSA
    np.testing.assert_array_equal(msa_feat[..., channels["has_deletion"]][..., 0], np.clip(deletions, 0, 1))
    decoded = 3.0 * np.tan(msa_feat[..., channels["deletion_value"]][..., 0] * math.pi / 2)
    np.testing.assert_allclose(decoded, deletions, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(msa_feat[..., channels["cluster_profile"]].sum(-1), 1.0, atol=1e-4)
    assert (msa_feat[..., channels["deletion_mean_value"]] >= 0).all()
    target = features["target_feat"]
    assert not target[:, ff.TARGET_FEAT_CHANNELS["between_segment_residues"]].any()
    np.testing.assert_array_equal(target[:, ff.TARGET_FEAT_CHANNELS["aatype"]].argmax(-1), features["aatype"])
    np.testing.assert_array_equal(features["true_msa"][0], features["aatype"])  # the query's row is the sequence
    decoded_extra = 3.0 * np.tan(features["extra_deletion_value"] * math.pi / 2)
    np.testing.assert_allclose(np.clip(decoded_extra, 0, 1), features["extra_has_deletion"], atol=1e-4)


# ------------------------------------------------------------------------------------------------- crops
def test_crop_keeps_every_feature_aligned(dataset):
    """Same generator: the crop is the last draw, so the cropped example is a window of the whole one."""
    config = dataclasses.replace(dataset.config, crop_size=32, max_msa_clusters=8)
    whole = example(dataset, CHAIN_WITH_MSA, seed=5, crop=False, config=config)
    starts = set()
    for seed in (5, 5):
        cropped = example(dataset, CHAIN_WITH_MSA, seed=seed, crop=True, config=config)
        start = int(cropped["residue_index"][0] - whole["residue_index"][0])
        starts.add(start)
        np.testing.assert_array_equal(np.diff(cropped["residue_index"]), 1)
        for key, value in whole.items():
            axis = ff.RESIDUE_AXIS.get(key)
            if axis is None:
                continue
            window = np.take(value, np.arange(start, start + 32), axis=axis)
            np.testing.assert_array_equal(cropped[key], window, err_msg=key)
        # Targets still belong to the residues they sit next to.
        recomputed = ff.structure_targets(cropped["aatype"], cropped["all_atom_positions"], cropped["all_atom_mask"])
        for key, value in recomputed.items():
            np.testing.assert_allclose(cropped[key], value, atol=1e-6, err_msg=key)
    assert len(starts) == 1
    # Different seeds give different windows (88 residues, crop 32: 57 possible starts).
    other_starts = {int(example(dataset, CHAIN_WITH_MSA, seed=s, crop=True, config=config)["residue_index"][0])
                    for s in range(8)}
    assert len(other_starts) > 1


def test_crop_of_short_chain_is_whole(dataset):
    config = dataclasses.replace(dataset.config, crop_size=256)
    features = example(dataset, CHAIN_ALONE, crop=True, config=config)
    assert features["aatype"].shape == (50,)


def test_deterministic_given_the_generator(dataset):
    a = example(dataset, CHAIN_WITH_MSA, seed=9, crop=True)
    b = example(dataset, CHAIN_WITH_MSA, seed=9, crop=True)
    c = example(dataset, CHAIN_WITH_MSA, seed=10, crop=True)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not np.array_equal(a["bert_mask"], c["bert_mask"])


# ------------------------------------------------------------------------------------------------ targets
def test_backbone_frames_and_pseudo_beta(dataset):
    features = example(dataset, CHAIN_WITH_MSA)
    frames = Rigid.from_tensor_4x4(torch.from_numpy(features["backbone_rigid_tensor"]).double())
    rots = frames.rots
    np.testing.assert_allclose((rots.transpose(-1, -2) @ rots).numpy(), np.broadcast_to(np.eye(3), rots.shape),
                               atol=1e-5)
    np.testing.assert_allclose(torch.linalg.det(rots).numpy(), 1.0, atol=1e-5)
    positions = torch.from_numpy(features["all_atom_positions"]).double()
    local = frames.unsqueeze(-1).invert_apply(positions[:, :3])  # N, CA, C in their own frame
    n, ca, c = local[:, 0], local[:, 1], local[:, 2]
    np.testing.assert_allclose(ca.numpy(), 0.0, atol=1e-4)  # origin at CA
    assert (c[:, 0] > 1.3).all() and np.allclose(c[:, 1:].numpy(), 0.0, atol=1e-4)  # C on +x (Algorithm 21)
    assert (n[:, 1] > 0).all() and np.allclose(n[:, 2].numpy(), 0.0, atol=1e-4)  # N in the xy plane, y > 0
    assert (features["backbone_rigid_mask"] == 1).all()
    is_gly = features["aatype"] == rc.restype_order["G"]
    assert is_gly.any()
    ca_positions, cb_positions = features["all_atom_positions"][:, 1], features["all_atom_positions"][:, 3]
    np.testing.assert_array_equal(features["pseudo_beta"][is_gly], ca_positions[is_gly])
    np.testing.assert_array_equal(features["pseudo_beta"][~is_gly], cb_positions[~is_gly])
    assert (features["all_atom_mask"][is_gly, 3] == 0).all() and (features["pseudo_beta_mask"] == 1).all()


def test_missing_backbone_atom_masks_the_frame():
    sequence_feats = ff.sequence_features("AGA")
    positions = np.zeros((3, 37, 3), np.float32)
    positions[:, :3] = [[-0.5, 1.4, 0.0], [0.0, 0.0, 0.0], [1.5, 0.0, 0.0]]
    positions += np.arange(3)[:, None, None] * 3.8
    mask = np.zeros((3, 37), np.float32)
    mask[:, :3] = 1
    mask[1, 2] = 0  # residue 2 has no C
    targets = ff.structure_targets(sequence_feats["aatype"], positions, mask)
    np.testing.assert_array_equal(targets["backbone_rigid_mask"], [1, 0, 1])
    np.testing.assert_array_equal(targets["backbone_rigid_tensor"][1], np.eye(4))
    np.testing.assert_array_equal(targets["pseudo_beta_mask"], [0, 1, 0])  # alanines lack CB here; glycine uses CA


# ------------------------------------------------------------------------------------------------ profiles
def test_profile_feeds_the_query_cluster_in_single_sequence_mode(dataset):
    profile = raw(dataset, CHAIN_ALONE)[3]
    with_profile = example(dataset, CHAIN_ALONE, drop_profile=False)
    assert with_profile["msa"].shape[0] == 1 and with_profile["extra_msa"].shape[0] == 0
    block = with_profile["msa_feat"][0, :, ff.MSA_FEAT_CHANNELS["cluster_profile"]]
    np.testing.assert_allclose(block[:, :20], profile, atol=1e-6)
    assert not block[:, 20:].any()
    np.testing.assert_allclose(with_profile["profile"], profile)
    assert (with_profile["profile_mask"] == 1).all()

    dropped = example(dataset, CHAIN_ALONE, drop_profile=True)
    assert not dropped["profile"].any() and not dropped["profile_mask"].any()
    block = dropped["msa_feat"][0, :, ff.MSA_FEAT_CHANNELS["cluster_profile"]]
    # AlphaFold2's cluster profile of a lone query: its own one-hot (over 1 + 1e-6, the count's epsilon).
    np.testing.assert_allclose(block, dropped["msa_feat"][0, :, ff.MSA_FEAT_CHANNELS["cluster_msa"]], atol=1e-5)

    # With a real MSA the cluster profile is the MSA's, and the profile is offered beside it.
    with_msa = example(dataset, CHAIN_WITH_MSA, drop_profile=False)
    assert with_msa["msa"].shape[0] > 1 and (with_msa["profile_mask"] == 1).all()
    block = with_msa["msa_feat"][0, :, ff.MSA_FEAT_CHANNELS["cluster_profile"]]
    assert not np.allclose(block[:, :20], with_msa["profile"], atol=1e-3)


def test_profile_dropout_rate(dataset):
    config = dataclasses.replace(dataset.config, profile_dropout=0.5, crop_size=16)
    sequence_feats, msa_feats, targets, profile, _ = raw(dataset, CHAIN_ALONE)
    kept = [ff.make_example(sequence_feats, msa_feats, targets, config, np.random.default_rng(s), crop=True,
                            profile=profile)["profile_mask"][0] for s in range(200)]
    assert 0.4 < np.mean(kept) < 0.6
    no_profile = ff.make_example(sequence_feats, msa_feats, targets, config, np.random.default_rng(0), crop=True)
    assert not no_profile["profile_mask"].any()


def test_bad_settings_and_shapes():
    with pytest.raises(ValueError, match="probabilities"):
        ff.FeatureConfig(masked_msa_uniform_prob=0.5, masked_msa_profile_prob=0.5, masked_msa_same_prob=0.5)
    with pytest.raises(ValueError, match="unknown feature settings"):
        ff.FeatureConfig.from_dict({"crop": 3})
    sequence_feats = ff.sequence_features("ACD")
    msa_feats = {"msa": np.zeros((1, 4), np.int64), "deletion_matrix": np.zeros((1, 4), np.float32),
                 "msa_mask": np.ones((1, 4), np.float32)}
    with pytest.raises(ValueError, match="MSA has 4 columns; expected 3"):
        ff.make_example(sequence_feats, msa_feats, None, ff.FeatureConfig(), np.random.default_rng(0), crop=False)


# ------------------------------------------------------------------------------------------------ OpenFold
def _openfold():
    directory = os.environ.get("OPENFOLD_DIR", "/work/peers/openfold")
    stubs = "/work/shared/peers/stubs"
    if not os.path.isdir(os.path.join(directory, "openfold")):
        pytest.skip("OpenFold is not on this machine (set OPENFOLD_DIR)")
    sys.path[:0] = [stubs, directory]
    try:
        from openfold.data import data_transforms
    except ImportError as error:
        pytest.skip(f"OpenFold's data transforms do not import here: {error}")
    finally:
        for p in (stubs, directory):
            if p in sys.path:
                sys.path.remove(p)
    return data_transforms


def test_clusters_msa_feat_and_targets_match_openfold(dataset):
    """The deterministic steps against OpenFold's data_transforms on the same sampled, masked MSA."""
    dt = _openfold()
    sequence_feats, msa_feats, targets, _, _ = raw(dataset, CHAIN_WITH_MSA)
    config = dataclasses.replace(dataset.config, max_msa_clusters=6)
    rng = np.random.default_rng(2)
    ours = ff.sample_msa({**sequence_feats, **msa_feats, **targets}, config.max_msa_clusters, rng)
    ours = ff.make_masked_msa(ours, ff.msa_residue_profile(msa_feats["msa"], msa_feats["msa_mask"]), config, rng)
    theirs = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ours.items()}
    theirs["between_segment_residues"] = torch.zeros(len(sequence_feats["aatype"]), dtype=torch.int64)

    ours = ff.make_msa_feat(ff.summarize_clusters(ours, ff.nearest_neighbor_clusters(ours)))
    # OpenFold's transforms are curried: f(settings)(features); gap agreement weight 0 as in its config.
    theirs = dt.nearest_neighbor_clusters(gap_agreement_weight=0.0)(theirs)
    theirs = dt.make_msa_feat()(dt.summarize_clusters()(theirs))
    np.testing.assert_array_equal(ff.nearest_neighbor_clusters(ours), theirs["extra_cluster_assignment"].numpy())
    for key in ("msa_feat", "target_feat", "extra_has_deletion", "extra_deletion_value"):
        np.testing.assert_allclose(ours[key], theirs[key].numpy(), rtol=1e-5, atol=1e-6, err_msg=key)

    # Pseudo-beta and backbone frames (OpenFold builds frames from C, CA, N and flips two axes: same frame).
    of_targets = {k: torch.from_numpy(v) for k, v in targets.items()}
    of_targets["aatype"] = torch.from_numpy(sequence_feats["aatype"])
    pseudo_beta, pseudo_beta_mask = dt.pseudo_beta_fn(of_targets["aatype"], of_targets["all_atom_positions"],
                                                      of_targets["all_atom_mask"])
    np.testing.assert_allclose(targets["pseudo_beta"], pseudo_beta.numpy(), atol=1e-6)
    np.testing.assert_array_equal(targets["pseudo_beta_mask"], pseudo_beta_mask.numpy())
    frames = dt.atom37_to_frames(of_targets)
    np.testing.assert_allclose(targets["backbone_rigid_tensor"], frames["rigidgroups_gt_frames"][:, 0].numpy(),
                               atol=1e-4)
    np.testing.assert_array_equal(targets["backbone_rigid_mask"], frames["rigidgroups_gt_exists"][:, 0].numpy())
