"""The protein BERT computes the same function with every fusion on and with every fusion off
(Megatron's --no-masked-softmax-fusion, --no-bias-gelu-fusion, --no-bias-dropout-fusion, plus LayerNorm): outputs
and all parameter gradients, in eval mode and in training mode with hidden dropout (the dropout masks are drawn
the same way on both paths), with padding and with packed (block-diagonal) attention masks."""
from __future__ import annotations

import pytest
import torch

bert = pytest.importorskip("megatron_protein.models.bert", reason="needs engineer F's models/bert.py")
from megatron_protein.parallel.tensor_parallel import model_parallel_seed  # noqa: E402

FUSION_FLAGS = ("masked_softmax_fusion", "bias_gelu_fusion", "bias_dropout_fusion", "layernorm_fusion")


def _model(fused: bool, hidden_dropout: float) -> torch.nn.Module:
    config = bert.BertConfig(num_layers=2, hidden_size=32, num_attention_heads=4, max_position_embeddings=40,
                             hidden_dropout=hidden_dropout, attention_dropout=0.0, init_seed=7,
                             **{flag: fused for flag in FUSION_FLAGS})
    return bert.ProteinBertModel(config)


def _batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 30, (3, 23), generator=g)
    lengths = torch.tensor([23, 17, 9])
    real = torch.arange(23)[None, :] < lengths[:, None]
    tokens[~real] = 0
    padding_mask = bert.padding_attention_mask(real)  # [b, 1, 1, s]
    segments = real.long()
    segments[0, 12:] = 2  # sample 0 packs two sequences
    packed_mask = (segments[:, None, :, None] != segments[:, None, None, :]) | (segments == 0)[:, None, None, :]
    position_ids = torch.arange(23).repeat(3, 1)
    position_ids[0, 12:] -= 12
    return tokens, padding_mask, packed_mask, position_ids


def _run(model, tokens, mask, position_ids, seed):
    model.zero_grad(set_to_none=True)
    model_parallel_seed(seed)  # the default generator and the tensor-parallel dropout stream
    logits = model(tokens, mask, position_ids)
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("training", [False, True])
def test_bert_same_outputs_and_grads_with_fusion_on_and_off(training):
    fused, unfused = _model(True, 0.2), _model(False, 0.2)
    unfused.load_state_dict(fused.state_dict())  # fused modules keep the unfused state-dict layout
    for model in (fused, unfused):
        model.train(training)
    tokens, padding_mask, packed_mask, position_ids = _batch()
    for mask in (padding_mask, packed_mask):
        out_fused, grads_fused = _run(fused, tokens, mask, position_ids, seed=5)
        out_unfused, grads_unfused = _run(unfused, tokens, mask, position_ids, seed=5)
        assert torch.isfinite(out_fused).all()
        torch.testing.assert_close(out_fused, out_unfused, atol=2e-5, rtol=2e-5)
        for name, grad in grads_fused.items():
            torch.testing.assert_close(grad, grads_unfused[name], atol=2e-5, rtol=2e-5,
                                       msg=lambda m: f"{name}: {m}")
    if training:  # dropout really ran: a different seed changes the output
        other, _ = _run(fused, tokens, padding_mask, position_ids, seed=6)
        assert not torch.allclose(other, out_fused)
