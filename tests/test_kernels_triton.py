"""Every Triton kernel against its PyTorch reference, forward and backward, on CPU under Triton's interpreter
(TRITON_INTERPRET=1, set here before triton is imported; scripts/test.sh exports it too).

fp32 comparisons are tight (2e-5); bf16 is checked more loosely. Shapes are tiny because the interpreter is
~100x slower than compiled code, but they cover what breaks kernels: widths and lengths that are not a power of
two or a multiple of the block (7, 13, 19, 33), more rows than one program handles, fully masked rows (zeros, no
NaN) and biases/masks broadcast over heads and MSA rows (stride-0 reads and atomic bias-gradient sums).
"""
from __future__ import annotations

import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="the Triton kernels are an optional extra: pip install -e .[kernels]")

from megatron_protein import kernels  # noqa: E402
from megatron_protein.kernels import dispatch  # noqa: E402
from tests.kernels_helpers import assert_same, run_with_grads  # noqa: E402

pytestmark = pytest.mark.skipif(not dispatch.triton_interpreter_enabled(),
                                reason="Triton kernels run on CPU only under TRITON_INTERPRET=1")

DTYPES = [torch.float32, torch.bfloat16]


def _randomise(module, seed=0, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def _cast(inputs, dtype):
    return [x.detach().to(dtype).requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            for x in inputs]


def _compare(module, inputs, dtype, what, seed=0):
    """Triton in ``dtype`` against the reference. For bf16 the reference runs in fp32 on the same (bf16-rounded)
    inputs and weights, so the check measures the kernel's own rounding, not the reference's."""
    module = module.to(dtype)
    low_precision = _cast(inputs, dtype)
    triton_result = run_with_grads(module, "triton", low_precision, seed)
    if dtype == torch.float32:
        reference_result = run_with_grads(module, "reference", low_precision, seed)
    else:
        reference_result = run_with_grads(copy.deepcopy(module).float(), "reference",
                                           _cast(low_precision, torch.float32), seed)
    assert_same(triton_result, reference_result, dtype, what)
    return triton_result


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [7, 33, 129])
def test_layer_norm(width, dtype):
    x = torch.randn(3, 7, width)  # 21 rows: more than one backward program (16 rows each)
    _compare(_randomise(kernels.LayerNorm(width)), [x], dtype, f"LayerNorm width={width}")


class _SoftmaxCall(torch.nn.Module):
    def __init__(self, module, mask):
        super().__init__()
        self.module, self.mask = module, mask

    def forward(self, scores, bias=None):
        if isinstance(self.module, kernels.ScaleMaskSoftmax):
            return self.module(scores, self.mask)
        return self.module(scores, bias, self.mask)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq", [1, 13])
def test_scale_mask_softmax_padding_packed_and_fully_masked(seq, dtype):
    scores = torch.randn(2, 2, seq, seq)
    padding = torch.zeros(2, 1, 1, seq, dtype=torch.bool)
    padding[1, ..., seq // 2 + 1:] = True
    segments = torch.tensor([[1] * seq, [1] * (seq // 2) + [2] * (seq - seq // 2)])
    segments[1, -2:] = 0  # padding: its query rows are fully masked
    packed = (segments[:, None, :, None] != segments[:, None, None, :]) | (segments == 0)[:, None, None, :]
    for name, mask in (("none", None), ("padding", padding), ("packed", packed[..., :seq, :seq])):
        out = _compare(_SoftmaxCall(kernels.ScaleMaskSoftmax(0.25), mask), [scores], dtype, f"softmax {name}")
        if name == "packed" and seq > 2:
            assert torch.equal(out[0][1, :, -1], torch.zeros_like(out[0][1, :, -1]))  # fully masked row


@pytest.mark.parametrize("bias_shape", [(2, 1, 3, 5, 11), (2, 1, 1, 5, 11), (1, 5, 11)])
def test_pair_bias_softmax_bias_broadcast_over_rows_and_heads(bias_shape):
    logits = torch.randn(2, 3, 3, 5, 11)  # [b, N_seq, H, Q, K]
    bias = torch.randn(bias_shape)
    mask = torch.rand(2, 3, 1, 1, 11) < 0.3
    mask[0, 1] = True  # one MSA row with every residue masked
    result = _compare(_SoftmaxCall(kernels.PairBiasSoftmax(0.5), mask), [logits, bias], torch.float32,
                      f"pair-bias softmax bias={bias_shape}")
    assert result[1][1].shape == bias.shape


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gelu(dtype):
    _compare(kernels.BiasGeLU(), [torch.randn(3, 5, 37) * 2, torch.randn(37)], dtype, "BiasGeLU")
    _compare(kernels.BiasGeLU(), [torch.randn(2, 9), None], dtype, "GeLU without bias")


class _SeededBDA(torch.nn.Module):
    """Draws the dropout mask from a fixed seed so both backends see the same mask."""

    def __init__(self, p, broadcast_dim):
        super().__init__()
        self.op = kernels.BiasDropoutAdd(p, broadcast_dim=broadcast_dim)

    def forward(self, x, bias, residual):
        torch.manual_seed(11)
        return self.op(x, bias, residual)


@pytest.mark.parametrize("broadcast_dim", [None, -3, (0, -2)])
def test_bias_dropout_add_train_and_eval(broadcast_dim):
    x, residual = torch.randn(2, 4, 5, 7), torch.randn(2, 4, 5, 7)
    bias = torch.randn(7)
    module = _SeededBDA(0.3, broadcast_dim)
    train = _compare(module, [x, bias, residual], torch.float32, f"BiasDropoutAdd train {broadcast_dim}")
    assert (train[0] == residual).any()  # something was dropped
    _compare(module.eval(), [x, bias, residual], torch.float32, "BiasDropoutAdd eval")
    _compare(module.train(), [x, bias, residual], torch.bfloat16, "BiasDropoutAdd bf16")


@pytest.mark.parametrize("dtype", DTYPES)
def test_core_attention_flash_kernel(dtype):
    seq = 19  # two 16-row blocks, the second one ragged
    q, k, v = (torch.randn(2, 2, seq, 8) for _ in range(3))
    mask = torch.zeros(2, 1, seq, seq, dtype=torch.bool)
    mask[1, ..., 12:] = True
    mask[1, :, 12:, :] = True  # padding queries: zero context
    result = _compare(kernels.CoreAttention(8).eval(), [q, k, v, mask], dtype, "CoreAttention")
    assert torch.equal(result[0][1, :, 12:], torch.zeros_like(result[0][1, :, 12:]))


@pytest.mark.parametrize("bias_shape", [(1, 1, 2, 19, 19), (1, 1, 1, 19, 19)])
def test_gated_attention_flash_kernel_with_pair_bias(bias_shape):
    n_seq, n_res = 3, 19
    module = _randomise(kernels.GatedSelfAttention(c_in=6, c_hidden=5, num_heads=2), std=0.3)
    msa = torch.randn(1, n_seq, n_res, 6)
    pair_bias = torch.randn(bias_shape)  # shared by every MSA row (and every head in the second case)
    mask = torch.zeros(1, n_seq, 1, 1, n_res, dtype=torch.bool)
    mask[0, 1, ..., 15:] = True
    mask[0, 2] = True  # a fully masked row
    _compare(module, [msa, pair_bias, mask], torch.float32, f"GatedSelfAttention bias={bias_shape}")
    _compare(module, [msa, pair_bias, mask], torch.bfloat16, "GatedSelfAttention bf16")


def test_triton_path_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with dispatch.force_backend("triton"):
            kernels.LayerNorm(4)(torch.randn(2, 4))


def test_flash_attention_dropout_matches_reference_with_the_kernels_mask():
    """In-kernel attention dropout: materialise the kernel's Philox keep mask for the same seed and check the
    output and every gradient against softmax -> mask / (1 - p) -> matmul written out in torch."""
    from megatron_protein.kernels._triton.flash_attention import (attention_dropout_keep_mask, draw_dropout_seed,
                                                                  flash_attention)
    p, seq = 0.3, 19
    q, k, v = (torch.randn(2, 2, seq, 8, requires_grad=True) for _ in range(3))
    mask = torch.zeros(2, 1, seq, seq, dtype=torch.bool)
    mask[1, ..., 12:] = True
    torch.manual_seed(21)
    out = flash_attention(q, k, v, None, mask, 0.35, dropout_p=p)
    torch.manual_seed(21)
    keep = attention_dropout_keep_mask(draw_dropout_seed(q.device), p, 4, seq, seq, q.device).view(2, 2, seq, seq)
    assert 0.55 < keep.float().mean() < 0.85
    probs = kernels.masked_softmax(q @ k.transpose(-1, -2), 0.35, None, mask, "unfused")
    expected = (probs * keep / (1 - p)) @ v
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    cotangent = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), cotangent),
                         torch.autograd.grad(expected, (q, k, v), cotangent)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
