"""Evoformer tests that need no peer: initialisers, chunked = unchunked, recompute = no recompute (gradients),
padding invariance, the Parallel Evoformer ('end') against its branches written out by hand, the extra-MSA stack,
kernel choices (unfused, tiled attention) and bf16 autocast.
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_protein.kernels import FusionConfig
from megatron_protein.models.folding import evoformer as evo
from megatron_protein.models.folding.chunking import chunk_layer
from megatron_protein.models.folding.primitives import TRUNCATED_NORMAL_STD, Linear
from tests.test_evoformer_common import assert_close_scaled, random_inputs, random_masks, randomize_, tiny_config

S, R = 5, 7
FP32 = dict(atol=2e-5, rtol=1e-5)


def _block_inputs(cfg, batch=(), seed=0):
    m, z = random_inputs(batch, S, R, cfg.c_m, cfg.c_z, seed)
    return (m, z, *random_masks(batch, S, R, seed))


# -- primitives ----------------------------------------------------------------------------------------------------

def test_linear_initialisers_follow_supplement_1_11_4():
    torch.manual_seed(0)
    fan_in = 400
    for init, variance in (("default", 1.0 / fan_in), ("relu", 2.0 / fan_in), ("normal", 1.0 / fan_in)):
        w = Linear(fan_in, 300, init=init).weight
        assert abs(w.var().item() / variance - 1.0) < 0.05, init
        if init != "normal":  # truncated at 2 standard deviations of the underlying normal
            assert w.abs().max().item() <= 2.0 * math.sqrt(variance) / TRUNCATED_NORMAL_STD + 1e-6
    glorot = Linear(fan_in, 300, init="glorot").weight
    assert abs(glorot.var().item() / (2.0 / (fan_in + 300)) - 1.0) < 0.05
    gating, final = Linear(8, 4, init="gating"), Linear(8, 4, init="final")
    assert gating.weight.eq(0).all() and gating.bias.eq(1).all()
    assert final.weight.eq(0).all() and final.bias.eq(0).all()
    assert Linear(8, 4).bias.eq(0).all()
    with pytest.raises(ValueError, match="init must be one of"):
        Linear(8, 4, init="xavier")


def test_fresh_block_is_the_identity():
    """Every residual update ends in a 'final' (zero) Linear, so an untrained block leaves m and z unchanged."""
    cfg = tiny_config()
    block = evo.EvoformerBlock(cfg).eval()
    m, z, msa_mask, pair_mask = _block_inputs(cfg)
    m_out, z_out = block(m, z, msa_mask, pair_mask)
    torch.testing.assert_close(m_out, m, atol=0, rtol=0)
    torch.testing.assert_close(z_out, z, atol=0, rtol=0)


def test_block_does_not_modify_its_inputs_in_inference():
    cfg = tiny_config()
    block = randomize_(evo.EvoformerBlock(cfg)).eval()
    m, z, msa_mask, pair_mask = _block_inputs(cfg)
    m0, z0 = m.clone(), z.clone()
    with torch.no_grad():
        block(m, z, msa_mask, pair_mask, chunk_size=2)
        block(m, z, msa_mask, pair_mask)
    assert torch.equal(m, m0) and torch.equal(z, z0)


def test_bad_shapes_give_clear_errors():
    cfg = tiny_config()
    block = evo.EvoformerBlock(cfg)
    m, z, msa_mask, pair_mask = _block_inputs(cfg)
    with pytest.raises(ValueError, match="msa_mask"):
        block(m, z, msa_mask[:, :-1], pair_mask)
    with pytest.raises(ValueError, match="pair representation"):
        block(m, z[:, :-1], msa_mask, pair_mask)
    with pytest.raises(ValueError, match="outer_product_mean_position"):
        tiny_config(outer_product_mean_position="last")


# -- chunking ------------------------------------------------------------------------------------------------------

def test_chunk_layer_is_exact_and_keeps_shared_inputs_whole():
    x = torch.randn(2, 5, 3, 4)
    shared = torch.randn(1, 1, 3, 4)  # broadcast over both batch dims: passed whole to every chunk
    seen = []

    def fn(a, b):
        seen.append(b.shape)
        return (a * b).sum(-1)

    out = chunk_layer(fn, (x, shared), chunk_size=2, num_batch_dims=2)
    torch.testing.assert_close(out, (x * shared).sum(-1), atol=0, rtol=0)
    assert all(s == shared.shape for s in seen) and len(seen) == 2 * 3  # 2 batch entries x ceil(5 / 2)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_layer(fn, (x, shared), chunk_size=0, num_batch_dims=2)


@pytest.mark.parametrize("batch", [(), (2,)], ids=["unbatched", "batch2"])
@pytest.mark.parametrize("position", ["middle", "end", "first"])
def test_chunked_inference_equals_unchunked(batch, position):
    cfg = tiny_config(outer_product_mean_position=position)
    stack = randomize_(evo.EvoformerStack(cfg)).eval()
    inputs = _block_inputs(cfg, batch)
    with torch.no_grad():
        full = stack(*inputs)
        for chunk_size in (1, 3):
            chunked = stack(*inputs, chunk_size=chunk_size)
            for a, b in zip(chunked, full):
                torch.testing.assert_close(a, b, **FP32)


def test_chunked_extra_msa_stack_equals_unchunked():
    cfg = tiny_config(global_column_attention=True)
    stack = randomize_(evo.ExtraMSAStack(cfg)).eval()
    inputs = _block_inputs(cfg)
    with torch.no_grad():
        torch.testing.assert_close(stack(*inputs, chunk_size=2), stack(*inputs), **FP32)


# -- recompute -----------------------------------------------------------------------------------------------------

def _gradients(stack, inputs, seed):
    m, z = (t.clone().requires_grad_() for t in inputs[:2])
    torch.manual_seed(seed)  # the same dropout masks in both runs
    m_out, z_out, s = stack(m, z, *inputs[2:])
    loss = (m_out * torch.linspace(-1, 1, m_out.shape[-1])).sum() + (z_out ** 2).mean() + s.sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in stack.named_parameters()}
    grads["m"], grads["z"] = m.grad, z.grad
    stack.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_recompute_gives_the_same_gradients_with_dropout():
    cfg = tiny_config()
    plain = randomize_(evo.EvoformerStack(cfg)).train()
    recomputed = evo.EvoformerStack(cfg.with_(recompute=True)).train()
    recomputed.load_state_dict(plain.state_dict())
    inputs = _block_inputs(cfg)
    loss_a, grads_a = _gradients(plain, inputs, seed=3)
    loss_b, grads_b = _gradients(recomputed, inputs, seed=3)
    torch.testing.assert_close(loss_b, loss_a, atol=0, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-6, msg=name)
    # Dropout really was on: another seed gives another loss.
    loss_c, _ = _gradients(plain, inputs, seed=4)
    assert not torch.equal(loss_c, loss_a)


# -- masks and padding ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("position", ["middle", "end", "first"])
@pytest.mark.parametrize("extra_msa", [False, True], ids=["evoformer", "extra_msa"])
def test_padding_does_not_change_real_positions(position, extra_msa):
    cfg = tiny_config(outer_product_mean_position=position, global_column_attention=extra_msa)
    stack = randomize_(evo.EvoformerStack(cfg)).eval()
    n_seq, n_res, pad_seq, pad_res = 4, 6, 3, 2
    m, z = random_inputs((), n_seq, n_res, cfg.c_m, cfg.c_z, seed=5)
    # Padding filled with garbage (large values): only the masks may keep it out.
    m_pad, z_pad = random_inputs((), n_seq + pad_seq, n_res + pad_res, cfg.c_m, cfg.c_z, seed=6)
    m_pad, z_pad = 50 * m_pad, 50 * z_pad
    m_pad[:n_seq, :n_res], z_pad[:n_res, :n_res] = m, z
    msa_mask = torch.zeros(n_seq + pad_seq, n_res + pad_res)
    msa_mask[:n_seq, :n_res] = 1
    seq_mask = torch.zeros(n_res + pad_res)
    seq_mask[:n_res] = 1
    pair_mask = seq_mask[:, None] * seq_mask[None, :]
    with torch.no_grad():
        m_ref, z_ref, s_ref = stack(m, z, torch.ones(n_seq, n_res), torch.ones(n_res, n_res))
        m_out, z_out, s_out = stack(m_pad, z_pad, msa_mask, pair_mask)
    torch.testing.assert_close(m_out[:n_seq, :n_res], m_ref, **FP32)
    torch.testing.assert_close(z_out[:n_res, :n_res], z_ref, **FP32)
    torch.testing.assert_close(s_out[:n_res], s_ref, **FP32)


# -- the Parallel Evoformer ----------------------------------------------------------------------------------------

def test_opm_at_end_equals_the_branches_by_hand():
    """'end' at bp degree 1: MSA branch (row attn, column attn, transition, OPM of the new MSA) and pair branch
    (from the block's input z) computed here from the block's own modules, then joined."""
    cfg = tiny_config(outer_product_mean_position="end")
    block = randomize_(evo.EvoformerBlock(cfg)).eval()
    m, z, msa_mask, pair_mask = _block_inputs(cfg)
    with torch.no_grad():
        m_out, z_out = block(m, z, msa_mask, pair_mask)
        m1 = m + block.msa_att_row(m, z, msa_mask)
        m1 = m1 + block.msa_att_col(m1, msa_mask)
        m1 = m1 + block.msa_transition(m1, msa_mask)
        opm = block.outer_product_mean(m1, msa_mask)
        z1 = z + block.tri_mul_out(z, pair_mask)
        z1 = z1 + block.tri_mul_in(z1, pair_mask)
        z1 = z1 + block.tri_att_start(z1, pair_mask)
        z1 = z1 + block.tri_att_end(z1, pair_mask)
        z1 = z1 + block.pair_transition(z1, pair_mask)
        z1 = z1 + opm
    torch.testing.assert_close(m_out, m1, **FP32)
    torch.testing.assert_close(z_out, z1, **FP32)
    # The branches as functions: msa_branch(m, z) -> (m_new, opm_update), pair_branch(z) -> z_new.
    with torch.no_grad():
        m_b, opm_b = block.msa_branch(m, z, msa_mask, None)
        z_b = block.pair_branch(z, pair_mask, None)
    torch.testing.assert_close(m_b, m1, **FP32)
    torch.testing.assert_close(z_b + opm_b, z1, **FP32)
    # ... and 'middle' is a different function (the pair stack sees this block's OPM).
    middle = evo.EvoformerBlock(cfg.with_(outer_product_mean_position="middle")).eval()
    middle.load_state_dict(block.state_dict())
    with torch.no_grad():
        assert not torch.allclose(middle(m, z, msa_mask, pair_mask)[1], z_out, atol=1e-3)


# -- extra-MSA stack -----------------------------------------------------------------------------------------------

def test_extra_msa_stack_runs_and_trains():
    cfg = evo.EvoformerConfig.extra_msa(c_m=8, c_z=10, num_blocks=2, c_hidden_msa_att=4, num_heads_msa=2,
                                        c_hidden_opm=4, c_hidden_mul=6, c_hidden_pair_att=4, num_heads_pair=2)
    stack = randomize_(evo.ExtraMSAStack(cfg)).train()
    assert all(isinstance(b.msa_att_col, evo.MSAColumnGlobalAttention) for b in stack.blocks)
    e, z = random_inputs((), 9, R, cfg.c_m, cfg.c_z)
    msa_mask, pair_mask = random_masks((), 9, R)
    z_out = stack(e, z.requires_grad_(), msa_mask, pair_mask)
    assert z_out.shape == z.shape and not torch.allclose(z_out, z)
    z_out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in stack.parameters())


# -- kernels -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fusion", [FusionConfig.unfused(), FusionConfig(attention_tile_size=3)],
                         ids=["unfused", "tiled_attention"])
def test_kernel_choices_compute_the_same_function(fusion):
    cfg = tiny_config(msa_dropout=0.0, pair_dropout=0.0)
    reference = randomize_(evo.EvoformerStack(cfg)).train()
    other = evo.EvoformerStack(cfg.with_(fusion=fusion)).train()
    other.load_state_dict(reference.state_dict())
    inputs = _block_inputs(cfg)
    loss_a, grads_a = _gradients(reference, inputs, seed=0)
    loss_b, grads_b = _gradients(other, inputs, seed=0)
    assert_close_scaled(loss_b, loss_a, atol=1e-4, msg="loss")
    for name in grads_a:
        assert_close_scaled(grads_b[name], grads_a[name], atol=1e-4, rtol=1e-4, msg=name)


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    cfg = tiny_config()
    stack = randomize_(evo.EvoformerStack(cfg), scale=0.2).eval()
    m, z, msa_mask, pair_mask = _block_inputs(cfg)
    with torch.no_grad():
        ref = stack(m, z, msa_mask, pair_mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = stack(m, z, msa_mask, pair_mask)
    for a, b, name in zip(low, ref, ("m", "z", "s")):
        assert torch.isfinite(a).all(), name
        rel = (a.float() - b).norm() / b.norm()
        assert rel < 0.03, f"{name}: relative error {rel:.4f} under bf16 autocast"
    # Training under autocast (the memory-lean functions recompute in backward under the forward's autocast):
    # the gradients stay close to fp32's. (A gradient that is zero in exact arithmetic, such as the pair bias's
    # LayerNorm shift, which softmax ignores, is rounding noise in both: skipped.)
    stack.train()
    grads = []
    for enabled in (False, True):
        m_in = m.clone().requires_grad_()
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            m_out, z_out, s = stack(m_in, z, msa_mask, pair_mask)
        (m_out.float().square().mean() + z_out.float().square().mean() + s.float().sum()).backward()
        grads.append({n: p.grad.clone() for n, p in stack.named_parameters()} | {"m": m_in.grad})
        stack.zero_grad(set_to_none=True)
    for name, ref in grads[0].items():
        low = grads[1][name]
        assert torch.isfinite(low).all(), name
        if ref.norm() > 1e-4:
            rel = (low.float() - ref).norm() / ref.norm()
            assert rel < 0.15, f"{name}: relative gradient error {rel:.3f} under bf16 autocast"


# -- memory-lean paths ---------------------------------------------------------------------------------------------

def _tiny_budgets(monkeypatch):
    """Chunk budgets of one element, so every memory-lean path runs in many chunks even at test sizes."""
    from megatron_protein.models.folding import (chunking, outer_product_mean, primitives, transition,
                                                 triangle_multiplication)
    monkeypatch.setattr(chunking, "ATTENTION_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(triangle_multiplication, "PROJECTION_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(triangle_multiplication, "MIN_SLICES_PER_CHUNK", 2)
    monkeypatch.setattr(outer_product_mean, "OUTER_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(transition, "HIDDEN_CHUNK_ELEMENTS", 1)
    monkeypatch.setattr(primitives, "BIAS_CHUNK_ELEMENTS", 1)


@pytest.mark.parametrize("batch", [(), (2,)], ids=["unbatched", "batch2"])
def test_memory_lean_training_paths_in_many_chunks_give_the_same_gradients(batch, monkeypatch):
    """Recomputed attention and transitions, the chunked gated projection of the triangle updates and the chunked
    outer product (all recomputing in backward) against the plain paths, in one chunk each."""
    cfg = tiny_config()
    plain = randomize_(evo.EvoformerStack(cfg.with_(lean_training=False))).train()
    inputs = _block_inputs(cfg, batch)
    loss_a, grads_a = _gradients_any(plain, inputs, seed=1)
    _tiny_budgets(monkeypatch)
    lean = evo.EvoformerStack(cfg).train()
    lean.load_state_dict(plain.state_dict())
    loss_b, grads_b = _gradients_any(lean, inputs, seed=1)
    assert_close_scaled(loss_b, loss_a, msg="loss")
    for name in grads_a:
        assert_close_scaled(grads_b[name], grads_a[name], msg=name)


def _gradients_any(stack, inputs, seed):
    m, z = (t.clone().requires_grad_() for t in inputs[:2])
    torch.manual_seed(seed)
    m_out, z_out, s = stack(m, z, *inputs[2:])
    loss = (m_out * torch.linspace(-1, 1, m_out.shape[-1])).sum() + (z_out ** 2).mean() + s.sum()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in stack.named_parameters()}
    grads["m"], grads["z"] = m.grad, z.grad
    return loss.detach(), grads


@pytest.mark.parametrize("position", ["middle", "end"])
def test_in_place_inference_in_many_chunks_equals_out_of_place(position, monkeypatch):
    """inplace=True: every update added into m and z chunk by chunk (add_into) against a fresh-tensor run."""
    cfg = tiny_config(outer_product_mean_position=position)
    block = randomize_(evo.EvoformerBlock(cfg)).eval()
    m, z, msa_mask, pair_mask = _block_inputs(cfg, (2,))
    with torch.no_grad():
        ref_m, ref_z = block(m, z, msa_mask, pair_mask)
        _tiny_budgets(monkeypatch)
        m_in, z_in = m.clone(), z.clone()
        out_m, out_z = block(m_in, z_in, msa_mask, pair_mask, chunk_size=2, inplace=True)
    torch.testing.assert_close(out_m, ref_m, **FP32)
    torch.testing.assert_close(out_z, ref_z, **FP32)
    assert out_z.data_ptr() == z_in.data_ptr() or position == "end"  # 'middle': the pair updated in place
