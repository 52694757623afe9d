"""Sparse prediction: with dropout off, the last layer and the MLM head at the masked positions only give the dense
model's loss and gradients (a float64 model; the cross-entropy runs in float32 by design, so the tolerance is
float32's), with padding masks, packed-segment masks, recompute and rows without any prediction. With dropout on
the claim does not hold (the last layer draws masks of another shape), and a test says so.
Pretraining uses sparse prediction by default, so the TP=2 / PP=2 / TP=2 x DP=2 loss curves of
``test_pretrain_parallel.py`` cover its tensor-parallel path against one process."""
from __future__ import annotations

import pytest
import torch

from megatron_protein.data.mlm_dataset import attention_mask_from_segments
from megatron_protein.models.bert import (BertConfig, ProteinBertModel, masked_lm_loss, padding_attention_mask,
                                          predicted_labels, prediction_positions)
from megatron_protein.parallel import scg
from megatron_protein.parallel.tensor_parallel import model_parallel_seed


def tiny_config(**overrides) -> BertConfig:
    values = dict(num_layers=3, hidden_size=32, num_attention_heads=4, max_position_embeddings=24,
                  hidden_dropout=0.0, attention_dropout=0.0, init_seed=5)
    values.update(overrides)
    return BertConfig(**values)


def batch(seed: int = 0, b: int = 3, s: int = 24, packed: bool = False):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, 30, (b, s), generator=g)
    if packed:  # three rows of 2-3 packed sequences and a padded tail
        segments = torch.tensor([[1] * 10 + [2] * 14, [1] * 7 + [2] * 9 + [3] * 5 + [0] * 3, [1] * 20 + [0] * 4])[:b]
        mask = attention_mask_from_segments(segments)
    else:
        lengths = torch.tensor([s, s - 6, s - 13])[:b]
        mask = padding_attention_mask(torch.arange(s)[None, :] < lengths[:, None])
    loss_mask = torch.rand(tokens.shape, generator=g) < 0.2
    loss_mask[0, 3] = True
    if b > 2:
        loss_mask[2] = False  # a row without any prediction
    labels = torch.where(loss_mask, tokens, torch.full_like(tokens, -100))
    return tokens, mask, labels, loss_mask


def loss_and_grads(model, tokens, mask, labels, loss_mask, sparse: bool):
    model.zero_grad(set_to_none=True)
    if sparse:
        logits = model(tokens, mask, prediction_mask=loss_mask)
        sparse_labels, ones = predicted_labels(labels, loss_mask)
        loss, count = masked_lm_loss(logits, sparse_labels, ones)
    else:
        logits = model(tokens, mask)
        loss, count = masked_lm_loss(logits, labels, loss_mask.float())
    loss.backward()
    return loss.detach(), int(count), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def single_process():
    groups = scg.init_process_group([("dp", None), ("pp", 1), ("tp", 1)])
    model_parallel_seed(11, groups)
    return groups


def test_prediction_positions_lists_each_rows_positions_in_order():
    mask = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    index, valid = prediction_positions(mask)
    assert index.shape == (3, 3)
    assert valid.tolist() == [[True, True, True], [False, False, False], [True, False, False]]
    assert index[0].tolist() == [1, 3, 4] and index[2, 0].item() == 0
    # row-major order of the valid entries is the order of labels[mask]
    positions = index[valid]
    rows = torch.arange(3)[:, None].expand_as(index)[valid]
    assert list(zip(rows.tolist(), positions.tolist())) == [tuple(p) for p in mask.nonzero().tolist()]
    empty_index, empty_valid = prediction_positions(torch.zeros(2, 4, dtype=torch.bool))
    assert empty_index.shape == (2, 1) and not empty_valid.any()


@pytest.mark.parametrize("packed", [False, True], ids=["padding-mask", "packed-segments"])
@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "recompute"])
def test_sparse_loss_and_gradients_equal_the_dense_model(single_process, packed, recompute):
    model = ProteinBertModel(tiny_config(checkpoint_activations=recompute)).double().train()
    tokens, mask, labels, loss_mask = batch(packed=packed)
    dense = loss_and_grads(model, tokens, mask, labels, loss_mask, sparse=False)
    sparse = loss_and_grads(model, tokens, mask, labels, loss_mask, sparse=True)
    assert sparse[1] == dense[1] == int(loss_mask.sum())
    torch.testing.assert_close(sparse[0], dense[0], rtol=1e-6, atol=1e-7)
    for name, grad in dense[2].items():
        assert float(grad.abs().max()) > 0, name  # every parameter takes part
        torch.testing.assert_close(sparse[2][name], grad, rtol=1e-5, atol=1e-8, msg=name)


def test_sparse_logits_are_the_dense_logits_at_the_predicted_positions(single_process):
    model = ProteinBertModel(tiny_config()).double().eval()
    tokens, mask, labels, loss_mask = batch(seed=3)
    with torch.no_grad():
        dense = model(tokens, mask)
        sparse = model(tokens, mask, prediction_mask=loss_mask)
    assert sparse.shape == (int(loss_mask.sum()), dense.shape[-1])
    torch.testing.assert_close(sparse, dense[loss_mask], rtol=1e-12, atol=1e-12)


def test_a_batch_without_predictions_gives_zero_loss_and_zero_gradients(single_process):
    model = ProteinBertModel(tiny_config()).double().train()
    tokens, mask, labels, _ = batch()
    nothing = torch.zeros_like(tokens, dtype=torch.bool)
    loss, count, grads = loss_and_grads(model, tokens, mask, torch.full_like(labels, -100), nothing, sparse=True)
    assert count == 0 and float(loss) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in grads.values())


def test_a_prediction_mask_of_the_wrong_shape_is_rejected(single_process):
    model = ProteinBertModel(tiny_config())
    tokens, mask, _, loss_mask = batch()
    with pytest.raises(ValueError, match=r"prediction_mask must be \[b, s\]"):
        model(tokens, mask, prediction_mask=loss_mask[:, :5])


def test_with_dropout_the_sparse_loss_is_not_the_dense_one(single_process):
    """The documented condition: with dropout on, the last layer's masks are drawn for other shapes, so sparse and
    dense prediction give different losses from the same generator state (both are valid samples of dropout)."""
    model = ProteinBertModel(tiny_config(hidden_dropout=0.1, attention_dropout=0.1)).double().train()
    tokens, mask, labels, loss_mask = batch()
    state = torch.get_rng_state()
    dense, _, _ = loss_and_grads(model, tokens, mask, labels, loss_mask, sparse=False)
    torch.set_rng_state(state)
    model_parallel_seed(11, single_process)
    sparse, _, _ = loss_and_grads(model, tokens, mask, labels, loss_mask, sparse=True)
    assert abs(float(dense) - float(sparse)) > 1e-6
    # Same generators, dropout off: equal (what the tests above check in detail).
    model.eval()
    with torch.no_grad():
        sparse_logits = model(tokens, mask, prediction_mask=loss_mask)
        dense_logits = model(tokens, mask)[loss_mask]
    torch.testing.assert_close(sparse_logits, dense_logits, rtol=1e-10, atol=1e-10)
