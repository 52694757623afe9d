"""MSA readers (A3M, Stockholm through easel), the A3M writer, jackhmmer through pyhmmer, and bad input."""
import glob
import gzip
import os
import string
from collections import Counter

import numpy as np
import pytest

from megatron_protein.data import msa as msa_lib
from megatron_protein.data.msa import (JackhmmerMsaBuilder, JackhmmerSettings, Msa, MsaError,
                                       MsaQueryMismatchError, read_a3m, read_msa, read_stockholm, write_a3m)
from megatron_protein.data.readers import read_fasta
from megatron_protein.data.readers import read_stockholm as read_stockholm_records
from megatron_protein.structure import residue_constants as rc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PFAM_SAMPLE = os.path.join(REPO, "data", "pfam", "pfam_sample.fasta")
MINIFAM = os.path.join(REPO, "data", "pfam", "seeds", "minifam.sto")
TEST_SEEDS = sorted(glob.glob(os.path.join(REPO, "tests", "data", "msa", "*.sto")))
SHARED_SEEDS = sorted(glob.glob("/work/shared/data/pfam/seeds/*.sto"))
SHIPPED_MSAS = sorted(glob.glob(os.path.join(REPO, "data", "structures", "msas", "*.a3m.gz")))


def ids(sequence):
    return [rc.msa_letter_to_id(c) for c in sequence]


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


# ------------------------------------------------------------------------------------------------------ A3M
def test_a3m_insertions_become_deletion_counts(tmp_path):
    path = write(tmp_path / "toy.a3m", ">query\nACDEF\n>s1 has two insertions\nA-cDEgF\n>s2\naaACDEFkk\n")
    msa = read_a3m(path)
    assert msa.names == ("query", "s1", "s2")
    np.testing.assert_array_equal(msa.msa, [ids("ACDEF"), ids("A-DEF"), ids("ACDEF")])
    # 'c' before D and 'g' before F; 'aa' before the first column; insertions after the last column are dropped.
    np.testing.assert_array_equal(msa.deletion_matrix, [[0, 0, 0, 0, 0], [0, 0, 1, 0, 1], [2, 0, 0, 0, 0]])
    assert msa.aligned(1) == "A-DEF"
    assert msa.query == "ACDEF"
    # Identical aligned rows are dropped by deduplicate (s2 equals the query on the query's columns).
    assert msa.deduplicate().names == ("query", "s1")


def test_a3m_round_trip_of_real_alignments(tmp_path):
    """Real Stockholm seeds converted to A3M, written and read back: same rows, ids and deletions, same text."""
    for name, msa in msa_lib.iter_stockholm(MINIFAM):
        first = tmp_path / f"{name}.a3m"
        write_a3m(msa, str(first))
        again = read_a3m(str(first))
        assert again.rows == msa.rows and again.names == msa.names
        np.testing.assert_array_equal(again.msa, msa.msa)
        np.testing.assert_array_equal(again.deletion_matrix, msa.deletion_matrix)
        second = tmp_path / f"{name}.again.a3m"
        write_a3m(again, str(second))
        assert first.read_text() == second.read_text()
        assert not [p for p in os.listdir(tmp_path) if ".tmp." in p]


@pytest.mark.skipif(not SHIPPED_MSAS, reason="no shipped MSAs in data/structures/msas")
def test_shipped_a3m_round_trip(tmp_path):
    source = SHIPPED_MSAS[0]
    msa = read_msa(source)
    assert msa.depth > 1
    write_a3m(msa, str(tmp_path / "x.a3m"))
    with gzip.open(source, "rt") as f:
        assert (tmp_path / "x.a3m").read_text() == f.read()


# ------------------------------------------------------------------------------------------------ Stockholm
def check_stockholm_file(path):
    """Every alignment: the query is the first sequence with its gaps removed, each row holds exactly that
    sequence's residues (upper case aligned, lower case inserted, checked against the project's own Stockholm
    reader), and deletion counts add up to the lower-case letters."""
    by_alignment = {}  # the project's reader gives records with their alignment's family (accession or ID)
    for record in read_stockholm_records(path):
        by_alignment.setdefault(record.family, []).append(record)
    alignments = list(msa_lib.iter_stockholm(path))
    assert len(alignments) == len(by_alignment)
    for (name, msa), records in zip(alignments, by_alignment.values()):
        assert msa.depth == len(records)
        assert list(msa.names) == [r.name for r in records]
        ungapped = [r.sequence.replace("-", "").replace(".", "").upper() for r in records]
        assert msa.query == ungapped[0]
        for row, residues, deletions in zip(msa.rows, ungapped, msa.deletion_matrix):
            assert row.replace("-", "").upper() == residues
            # Insertions after the last query column have no column to count against (dropped, as in AF2).
            assert deletions.sum() == sum(c.islower() for c in row.rstrip(string.ascii_lowercase))
        assert msa.msa.shape == (len(records), len(ungapped[0]))
    return alignments


def test_stockholm_minifam_five_alignments():
    alignments = check_stockholm_file(MINIFAM)
    assert [name for name, _ in alignments] == ["BCSC_C", "Ependymin", "Como_SCP", "MHC2-interact", "Caudal_act"]
    assert sum(msa.depth for _, msa in alignments) == 39  # as data/pfam/PROVENANCE.md and the shared README say
    assert read_stockholm(MINIFAM, alignment="Como_SCP").depth == 10
    with pytest.raises(MsaError, match="no alignment named 'nope'"):
        read_stockholm(MINIFAM, alignment="nope")


@pytest.mark.parametrize("path", TEST_SEEDS, ids=os.path.basename)
def test_stockholm_test_seeds(path):
    check_stockholm_file(path)


def test_stockholm_globins_query_columns():
    msa = read_stockholm(os.path.join(REPO, "tests", "data", "msa", "globins4.sto"))
    assert msa.names[0] == "HBB_HUMAN"
    assert msa.query.startswith("VHLTPEEKSAVTALWGKV") and msa.length == 146  # human beta globin, 146 residues
    # GLB5_PETMA has 8 residues before HBB's first residue and the alignment's leading dots: insertions.
    assert msa.deletion_matrix[3, 0] == 8 and msa.rows[3].startswith("pivdtgsv")


@pytest.mark.skipif(not SHARED_SEEDS, reason="/work/shared/data/pfam/seeds is not on this machine")
def test_stockholm_every_shared_seed():
    for path in SHARED_SEEDS:
        check_stockholm_file(path)


# ------------------------------------------------------------------------------------------------ jackhmmer
def test_jackhmmer_finds_its_own_family(tmp_path):
    """A real ACP_syn_III domain against the embedded Pfam sample: its 15 family members come back, little else."""
    records = list(read_fasta(PFAM_SAMPLE))
    family_of = {r.name: r.family for r in records}
    members = [r for r in records if r.family_name == "ACP_syn_III"]
    assert len(members) == 16
    query = members[0]
    builder = JackhmmerMsaBuilder(PFAM_SAMPLE, JackhmmerSettings(iterations=2, evalue=1e-3),
                                  cache_dir=str(tmp_path / "cache"), cpus=1)
    msa = builder.build(query.sequence, "query")
    assert msa.query == query.sequence and msa.names[0] == "query"
    hit_families = Counter(family_of[name.rsplit("/", 1)[0]] for name in msa.names[1:])
    assert hit_families[query.family] >= 12, hit_families
    assert hit_families[query.family] >= 0.9 * sum(hit_families.values()), hit_families
    assert msa.depth == len(set(map(bytes, msa.msa)))  # identical rows (the query's own entry) removed

    # Cached: one A3M under the query's key, written atomically; a second build reads it back unchanged.
    cached = glob.glob(str(tmp_path / "cache" / "*" / "*.a3m"))
    assert cached == [builder.cache_path(query.sequence)]
    again = builder.build(query.sequence, "query")
    assert again.source == cached[0] and again.rows == msa.rows
    assert not glob.glob(str(tmp_path / "cache" / "*" / "*.tmp.*"))
    # Another setting is another key.
    other = JackhmmerMsaBuilder(PFAM_SAMPLE, JackhmmerSettings(iterations=1), cache_dir=str(tmp_path / "cache"))
    assert other.cache_path(query.sequence) != builder.cache_path(query.sequence)


def test_jackhmmer_max_sequences_and_no_homologues(tmp_path):
    records = list(read_fasta(PFAM_SAMPLE))
    query = next(r for r in records if r.family_name == "ACP_syn_III")
    capped = JackhmmerMsaBuilder(PFAM_SAMPLE, JackhmmerSettings(iterations=1, max_sequences=5), cpus=1)
    assert capped.build(query.sequence).depth == 5
    # A low-complexity made-up sequence has no homologue: the MSA is the query alone.
    alone = capped.build("GS" * 30)
    assert alone.depth == 1 and alone.query == "GS" * 30


def test_single_sequence_mode():
    msa = Msa.single_sequence("mkv")
    assert msa.depth == 1 and msa.query == "MKV"
    np.testing.assert_array_equal(msa.msa, [ids("MKV")])
    assert not msa.deletion_matrix.any()


# ------------------------------------------------------------------------------------------------ bad input
def test_query_mismatch_names_file_and_record(tmp_path):
    path = write(tmp_path / "q.a3m", ">myquery\nACDEF\n>s1\nAC-EF\n")
    with pytest.raises(MsaQueryMismatchError, match=r"q\.a3m: record 'myquery'.*residue 3 \('D' in the MSA, 'W'"):
        read_a3m(path, query="ACWEF")
    with pytest.raises(MsaQueryMismatchError, match="has 5 residues but the chain has 4"):
        read_a3m(path, query="ACDE")
    read_a3m(path, query="ACXEF")  # X matches anything


def test_bad_letters_empty_files_and_wrong_lengths(tmp_path):
    with pytest.raises(MsaError, match=r"bad\.a3m:3: record 's1': character '1' at position 3"):
        read_a3m(write(tmp_path / "bad.a3m", ">q\nACDEF\n>s1\nAC1EF\n"))
    with pytest.raises(MsaError, match=r"short\.a3m:3: record 's1': 4 aligned columns.*expected 5"):
        read_a3m(write(tmp_path / "short.a3m", ">q\nACDEF\n>s1\nACDE\n"))
    with pytest.raises(MsaError, match=r"empty\.a3m: empty file"):
        read_a3m(write(tmp_path / "empty.a3m", ""))
    with pytest.raises(MsaError, match=r"empty\.sto: empty file"):
        read_stockholm(write(tmp_path / "empty.sto", ""))
    with pytest.raises(MsaError, match=r"junk\.sto: not a readable Stockholm"):
        read_stockholm(write(tmp_path / "junk.sto", "this is not an alignment\n"))
    with pytest.raises(MsaError, match="record 'q'.*gaps or insertions"):
        read_a3m(write(tmp_path / "gapq.a3m", ">q\nAC-EF\n"))
    with pytest.raises(MsaError, match=r"<query>: record 'x': letter '\*' at position 4 is not an amino acid"):
        JackhmmerMsaBuilder(PFAM_SAMPLE).build("ACD*", "x")
    with pytest.raises(MsaError, match="empty sequence"):
        msa_lib.validate_sequence("", "f.fasta", "r")


def test_cli_one_line_errors_and_no_output(tmp_path, capsys):
    bad = write(tmp_path / "bad.a3m", ">q\nACDEF\n>s1\nAC1EF\n")
    assert msa_lib.main(["info", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad}:3: record 's1'") and "\n" not in err
    good = write(tmp_path / "good.a3m", ">q\nACDEF\n")
    assert msa_lib.main(["info", good, "--sequence", "ACDEW"]) == 2
    assert "differs from --sequence at residue 5" in capsys.readouterr().err
    queries = write(tmp_path / "queries.fasta", ">ok\nACDEFGHIK\n>bad\nAC9EF\n")
    out_dir = tmp_path / "out"
    assert msa_lib.main(["build", "--queries", queries, "--database", PFAM_SAMPLE, "--out-dir", str(out_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {queries}:3: record 'bad': letter '9'") and "\n" not in err
    assert not out_dir.exists()


def test_cli_build_writes_a3ms(tmp_path, capsys):
    records = list(read_fasta(PFAM_SAMPLE))
    query = next(r for r in records if r.family_name == "ACP_syn_III")
    queries = write(tmp_path / "q.fasta", f">acp\n{query.sequence}\n")
    assert msa_lib.main(["build", "--queries", queries, "--database", PFAM_SAMPLE, "--out-dir",
                         str(tmp_path / "out"), "--iterations", "1", "--cpus", "1"]) == 0
    msa = read_a3m(str(tmp_path / "out" / "acp.a3m"), query=query.sequence)
    assert msa.depth > 10
    assert '"with_homologues": 1' in capsys.readouterr().out
