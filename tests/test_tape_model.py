"""The TAPE-format protein BERT: the function it computes, its file format and its errors on bad model directories."""
from __future__ import annotations

import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

from tape_tasks.config import ModelFileError, ProteinBertConfig
from tape_tasks.heads import ProteinModelForTask
from tape_tasks.model import OneHotModel, ProteinBertForMaskedLM, ProteinBertModel, onehot_config

TINY = dict(hidden_size=12, num_hidden_layers=2, num_attention_heads=3, intermediate_size=20,
            max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            layer_norm_eps=1e-5)


def tiny_config(**overrides) -> ProteinBertConfig:
    return ProteinBertConfig(**{**TINY, **overrides})


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Random LayerNorm affine and biases too, so a swapped or missing one changes the output."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def reference_bert(sd: dict, cfg: ProteinBertConfig, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The shared-convention pre-LN protein BERT written out from the state dict, op by op."""
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    d = H // nh
    B, L = ids.shape
    x = sd["embeddings.word_embeddings.weight"][ids] + sd["embeddings.position_embeddings.weight"][:L][None]

    def ln(t, name):
        return F.layer_norm(t, (H,), sd[f"{name}.weight"], sd[f"{name}.bias"], cfg.layer_norm_eps)

    def lin(t, name):
        return t @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        a = ln(x, p + "input_ln")
        q, k, v = (lin(a, p + f"attention.self.{n}").view(B, L, nh, d).permute(0, 2, 1, 3)
                   for n in ("query", "key", "value"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        context = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(B, L, H)
        h = x + lin(context, p + "attention.output.dense")
        m = lin(ln(h, p + "post_attn_ln"), p + "intermediate.dense")
        m = 0.5 * m * (1.0 + torch.erf(m / math.sqrt(2.0)))            # exact erf GeLU
        x = h + lin(m, p + "output.dense")
    return ln(x, "encoder.final_ln")


def test_forward_is_the_pre_ln_protein_bert_with_padding():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = _perturbed(ProteinBertModel(cfg)).double().eval()
    ids = torch.randint(5, 30, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    ids[:, 0] = 2
    out, pooled = model(ids, mask)
    expected = reference_bert(model.state_dict(), cfg, ids, mask)
    assert torch.allclose(out, expected, atol=1e-10, rtol=0)
    # Mean pooling over residues only: <cls> (position 0), <sep>-free here, and padding excluded.
    residues = (mask.bool() & (ids != 2)).double().unsqueeze(-1)
    assert torch.allclose(pooled, (expected * residues).sum(1) / residues.sum(1), atol=1e-10)


def test_the_reference_would_catch_a_tanh_gelu(monkeypatch):
    """The comparison above is sensitive: with the tanh GeLU the model leaves the erf reference by far more than
    its tolerance (so a model using the wrong GeLU cannot pass it)."""
    torch.manual_seed(1)
    cfg = tiny_config(num_hidden_layers=1)
    model = _perturbed(ProteinBertModel(cfg)).double().eval()
    ids = torch.randint(5, 30, (2, 7))
    expected = reference_bert(model.state_dict(), cfg, ids, torch.ones_like(ids))
    erf_gelu = F.gelu
    monkeypatch.setattr(F, "gelu", lambda t: erf_gelu(t, approximate="tanh"))
    tanh_out, _ = model(ids)
    assert (tanh_out - expected).abs().max() > 1e-6


def test_padding_does_not_change_a_protein():
    torch.manual_seed(2)
    model = _perturbed(ProteinBertModel(tiny_config())).eval()
    ids = torch.tensor([[2, 5, 9, 14, 20, 3]])
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], 1)
    out, pooled = model(ids)
    out_p, pooled_p = model(padded, mask)
    assert torch.allclose(out, out_p[:, :6], atol=1e-5)
    assert torch.allclose(pooled, pooled_p, atol=1e-5)


def test_documented_keys_are_the_state_dict_keys():
    """The key list at the top of tape_tasks/model.py is what the converter writes: it must be exact."""
    import tape_tasks.model as module

    documented = set()
    for line in module.__doc__.splitlines():
        match = re.match(r"\s+(bert\.\S+|mlm\.\S+)\s", line + " ")
        if not match:
            continue
        name = match.group(1)
        group = re.search(r"\{([a-z,]+)\}$", name)
        stems = [name[:group.start()] + part for part in group.group(1).split(",")] if group else [name]
        for stem in stems:
            documented.update(stem.replace("{i}", str(i)) for i in range(2))
    model = ProteinBertForMaskedLM(tiny_config())
    assert documented == set(model.state_dict())


def test_save_and_load_round_trip_and_tied_decoder(tmp_path):
    torch.manual_seed(3)
    model = _perturbed(ProteinBertForMaskedLM(tiny_config())).eval()
    assert model.mlm.decoder.weight is model.bert.embeddings.word_embeddings.weight
    model.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "pytorch_model.bin"]
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                "initializer_range", "layer_norm_eps"):
        assert key in config
    assert config["pre_layernorm"] is True and config["vocab_size"] == 30
    loaded = ProteinBertForMaskedLM.from_pretrained(str(tmp_path)).eval()
    assert loaded.mlm.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    ids = torch.randint(5, 30, (2, 8))
    assert torch.equal(model(ids)[0], loaded(ids)[0])
    # The bare backbone and a task model read the same directory (prefix 'bert.' stripped / kept).
    bare = ProteinBertModel.from_pretrained(str(tmp_path)).eval()
    assert torch.equal(bare(ids)[0], model.bert(ids)[0])
    task = ProteinModelForTask.from_pretrained(str(tmp_path), head="token_classification", num_labels=3).eval()
    assert torch.equal(task.bert(ids)[0], model.bert(ids)[0])
    # ...and a bare backbone's directory loads into the MLM model (its head fresh, the decoder still tied).
    bare_dir = tmp_path / "bare"
    bare.save_pretrained(str(bare_dir))
    mlm = ProteinBertForMaskedLM.from_pretrained(str(bare_dir))
    assert torch.equal(mlm.mlm.decoder.weight, bare.embeddings.word_embeddings.weight)


def test_config_that_does_not_match_the_weights_is_refused(tmp_path):
    model = ProteinBertForMaskedLM(tiny_config())
    model.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())

    config["intermediate_size"] = 24
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"intermediate\.dense\.weight.*\(20, 12\).*\(24, 12\).*does not match"):
        ProteinBertForMaskedLM.from_pretrained(str(tmp_path))

    config["intermediate_size"] = 20
    config["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"lacks .*layer\.2\..*does not match"):
        ProteinBertForMaskedLM.from_pretrained(str(tmp_path))

    config["num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"does not describe.*layer\.1\."):
        ProteinBertModel.from_pretrained(str(tmp_path))


def test_bad_model_directories(tmp_path):
    with pytest.raises(ModelFileError, match="no config.json"):
        ProteinBertModel.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text('{"hidden_size": 12,\n "num_attention_heads": 5\n}')
    with pytest.raises(ModelFileError, match="not a multiple"):
        ProteinBertModel.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text('{"hidden_size": 12,\n "pre_layernorm": false}')
    with pytest.raises(ModelFileError, match="post-LN"):
        ProteinBertModel.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text('{"hidden_size": 12,\n "num_attention_heads": }')
    with pytest.raises(ModelFileError, match="line 2"):
        ProteinBertModel.from_pretrained(str(tmp_path))
    tiny_config().save_pretrained(str(tmp_path))
    with pytest.raises(ModelFileError, match="no pytorch_model.bin"):
        ProteinBertModel.from_pretrained(str(tmp_path))
    # An original (post-LN) TAPE checkpoint whose config.json has no pre_layernorm field.
    state = ProteinBertModel(tiny_config()).state_dict()
    state["embeddings.LayerNorm.weight"] = torch.ones(12)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelFileError, match="post-LN weights"):
        ProteinBertModel.from_pretrained(str(tmp_path))


def test_onehot_baseline(tmp_path):
    model = OneHotModel(onehot_config())
    ids = torch.tensor([[2, 5, 5, 7, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    out, pooled = model(ids, mask)
    assert out.shape == (1, 6, 30) and out[0, 1, 5] == 1 and out[0, 5].sum() == 0
    expected = torch.zeros(30)
    expected[5], expected[7] = 2 / 3, 1 / 3
    assert torch.allclose(pooled[0], expected)
    task = ProteinModelForTask(onehot_config(), head="value")
    task.save_pretrained(str(tmp_path))
    again = ProteinModelForTask.from_pretrained(str(tmp_path), head="value")
    assert torch.equal(task(ids, mask)[0], again(ids, mask)[0])


def test_heads_shapes_and_contact_symmetry():
    torch.manual_seed(4)
    cfg = tiny_config()
    ids = torch.randint(5, 30, (2, 10))
    for head, labels, shape in [("value", 1, (2, 1)), ("sequence_classification", 7, (2, 7)),
                                ("token_classification", 3, (2, 10, 3)), ("contact", 2, (2, 8, 8, 2))]:
        model = ProteinModelForTask(cfg, head=head, num_labels=labels).eval()
        (prediction,) = model(ids)
        assert prediction.shape == shape, head
        if head == "contact":
            assert torch.allclose(prediction, prediction.transpose(1, 2))


def test_contact_head_factorised_equals_tape_pair_features():
    """Without dropout the O(L^2) product form equals TAPE's [B, L, L, 2H] features -> linear -> symmetrise."""
    from tape_tasks.heads import PairwiseContactPredictionHead

    torch.manual_seed(5)
    head = PairwiseContactPredictionHead(8, dropout=0.1).double()
    h = torch.randn(2, 9, 8, dtype=torch.float64)
    pairwise = torch.cat([h[:, :, None] * h[:, None, :], h[:, :, None] - h[:, None, :]], dim=-1)
    full = head.predict[1](pairwise)
    full = ((full + full.transpose(1, 2)) / 2)[:, 1:-1, 1:-1]
    head.eval()
    (fast,) = head(h)
    assert torch.allclose(fast, full, atol=1e-12)
    head.train()
    head.predict[0].p = 0.0
    (no_dropout,) = head(h)
    assert torch.allclose(no_dropout, full, atol=1e-12)
