"""The protein BERT computes the function the shared conventions define, under Megatron's key names.

The reference below is written from the convention text alone (plain torch ops on the state dict): learned
absolute positions and no embedding LayerNorm; pre-LN layers with a fused QKV whose rows are [heads, 3, head_dim];
exact erf GeLU; final LayerNorm; MLM head dense -> gelu -> LayerNorm -> tied decoder + bias. Engineer E's TAPE model
and G's converter rely on exactly this, so the comparison is strict (float64, 1e-10).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_protein.models.bert import BertConfig, ProteinBertModel, masked_lm_loss, padding_attention_mask
from megatron_protein.parallel import scg
from megatron_protein.parallel.tensor_parallel import model_parallel_seed


def tiny_config(**overrides) -> BertConfig:
    values = dict(num_layers=2, hidden_size=32, num_attention_heads=4, max_position_embeddings=40,
                  hidden_dropout=0.0, attention_dropout=0.0, layernorm_epsilon=1e-5, init_seed=3)
    values.update(overrides)
    return BertConfig(**values)


@pytest.fixture(autouse=True)
def single_process():
    groups = scg.init_process_group([("dp", None), ("pp", 1), ("tp", 1)])
    model_parallel_seed(11, groups)
    return groups


def reference_logits(state: dict, config: BertConfig, tokens, position_ids, key_padding) -> torch.Tensor:
    """The convention, written out: returns full logits [b, s, padded_vocab]."""
    p = {k: v.double() for k, v in state.items()}
    eps, heads, d = config.layernorm_epsilon, config.num_attention_heads, config.head_dim
    ln = lambda x, name: F.layer_norm(x, x.shape[-1:], p[name + ".weight"], p[name + ".bias"], eps)  # noqa: E731
    x = p["language_model.embedding.word_embeddings.weight"][tokens] + \
        p["language_model.embedding.position_embeddings.weight"][position_ids]
    b, s, h = x.shape
    for i in range(config.num_layers):
        pre = f"language_model.encoder.layers.{i}."
        y = ln(x, pre + "input_layernorm")
        qkv = (y @ p[pre + "self_attention.query_key_value.weight"].T + p[pre + "self_attention.query_key_value.bias"])
        qkv = qkv.view(b, s, heads, 3, d)
        q, k, v = (qkv[:, :, :, j].permute(0, 2, 1, 3) for j in range(3))  # [b, heads, s, d]
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        scores = scores.masked_fill(key_padding[:, None, None, :], float("-inf"))
        context = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(b, s, h)
        x = x + context @ p[pre + "self_attention.dense.weight"].T + p[pre + "self_attention.dense.bias"]
        y = ln(x, pre + "post_attention_layernorm")
        y = F.gelu(y @ p[pre + "mlp.dense_h_to_4h.weight"].T + p[pre + "mlp.dense_h_to_4h.bias"])  # erf GeLU
        x = x + y @ p[pre + "mlp.dense_4h_to_h.weight"].T + p[pre + "mlp.dense_4h_to_h.bias"]
    x = ln(x, "language_model.encoder.final_layernorm")
    y = ln(F.gelu(x @ p["lm_head.dense.weight"].T + p["lm_head.dense.bias"]), "lm_head.layernorm")
    return y @ p["language_model.embedding.word_embeddings.weight"].T + p["lm_head.bias"]


def random_batch(b=3, s=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, 30, (b, s), generator=g)
    lengths = torch.tensor([s, s - 5, s - 11])[:b]
    padding = torch.arange(s)[None, :] < lengths[:, None]  # True at real tokens
    tokens = tokens.masked_fill(~padding, 0)
    tokens[:, 0] = 2
    return tokens, padding


def test_state_dict_has_megatron_names_and_shapes():
    config = tiny_config()
    model = ProteinBertModel(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    h, v = config.hidden_size, config.padded_vocab_size(1)
    assert v == 32  # 30 IUPAC tokens padded to a multiple of 8
    expected = {
        "language_model.embedding.word_embeddings.weight": (v, h),
        "language_model.embedding.position_embeddings.weight": (40, h),
        "language_model.encoder.final_layernorm.weight": (h,), "language_model.encoder.final_layernorm.bias": (h,),
        "lm_head.dense.weight": (h, h), "lm_head.dense.bias": (h,), "lm_head.layernorm.weight": (h,),
        "lm_head.layernorm.bias": (h,), "lm_head.bias": (v,),
    }
    for i in range(2):
        pre = f"language_model.encoder.layers.{i}."
        expected.update({
            pre + "input_layernorm.weight": (h,), pre + "input_layernorm.bias": (h,),
            pre + "self_attention.query_key_value.weight": (3 * h, h),
            pre + "self_attention.query_key_value.bias": (3 * h,),
            pre + "self_attention.dense.weight": (h, h), pre + "self_attention.dense.bias": (h,),
            pre + "post_attention_layernorm.weight": (h,), pre + "post_attention_layernorm.bias": (h,),
            pre + "mlp.dense_h_to_4h.weight": (4 * h, h), pre + "mlp.dense_h_to_4h.bias": (4 * h,),
            pre + "mlp.dense_4h_to_h.weight": (h, 4 * h), pre + "mlp.dense_4h_to_h.bias": (h,),
        })
    assert shapes == expected


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_forward_matches_the_written_out_architecture(fused):
    config = tiny_config(masked_softmax_fusion=fused, bias_gelu_fusion=fused, bias_dropout_fusion=fused,
                         layernorm_fusion=fused)
    model = ProteinBertModel(config).double().eval()
    # Non-zero biases and LayerNorm affine parameters, so that every term of the formula is exercised.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                param.add_(0.1 * torch.randn_like(param))
    tokens, padding = random_batch()
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = model(tokens, padding_attention_mask(padding), position_ids)
    expected = reference_logits(model.state_dict(), config, tokens, position_ids, ~padding)
    real = padding  # padding query rows are never used
    torch.testing.assert_close(logits[real], expected[real], rtol=1e-10, atol=1e-10)


def test_padding_does_not_change_real_positions():
    model = ProteinBertModel(tiny_config()).eval()
    tokens, padding = random_batch(b=1, s=12)
    padding[:] = True
    longer = torch.cat([tokens, torch.zeros(1, 8, dtype=torch.long)], dim=1)
    longer_padding = torch.cat([padding, torch.zeros(1, 8, dtype=torch.bool)], dim=1)
    short = model(tokens, padding_attention_mask(padding))
    long = model(longer, padding_attention_mask(longer_padding))
    torch.testing.assert_close(long[:, :12], short, rtol=1e-5, atol=1e-5)


def test_packed_window_equals_separate_sequences():
    """A block-diagonal mask with restarting positions computes what separate samples compute (ProteinLM)."""
    from megatron_protein.data.mlm_dataset import attention_mask_from_segments

    model = ProteinBertModel(tiny_config()).eval()
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(5, 30, (1, 9), generator=g), torch.randint(5, 30, (1, 7), generator=g)
    packed = torch.cat([a, b, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    segments = torch.tensor([[1] * 9 + [2] * 7 + [0] * 4])
    positions = torch.tensor([list(range(9)) + list(range(7)) + [0] * 4])
    out = model(packed, attention_mask_from_segments(segments), positions)
    torch.testing.assert_close(out[:, :9], model(a, None), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[:, 9:16], model(b, None), rtol=1e-5, atol=1e-5)


def test_activation_recompute_gives_the_same_gradients_with_dropout():
    """Recompute replays the default RNG and the model-parallel tracker, so dropout masks match exactly."""
    config = tiny_config(hidden_dropout=0.2, attention_dropout=0.2)
    tokens, padding = random_batch()
    labels = torch.where(torch.rand(tokens.shape, generator=torch.Generator().manual_seed(1)) < 0.3, tokens, -100)
    labels[:, 1] = tokens[:, 1]
    grads = []
    for recompute in (False, True):
        config.checkpoint_activations = recompute
        model = ProteinBertModel(config).train()
        model_parallel_seed(21)
        logits = model(tokens, padding_attention_mask(padding))
        loss, _ = masked_lm_loss(logits, labels, (labels != -100).float())
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=name)


def test_masked_lm_loss_is_mean_cross_entropy_over_predicted_tokens():
    model = ProteinBertModel(tiny_config()).eval()
    tokens, padding = random_batch()
    labels = torch.full_like(tokens, -100)
    labels[:, 2:5] = tokens[:, 2:5]
    logits = model(tokens, padding_attention_mask(padding))
    loss, count = masked_lm_loss(logits, labels, (labels != -100).float())
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    assert int(count) == 9
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_bad_shapes_are_rejected_with_the_reason():
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        BertConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="does not divide num_attention_heads"):
        tiny_config(num_attention_heads=2, hidden_size=32).check_parallel(tp_size=4, pp_size=1)
    model = ProteinBertModel(tiny_config(max_position_embeddings=16))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 16"):
        model(torch.full((1, 20), 5), None)
