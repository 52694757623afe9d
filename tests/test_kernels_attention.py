"""The Evoformer's gated self-attention (AF2 Algorithm 7), the memory-efficient tiled attention and the CPU training
core (fused flash forward, recomputing backward).

The tiled and the CPU flash paths must equal the plain one (forward and every gradient, float64; the flash path
also in float32) for tile and chunk sizes that do not divide the lengths, with fully masked rows and pair biases
broadcast over MSA rows and heads, and must not save any tensor the size of the logits for backward.
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_protein import kernels
from megatron_protein.kernels.gated_attention import attention_core
from tests.kernels_helpers import assert_same, run_with_grads


def _plain(q, k, v, bias, mask, scale):
    return kernels.masked_softmax(q @ k.transpose(-1, -2), scale, bias, mask, "unfused") @ v


def _assert_equals_plain(core, bias_shape, dtype=torch.float64, **tol):
    """``core(q, k, v, bias, mask, scale)`` against the plain composition: output and every gradient, with a fully
    masked MSA row (zeros, no NaN) and the bias broadcast as ``bias_shape`` says."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 3, 11, 6, dtype=dtype, requires_grad=True) for _ in range(3))
    bias = None if bias_shape is None else torch.randn(bias_shape, dtype=dtype, requires_grad=True)
    mask = torch.rand(2, 4, 1, 1, 11) < 0.3
    mask[1, 2] = True  # a fully masked MSA row
    inputs = [t for t in (q, k, v, bias) if t is not None]
    scale = 1 / math.sqrt(6)
    plain = _plain(q, k, v, bias, mask, scale)
    out = core(q, k, v, bias, mask, scale)
    torch.testing.assert_close(out, plain, **tol)
    assert torch.equal(out[1, 2], torch.zeros_like(out[1, 2]))
    cotangent = torch.randn_like(plain)
    grads_plain = torch.autograd.grad(plain, inputs, cotangent)
    grads_out = torch.autograd.grad(out, inputs, cotangent)
    for name, a, b in zip("qkvb", grads_out, grads_plain):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("tiles", [(4, 5), (16, 16), (1, 7)])
@pytest.mark.parametrize("bias_shape", [None, (2, 1, 3, 11, 11), (1, 1, 11), (2, 1, 1, 1, 11)])
def test_tiled_attention_equals_plain(tiles, bias_shape):
    _assert_equals_plain(lambda q, k, v, bias, mask, scale: kernels.tiled_attention(
        q, k, v, bias, mask, scale, q_tile=tiles[0], k_tile=tiles[1]), bias_shape)


def test_tiled_attention_gradcheck():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 5, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    mask[..., 3, :] = True
    mask[..., 0, 4] = True
    assert torch.autograd.gradcheck(lambda *t: kernels.tiled_attention(*t, mask, 0.7, 2, 3), (q, k, v, bias))


@pytest.mark.parametrize("chunk_rows", [1, 3, 4])
@pytest.mark.parametrize("bias_shape", [None, (2, 1, 3, 11, 11), (1, 1, 11), (2, 1, 1, 1, 11), (2, 4, 3, 11, 11)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flash_attention_cpu_equals_plain(chunk_rows, bias_shape, dtype):
    """The training core on CPU (fused flash forward, recomputing backward) against the plain composition, with
    biases broadcast every way the Evoformer uses and B cut into chunks that do not divide it."""
    from megatron_protein.kernels.flash_attention_cpu import flash_attention_cpu
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
    _assert_equals_plain(lambda q, k, v, bias, mask, scale: flash_attention_cpu(
        q, k, v, bias, mask, scale, chunk_elements=chunk_rows * 3 * 11 * 11), bias_shape, dtype, **tol)


def test_flash_attention_cpu_gradcheck_and_no_mask():
    from megatron_protein.kernels.flash_attention_cpu import flash_attention_cpu
    torch.manual_seed(1)
    q, k, v = (torch.randn(3, 2, 5, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: flash_attention_cpu(*t, None, 0.7, chunk_elements=50), (q, k, v, bias))
    mask = torch.zeros(3, 1, 1, 5, dtype=torch.bool)
    mask[0, ..., 4] = True
    assert torch.autograd.gradcheck(lambda *t: flash_attention_cpu(*t, mask, 0.7), (q, k, v, bias))


def test_flash_attention_cpu_refuses_what_it_cannot_run():
    from megatron_protein.kernels.flash_attention_cpu import flash_attention_cpu
    q = torch.randn(2, 2, 5, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32/float64"):
        flash_attention_cpu(q, q, q)
    with pytest.raises(ValueError, match="same leading dims"):
        flash_attention_cpu(torch.randn(2, 2, 5, 4), torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4))
    with pytest.raises(TypeError, match="bool"):
        x = torch.randn(2, 2, 5, 4)
        flash_attention_cpu(x, x, x, mask=torch.zeros(2, 1, 1, 5))


def _largest_saved_numel(fn, *args):
    largest = 0

    def pack(t):
        nonlocal largest
        largest = max(largest, t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return largest


def test_tiled_attention_saves_nothing_the_size_of_the_logits():
    n_seq, heads, n_res, c = 8, 2, 48, 4
    q, k, v = (torch.randn(n_seq, heads, n_res, c, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, heads, n_res, n_res, requires_grad=True)  # the pair bias, shared by the MSA rows
    logits_numel = n_seq * heads * n_res * n_res
    plain = _largest_saved_numel(_plain, q, k, v, bias, None, 0.5)
    tiled = _largest_saved_numel(kernels.tiled_attention, q, k, v, bias, None, 0.5, 16, 16)
    from megatron_protein.kernels.flash_attention_cpu import flash_attention_cpu
    flash = _largest_saved_numel(flash_attention_cpu, q, k, v, bias, None, 0.5)
    assert plain >= logits_numel
    assert tiled <= max(bias.numel(), q.numel())
    assert flash <= max(bias.numel(), q.numel())


@pytest.mark.parametrize("tile_size", [None, 7])
def test_gated_self_attention_fused_tiled_and_unfused_agree(tile_size):
    torch.manual_seed(2)
    module = kernels.GatedSelfAttention(c_in=8, c_hidden=4, num_heads=3, tile_size=tile_size).double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.4)
    msa = torch.randn(2, 5, 13, 8, dtype=torch.float64, requires_grad=True)  # [b, N_seq, N_res, c_m]
    pair_bias = torch.randn(2, 1, 3, 13, 13, dtype=torch.float64, requires_grad=True)
    msa_mask = torch.rand(2, 5, 13) > 0.2
    mask = ~msa_mask[:, :, None, None, :]
    fused = run_with_grads(module, "reference", [msa, pair_bias, mask])
    unfused = run_with_grads(module, "unfused", [msa, pair_bias, mask])
    assert_same(fused, unfused, torch.float64, f"GatedSelfAttention tile_size={tile_size}")


def test_gated_self_attention_matches_algorithm_7_written_out():
    """An independent transcription of Algorithm 7 lines 2-7 (supplement), einsum by einsum."""
    torch.manual_seed(3)
    c_m, c, heads, n_seq, n_res = 6, 4, 2, 3, 7
    module = kernels.GatedSelfAttention(c_m, c, heads).double()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
    m = torch.randn(n_seq, n_res, c_m, dtype=torch.float64)
    b = torch.randn(heads, n_res, n_res, dtype=torch.float64)  # b_ij^h
    w = {name: getattr(module, f"linear_{name}").weight.view(heads, c, c_m) for name in "qkvg"}
    q, k, v = (torch.einsum("sic,hdc->shid", m, w[n]) for n in "qkv")
    g = torch.sigmoid(torch.einsum("sic,hdc->shid", m, w["g"]) + module.linear_g.bias.view(1, heads, 1, c))
    a = torch.softmax(torch.einsum("shid,shjd->shij", q, k) / math.sqrt(c) + b, dim=-1)
    o = g * torch.einsum("shij,shjd->shid", a, v)
    expected = torch.einsum("shid,ehd->sie", o, module.linear_o.weight.view(c_m, heads, c)) + module.linear_o.bias
    torch.testing.assert_close(module(m, b[None]), expected)


def test_attention_core_rejects_unknown_backend():
    x = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match="unknown backend"):
        attention_core(x, x, x, None, None, 1.0, "cuda")


def test_fusion_config_builds_every_layer_with_its_choice():
    config = kernels.FusionConfig(attention_tile_size=32)
    assert config.gated_self_attention(8, 4, 2).tile_size == 32
    assert config.layer_norm(8).fused and config.bias_dropout_add(0.1, broadcast_dim=-3).broadcast_dims == (-3,)
    off = kernels.FusionConfig.unfused()
    assert not any(m.fused for m in (off.layer_norm(4), off.bias_gelu(), off.bias_dropout_add(0.1),
                                     off.scale_mask_softmax(1.0), off.pair_bias_softmax(), off.core_attention(4),
                                     off.gated_self_attention(4, 2, 2)))
    with pytest.raises(ValueError, match="attention_tile_size"):
        kernels.FusionConfig(attention_tile_size=0)
