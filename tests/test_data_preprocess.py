"""preprocess: inputs to .bin/.idx, summary, splits by family and at random, workers, bad input leaves nothing."""
import gzip
import json
import os

import pytest

from megatron_protein.data.indexed_dataset import MMapIndexedDataset
from megatron_protein.data.preprocess import main, parse_fractions, preprocess
from megatron_protein.data.readers import InputFormatError, read_records
from megatron_protein.data.tokenizer import IUPACTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "data", "pfam", "pfam_sample.fasta")
TOK = IUPACTokenizer()


def test_fasta_round_trip_and_summary(tmp_path):
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">a/1-5 a PF00001.1;F1;\nMKV\nLA\n>b/1-4 b PF00002.1;F2;\nAJ*c\n>c only gaps\n--.\n"
                     ">d/1-600 d PF00003.1;F3;\n" + "W" * 600 + "\n")
    prefix = str(tmp_path / "out" / "pf")
    summary = preprocess([str(fasta)], prefix, progress=False, max_length=500)
    ds = MMapIndexedDataset(prefix)
    assert [TOK.decode(ds[i]) for i in range(len(ds))] == ["MKVLA", "A<unk><unk>C"]
    out = summary["outputs"][prefix]
    assert (out["sequences"], out["residues"], out["unknown_residues"], out["families"]) == (2, 9, 2, 2)
    assert summary["dropped"] == {"no residues after removing gaps": 1, "longer than --max-length 500": 1}
    assert out["length_histogram"]["1-31"] == 2
    assert json.load(open(prefix + "_summary.json")) == summary


def test_stockholm_gzip_and_json_inputs(tmp_path):
    sto = tmp_path / "a.sto.gz"
    with gzip.open(sto, "wt") as f:
        f.write("# STOCKHOLM 1.0\n#=GF AC PF00005.2\nx  AC-d\ny  --..\n\nx  EF\ny  .-..\n//\n")
    js = tmp_path / "b.json"
    js.write_text(json.dumps([{"primary": "MKV", "family": 4}, {"primary": "WY", "family": 5}]))
    prefix = str(tmp_path / "mixed")
    summary = preprocess([str(sto), str(js)], prefix, progress=False)
    ds = MMapIndexedDataset(prefix)
    assert [TOK.decode(ds[i]) for i in range(len(ds))] == ["ACDEF", "MKV", "WY"]
    assert summary["dropped"] == {"no residues after removing gaps": 1}


def test_split_by_family_holds_out_families(tmp_path):
    prefix = str(tmp_path / "pfam")
    summary = preprocess([SAMPLE], prefix, split_by_family=(0.9, 0.05, 0.05), seed=1234, progress=False)
    families = {}
    for split in ("train", "valid", "test"):
        assert summary["outputs"][f"{prefix}_{split}"]["sequences"] > 0
    # map each sequence back to its family through the input order (one pass over the sample)
    records = list(read_records(SAMPLE))
    by_tokens = {}
    for r in records:
        by_tokens.setdefault(TOK.decode(TOK.encode(r.sequence)), set()).add(r.family)
    for split in ("train", "valid", "test"):
        ds = MMapIndexedDataset(f"{prefix}_{split}")
        families[split] = set().union(*(by_tokens[TOK.decode(ds[i])] for i in range(len(ds))))
    assert not families["train"] & families["valid"] and not families["train"] & families["test"]
    assert not families["valid"] & families["test"]
    assert sum(len(MMapIndexedDataset(f"{prefix}_{s}")) for s in ("train", "valid", "test")) == len(records)
    assert 0.8 < len(families["train"]) / 300 < 0.97
    # reproducible by seed; another seed holds out other families
    again = str(tmp_path / "again")
    preprocess([SAMPLE], again, split_by_family=(0.9, 0.05, 0.05), seed=1234, progress=False)
    assert open(f"{again}_valid.bin", "rb").read() == open(f"{prefix}_valid.bin", "rb").read()
    other = str(tmp_path / "other")
    preprocess([SAMPLE], other, split_by_family=(0.9, 0.05, 0.05), seed=99, progress=False)
    assert open(f"{other}_valid.bin", "rb").read() != open(f"{prefix}_valid.bin", "rb").read()


def test_split_random_and_workers(tmp_path):
    one = str(tmp_path / "one")
    two = str(tmp_path / "two")
    gz = tmp_path / "sample.fasta.gz"  # gzip cannot be cut into parts: read in the main process, encoded in the pool
    with open(SAMPLE, "rb") as src, gzip.open(gz, "wb") as dst:
        dst.write(src.read())
    three = str(tmp_path / "three")
    s1 = preprocess([SAMPLE], one, split_random=(0.8, 0.1, 0.1), seed=3, progress=False, workers=1)
    s2 = preprocess([SAMPLE], two, split_random=(0.8, 0.1, 0.1), seed=3, progress=False, workers=2, batch_size=256)
    s3 = preprocess([str(gz)], three, split_random=(0.8, 0.1, 0.1), seed=3, progress=False, workers=2,
                    batch_size=256)
    assert s1["outputs"][f"{one}_train"] == s2["outputs"][f"{two}_train"] == s3["outputs"][f"{three}_train"]
    for split in ("train", "valid", "test"):
        for other in (two, three):
            assert open(f"{one}_{split}.bin", "rb").read() == open(f"{other}_{split}.bin", "rb").read()
            assert open(f"{one}_{split}.idx", "rb").read() == open(f"{other}_{split}.idx", "rb").read()
    counts = [s1["outputs"][f"{one}_{s}"]["sequences"] for s in ("train", "valid", "test")]
    assert sum(counts) == 3912 and abs(counts[1] / 3912 - 0.1) < 0.02
    # random split mixes families: most valid families also occur in train
    assert s1["outputs"][f"{one}_valid"]["families"] > 100


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("content,message", [
    (">ok\nACD\n" * 100 + "MKV\n", None),  # not an error: continuation line of the last record
    ("MKV\n>s\nAC\n", r"in\.fasta:1: sequence line before any '>' header"),
    (">s1\nACD\n" * 100 + ">empty\n>s2\nAC\n" + ">s3\nACD\n" * 100, r"in\.fasta:201: empty record 'empty'"),
])
def test_bad_fasta_leaves_nothing(tmp_path, content, message, workers):
    fasta = tmp_path / "in.fasta"
    fasta.write_text(content)
    out = tmp_path / "out"
    out.mkdir()
    if message is None:
        preprocess([str(fasta)], str(out / "x"), progress=False, batch_size=7, workers=workers)
        assert sorted(os.listdir(out)) == ["x.bin", "x.idx", "x_summary.json"]
        return
    with pytest.raises(InputFormatError, match=message):
        preprocess([str(fasta)], str(out / "x"), split_by_family=(0.9, 0.05, 0.05), progress=False, batch_size=7,
                   workers=workers)
    assert os.listdir(out) == []


def test_bad_stockholm_leaves_nothing(tmp_path):
    sto = tmp_path / "in.sto"
    sto.write_text("# STOCKHOLM 1.0\nx AC\n//\n# STOCKHOLM 1.0\ny DE\n")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputFormatError, match=r"in\.sto:5: end of file inside the alignment started at line 4"):
        preprocess([str(sto)], str(out / "x"), progress=False, workers=2)
    assert os.listdir(out) == []


def test_cli(tmp_path, capsys):
    prefix = str(tmp_path / "cli")
    assert main(["--input", SAMPLE, "--output-prefix", prefix, "--split-by-family", "0.9,0.05,0.05",
                 "--no-progress", "--tensorboard-dir", str(tmp_path / "tb")]) == 0
    printed = capsys.readouterr().out
    assert "3,912 records" in printed and "_valid:" in printed
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))
    assert parse_fractions("8,1,1", "--x") == (0.8, 0.1, 0.1)
    with pytest.raises(ValueError, match="--split-random expects three"):
        parse_fractions("0.9,0.1", "--split-random")
