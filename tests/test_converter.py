"""Converter on hand-made Megatron checkpoints: shard discovery, TP/PP merge, vocabularies, TAPE and HF outputs,
reshard, and bad input.

The checkpoints are laid out by hand from the Megatron conventions (not by the code under test), and the
reference output is a plain-torch implementation of the Megatron BERT function computed on the full (unsplit)
weights with Megatron's names and its per-head fused QKV. The converted TAPE model (loaded by ``tape_tasks``) and
the Hugging Face ESM export must reproduce that output within float32 round-off (atol 1e-5).
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megatron_protein.conversion import megatron_checkpoint as mc
from megatron_protein.conversion.megatron_checkpoint import CheckpointError
from megatron_protein.conversion.output import parse_dtype
from megatron_protein.conversion.reshard import reshard
from megatron_protein.conversion.to_tape import ConversionError, convert
from megatron_protein.conversion.vocabulary import PROTEINLM_VOCAB, TAPE_VOCAB
from megatron_protein.utils.errors import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-5

LAYERS, HIDDEN, HEADS, FFN, MAX_POS, EPS = 4, 16, 4, 32, 24, 1e-5


def full_megatron_state(padded_vocab: int, seed: int = 0, tokentypes: int = 0) -> dict[str, torch.Tensor]:
    """A random full (tp = pp = 1) model in Megatron's names; LayerNorms random too, so a swap shows."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    state = {mc.WORD_EMBEDDINGS: rand(padded_vocab, HIDDEN), mc.POSITION_EMBEDDINGS: rand(MAX_POS, HIDDEN)}
    if tokentypes:
        state[mc.TOKENTYPE_EMBEDDINGS] = rand(tokentypes, HIDDEN)
    for i in range(LAYERS):
        p = f"language_model.encoder.layers.{i}."
        state.update({
            p + "input_layernorm.weight": 1 + rand(HIDDEN, scale=0.1), p + "input_layernorm.bias": rand(HIDDEN),
            p + "self_attention.query_key_value.weight": rand(3 * HIDDEN, HIDDEN),
            p + "self_attention.query_key_value.bias": rand(3 * HIDDEN),
            p + "self_attention.dense.weight": rand(HIDDEN, HIDDEN), p + "self_attention.dense.bias": rand(HIDDEN),
            p + "post_attention_layernorm.weight": 1 + rand(HIDDEN, scale=0.1),
            p + "post_attention_layernorm.bias": rand(HIDDEN),
            p + "mlp.dense_h_to_4h.weight": rand(FFN, HIDDEN), p + "mlp.dense_h_to_4h.bias": rand(FFN),
            p + "mlp.dense_4h_to_h.weight": rand(HIDDEN, FFN), p + "mlp.dense_4h_to_h.bias": rand(HIDDEN),
        })
    state.update({
        mc.FINAL_LAYERNORM + ".weight": 1 + rand(HIDDEN, scale=0.1), mc.FINAL_LAYERNORM + ".bias": rand(HIDDEN),
        "lm_head.dense.weight": rand(HIDDEN, HIDDEN), "lm_head.dense.bias": rand(HIDDEN),
        "lm_head.layernorm.weight": 1 + rand(HIDDEN, scale=0.1), "lm_head.layernorm.bias": rand(HIDDEN),
        "lm_head.bias": rand(padded_vocab),
    })
    return state


def megatron_reference(full, tokens, padding_mask):
    """The Megatron pre-LN BERT (ProteinLM) on the full weights: (sequence output, MLM logits over all rows)."""
    b, s = tokens.shape
    d = HIDDEN // HEADS
    x = full[mc.WORD_EMBEDDINGS][tokens] + full[mc.POSITION_EMBEDDINGS][:s]
    if mc.TOKENTYPE_EMBEDDINGS in full:
        x = x + full[mc.TOKENTYPE_EMBEDDINGS][0]
    masked = ~padding_mask[:, None, None, :]
    for i in range(LAYERS):
        p = f"language_model.encoder.layers.{i}."
        ln = F.layer_norm(x, (HIDDEN,), full[p + "input_layernorm.weight"], full[p + "input_layernorm.bias"], EPS)
        qkv = F.linear(ln, full[p + "self_attention.query_key_value.weight"],
                       full[p + "self_attention.query_key_value.bias"]).view(b, s, HEADS, 3, d)
        q, k, v = (qkv[:, :, :, j].transpose(1, 2) for j in range(3))
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(masked, float("-inf"))
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, HIDDEN)
        h = x + F.linear(context, full[p + "self_attention.dense.weight"], full[p + "self_attention.dense.bias"])
        ln = F.layer_norm(h, (HIDDEN,), full[p + "post_attention_layernorm.weight"],
                          full[p + "post_attention_layernorm.bias"], EPS)
        inner = F.gelu(F.linear(ln, full[p + "mlp.dense_h_to_4h.weight"], full[p + "mlp.dense_h_to_4h.bias"]))
        x = h + F.linear(inner, full[p + "mlp.dense_4h_to_h.weight"], full[p + "mlp.dense_4h_to_h.bias"])
    y = F.layer_norm(x, (HIDDEN,), full[mc.FINAL_LAYERNORM + ".weight"], full[mc.FINAL_LAYERNORM + ".bias"], EPS)
    t = F.gelu(F.linear(y, full["lm_head.dense.weight"], full["lm_head.dense.bias"]))
    t = F.layer_norm(t, (HIDDEN,), full["lm_head.layernorm.weight"], full["lm_head.layernorm.bias"], EPS)
    return y, F.linear(t, full[mc.WORD_EMBEDDINGS], full["lm_head.bias"])


def shard_by_hand(full, tp, pp):
    """Megatron's partitions written out from the conventions (independent of the converter's split)."""
    column = ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
              "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")
    row = ("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")
    per_stage = LAYERS // pp
    parts = {}
    for p in range(pp):
        for t in range(tp):
            out = {}
            for key, value in full.items():
                if key.startswith("language_model.encoder.layers."):
                    index = int(key.split(".")[3])
                    if index // per_stage != p:
                        continue
                    rest = key.split(".", 4)[4]
                    key = f"language_model.encoder.layers.{index % per_stage}.{rest}"
                    if rest in column:
                        value = value.chunk(tp, 0)[t]
                    elif rest in row:
                        value = value.chunk(tp, 1)[t]
                elif key.startswith("language_model.embedding."):
                    if p != 0:
                        continue
                    if key == mc.WORD_EMBEDDINGS:
                        value = value.chunk(tp, 0)[t]
                elif p != pp - 1:
                    continue
                elif key == "lm_head.bias":
                    value = value.chunk(tp, 0)[t]
                out[key] = value.clone()
            if pp > 1 and p == pp - 1:
                out["word_embeddings_for_head.weight"] = full[mc.WORD_EMBEDDINGS].chunk(tp, 0)[t].clone()
            parts[(t, p)] = out
    return parts


def megatron_args(tp, pp, padded_vocab, **extra):
    return argparse.Namespace(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                              ffn_hidden_size=FFN, seq_length=MAX_POS, max_position_embeddings=MAX_POS,
                              padded_vocab_size=padded_vocab, make_vocab_size_divisible_by=8,
                              tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              layernorm_epsilon=EPS, hidden_dropout=0.1, attention_dropout=0.1,
                              init_method_std=0.02, **extra)


def save_megatron(save_dir, parts, args, iteration=100):
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    for (t, p), model in parts.items():
        path = os.path.join(save_dir, f"iter_{iteration:07d}", mc.shard_dirname(t, p, pp), "model_optim_rng.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": model,
                    "optimizer": {"state": {}}, "lr_scheduler": {"num_steps": iteration}}, path)
    with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))
    return save_dir


def sample_batch(vocab_ids, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.tensor(vocab_ids)[torch.randint(0, len(vocab_ids), (3, 11), generator=g)]
    padding_mask = torch.ones(3, 11, dtype=torch.bool)
    padding_mask[1, 7:] = False
    padding_mask[2, 4:] = False
    return tokens, padding_mask


def tape_outputs(model_dir, tokens, padding_mask):
    from tape_tasks.model import ProteinBertForMaskedLM
    model = ProteinBertForMaskedLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        sequence, _ = model.bert(tokens, padding_mask.long())
        logits = model.mlm(sequence)[0]
    return sequence, logits


def assert_close_at_real_tokens(actual, expected, padding_mask):
    torch.testing.assert_close(actual[padding_mask], expected[padding_mask], atol=ATOL, rtol=1e-5)


@pytest.fixture(scope="module")
def full32():
    return full_megatron_state(padded_vocab=32)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_sharded_checkpoint_converts_to_tape_with_equal_outputs(tmp_path, full32, tp, pp):
    save = save_megatron(str(tmp_path / "save"), shard_by_hand(full32, tp, pp), megatron_args(tp, pp, 32))
    out = tmp_path / "tape"
    convert(save, str(out), table_file=None)
    tokens, padding_mask = sample_batch(list(range(2, 30)))
    ref_seq, ref_logits = megatron_reference(full32, tokens, padding_mask)
    seq, logits = tape_outputs(str(out), tokens, padding_mask)
    assert logits.shape[-1] == 30  # the two padding rows are dropped
    assert_close_at_real_tokens(seq, ref_seq, padding_mask)
    assert_close_at_real_tokens(logits, ref_logits[..., :30], padding_mask)


def test_src_may_be_iteration_dir_shard_dir_or_file(tmp_path, full32):
    save = save_megatron(str(tmp_path / "save"), shard_by_hand(full32, 2, 2), megatron_args(2, 2, 32))
    reference = mc.merge_partitions(mc.load_checkpoint(save))
    for src in (os.path.join(save, "iter_0000100"), os.path.join(save, "iter_0000100", "mp_rank_01_001"),
                os.path.join(save, "iter_0000100", "mp_rank_00_000", "model_optim_rng.pt")):
        merged = mc.merge_partitions(mc.load_checkpoint(src))
        assert merged.keys() == reference.keys()
        assert all(torch.equal(merged[k], reference[k]) for k in merged)
    assert set(reference) == set(full32)
    assert all(torch.equal(reference[k], full32[k]) for k in full32)


def proteinlm_checkpoint(tmp_path, full):
    """One partition laid out like ProteinLM's released checkpoints: nested dicts, 'transformer'/'attention'
    names, 31-token vocabulary padded to 128, token-type embeddings, a pooler and a binary head."""
    flat = {}
    for key, value in full.items():
        key = key.replace("language_model.encoder.", "language_model.transformer.")
        key = key.replace(".self_attention.", ".attention.")
        flat[key] = value
    emb = {name: {"weight": flat[f"language_model.embedding.{name}.weight"]}
           for name in ("word_embeddings", "position_embeddings", "tokentype_embeddings")}
    transformer = {k[len("language_model.transformer."):]: v for k, v in flat.items()
                   if k.startswith("language_model.transformer.")}
    model = {"language_model": {"embedding": emb, "transformer": transformer,
                                "pooler": {"dense.weight": torch.zeros(HIDDEN, HIDDEN),
                                           "dense.bias": torch.zeros(HIDDEN)}},
             "lm_head": {k[len("lm_head."):]: v for k, v in flat.items() if k.startswith("lm_head.")},
             "binary_head": {"weight": torch.zeros(2, HIDDEN), "bias": torch.zeros(2)}}
    args = argparse.Namespace(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS,
                              max_position_embeddings=MAX_POS, padded_vocab_size=128, model_parallel_size=1,
                              tensor_model_parallel_size=1, pipeline_model_parallel_size=1, layernorm_epsilon=EPS,
                              vocab_file="/data/protein_tools/iupac_vocab.txt", make_vocab_size_divisible_by=128)
    path = tmp_path / "proteinlm" / "model_optim_rng.pt"
    path.parent.mkdir()
    # Saved as torch 1.x did (legacy serialization), with an optimizer entry whose class is not importable here
    # (as Megatron-LM 1.x's megatron.fp16.loss_scaler objects in ProteinLM's checkpoints are not): the safe
    # loader puts an inert stand-in in its place.
    import sys
    import types
    names = ("megatron", "megatron.fp16", "megatron.fp16.loss_scaler")
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    scaler_class = type("DynamicLossScaler", (), {"__module__": "megatron.fp16.loss_scaler"})
    sys.modules["megatron.fp16.loss_scaler"].DynamicLossScaler = scaler_class
    try:
        scaler = scaler_class()
        scaler.cur_scale = 1024.0
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 5000, "model": model,
                    "optimizer": {"loss_scaler": scaler}}, path, _use_new_zipfile_serialization=False)
    finally:
        for name in names:
            del sys.modules[name]
    return str(path)


def test_proteinlm_layout_and_31_token_vocab_map_to_tape_ids(tmp_path):
    full = full_megatron_state(padded_vocab=128, seed=3, tokentypes=2)
    src = proteinlm_checkpoint(tmp_path, full)
    out = tmp_path / "tape"
    conversion = convert(src, str(out), table_file=None)
    assert conversion.vocab_name == "proteinlm"
    assert "binary_head.weight" in conversion.not_converted
    # The same residues in both id systems: ProteinLM's letter ids are TAPE's + 1 ([unused1] at 5).
    letters = "ACDEKLMWYXBZUO"
    proteinlm_ids = [PROTEINLM_VOCAB.index(c) for c in letters] + [2, 3]
    tape_ids = [TAPE_VOCAB.index(c) for c in letters] + [2, 3]
    assert proteinlm_ids[:len(letters)] == [t + 1 for t in tape_ids[:len(letters)]]
    pl_tokens, padding_mask = sample_batch(proteinlm_ids)
    tape_tokens = torch.tensor([tape_ids[proteinlm_ids.index(int(t))] for t in pl_tokens.flatten()]).view_as(
        pl_tokens)
    ref_seq, ref_logits = megatron_reference(full, pl_tokens, padding_mask)
    seq, logits = tape_outputs(str(out), tape_tokens, padding_mask)
    assert_close_at_real_tokens(seq, ref_seq, padding_mask)
    # TAPE logit column j is ProteinLM column rows[j]: specials 0..4, then letters shifted by one.
    rows = list(range(5)) + list(range(6, 31))
    assert_close_at_real_tokens(logits, ref_logits[..., rows], padding_mask)


def test_checkpoint_version_0_and_1_qkv_orders_are_reordered():
    heads, d = 3, 2
    per_head = torch.arange(heads * 3 * d, dtype=torch.float32).view(heads, 3, d)  # version >= 2 layout
    v0 = per_head.transpose(0, 1).reshape(-1)       # [3, heads, d]
    v1 = per_head.transpose(1, 2).reshape(-1)       # [heads, d, 3]
    assert torch.equal(mc.fix_qkv_ordering(v0, 0, heads), per_head.reshape(-1))
    assert torch.equal(mc.fix_qkv_ordering(v1, 1.0, heads), per_head.reshape(-1))
    q, k, v = mc.split_qkv(per_head.reshape(-1), heads)
    assert torch.equal(q, per_head[:, 0].reshape(-1)) and torch.equal(v, per_head[:, 2].reshape(-1))
    assert torch.equal(mc.fuse_qkv(q, k, v, heads), per_head.reshape(-1))


def test_hf_esm_export_matches(tmp_path, full32):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer, EsmForMaskedLM
    save = save_megatron(str(tmp_path / "save"), shard_by_hand(full32, 2, 2), megatron_args(2, 2, 32))
    out = tmp_path / "tape"
    convert(save, str(out), formats=("tape", "hf-esm"), table_file=None)
    model = EsmForMaskedLM.from_pretrained(str(out / "hf-esm")).eval()
    tokens, padding_mask = sample_batch(list(range(2, 30)))
    ref_seq, ref_logits = megatron_reference(full32, tokens, padding_mask)
    with torch.no_grad():
        result = model(input_ids=tokens, attention_mask=padding_mask.long(), output_hidden_states=True)
    assert_close_at_real_tokens(result.logits, ref_logits[..., :30], padding_mask)
    assert_close_at_real_tokens(result.hidden_states[-1], ref_seq, padding_mask)
    tokenizer = AutoTokenizer.from_pretrained(str(out / "hf-esm"))
    assert tokenizer("ACDE")["input_ids"] == [2, 5, 7, 8, 9, 3]


def test_reshard_tp2_to_tp1_and_back(tmp_path, full32):
    original = shard_by_hand(full32, 2, 1)
    save = save_megatron(str(tmp_path / "save"), original, megatron_args(2, 1, 32))
    reshard(save, str(tmp_path / "tp1"), tp=1, pp=1)
    reshard(str(tmp_path / "tp1"), str(tmp_path / "tp2"), tp=2, pp=1)
    back = mc.load_checkpoint(str(tmp_path / "tp2"))
    assert (back.tp_size, back.pp_size, back.iteration) == (2, 1, 100)
    assert back.extras[(0, 0)]["lr_scheduler"] == {"num_steps": 100}
    for key, shard in back.partitions.items():
        assert shard.keys() == original[key].keys()
        assert all(torch.equal(shard[k], original[key][k]) for k in shard)
    tokens, padding_mask = sample_batch(list(range(2, 30)))
    ref_seq, ref_logits = megatron_reference(full32, tokens, padding_mask)
    for directory in ("tp1", "tp2"):
        convert(str(tmp_path / directory), str(tmp_path / f"tape_{directory}"), table_file=None)
        seq, logits = tape_outputs(str(tmp_path / f"tape_{directory}"), tokens, padding_mask)
        assert_close_at_real_tokens(logits, ref_logits[..., :30], padding_mask)


def test_reshard_to_pipeline_stages_matches_megatron_layout(tmp_path, full32):
    save = save_megatron(str(tmp_path / "save"), shard_by_hand(full32, 1, 1), megatron_args(1, 1, 32))
    reshard(save, str(tmp_path / "tp2pp2"), tp=2, pp=2)
    back = mc.load_checkpoint(str(tmp_path / "tp2pp2"))
    expected = shard_by_hand(full32, 2, 2)
    assert back.partitions.keys() == expected.keys()
    for key, shard in back.partitions.items():
        assert shard.keys() == expected[key].keys(), key
        assert all(torch.equal(shard[k], expected[key][k]) for k in shard)


# --- bad input: clear errors, nothing left behind --------------------------------------------------------------

def _assert_no_output(tmp_path, name="tape"):
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(name) or p.startswith(f".{name}")]
    assert leftovers == []


def test_missing_shard_is_named(tmp_path, full32):
    import shutil
    save = save_megatron(str(tmp_path / "save"), shard_by_hand(full32, 2, 2), megatron_args(2, 2, 32))
    shutil.rmtree(os.path.join(save, "iter_0000100", "mp_rank_01_001"))
    with pytest.raises(CheckpointError, match="mp_rank_01_001"):
        convert(save, str(tmp_path / "tape"), table_file=None)
    _assert_no_output(tmp_path)


def test_sizes_that_contradict_the_checkpoint(tmp_path, full32):
    save = save_megatron(str(tmp_path / "save"), shard_by_hand(full32, 1, 1), megatron_args(1, 1, 32))
    for kwargs, flag in (({"hidden": 32}, "--hidden"), ({"heads": 8}, "--heads"), ({"layers": 2}, "--layers")):
        with pytest.raises(CheckpointError, match=flag):
            convert(save, str(tmp_path / "tape"), table_file=None, **kwargs)
    convert(save, str(tmp_path / "tape"), hidden=HIDDEN, heads=HEADS, layers=LAYERS, table_file=None)


def test_truncated_file_is_named(tmp_path, full32):
    save = save_megatron(str(tmp_path / "save"), shard_by_hand(full32, 2, 1), megatron_args(2, 1, 32))
    path = os.path.join(save, "iter_0000100", "mp_rank_01", "model_optim_rng.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError, match="mp_rank_01.*truncated"):
        convert(save, str(tmp_path / "tape"), table_file=None)
    _assert_no_output(tmp_path)


def test_dtype_parsing_and_unknown_dtype(tmp_path, full32):
    assert parse_dtype("torch.float16") is torch.float16
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("torch.bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown destination dtype"):
        parse_dtype("__import__('os')")
    save = save_megatron(str(tmp_path / "save"), shard_by_hand(full32, 1, 1), megatron_args(1, 1, 32))
    with pytest.raises(ValueError, match="torch.float8"):
        convert(save, str(tmp_path / "tape"), dtype="torch.float8", table_file=None)
    _assert_no_output(tmp_path)
    convert(save, str(tmp_path / "tape"), dtype="torch.bfloat16", table_file=None)
    state = torch.load(tmp_path / "tape" / "pytorch_model.bin", weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in state.values())


def _load_script(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), os.path.join(REPO, "converter", name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_prints_table_and_reports_errors(tmp_path, full32, capsys):
    save = save_megatron(str(tmp_path / "save"), shard_by_hand(full32, 2, 1), megatron_args(2, 1, 32))
    script = os.path.join(REPO, "converter", "megatron-converter.py")
    # ProteinLM's spelling of the flags, in a real subprocess (the script finds the package by itself).
    run = subprocess.run([sys.executable, script, "-src", save, "-out", str(tmp_path / "tape"), "-dtp",
                          "torch.float32", "-hidden", str(HIDDEN), "-heads", str(HEADS), "-layers", str(LAYERS)],
                         capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert "bert.encoder.layer.3.attention.self.value.weight" in run.stdout
    assert "mlm.bias" in run.stdout
    assert "verified TAPE ProteinBertForMaskedLM" in run.stdout
    assert os.path.isfile(tmp_path / "tape" / "config.json")
    cli = _load_script("megatron-converter.py")
    assert run_cli(cli.main, ["--src", save, "--out", str(tmp_path / "bad"), "--heads", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--heads 2 contradicts" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "bad")


def test_verification_refuses_a_wrong_mapping(tmp_path, full32, monkeypatch):
    """A conversion bug (q and k swapped) is caught by the built-in check before anything is written."""
    from megatron_protein.conversion import to_tape
    from megatron_protein.conversion.verify import VerificationError
    save = save_megatron(str(tmp_path / "save"), shard_by_hand(full32, 1, 1), megatron_args(1, 1, 32))
    real_split = mc.split_qkv
    monkeypatch.setattr(to_tape.mc, "split_qkv", lambda t, heads: tuple(real_split(t, heads)[i] for i in (1, 0, 2)))
    with pytest.raises(VerificationError, match="not written"):
        convert(save, str(tmp_path / "tape"), table_file=None)
    _assert_no_output(tmp_path)


def test_reshard_cli(tmp_path, full32, capsys):
    save = save_megatron(str(tmp_path / "save"), shard_by_hand(full32, 2, 2), megatron_args(2, 2, 32))
    cli = _load_script("reshard.py")
    assert run_cli(cli.main, ["--src", save, "--out", str(tmp_path / "tp1"), "--tp", "1"]) == 0
    assert "mp_rank_00" in capsys.readouterr().out
    merged = mc.merge_partitions(mc.load_checkpoint(str(tmp_path / "tp1")))
    assert all(torch.equal(merged[k], full32[k]) for k in full32)
    assert run_cli(cli.main, ["--src", save, "--out", str(tmp_path / "tp3"), "--tp", "3"]) == 2
    assert "does not divide num_attention_heads" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "tp3")


def test_dst_supplies_config_fields_and_missing_tensors(tmp_path, full32):
    """A checkpoint saved without its MLM head converts only with --dst, whose head and config fields are used."""
    from tape_tasks.config import ProteinBertConfig
    from tape_tasks.model import ProteinBertForMaskedLM
    headless = {k: v for k, v in full32.items() if not k.startswith("lm_head.")}
    save = save_megatron(str(tmp_path / "save"), shard_by_hand(headless, 1, 1), megatron_args(1, 1, 32))
    with pytest.raises(ConversionError, match="--dst"):
        convert(save, str(tmp_path / "tape"), table_file=None)
    _assert_no_output(tmp_path)
    dst_config = ProteinBertConfig(vocab_size=30, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=MAX_POS,
                                   pooling="cls")
    dst = ProteinBertForMaskedLM(dst_config)
    dst.save_pretrained(str(tmp_path / "untrained"))
    convert(save, str(tmp_path / "tape"), dst=str(tmp_path / "untrained"), table_file=None)
    converted = ProteinBertForMaskedLM.from_pretrained(str(tmp_path / "tape"))
    assert converted.config.pooling == "cls"
    torch.testing.assert_close(converted.mlm.transform.dense.weight, dst.mlm.transform.dense.weight)
    torch.testing.assert_close(converted.bert.embeddings.position_embeddings.weight, full32[mc.POSITION_EMBEDDINGS])
    wrong = ProteinBertForMaskedLM(ProteinBertConfig(vocab_size=30, hidden_size=HIDDEN, num_hidden_layers=2,
                                                     num_attention_heads=HEADS, intermediate_size=FFN,
                                                     max_position_embeddings=MAX_POS))
    wrong.save_pretrained(str(tmp_path / "wrong"))
    with pytest.raises(ConversionError, match="num_hidden_layers=2"):
        convert(save, str(tmp_path / "tape2"), dst=str(tmp_path / "wrong"), table_file=None)


def test_vocab_file_rows_are_matched_by_name_and_mcore_layout_is_refused(tmp_path):
    from megatron_protein.conversion.vocabulary import VocabularyError, read_vocab_file, tape_rows
    vocab = tmp_path / "vocab.txt"
    shuffled = list(reversed(TAPE_VOCAB))
    vocab.write_text("\n".join(shuffled) + "\n")
    rows = tape_rows(read_vocab_file(str(vocab)), 32)
    assert [shuffled[r] for r in rows.tolist()] == list(TAPE_VOCAB)
    vocab.write_text("\n".join(shuffled[:10]) + "\n\n" + "\n".join(shuffled[10:]) + "\n")
    with pytest.raises(VocabularyError, match="line 11"):
        read_vocab_file(str(vocab))
    with pytest.raises(VocabularyError, match=r"lacks TAPE token\(s\) \['O'\]"):
        tape_rows([t for t in TAPE_VOCAB if t != "O"], 32)
    path = tmp_path / "mcore" / "model_optim_rng.pt"
    path.parent.mkdir()
    torch.save({"model": {"decoder.layers.0.self_attention.linear_qkv.weight": torch.zeros(3, 1),
                          "embedding.word_embeddings.weight": torch.zeros(2, 1)}}, path)
    with pytest.raises(CheckpointError, match="Megatron-Core"):
        mc.load_checkpoint(str(path))


def _pretraining_model_and_optimizer(tp, pp, t, p):
    """The pretraining's model and AdamW for partition (t, p) of a tp x pp layout, built without processes (the
    layers only keep their slice at construction; nothing communicates until forward)."""
    from megatron_protein.models.bert import BertConfig, ProteinBertModel
    from megatron_protein.parallel import scg
    from megatron_protein.training.optimizer import OptimConfig, build_optimizer
    config = BertConfig(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
                        max_position_embeddings=MAX_POS, hidden_dropout=0.0, attention_dropout=0.0)
    groups = scg.ParallelGroups(axes=("dp", "pp", "tp"), degrees={"dp": 1, "pp": pp, "tp": tp}, rank=p * tp + t,
                                world_size=tp * pp, _coords={"dp": 0, "pp": p, "tp": t})
    model = ProteinBertModel(config, groups)
    return model, build_optimizer(model, OptimConfig())


def test_reshard_moves_each_adam_moment_with_its_parameter(tmp_path):
    """TP=1 -> TP=2 x PP=2: every AdamW index of every new partition holds the moments of the parameter the
    pretraining's own optimizer puts at that index (moments are made from the parameter's values, so a swap of two
    same-shaped parameters, e.g. a LayerNorm's weight and bias, would show)."""
    model, optimizer = _pretraining_model_and_optimizer(1, 1, 0, 0)
    for group in optimizer.param_groups:
        for param in group["params"]:
            optimizer.state[param] = {"step": torch.tensor(3.0), "exp_avg": 2 * param.detach().clone(),
                                      "exp_avg_sq": param.detach() ** 2 + 1}
    args = megatron_args(1, 1, 32)
    path = tmp_path / "save" / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt"
    path.parent.mkdir(parents=True)
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 3, "model": model.state_dict(),
                "optimizer": {"optimizer": optimizer.state_dict(), "grad_scaler": None},
                "lr_scheduler": {"step": 3}}, path)
    (tmp_path / "save" / "latest_checkpointed_iteration.txt").write_text("3")
    reshard(str(tmp_path / "save"), str(tmp_path / "tp2pp2"), tp=2, pp=2)
    resharded = mc.load_checkpoint(str(tmp_path / "tp2pp2"), keep_optimizer=True)
    for (t, p), extras in resharded.extras.items():
        assert extras["resharded_from"]["optimizer"] == "resharded"
        new_model, new_optimizer = _pretraining_model_and_optimizer(2, 2, t, p)
        new_model.load_state_dict(resharded.partitions[(t, p)], strict=True)
        new_optimizer.load_state_dict(extras["optimizer"]["optimizer"])
        params = [q for group in new_optimizer.param_groups for q in group["params"]]
        assert len(new_optimizer.state) == len(params)
        for param in params:
            state = new_optimizer.state[param]
            torch.testing.assert_close(state["exp_avg"], 2 * param.detach(), atol=0, rtol=0)
            torch.testing.assert_close(state["exp_avg_sq"], param.detach() ** 2 + 1, atol=0, rtol=0)
            assert float(state["step"]) == 3.0
