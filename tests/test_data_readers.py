"""Streaming readers: Pfam headers, FASTA, Stockholm (multi-block, many alignments, gzip), TAPE LMDB and JSON."""
import gzip
import json
import os
import pickle

import pytest

from megatron_protein.data.readers import (InputFormatError, detect_format, parse_pfam_header, partition_file,
                                           read_fasta, read_records, read_stockholm, read_tape_json,
                                           read_tape_lmdb)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "data", "pfam", "pfam_sample.fasta")
MINIFAM = os.path.join(REPO, "data", "pfam", "seeds", "minifam.sto")  # HMMER's 5-alignment Pfam test file


def test_pfam_header():
    h = parse_pfam_header(">A0A0A0MRZ7_9ARAB/67-118 A0A0A0MRZ7.1 PF00001.21;7tm_1;")  # real Pfam-A.fasta form
    assert (h.name, h.start, h.end, h.protein_accession) == ("A0A0A0MRZ7_9ARAB", 67, 118, "A0A0A0MRZ7.1")
    assert (h.family_accession, h.family_version, h.family_name) == ("PF00001", 21, "7tm_1")
    h = parse_pfam_header("GCF_000006745_006680/166-201 GCF_000006745_006680 PF10417.12;1-cysPrx_C;")
    assert (h.family_accession, h.family_name, h.start, h.end) == ("PF10417", "1-cysPrx_C", 166, 201)
    assert parse_pfam_header(">sp|P69905|HBA_HUMAN Hemoglobin subunit alpha") is None


def test_fasta(tmp_path):
    path = tmp_path / "x.fasta"
    path.write_text(">Q1/1-8 Q1.2 PF00042.9;Globin;\nMVLS\nPADK\n\n>plain description here\nAC-DE\n;comment\nfg\n")
    records = list(read_fasta(str(path)))
    assert [(r.name, r.sequence, r.family, r.family_name) for r in records] == [
        ("Q1/1-8", "MVLSPADK", "PF00042", "Globin"), ("plain", "AC-DEfg", None, None)]
    assert records[1].location.endswith("x.fasta:5")


def test_fasta_errors(tmp_path):
    path = tmp_path / "a.fasta"
    path.write_text("\nMKV\n>s1\nAC\n")
    with pytest.raises(InputFormatError, match=r"a\.fasta:2: sequence line before any '>' header"):
        list(read_fasta(str(path)))
    path = tmp_path / "b.fasta"
    path.write_text(">s1\nAC\n>s2 empty\n>s3\nDE\n")
    with pytest.raises(InputFormatError, match=r"b\.fasta:3: empty record 's2'"):
        list(read_fasta(str(path)))
    path.write_text(">s1\nAC\n>last\n")
    with pytest.raises(InputFormatError, match=r"b\.fasta:3: empty record 'last'"):
        list(read_fasta(str(path)))


MULTI_BLOCK = """# STOCKHOLM 1.0
#=GF ID   Toy
#=GF AC   PF99999.3
#=GS seqA/1-7 AC P00001.1

seqA/1-7   MK-VL
seqB/3-11  mkAVL
#=GC SS_cons ..HHH

seqA/1-7   ..AGT.
seqB/3-11  GGA--T
//
# STOCKHOLM 1.0
#=GF ID   Other
seqC  WWW
//
"""


def test_stockholm_multi_block_and_many_alignments(tmp_path):
    path = tmp_path / "toy.sto"
    path.write_text(MULTI_BLOCK)
    records = list(read_stockholm(str(path)))
    assert [(r.name, r.sequence, r.family) for r in records] == [
        ("seqA/1-7", "MK-VL..AGT.", "PF99999"), ("seqB/3-11", "mkAVLGGA--T", "PF99999"), ("seqC", "WWW", "Other")]
    assert records[1].location.endswith("toy.sto:7")
    gz = tmp_path / "toy.sto.gz"
    with gzip.open(gz, "wt") as f:
        f.write(MULTI_BLOCK)
    assert [(r.name, r.sequence) for r in read_records(str(gz))] == [(r.name, r.sequence) for r in records]


def test_stockholm_real_seed_file():
    minifam = list(read_stockholm(MINIFAM))
    assert len({r.name for r in minifam}) == 39  # 5 alignments (see data/pfam/PROVENANCE.md)
    assert {r.family for r in minifam} == {"PF05420", "PF00811", "PF02248", "PF09307", "PF04731"}
    for family in {r.family for r in minifam}:  # the rows of one alignment all have its width
        assert len({len(r.sequence) for r in minifam if r.family == family}) == 1


@pytest.mark.parametrize("path,fmt,reader", [
    (SAMPLE, "fasta", read_fasta),
    (MINIFAM, "stockholm", read_stockholm),
])
def test_partitions_read_the_same_records(path, fmt, reader):
    parts = partition_file(path, fmt, 7)
    assert len(parts) > 1 and parts[0].start == 0 and parts[-1].end == os.path.getsize(path)
    assert all(a.end == b.start for a, b in zip(parts, parts[1:]))
    whole = [(r.name, r.sequence, r.family, r.location) for r in reader(path)]
    pieces = [(r.name, r.sequence, r.family, r.location) for part in parts for r in reader(path, part)]
    assert pieces == whole  # same records, and the same file:line locations


def test_stockholm_errors(tmp_path):
    path = tmp_path / "open.sto"
    path.write_text("# STOCKHOLM 1.0\nseqA  ACDE\nseqB  ACDF\n")
    with pytest.raises(InputFormatError, match=r"open\.sto:3: end of file inside the alignment started at line 1; "
                                               r"expected '//'"):
        list(read_stockholm(str(path)))
    path.write_text("# STOCKHOLM 1.0\nseqA  ACDE\n# STOCKHOLM 1.0\nseqB AC\n//\n")
    with pytest.raises(InputFormatError, match=r"open\.sto:3: .*not closed with '//'"):
        list(read_stockholm(str(path)))
    path.write_text("# STOCKHOLM 1.0\nseqA  AC DE\n//\n")
    with pytest.raises(InputFormatError, match=r"open\.sto:2: expected '<name> <aligned sequence>'"):
        list(read_stockholm(str(path)))


def write_tape_lmdb(path, items):
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, item in enumerate(items):
            txn.put(str(i).encode(), pickle.dumps(item))
        txn.put(b"num_examples", pickle.dumps(len(items)))
    env.close()


TAPE_ITEMS = [{"primary": "MKVLAAGIV", "protein_length": 9, "clan": 3, "family": 17},
              {"primary": "GGSWY", "protein_length": 5, "clan": 1, "family": 2}]


def test_tape_lmdb(tmp_path):
    path = tmp_path / "pfam_valid.lmdb"
    write_tape_lmdb(path, TAPE_ITEMS)
    assert detect_format(str(path)) == "tape-lmdb"
    records = list(read_records(str(path)))
    assert [(r.sequence, r.family) for r in records] == [("MKVLAAGIV", "17"), ("GGSWY", "2")]
    bad = tmp_path / "bad.lmdb"
    write_tape_lmdb(bad, [{"sequence": "AC"}])
    with pytest.raises(InputFormatError, match=r"bad\.lmdb: record 0: expected a dict with a 'primary'"):
        list(read_tape_lmdb(str(bad)))


def test_tape_json(tmp_path):
    items = [dict(item, id=f"r{i}") for i, item in enumerate(TAPE_ITEMS * 50)]
    path = tmp_path / "pfam_holdout.json"
    path.write_text(json.dumps(items, indent=1))
    for chunk_size in (16, 1 << 16):  # records straddle chunk boundaries
        records = list(read_tape_json(str(path), chunk_size=chunk_size))
        assert [r.sequence for r in records] == [i["primary"] for i in items]
        assert records[3].name == "r3" and records[0].family == "17"
    lines = tmp_path / "x.jsonl"
    lines.write_text("\n".join(json.dumps(i) for i in items[:3]) + "\n")
    assert [r.location for r in read_tape_json(str(lines))] == [f"{lines}:{n}" for n in (1, 2, 3)]
    path.write_text('[\n{"primary": "AC"},\n{"primary": "DE"\n')
    with pytest.raises(InputFormatError, match=r"pfam_holdout\.json:\d+: invalid JSON in record 1"):
        list(read_tape_json(str(path)))


def test_embedded_sample_is_pfam_fasta():
    records = list(read_records(SAMPLE))
    assert len(records) == 3912 and len({r.family for r in records}) == 300
    assert all(r.family.startswith("PF") for r in records)
