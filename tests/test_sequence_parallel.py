"""Sequence parallelism (``BertConfig.sequence_parallel``, Korthikanti et al. 2022) at TP=2 against TP=2 without it
and against one process.

A tiny protein BERT (2 layers, hidden 32, 4 heads, seq 16, dropout off) is built from the same seed at TP=1 in the
pytest process and at TP=2 with and without sequence parallelism in two spawned ranks; all three compute the MLM
loss of one fixed batch (padding mask, 15% predicted positions) and backward: dense prediction, sparse prediction
(the last layer at the predicted positions only, its queries split over tp), and sparse prediction with every
layer recomputed in backward. Each rank's gradient shard (a tp-split parameter's slice of the full gradient, a
replicated parameter's whole gradient, after :func:`all_reduce_sequence_parallel_gradients`) must match the
one-process gradient, and the SP and non-SP TP=2 runs must match each other. Tolerance: float32, atol 2e-6 /
rtol 1e-5 (partial sums meet in other orders); observed below 5e-7.

The same model with ``compile_layers`` (its layers' forward compiled, with the torch.compile backend ``aot_eager``
here so that the test need not wait for C++ code generation) at TP=2, with and without sequence parallelism, must
match one process too: the compiled graphs break at each collective.

With dropout on, the hidden-dropout masks of the two sequence slices must differ: each slice draws from its rank's
model-parallel stream (drawn from the default generator, seeded alike on both tp ranks, they would be equal).
"""
from __future__ import annotations

import pytest
import torch

from harness import run_distributed
from megatron_protein.models.bert import BertConfig, ProteinBertModel, masked_lm_loss, predicted_labels
from megatron_protein.parallel import scg
from megatron_protein.parallel.tensor_parallel import (all_reduce_sequence_parallel_gradients, model_parallel_seed,
                                                       sequence_parallel_parameters)

ATOL, RTOL = 2e-6, 1e-5
BATCH, SEQ = 3, 16
CASES = [("dense", False), ("sparse", False), ("sparse", True)]   # (prediction, recompute)


def make_batch():
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(5, 25, (BATCH, SEQ), generator=g)
    padding = torch.ones(BATCH, SEQ, dtype=torch.bool)
    padding[1, 11:] = False                     # one padded row
    loss_mask = (torch.rand(BATCH, SEQ, generator=g) < 0.25) & padding
    loss_mask[2, :] = False
    loss_mask[2, 3] = True                      # a row with a single prediction
    labels = torch.where(loss_mask, torch.randint(5, 25, (BATCH, SEQ), generator=g), torch.full_like(tokens, -100))
    return tokens, (~padding)[:, None, None, :], labels, loss_mask


def config(sequence_parallel: bool, recompute: bool = False, dropout: float = 0.0,
           compile_layers: bool = False) -> BertConfig:
    return BertConfig(num_layers=2, hidden_size=32, num_attention_heads=4, max_position_embeddings=SEQ,
                      hidden_dropout=dropout, attention_dropout=0.0, init_seed=11,
                      checkpoint_activations=recompute, sequence_parallel=sequence_parallel,
                      compile_layers=compile_layers)


def loss_and_grads(groups, sequence_parallel: bool, prediction: str, recompute: bool, compile_layers: bool = False,
                   autocast: bool = False):
    model_parallel_seed(3, groups)
    model = ProteinBertModel(config(sequence_parallel, recompute, compile_layers=compile_layers), groups)
    tokens, mask, labels, loss_mask = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if prediction == "sparse":
            logits = model(tokens, mask, prediction_mask=loss_mask)
            loss, _ = masked_lm_loss(logits, *predicted_labels(labels, loss_mask), groups)
        else:
            logits = model(tokens, mask)
            loss, _ = masked_lm_loss(logits, labels, loss_mask, groups)
    loss.backward()
    all_reduce_sequence_parallel_gradients(sequence_parallel_parameters(model), groups)
    grads = {}
    for name, param in model.named_parameters():
        grads[name] = (param.grad.clone(), getattr(param, "tensor_model_parallel", False),
                       getattr(param, "partition_dim", -1), getattr(param, "sequence_parallel", False))
    return loss.item(), grads


def _worker():
    groups = scg.init_process_group([("tp", 2)])
    out = {"tp_rank": groups.rank_in("tp")}
    for prediction, recompute in CASES:
        for sp in (False, True):
            out[(prediction, recompute, sp)] = loss_and_grads(groups, sp, prediction, recompute)
    # Compiled layers (--compile-layers) at TP=2, with and without SP: the graphs break at every collective.
    for sp in (False, True):
        out[("compiled", sp)] = loss_and_grads(groups, sp, "dense", False, compile_layers=True)
        out[("bf16", sp)] = loss_and_grads(groups, sp, "sparse", False, autocast=True)
    # Dropout masks of the two slices: the embedding dropout of the sequence-parallel region (p = 0.5).
    model_parallel_seed(3, groups)
    model = ProteinBertModel(config(True, dropout=0.5), groups)
    tokens = make_batch()[0]
    positions = torch.arange(SEQ).expand_as(tokens)
    out["slice_keep_mask"] = model.language_model.embedding(tokens, positions) != 0   # [b, s/2, h]
    return out


@pytest.fixture(scope="module")
def results():
    single = scg._single_process(("tp",), {"tp": 1})
    reference = {case: loss_and_grads(single, False, *case) for case in CASES}
    # aot_eager: the compiled layers' graphs are traced and differentiated without generating C++ (fast).
    return reference, run_distributed(_worker, 2, env={"MEGATRON_PROTEIN_COMPILE_BACKEND": "aot_eager"})


def _slice(full: torch.Tensor, is_parallel: bool, dim: int, rank: int) -> torch.Tensor:
    return full.chunk(2, dim=dim)[rank] if is_parallel else full


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[f"{p}{'-recompute' if r else ''}" for p, r in CASES])
def test_sequence_parallel_tp2_equals_tp2_and_one_process(results, case):
    reference, ranks = results
    ref_loss, ref_grads = reference[case]
    for out in ranks:
        rank = out["tp_rank"]
        plain_loss, plain = out[case + (False,)]
        sp_loss, sp = out[case + (True,)]
        assert sp_loss == pytest.approx(ref_loss, rel=RTOL, abs=ATOL)
        assert sp_loss == pytest.approx(plain_loss, rel=RTOL, abs=ATOL)
        assert set(sp) == set(plain) == set(ref_grads)
        marked = {name for name, (_, _, _, is_sp) in sp.items() if is_sp}
        # What runs on the slices: every LayerNorm, the row-parallel biases, the MLM head's dense and LayerNorm.
        assert {n for n in marked if "layernorm" in n} == {n for n in sp if "layernorm" in n}
        assert "language_model.encoder.layers.0.self_attention.dense.bias" in marked
        assert "language_model.encoder.layers.1.mlp.dense_4h_to_h.bias" in marked
        assert not any(n for n in marked if "query_key_value" in n or "embeddings" in n)
        for name, (grad, is_parallel, dim, _) in sp.items():
            expected = _slice(ref_grads[name][0], is_parallel, dim, rank)
            torch.testing.assert_close(grad, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name} vs 1 proc: {m}")
            torch.testing.assert_close(grad, plain[name][0], atol=ATOL, rtol=RTOL,
                                       msg=lambda m: f"{name} vs TP=2 without SP: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_compiled_layers_at_tp2_equal_one_process(results, sp):
    reference, ranks = results
    ref_loss, ref_grads = reference[("dense", False)]
    for out in ranks:
        loss, grads = out[("compiled", sp)]
        assert loss == pytest.approx(ref_loss, rel=RTOL, abs=ATOL)
        for name, (grad, is_parallel, dim, _) in grads.items():
            torch.testing.assert_close(grad, _slice(ref_grads[name][0], is_parallel, dim, out["tp_rank"]),
                                       atol=ATOL, rtol=RTOL, msg=lambda m: f"compiled {name}: {m}")


@pytest.mark.slow
def test_sequence_parallel_under_bf16_autocast_equals_tp2(results):
    """The sequence-parallel product casts for autocast itself (it keeps the slice, not the gathered input): the
    same bf16 numerics as TP=2 without it, to bf16 rounding (loss 1e-2, each gradient 3e-2 of its largest value)."""
    _, ranks = results
    for out in ranks:
        (loss, plain), (sp_loss, sp) = out[("bf16", False)], out[("bf16", True)]
        assert sp_loss == pytest.approx(loss, abs=1e-2)
        for name, (grad, _, _, _) in sp.items():
            reference = plain[name][0]
            assert grad.dtype == reference.dtype == torch.float32, name
            assert (grad - reference).abs().max() <= 3e-2 * reference.abs().max() + 1e-6, name


@pytest.mark.slow
def test_each_sequence_slice_draws_its_own_dropout_mask(results):
    _, ranks = results
    masks = [out["slice_keep_mask"] for out in ranks]
    assert masks[0].shape == (BATCH, SEQ // 2, 32)
    kept = masks[0].float().mean().item()
    assert 0.35 < kept < 0.65                    # p = 0.5 dropout did run
    assert (masks[0] != masks[1]).float().mean() > 0.3   # independent masks: about half the entries differ


def test_sequence_parallel_at_tp1_is_the_plain_model():
    """At TP=1 every sequence-parallel collective is the identity: the same loss, the same gradients (bit for bit
    with dense prediction; under sparse prediction the head runs before dropping the padded query rows instead of
    after, which only reorders the sums of its parameters' gradients)."""
    single = scg._single_process(("tp",), {"tp": 1})
    for case in CASES:
        plain_loss, plain = loss_and_grads(single, False, *case)
        sp_loss, sp = loss_and_grads(single, True, *case)
        assert sp_loss == plain_loss
        for name in plain:
            if case[0] == "dense":
                assert torch.equal(sp[name][0], plain[name][0]), name
            else:
                torch.testing.assert_close(sp[name][0], plain[name][0], atol=1e-7, rtol=1e-6)
