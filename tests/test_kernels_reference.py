"""The PyTorch paths of every kernel (fast reference = fused=True on CPU, and unfused) against each other and
against independent ground truth (torch.nn.LayerNorm, nn.functional.gelu, a float64 softmax), forward and backward.
Odd widths and lengths, fully masked rows (zeros, no NaN) and biases broadcast over heads and MSA rows."""
from __future__ import annotations


import pytest
import torch

from megatron_protein import kernels
from megatron_protein.kernels import dispatch
from tests.kernels_helpers import assert_same, cotangent_like, run_with_grads


def _randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


@pytest.mark.parametrize("width", [1, 7, 129])
def test_layer_norm_matches_torch(width):
    x = torch.randn(3, 5, width, dtype=torch.float64, requires_grad=True)
    ours = _randomise(kernels.LayerNorm(width, eps=1e-5).double())
    truth = torch.nn.LayerNorm(width, eps=1e-5).double()
    truth.load_state_dict(ours.state_dict())  # same state-dict layout as torch.nn.LayerNorm
    expected = run_with_grads(truth, "reference", [x])
    for backend in ("reference", "unfused"):
        assert_same(run_with_grads(ours, backend, [x]), expected, torch.float64, f"LayerNorm {backend}")


def test_layer_norm_rejects_wrong_width():
    with pytest.raises(ValueError, match="last dimension 8"):
        kernels.LayerNorm(8)(torch.randn(2, 7))


def _softmax_truth(scores, scale, bias, mask):
    """Independent float64 ground truth: exp / sum over the unmasked keys only, zero rows when none is left."""
    x = scores.double() * scale + (0 if bias is None else bias.double())
    keep = torch.ones_like(x, dtype=torch.bool) if mask is None else ~mask.expand_as(x)
    x = torch.where(keep, x, torch.zeros_like(x))
    x = x - torch.where(keep, x, torch.full_like(x, -1e300)).amax(-1, keepdim=True).clamp(min=-1e300)
    e = torch.where(keep, torch.exp(x), torch.zeros_like(x))
    return e / e.sum(-1, keepdim=True).clamp(min=1e-300)


class _Softmax(torch.nn.Module):
    def __init__(self, module, mask):
        super().__init__()
        self.module, self.mask = module, mask
        self.fused = module.fused

    def forward(self, scores, bias=None):
        self.module.fused = self.fused
        if isinstance(self.module, kernels.ScaleMaskSoftmax):
            return self.module(scores, self.mask)
        return self.module(scores, bias, self.mask)


@pytest.mark.parametrize("seq", [1, 5, 127, 130])
def test_scale_mask_softmax_padding_and_packed_masks(seq):
    torch.manual_seed(seq)
    scores = torch.randn(2, 3, seq, seq, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([seq, max(1, seq - 3)])
    padding = (torch.arange(seq)[None, :] >= lengths[:, None])[:, None, None, :]  # [b, 1, 1, s]
    segments = torch.ones(2, seq, dtype=torch.long)
    segments[:, seq // 2:] = 2
    segments[1, lengths[1]:] = 0
    packed = (segments[:, None, :, None] != segments[:, None, None, :]) | (segments == 0)[:, None, None, :]
    for mask in (None, padding, packed):
        module = _Softmax(kernels.ScaleMaskSoftmax(scale=0.125), mask)
        truth = _softmax_truth(scores, 0.125, None, mask)
        ref = run_with_grads(module, "reference", [scores])
        unf = run_with_grads(module, "unfused", [scores])
        torch.testing.assert_close(ref[0], truth)
        assert_same(ref, unf, torch.float64, f"ScaleMaskSoftmax seq={seq}")


def test_fully_masked_rows_are_zero_with_finite_grads():
    scores = torch.randn(1, 2, 4, 6, requires_grad=True)
    mask = torch.zeros(1, 1, 4, 6, dtype=torch.bool)
    mask[0, 0, 1] = True  # query 1 sees no key
    for fused in (True, False):
        probs = kernels.ScaleMaskSoftmax(1.0, fused=fused)(scores, mask)
        assert torch.equal(probs[0, :, 1], torch.zeros(2, 6))
        probs.pow(2).sum().backward()
        assert torch.isfinite(scores.grad).all()
        assert torch.equal(scores.grad[0, :, 1], torch.zeros(2, 6))
        scores.grad = None


def test_half_precision_softmax_runs_in_fp32():
    scores = (torch.randn(1, 1, 3, 200) * 30).bfloat16()
    probs = kernels.ScaleMaskSoftmax(1.0)(scores, None)
    assert probs.dtype == torch.bfloat16
    torch.testing.assert_close(probs.float(), torch.softmax(scores.float(), -1), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("bias_shape", [(2, 1, 3, 5, 9), (1, 1, 5, 9), (2, 1, 1, 1, 9)])
def test_pair_bias_softmax_grads_reduce_to_bias_shape(bias_shape):
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 3, 5, 9, dtype=torch.float64, requires_grad=True)  # [b, N_seq, H, Q, K]
    bias = torch.randn(bias_shape, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 4, 1, 1, 9) < 0.3
    mask[0, 0] = True
    module = _Softmax(kernels.PairBiasSoftmax(scale=0.5), mask)
    ref = run_with_grads(module, "reference", [logits, bias])
    unf = run_with_grads(module, "unfused", [logits, bias])
    torch.testing.assert_close(ref[0], _softmax_truth(logits, 0.5, bias, mask))
    assert ref[1][1].shape == bias.shape
    assert_same(ref, unf, torch.float64, "PairBiasSoftmax")
    small_logits = logits[:, :2, :2, :3].detach().clone().requires_grad_()
    small_bias = bias.detach()
    for dim in range(1, bias.dim() + 1):  # cut the bias to the small logits, keeping its broadcast dims
        small_bias = small_bias.narrow(-dim, 0, min(bias.shape[-dim], small_logits.shape[-dim]))
    small_bias = small_bias.clone().requires_grad_()
    small_mask = mask[:, :2]
    assert torch.autograd.gradcheck(lambda s, b: kernels.masked_softmax(s, 0.5, b, small_mask, "reference"),
                                    (small_logits, small_bias))


def test_masked_softmax_rejects_bad_masks():
    with pytest.raises(TypeError, match="bool"):
        kernels.ScaleMaskSoftmax()(torch.randn(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="does not broadcast"):
        kernels.ScaleMaskSoftmax()(torch.randn(1, 1, 2, 3), torch.zeros(1, 1, 2, 2, dtype=torch.bool))


@pytest.mark.parametrize("width", [3, 130])
def test_bias_gelu_is_exact_erf_gelu(width):
    x = torch.randn(4, 5, width, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(width, dtype=torch.float64, requires_grad=True)
    truth = torch.nn.functional.gelu(x + bias)  # exact (erf) form, not tanh
    for fused in (True, False):
        out = kernels.BiasGeLU(fused=fused)(x, bias)
        torch.testing.assert_close(out, truth)
    small_x = x[:2, :2, :3].detach().clone().requires_grad_()
    small_bias = bias[:3].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kernels.BiasGeLU(fused=True)(a, b), (small_x, small_bias))
    assert torch.autograd.gradcheck(lambda a: kernels.BiasGeLU(fused=True)(a, None), (small_x,))
    tanh = torch.nn.functional.gelu(x + bias, approximate="tanh")
    assert (kernels.BiasGeLU()(x, bias) - tanh).abs().max() > 1e-6  # would catch a tanh implementation


@pytest.mark.parametrize("fused", [True, False])
def test_bias_gelu_adds_an_fp32_bias_in_the_bf16_activations_dtype(fused):
    """Under autocast the activation is bf16 and the bias parameter fp32: the op stays in bf16 (as autocast's own
    linear-with-bias does) and the bias still gets its fp32 gradient."""
    torch.manual_seed(0)
    x = torch.randn(6, 40).bfloat16().requires_grad_()
    bias = torch.randn(40, requires_grad=True)
    out = kernels.BiasGeLU(fused=fused)(x, bias)
    assert out.dtype == torch.bfloat16
    truth = torch.nn.functional.gelu(x.detach().double() + bias.detach().bfloat16().double())
    torch.testing.assert_close(out.double(), truth, rtol=1.6e-2, atol=1e-2)
    out.float().sum().backward()
    assert bias.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    x64, b64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    torch.nn.functional.gelu(x64 + b64).sum().backward()
    torch.testing.assert_close(bias.grad.double(), b64.grad, rtol=2e-2, atol=2e-2)


class _BDA(torch.nn.Module):
    def __init__(self, p, broadcast_dim=None):
        super().__init__()
        self.op = kernels.BiasDropoutAdd(p, broadcast_dim=broadcast_dim)
        self.fused = True

    def forward(self, x, bias, residual):
        self.op.fused = self.fused
        return self.op(x, bias, residual)


@pytest.mark.parametrize("broadcast_dim", [None, -3, -2, (0, -2)])
def test_bias_dropout_add_train_shares_mask_along_axis(broadcast_dim):
    x = torch.randn(2, 6, 5, 8, dtype=torch.float64, requires_grad=True)  # [b, N_seq, N_res, c_m]
    bias = torch.randn(8, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(2, 6, 5, 8, dtype=torch.float64, requires_grad=True)
    module = _BDA(0.4, broadcast_dim)
    ref = run_with_grads(module, "reference", [x, bias, residual], seed=3)
    unf = run_with_grads(module, "unfused", [x, bias, residual], seed=3)
    assert_same(ref, unf, torch.float64, "BiasDropoutAdd")
    dropped = (ref[0] - residual) == 0  # x + bias is never exactly 0 here
    assert 0.2 < dropped.double().mean() < 0.6
    dims = () if broadcast_dim is None else ((broadcast_dim,) if isinstance(broadcast_dim, int) else broadcast_dim)
    for d in dims:  # the mask is constant along every shared axis
        assert torch.equal(dropped, dropped.narrow(d, 0, 1).expand_as(dropped))
    kept = ~dropped
    torch.testing.assert_close(ref[0][kept], (residual + (x + bias) / 0.6)[kept])
    torch.testing.assert_close(ref[1][2], cotangent_like(ref[0], seed=4))  # d residual = the cotangent


def test_bias_dropout_add_inference_is_plain_sum():
    op = kernels.BiasDropoutAdd(0.5).eval()
    x, b, r = torch.randn(3, 4), torch.randn(4), torch.randn(3, 4)
    torch.testing.assert_close(op(x, b, r), r + x + b)
    torch.testing.assert_close(op(x, None, r), r + x)
    with pytest.raises(ValueError, match="residual shape"):
        op(x, b, torch.randn(3, 5))


@pytest.mark.parametrize("seq", [1, 13])
def test_core_attention_fused_equals_unfused(seq):
    torch.manual_seed(seq)
    q, k, v = (torch.randn(2, 3, seq, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.zeros(2, 1, seq, seq, dtype=torch.bool)
    mask[1, ..., seq - seq // 2:] = True  # padding keys
    mask[1, :, seq - seq // 2:, :] = True  # padding queries see nothing -> zero context
    attention = kernels.CoreAttention(8, dropout_p=0.0)
    ref = run_with_grads(attention, "reference", [q, k, v, mask])
    unf = run_with_grads(attention, "unfused", [q, k, v, mask])
    assert_same(ref, unf, torch.float64, "CoreAttention")
    if seq > 1:
        assert torch.equal(ref[0][1, :, seq - seq // 2:], torch.zeros_like(ref[0][1, :, seq - seq // 2:]))


def test_dispatch_falls_back_on_cpu_and_logs_once(caplog):
    import logging
    caplog.set_level(logging.INFO, logger="megatron_protein.kernels.dispatch")
    assert dispatch.select_backend("LayerNorm", True, torch.zeros(1)) == "reference"
    assert dispatch.select_backend("LayerNorm", True, torch.zeros(1)) == "reference"
    assert dispatch.select_backend("LayerNorm", False, torch.zeros(1)) == "unfused"
    assert any("LayerNorm" in f for f in dispatch.fallbacks())
    assert sum("kernels.LayerNorm" in r.getMessage() for r in caplog.records) <= 1
    with pytest.raises(ValueError, match="backend"):
        with dispatch.force_backend("cuda"):
            pass
