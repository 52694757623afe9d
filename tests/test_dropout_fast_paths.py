"""The CPU training fast paths of the BERT kernels compute what the plain compositions compute.

* :func:`kernels.attention.attention_written_out` (written-out attention with dropout, used by ``CoreAttention``'s
  reference path in CPU training) against matmul -> masked softmax -> (probs * keep / (1 - p)) -> matmul with the
  same keep mask: outputs and q/k/v gradients in float64, plus torch.autograd.gradcheck; fully masked query rows
  give zeros; bf16 under autocast stays close to the fp32 result.
* :func:`kernels.attention.attention_written_out` without dropout (``CoreAttention``'s CPU training path in
  bf16/fp16), chunked over heads, with heads or batch broadcast: outputs and gradients against the composition.
* :func:`kernels.bias_dropout_add.bernoulli_keep_mask`: a function of the default generator's state only (same
  seed, same mask, whatever the thread count), keep rate within binomial bounds, chunked and unchunked sizes.
"""
import math

import pytest
import torch

from megatron_protein.kernels import bias_dropout_add as bda
from megatron_protein.kernels import attention as attention_module
from megatron_protein.kernels.attention import CoreAttention, attention_keep_mask, attention_written_out
from megatron_protein.kernels.softmax import softmax_unfused


def _masks(b, s):
    padding = torch.zeros(b, 1, 1, s, dtype=torch.bool)
    padding[0, ..., s - 2:] = True
    block = torch.zeros(b, 1, s, s, dtype=torch.bool)
    block[1, 0, 2, :] = True  # one fully masked query row
    block[0, 0, :, 1] = True
    return [None, padding, block]


def _plain(q, k, v, mask, keep, scale, p):
    probs = softmax_unfused(torch.matmul(q, k.transpose(-1, -2)), scale, None, mask)
    return torch.matmul(probs * keep / (1.0 - p), v)


@pytest.mark.parametrize("mask_index", [0, 1, 2])
def test_attention_dropout_matches_plain_composition(mask_index):
    torch.manual_seed(0)
    b, h, s, d, p = 2, 3, 7, 5, 0.3
    q, k, v = (torch.randn(b, h, s, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = _masks(b, s)[mask_index]
    keep = attention_keep_mask((b, h, s, s), p, "cpu")
    assert keep.dtype == torch.bool and not bool(keep.all())
    out = attention_written_out(q, k, v, mask, 1 / math.sqrt(d), p, keep)
    ref = _plain(q, k, v, mask, keep, 1 / math.sqrt(d), p)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(out)
    for ours, theirs in zip(torch.autograd.grad(out, (q, k, v), grad_out),
                            torch.autograd.grad(ref, (q, k, v), grad_out)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda q, k, v: attention_written_out(q, k, v, mask, 0.4, p, keep), (q, k, v))
    if mask_index == 2:
        assert torch.equal(out[1, :, 2], torch.zeros_like(out[1, :, 2]))


def test_attention_dropout_strided_views_and_bf16_autocast():
    """q, k, v as the model makes them (transposed views of one fused projection), fp32 and bf16 autocast."""
    torch.manual_seed(1)
    b, s, h, d, p = 2, 16, 2, 8, 0.1
    qkv = torch.randn(b, s, h, 3, d, requires_grad=True)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=3))
    keep = attention_keep_mask((b, h, s, s), p, "cpu")
    out = attention_written_out(q, k, v, None, 1 / math.sqrt(d), p, keep)
    ref = _plain(q, k, v, None, keep, 1 / math.sqrt(d), p)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(out.square().sum(), qkv)
    (grad_ref,) = torch.autograd.grad(ref.square().sum(), qkv)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attention_written_out(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, 1 / math.sqrt(d), p, keep)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), out, rtol=5e-2, atol=5e-2)
    with pytest.raises(ValueError, match="keep must be bool"):
        attention_written_out(q, k, v, None, 1.0, p, keep.float())


@pytest.mark.parametrize("mask_index", [0, 1, 2])
@pytest.mark.parametrize("heads_per_chunk", [1, 2, 5])
def test_written_out_attention_without_dropout_in_chunks_of_heads(monkeypatch, mask_index, heads_per_chunk):
    monkeypatch.setattr(attention_module, "_heads_per_chunk", lambda q, k: heads_per_chunk)
    torch.manual_seed(2)
    b, h, sq, sk, d = 2, 5, 6, 7, 4
    q = torch.randn(b, h, sq, d, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(b, h, sk, d, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = _masks(b, 7)[mask_index]
    mask = None if mask is None else mask[..., :sq, :] if mask.shape[-2] > 1 else mask
    out = attention_written_out(q, k, v, mask, 0.3)
    ref = _plain(q, k, v, mask, torch.ones(b, h, sq, sk, dtype=torch.bool), 0.3, 0.0)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(out)
    for ours, theirs in zip(torch.autograd.grad(out, (q, k, v), grad_out),
                            torch.autograd.grad(ref, (q, k, v), grad_out)):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda q, k, v: attention_written_out(q, k, v, mask, 0.3), (q, k, v))


def test_written_out_attention_sums_gradients_of_broadcast_heads_and_batch():
    torch.manual_seed(3)
    q = torch.randn(2, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 6, 3, dtype=torch.float64, requires_grad=True)  # shared over batch and heads
    v = torch.randn(2, 1, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: attention_written_out(q, k, v, None, 0.5), (q, k, v))
    p = 0.25
    keep = attention_keep_mask((2, 4, 5, 6), p, "cpu")
    assert torch.autograd.gradcheck(lambda q, k, v: attention_written_out(q, k, v, None, 0.5, p, keep), (q, k, v))


def test_core_attention_bf16_training_path_is_close_to_float64():
    """CoreAttention in CPU training under bf16 takes the written-out path (bf16 scores and probabilities, as
    Megatron's fused softmax keeps them); its outputs and gradients stay within bf16 rounding of float64."""
    torch.manual_seed(4)
    b, h, s, d = 2, 4, 64, 16
    base = [torch.randn(b, h, s, d, dtype=torch.float64) for _ in range(3)]
    mask = _masks(b, s)[1]
    attention = CoreAttention(d, 0.0).train()
    low = [t.bfloat16().requires_grad_() for t in base]
    high = [t.clone().requires_grad_() for t in base]
    out_low, out_high = attention(*low, mask), attention(*high, mask)
    assert out_low.dtype == torch.bfloat16
    torch.testing.assert_close(out_low.double(), out_high, rtol=0, atol=3e-2)
    grad_out = torch.randn(b, h, s, d, dtype=torch.float64)
    out_low.backward(grad_out.bfloat16())
    out_high.backward(grad_out)
    for a, b_ in zip(low, high):
        scale = float(b_.grad.abs().max())
        torch.testing.assert_close(a.grad.double(), b_.grad, rtol=0, atol=5e-2 * scale)


@pytest.mark.parametrize("shape", [(3, 50, 40), (4, 4, 256, 256)])  # one piece, and above the chunking threshold
def test_keep_mask_is_a_function_of_the_seed(shape):
    chunked = math.prod(shape) >= bda.KEEP_MASK_CHUNKED_MIN_NUMEL
    assert chunked == (len(shape) == 4)
    threads = torch.get_num_threads()
    masks = []
    try:
        for num_threads in (1, 2, 2):
            torch.set_num_threads(num_threads)
            torch.manual_seed(11)
            masks.append(bda.bernoulli_keep_mask(shape, 0.9, "cpu"))
    finally:
        torch.set_num_threads(threads)
    assert masks[0].dtype == torch.bool and masks[0].shape == shape
    assert torch.equal(masks[0], masks[1]) and torch.equal(masks[1], masks[2])
    torch.manual_seed(12)
    assert not torch.equal(bda.bernoulli_keep_mask(shape, 0.9, "cpu"), masks[0])
    n = math.prod(shape)
    rate = masks[0].double().mean().item()
    assert abs(rate - 0.9) < 6 * math.sqrt(0.9 * 0.1 / n)  # six binomial standard deviations
    if chunked:  # every chunk has its own stream: no two quarters repeat
        quarters = masks[0].flatten().chunk(bda.KEEP_MASK_CHUNKS)
        assert not torch.equal(quarters[0], quarters[1])
