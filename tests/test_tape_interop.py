"""TAPE users keep their code: the documented ``from tape_tasks import ...`` block (docs/tape.md) run as written
gives the pretraining model's logits on the same checkpoint; the converter ends by saying that songlab's
tape-proteins would load the directory silently wrong; the output directory follows the umask; several readers of
one LMDB split share its environment (py-lmdb cannot open a file twice)."""
from __future__ import annotations

import importlib.util
import os
import re

import torch

from pfam_fixtures import REPO
from test_converter import full_megatron_state, megatron_args, save_megatron, shard_by_hand

from megatron_protein.conversion.to_tape import convert
from megatron_protein.models.bert import BertConfig, ProteinBertModel
from megatron_protein.parallel import scg
from megatron_protein.parallel.tensor_parallel import model_parallel_seed
from megatron_protein.utils import lmdb_envs


def documented_block() -> str:
    with open(os.path.join(REPO, "docs", "tape.md")) as f:
        text = f.read()
    match = re.search(r"<!-- tape-from-tape-code:[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/tape.md lost the marked block"
    return match.group(1)


def converted(tmp_path):
    full = full_megatron_state(padded_vocab=32, seed=9)
    save = save_megatron(str(tmp_path / "save"), shard_by_hand(full, 2, 1), megatron_args(2, 1, 32))
    out = str(tmp_path / "tape")
    convert(save, out, table_file=None)
    return full, save, out


def test_documented_tape_code_reproduces_the_pretraining_models_logits(tmp_path):
    full, _, out = converted(tmp_path)
    scope = {"MODEL_DIR": out}
    exec(compile(documented_block(), "docs/tape.md", "exec"), scope)  # noqa: S102 - our own documentation
    logits, token_ids = scope["logits"], scope["token_ids"]
    assert logits.shape == (1, token_ids.shape[1], 30)
    assert scope["sequence_output"].shape == (1, token_ids.shape[1], 16) and scope["pooled_output"].shape == (1, 16)
    # The pretraining model (the Megatron BERT the checkpoint came from) on the same tokens.
    groups = scg.init_process_group([("dp", None)])
    model_parallel_seed(1, groups)
    ours = ProteinBertModel(BertConfig(num_layers=4, hidden_size=16, num_attention_heads=4, ffn_hidden_size=32,
                                       max_position_embeddings=24, hidden_dropout=0.0, attention_dropout=0.0),
                            groups).eval()
    ours.load_state_dict(full)
    with torch.no_grad():
        expected = ours(token_ids, None)[..., :30]
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_converter_warns_about_tape_proteins_and_respects_the_umask(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("megatron_converter",
                                                  os.path.join(REPO, "converter", "megatron-converter.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    full = full_megatron_state(padded_vocab=32, seed=2)
    save = save_megatron(str(tmp_path / "save"), shard_by_hand(full, 1, 1), megatron_args(1, 1, 32))
    out = str(tmp_path / "models" / "out")
    previous = os.umask(0o027)
    try:
        assert cli.main(["--src", save, "--out", out, "--quiet", "--format", "tape,hf-esm"]) == 0
    finally:
        os.umask(previous)
    said = capsys.readouterr().out
    assert "Do not load it with songlab's tape-proteins" in said and "from tape_tasks import" in said
    assert "hf-esm with transformers.EsmForMaskedLM" in said
    assert os.stat(out).st_mode & 0o777 == 0o750  # not mkdtemp's 0700
    assert os.stat(os.path.join(out, "hf-esm")).st_mode & 0o777 == 0o750


def test_one_lmdb_split_opened_twice_shares_its_environment(tmp_path):
    from megatron_protein.data.readers import read_tape_lmdb
    from tape_tasks.datasets import LMDBRecords, write_lmdb

    path = str(tmp_path / "pfam_train.lmdb")
    write_lmdb([{"primary": "MKTAY", "family": 1}, {"primary": "ACDEF", "family": 2}], path)
    first, second = LMDBRecords(path), LMDBRecords(path)  # py-lmdb alone: "already open in this process"
    assert first[0]["primary"] == "MKTAY" and second[1]["primary"] == "ACDEF"
    assert [r.sequence for r in read_tape_lmdb(path)] == ["MKTAY", "ACDEF"]  # the preprocess reader too
    assert lmdb_envs.open_count() == 1
    first.close()
    assert second[0]["primary"] == "MKTAY"  # still open for the other reader
    second.close()
    assert lmdb_envs.open_count() == 0
    # A file replaced under the same name is another file: read anew, not from the old environment.
    reader = LMDBRecords(path)
    assert reader[0]["primary"] == "MKTAY"
    write_lmdb([{"primary": "WWWW"}], path)
    assert LMDBRecords(path)[0]["primary"] == "WWWW"
    reader.close()
