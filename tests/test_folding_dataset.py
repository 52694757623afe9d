"""The embedded folding data, chain records, the deterministic resumable training stream and the collate."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from megatron_protein.data import folding_features as ff
from megatron_protein.data.folding_dataset import (DEFAULT_CHAINS, DEFAULT_MSA_DIR, FoldingBatches,
                                                   FoldingDataError, FoldingDataset, MsaDirectory, NpzChains,
                                                   collate_features, eval_batches)
from megatron_protein.data.msa import MsaQueryMismatchError
from megatron_protein.structure import residue_constants as rc

SMALL = ff.FeatureConfig(crop_size=48, max_msa_clusters=8, max_extra_msa=16)


@pytest.fixture(scope="module")
def train_set():
    return FoldingDataset(NpzChains(split="train"), config=SMALL, seed=7)


# ---------------------------------------------------------------------------------------------- embedded
def test_embedded_chains_and_split():
    data = np.load(DEFAULT_CHAINS, allow_pickle=False)
    assert len(data["ids"]) == 400 and len(set(data["ids"].tolist())) == 400
    assert (data["split"] == "train").sum() == 360 and (data["split"] == "valid").sum() == 40
    lengths = data["lengths"]
    assert lengths.min() >= 40 and lengths.max() <= 256
    np.testing.assert_array_equal(np.diff(data["offsets"]), lengths)
    assert data["coords"].shape == (int(lengths.sum()), 5, 3) and data["coords"].dtype == np.float32
    assert data["profile"].shape == (int(lengths.sum()), 20) and data["profile"].dtype == np.float16
    assert [len(s) for s in data["sequence"]] == lengths.tolist()
    train, valid = NpzChains(split="train"), NpzChains(split="valid")
    assert len(train) == 360 and len(valid) == 40 and not set(train.ids) & set(valid.ids)
    # Consecutive CA-CA distances of real, complete backbones.
    ca = data["coords"][:, 1]
    for i in range(0, 400, 40):
        chain = ca[data["offsets"][i]:data["offsets"][i + 1]]
        assert np.linalg.norm(np.diff(chain, axis=0), axis=-1).max() < 4.2


def test_shipped_msas_match_their_chains():
    summary = json.load(open(os.path.join(DEFAULT_MSA_DIR, "summary.json")))
    chains = NpzChains()
    with_msa = [c for c, n in summary["homologues_per_chain"].items() if n > 0]
    assert sorted(summary["homologues_per_chain"]) == sorted(chains.ids)
    assert len(with_msa) == summary["with_homologues"] > 0
    msas = MsaDirectory()
    index = {c: i for i, c in enumerate(chains.ids)}
    for chain_id in with_msa[:10]:
        msa = msas.get(chain_id, chains[index[chain_id]].sequence)  # checks the query
        assert msa.depth == summary["homologues_per_chain"][chain_id] + 1


def test_chain_record_atom37_and_profile():
    data = np.load(DEFAULT_CHAINS, allow_pickle=False)
    chains = NpzChains()
    for i in (0, 1, 2):
        record = chains[i]
        start, end = data["offsets"][i], data["offsets"][i + 1]
        coords = data["coords"][start:end]
        for k, atom in enumerate(["N", "CA", "C", "O", "CB"]):
            slot = rc.atom_order[atom]
            np.testing.assert_array_equal(record.all_atom_positions[:, slot], coords[:, k])
        is_gly = np.array([aa == "G" for aa in record.sequence])
        np.testing.assert_array_equal(record.all_atom_mask[:, rc.atom_order["CB"]], (~is_gly).astype(np.float32))
        assert record.all_atom_mask[:, [0, 1, 2, 4]].all() and record.all_atom_mask.sum(1).max() == 5
        # Profile columns reordered from the file's alphabetical order to restype order.
        alphabet = list(data["profile_alphabet"])
        for aa in "ARNDW":
            np.testing.assert_array_equal(record.profile[:, rc.restype_order[aa]],
                                          data["profile"][start:end, alphabet.index(aa)].astype(np.float32))
        np.testing.assert_array_equal(record.residue_index, data["start_resnum"][i] + np.arange(end - start))


# ---------------------------------------------------------------------------------------------- stream
def test_training_stream_is_deterministic_and_covers_each_epoch(train_set):
    n = len(train_set)
    epoch0 = [train_set.sample_chain(k) for k in range(n)]
    assert sorted(epoch0) == list(range(n))
    assert [train_set.sample_chain(k) for k in range(n, 2 * n)] != epoch0  # a new order each epoch
    fresh = FoldingDataset(NpzChains(split="train"), config=SMALL, seed=7)
    for k in (0, 5, n + 3):
        a, b = train_set.train_example(k), fresh.train_example(k)
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        ff.check_example(a)
        assert a["aatype"].shape[0] <= SMALL.crop_size
    other_seed = FoldingDataset(NpzChains(split="train"), config=SMALL, seed=8)
    assert [other_seed.sample_chain(k) for k in range(10)] != epoch0[:10]


def batches_equal(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_continues_the_same_stream(train_set):
    uninterrupted = FoldingBatches(train_set, batch_size=2)
    expected = [next(uninterrupted) for _ in range(4)]
    first = FoldingBatches(train_set, batch_size=2)
    for _ in range(2):
        next(first)
    state = first.state_dict()
    assert state == {"consumed_samples": 4, "seed": 7}
    resumed = FoldingBatches(train_set, batch_size=2)
    resumed.load_state_dict(state)
    assert batches_equal(next(resumed), expected[2]) and batches_equal(next(resumed), expected[3])
    with pytest.raises(ValueError, match="seed 99"):
        resumed.load_state_dict({"consumed_samples": 0, "seed": 99})


def test_data_parallel_ranks_split_the_global_batch(train_set):
    single = next(FoldingBatches(train_set, batch_size=4, fixed_msa_rows=True))
    ranks = [next(FoldingBatches(train_set, batch_size=2, dp_rank=r, dp_world_size=2, fixed_msa_rows=True))
             for r in range(2)]
    assert single["msa"].shape[1] == SMALL.max_msa_clusters and single["extra_msa"].shape[1] == SMALL.max_extra_msa
    for key in single:
        assert torch.equal(torch.cat([ranks[0][key], ranks[1][key]]), single[key]), key
    loader = FoldingBatches(train_set, batch_size=2, dp_rank=1, dp_world_size=2)
    next(loader)
    assert loader.state_dict()["consumed_samples"] == 4


@pytest.mark.slow
def test_loader_workers_give_the_same_batches(train_set):
    inline = FoldingBatches(train_set, batch_size=2, consumed_samples=6)
    workers = FoldingBatches(train_set, batch_size=2, consumed_samples=6, num_workers=1)
    for _ in range(2):
        assert batches_equal(next(inline), next(workers))
    assert workers.state_dict()["consumed_samples"] == inline.state_dict()["consumed_samples"] == 10


# ---------------------------------------------------------------------------------------------- collate
def test_collate_pads_with_masks(train_set):
    examples = [train_set.train_example(k) for k in range(3)]
    batch = collate_features(examples, pad_residues=64, multiple_of=3)
    length, rows, extra = 66, max(e["msa"].shape[0] for e in examples), max(1, max(e["extra_msa"].shape[0]
                                                                                  for e in examples))
    rows, extra = -(-rows // 3) * 3, -(-extra // 3) * 3
    assert batch["aatype"].shape == (3, length) and batch["msa_feat"].shape == (3, rows, length, 49)
    assert batch["extra_msa"].shape == (3, extra, length)
    assert batch["seq_length"].tolist() == [e["aatype"].shape[0] for e in examples]
    for b, e in enumerate(examples):
        n = e["aatype"].shape[0]
        assert batch["seq_mask"][b].sum() == n and not batch["seq_mask"][b, n:].any()
        assert not batch["msa_mask"][b, e["msa"].shape[0]:].any() and not batch["msa_mask"][b, :, n:].any()
        assert not batch["bert_mask"][b, :, n:].any() and not batch["pseudo_beta_mask"][b, n:].any()
        assert not batch["backbone_rigid_mask"][b, n:].any() and not batch["all_atom_mask"][b, n:].any()
        torch.testing.assert_close(batch["backbone_rigid_tensor"][b, n:],
                                   torch.eye(4).expand(length - n, 4, 4))
        torch.testing.assert_close(batch["msa_feat"][b, : e["msa"].shape[0], :n], torch.from_numpy(e["msa_feat"]))
    assert batch["msa"].dtype == torch.int64 and batch["msa_feat"].dtype == torch.float32
    with pytest.raises(ValueError, match="below the longest example"):
        collate_features(examples, pad_residues=10)


def test_eval_examples_are_whole_and_fixed():
    valid = FoldingDataset(NpzChains(split="valid"), config=SMALL, seed=7)
    (ids, batch), = list(eval_batches(FoldingDataset(NpzChains(split="valid"), config=SMALL, seed=7), 40))[:1]
    assert ids == valid.chains.ids
    assert batch["aatype"].shape == (40, int(valid.chains.lengths.max()))
    assert batch["seq_length"].tolist() == valid.chains.lengths.tolist()
    a, b = valid.eval_example(3), valid.eval_example(3)
    assert all(np.array_equal(a[k], b[k]) for k in a) and a["profile_mask"].all()
    assert not valid.eval_example(3, use_profile=False)["profile_mask"].any()


def test_sequence_only_examples_are_what_a_bare_fasta_gives():
    """Profile dropout and the sequence-only evaluation cut a chain's real MSA to its query and drop the profile:
    the same msa_feat as prediction from the sequence alone."""
    from megatron_protein.inference.predict import prediction_features

    from megatron_protein.data.msa import Msa
    from megatron_protein.inference.predict import Query
    from megatron_protein.models.folding.config import preset

    config = preset("tiny")
    features = dataclasses.replace(SMALL, masked_msa_fraction=0.0, profile_dropout=0.0)  # as the trainer evaluates
    valid = FoldingDataset(NpzChains(split="valid"), config=features, seed=7)
    with_msa = next(i for i in range(len(valid)) if valid.msa_depth(i) > 1)
    full, bare = valid.eval_example(with_msa), valid.eval_example(with_msa, use_profile=False)
    assert full["msa_feat"].shape[0] > 1 and full["profile_mask"].all()
    assert bare["msa_feat"].shape[0] == 1 and bare["extra_msa"].shape[0] == 0 and not bare["profile_mask"].any()
    chain = valid.chains[with_msa]
    predicted = prediction_features(Query("q", chain.sequence, "test"), Msa.single_sequence(chain.sequence, "q"),
                                    config)
    np.testing.assert_array_equal(bare["msa_feat"], predicted["msa_feat"][0].numpy())
    np.testing.assert_array_equal(bare["target_feat"], predicted["target_feat"][0].numpy())


# ---------------------------------------------------------------------------------------------- sources
def test_msa_directory_and_bad_msa(tmp_path):
    chains = NpzChains(split="valid")
    record = chains[0]
    (tmp_path / f"{record.chain_id}.a3m").write_text(f">q\n{record.sequence}\n>hom\n{record.sequence[:-1]}-\n")
    dataset = FoldingDataset(chains, msas=str(tmp_path), config=SMALL)
    assert dataset.msa_depth(0) == 2 and dataset.msa_depth(1) == 1
    other = chains[1].sequence
    wrong = "W" if other[0] != "W" else "A"
    (tmp_path / f"{chains[1].chain_id}.a3m").write_text(f">q\n{wrong}{other[1:]}\n")
    with pytest.raises(MsaQueryMismatchError, match=rf"{chains[1].chain_id}\.a3m: record 'q'.*residue 1"):
        FoldingDataset(chains, msas=str(tmp_path), config=SMALL).msa_depth(1)
    with pytest.raises(FoldingDataError, match="no such folder"):
        MsaDirectory(str(tmp_path / "missing"))


def test_bad_chain_files(tmp_path):
    with pytest.raises(FoldingDataError, match="no such file"):
        NpzChains(str(tmp_path / "none.npz"))
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(FoldingDataError, match=r"junk\.npz: not a readable \.npz"):
        NpzChains(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "partial.npz", ids=np.array(["A"]))
    with pytest.raises(FoldingDataError, match=r"partial\.npz: missing keys"):
        NpzChains(str(tmp_path / "partial.npz"))
    with pytest.raises(FoldingDataError, match="no chain has split 'test'"):
        NpzChains(split="test")


def test_structure_files_give_the_same_features(tmp_path):
    """PDB and mmCIF files of the repository (data/structures/pdb) through the structure reader."""
    from megatron_protein.data.folding_dataset import StructureFileChains, increasing_residue_index

    pdb_dir = os.path.join(os.path.dirname(DEFAULT_CHAINS), "pdb")
    mmcif = StructureFileChains(os.path.join(pdb_dir, "mmcif", "5PTI.cif"))
    record = mmcif[0]
    assert record.chain_id == "5PTI_A" and record.sequence.startswith("RPDFCLEPPYTGPCKARIIRYFYNAKAGLCQTFVYGG")
    pdbs = StructureFileChains(os.path.join(pdb_dir, "dssp_pdb"))
    assert len(pdbs) == 40 and all(f.endswith(".pdb") for f in pdbs.files)
    config = dataclasses.replace(SMALL, crop_size=32)
    for chains in (mmcif, StructureFileChains([pdbs.files[0], pdbs.files[1]])):
        dataset = FoldingDataset(chains, msas=None, config=config)
        for i in range(len(chains)):
            features = dataset.train_example(i)
            ff.check_example(features)
            assert (np.diff(features["residue_index"]) > 0).all()
            assert features["backbone_rigid_mask"].sum() > 0.9 * features["aatype"].shape[0]
            assert dataset.msa_depth(i) == 1 and not features["profile_mask"].any()
    np.testing.assert_array_equal(increasing_residue_index(np.array([5, 6, 6, 6, 9, 1])), [5, 6, 7, 8, 11, 12])
    with pytest.raises(FoldingDataError, match="no PDB/mmCIF files"):
        StructureFileChains(str(tmp_path))


def test_cli_checks_a_data_set_and_fails_in_one_line(tmp_path, capsys):
    from megatron_protein.data.folding_dataset import main

    cif = os.path.join(os.path.dirname(DEFAULT_CHAINS), "pdb", "mmcif", "5PTI.cif")
    assert main(["--structures", cif, "--msas"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["chains"] == 1 and summary["with_msa"] == 0
    assert main(["--structures", cif, "--chain", "Q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {cif}: no protein chain 'Q'") and "\n" not in err
    (tmp_path / "5PTI_A.a3m").write_text(">q\nACDE\n")
    assert main(["--structures", cif, "--msas", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "5PTI_A.a3m: record 'q': the MSA's query has 4 residues" in err and "\n" not in err
