"""Structure I/O (megatron_protein.structure.io): real PDB/mmCIF files, constructed edge cases, write-then-read.

Sequences are checked against independent sources: the mmCIF files' own ``_entity_poly.pdbx_seq_one_letter_code_can``
(at the SEQRES positions listed in ``pdbx_poly_seq_scheme``), and for the dssp_pdb files the length of the
MDAnalysis DSSP reference string (one letter per residue) and biotite's residue listing.
"""
import glob
import gzip
import io as _io
import os
import shutil

import numpy as np
import pytest

from megatron_protein.structure import residue_constants as rc
from megatron_protein.structure.io import (
    StructureError,
    chain_from_prediction,
    read_atoms,
    read_chain,
    write_mmcif,
    write_pdb,
    write_structure,
)

# Some dssp_pdb files have no element column; biotite guesses it from the atom name and says so.
pytestmark = pytest.mark.filterwarnings("ignore:.*elements were guessed from atom name")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PDB_DIR = os.path.join(REPO, "data", "structures", "pdb")
DSSP_PDB = sorted(glob.glob(os.path.join(PDB_DIR, "dssp_pdb", "*.pdb")))
MMCIF = sorted(glob.glob(os.path.join(PDB_DIR, "mmcif", "*.cif")))


def test_test_data_present():
    assert len(DSSP_PDB) == 40 and len(MMCIF) == 4


@pytest.mark.parametrize("path", DSSP_PDB, ids=os.path.basename)
def test_dssp_pdb_files_read_with_right_sequence_and_masks(path):
    import biotite.structure as struc
    import biotite.structure.io.pdb as pdb

    chain = read_chain(path)
    dssp = open(path + ".dssp").read().split()[0]
    assert len(chain) == len(dssp)
    # Independent listing: biotite's residues of the file, three-letter names through the standard table.
    atoms = pdb.PDBFile.read(path).get_structure(model=1)
    _, names = struc.get_residues(atoms[struc.filter_amino_acids(atoms)])
    assert chain.sequence == "".join(rc.restype_3to1.get(n, "X") for n in names)
    assert chain.chain_id == os.path.basename(path)[4]
    # Masks: every atom37 slot set is an atom of that residue (or OXT); backbone present for nearly all.
    allowed = rc.restype_atom37_mask()[chain.aatype]
    allowed[:, rc.atom_order["OXT"]] = 1
    assert np.all(chain.atom_mask <= allowed)
    assert chain.ca_mask.mean() > 0.95
    assert np.all(chain.atom_positions[chain.atom_mask == 0] == 0)
    assert chain.atom_positions.dtype == np.float32 and chain.atom_mask.dtype == np.float32
    assert chain.residue_index.dtype == np.int64 and np.all(np.diff(chain.residue_index) > 0)


def _entity_check(path):
    import biotite.structure.io.pdbx as pdbx

    block = pdbx.CIFFile.read(path).block
    ent = block["entity_poly"]
    seqs = dict(zip(ent["entity_id"].as_array(str), ent["pdbx_seq_one_letter_code_can"].as_array(str)))
    scheme = block["pdbx_poly_seq_scheme"]
    return (
        {k: v.replace("\n", "").replace(" ", "") for k, v in seqs.items()},
        scheme["pdb_strand_id"].as_array(str),
        scheme["entity_id"].as_array(str),
        scheme["seq_id"].as_array(int),
        scheme["auth_seq_num"].as_array(str),
    )


@pytest.mark.parametrize("path", MMCIF, ids=os.path.basename)
def test_mmcif_files_read_with_entity_sequence(path):
    from megatron_protein.structure.io import protein_chain_ids

    seqs, strand, entity, seq_id, auth = _entity_check(path)
    chains = protein_chain_ids(read_atoms(path))
    assert chains == list(dict.fromkeys(strand.tolist()))
    for chain_id in chains:
        chain = read_chain(path, chain_id)
        rows = np.flatnonzero((strand == chain_id) & (auth != "?"))
        expected = "".join(seqs[entity[r]][seq_id[r] - 1] for r in rows)
        assert chain.sequence == expected
        full = read_chain(path, chain_id, include_unobserved=True)
        assert full.sequence == seqs[entity[np.flatnonzero(strand == chain_id)[0]]]
    assert read_chain(path).chain_id == chains[0]


def test_3pwp_chain_selection_and_ligands_ignored():
    path = os.path.join(PDB_DIR, "mmcif", "3PWP.cif")
    chain_c = read_chain(path, "C")
    assert chain_c.sequence == "LGYGFVNYI"  # the peptide; GOL, SO4 and waters are not residues of a chain
    assert len(read_chain(path, "A")) == 275


def test_gzipped_files_read_the_same(tmp_path):
    for src in (DSSP_PDB[0], os.path.join(PDB_DIR, "mmcif", "5PTI.cif")):
        gz = tmp_path / (os.path.basename(src) + ".gz")
        with open(src, "rb") as fin, gzip.open(gz, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        a, b = read_chain(src), read_chain(str(gz))
        assert a.sequence == b.sequence
        np.testing.assert_array_equal(a.atom_positions, b.atom_positions)


def _atom(serial, name, resname, chain, resnum, x, y, z, altloc=" ", icode=" ", occ=1.0, b=20.0, record="ATOM  "):
    element = "SE" if name == "SE" else name[0]
    return (
        f"{record}{serial:5d} {name:<4}{altloc}{resname:>3} {chain}{resnum:4d}{icode}   "
        f"{x:8.3f}{y:8.3f}{z:8.3f}{occ:6.2f}{b:6.2f}          {element:>2}"
    )


def _residue(serial, resname, chain, resnum, origin, atoms=("N", "CA", "C", "O", "CB"), **kw):
    lines = []
    for k, name in enumerate(atoms):
        lines.append(_atom(serial + k, name, resname, chain, resnum, origin + k * 0.9, 1.0 + k, 2.0, **kw))
    return lines


def test_altlocs_insertion_codes_mse_nonstandard_and_missing_atoms(tmp_path):
    lines = []
    lines += _residue(1, "ALA", "A", 50, 0.0)
    # Residue 51 has two alternate locations of CB: B has the higher occupancy and must win.
    lines += _residue(6, "SER", "A", 51, 4.0, atoms=("N", "CA", "C", "O"))
    lines.append(_atom(10, "CB", "SER", "A", 51, 7.0, 7.0, 7.0, altloc="A", occ=0.3))
    lines.append(_atom(11, "CB", "SER", "A", 51, 8.0, 8.0, 8.0, altloc="B", occ=0.7))
    lines.append(_atom(12, "OG", "SER", "A", 51, 9.0, 9.0, 9.0, altloc="A", occ=0.3))
    lines.append(_atom(13, "OG", "SER", "A", 51, 9.5, 9.5, 9.5, altloc="B", occ=0.7))
    # Insertion codes 52, 52A, 52B; selenomethionine at 52A (HETATM, SE -> SD); phosphoserine at 52B.
    lines += _residue(14, "GLY", "A", 52, 8.0, atoms=("N", "CA", "C", "O"))
    lines += _residue(18, "MSE", "A", 52, 12.0, atoms=("N", "CA", "C", "O", "CB", "CG", "SE", "CE"), icode="A",
                      record="HETATM")
    lines += _residue(26, "SEP", "A", 52, 16.0, atoms=("N", "CA", "C", "O", "CB", "OG", "P"), icode="B",
                      record="HETATM")
    # Residue 53 lacks its O and CB (missing atoms); 55-56 are missing entirely (a gap in the numbering).
    lines += _residue(33, "LEU", "A", 53, 20.0, atoms=("N", "CA", "C"))
    lines += _residue(36, "UNK", "A", 57, 24.0, atoms=("N", "CA", "C", "O"))
    lines += _residue(40, "LYS", "B", 1, 30.0)  # another chain
    lines.append(_atom(45, "O", "HOH", "A", 100, 40.0, 40.0, 40.0, record="HETATM"))
    path = tmp_path / "edge.pdb"
    path.write_text("\n".join(lines) + "\nEND\n")

    chain = read_chain(str(path))
    assert chain.chain_id == "A"
    assert chain.sequence == "ASGMSLX"
    assert chain.residue_index.tolist() == [50, 51, 52, 52, 52, 53, 57]
    assert chain.insertion_code.tolist() == ["", "", "", "A", "B", "", ""]
    assert chain.residue_labels() == ["50", "51", "52", "52A", "52B", "53", "57"]
    assert chain.residue_names == ["ALA", "SER", "GLY", "MSE", "SEP", "LEU", "UNK"]
    cb, og, sd, o = (rc.atom_order[n] for n in ("CB", "OG", "SD", "O"))
    np.testing.assert_allclose(chain.atom_positions[1, cb], [8.0, 8.0, 8.0])
    np.testing.assert_allclose(chain.atom_positions[1, og], [9.5, 9.5, 9.5])
    assert chain.atom_mask[3, sd] == 1 and chain.atom_positions[3, sd, 0] == pytest.approx(12.0 + 6 * 0.9, abs=1e-3)
    assert chain.atom_mask[4].sum() == 6  # SEP's phosphate P is not an atom of serine
    assert chain.atom_mask[5, o] == 0 and chain.atom_mask[5, cb] == 0 and chain.atom_mask[5, :3].sum() == 3
    assert chain.atom_mask[6].sum() == 4 and chain.aatype[6] == 20
    assert chain.b_factors[0, 1] == pytest.approx(20.0)
    assert read_chain(str(path), "B").sequence == "K"


def test_include_unobserved_from_the_seqres_scheme(tmp_path):
    import biotite.structure.io.pdbx as pdbx

    src = os.path.join(PDB_DIR, "mmcif", "5PTI.cif")
    cif = pdbx.CIFFile.read(src)
    sites = cif.block["atom_site"]
    columns = {key: sites[key].as_array(str) for key in sites.keys()}
    drop = np.isin(columns["label_seq_id"], ["10", "11", "30"])
    cif.block["atom_site"] = pdbx.CIFCategory({key: col[~drop] for key, col in columns.items()})
    path = tmp_path / "5PTI_gaps.cif"
    cif.write(str(path))

    observed = read_chain(str(path))
    full = read_chain(str(path), include_unobserved=True)
    original = read_chain(src)
    assert len(observed) == len(original) - 3
    assert full.sequence == original.sequence
    gone = [i for i, label in enumerate(full.residue_labels()) if label not in observed.residue_labels()]
    assert len(gone) == 3 and np.all(full.atom_mask[gone] == 0)
    keep = [i for i in range(len(full)) if i not in gone]
    np.testing.assert_array_equal(full.atom_positions[keep], observed.atom_positions)
    np.testing.assert_array_equal(full.residue_index, original.residue_index)


@pytest.mark.parametrize("suffix", [".pdb", ".cif"])
def test_write_then_read_gives_same_coordinates_and_plddt(tmp_path, suffix):
    src = read_chain(os.path.join(PDB_DIR, "mmcif", "5PTI.cif"))
    rng = np.random.default_rng(0)
    plddt = np.round(rng.uniform(20, 98, size=len(src)), 2)
    pred = chain_from_prediction(src.aatype, src.atom_positions, src.atom_mask, src.residue_index, chain_id="A")
    out = tmp_path / f"model{suffix}"
    write_structure(pred, str(out), plddt=plddt)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    back = read_chain(str(out))
    assert back.sequence == src.sequence
    np.testing.assert_array_equal(back.residue_index, src.residue_index)
    np.testing.assert_array_equal(back.atom_mask, src.atom_mask)
    np.testing.assert_allclose(back.atom_positions, src.atom_positions, atol=1e-3)  # 3 decimals in PDB
    per_res_b = np.where(back.atom_mask > 0, back.b_factors, np.nan)
    np.testing.assert_allclose(np.nanmax(per_res_b, 1), plddt, atol=1e-2)
    np.testing.assert_allclose(np.nanmin(per_res_b, 1), plddt, atol=1e-2)


def test_writer_takes_torch_outputs_and_is_atomic(tmp_path, monkeypatch):
    import torch

    src = read_chain(DSSP_PDB[1])
    pred = chain_from_prediction(
        torch.from_numpy(src.aatype), torch.from_numpy(src.atom_positions).bfloat16(), torch.from_numpy(src.atom_mask)
    )
    assert pred.residue_index[0] == 1 and pred.atom_positions.dtype == np.float32
    target = tmp_path / "model.pdb"
    target.write_text("old\n")
    with pytest.raises(ValueError):
        write_pdb(pred, str(target), plddt=np.full(len(pred), 120.0))  # pLDDT is on AF2's 0-100 scale
    assert target.read_text() == "old\n"

    import biotite.structure.io.pdb as pdb

    def broken(self, path):
        with open(path, "w") as fh:
            fh.write("ATOM  half")
        raise OSError("disk full")

    monkeypatch.setattr(pdb.PDBFile, "write", broken)
    with pytest.raises(OSError):
        write_pdb(pred, str(target), plddt=np.full(len(pred), 50.0))
    assert target.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["model.pdb"]


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", "empty file"),
        (">seq1\nMKTAYIAKQR\n", "no ATOM/HETATM records"),
        ("ATOM      1  N   ALA A   1      abc     1.000   2.000  1.00 20.00           N\n", ":1: expected x, y, z"),
    ],
    ids=["empty", "fasta", "bad-coordinates"],
)
def test_bad_input_names_the_file(tmp_path, content, expected):
    path = tmp_path / "bad.pdb"
    path.write_text(content)
    with pytest.raises(StructureError) as err:
        read_chain(str(path))
    assert str(err.value).startswith(str(path)) and expected in str(err.value)


def test_missing_chain_and_broken_mmcif(tmp_path):
    with pytest.raises(StructureError, match="no protein chain 'Z'; protein chains in the file: A"):
        read_chain(DSSP_PDB[0], "Z")
    bad = tmp_path / "bad.cif"
    bad.write_text("data_x\n#\n_entry.id x\n")
    with pytest.raises(StructureError, match="bad.cif: no atom_site"):
        read_chain(str(bad))
    with pytest.raises(StructureError, match="no such file"):
        read_chain(str(tmp_path / "absent.pdb"))
