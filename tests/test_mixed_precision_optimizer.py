"""The mixed-precision optimizer's parts, in one process: float32 gradient accumulation through the flat buffers,
main parameters that keep what bf16 cannot hold, the AdamW update against torch's on float32, padded and lone
buckets, and the checkpoint state round trip and its conversions from and to torch AdamW's.

The update is checked bit for bit against torch's fused AdamW on a float32 copy fed the same float32 gradients
(the same kernel on the same numbers); gradient accumulation within float32 rounding of the summed bf16
gradients (rtol 1e-6, the order of two additions).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from megatron_protein.parallel import scg
from megatron_protein.parallel.dp import DataParallel
from megatron_protein.parallel.fused_params import FusedParameters
from megatron_protein.training.mixed_precision_optimizer import (MixedPrecisionOptimizer, OptimizerStateError,
                                                                 build_data_parallel, pieces_from_torch_adamw,
                                                                 torch_adamw_state_from_pieces)
from megatron_protein.training.optimizer import OptimConfig, build_optimizer, weight_decay_group


class TinyMLP(nn.Module):
    def __init__(self, width: int = 24):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(width, 2 * width)
        self.norm = nn.LayerNorm(2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.norm(self.up(x))))


@pytest.fixture
def groups():
    return scg.init_process_group([("dp", None), ("pp", 1), ("tp", 1)])


def batches(n: int, width: int = 24):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, width, generator=g), torch.randn(8, width, generator=g)) for _ in range(n)]


def mixed(groups, lr=1e-3, dtype=torch.bfloat16, weight_decay=0.01):
    model = TinyMLP()
    ddp = build_data_parallel(model, groups, overlap_grad_reduce=False, use_distributed_optimizer=False)
    optimizer = MixedPrecisionOptimizer(ddp, OptimConfig(lr=lr, weight_decay=weight_decay), dtype, groups)
    return model, ddp, optimizer


def test_bf16_gradients_accumulate_in_float32_main_grad(groups):
    model, ddp, optimizer = mixed(groups)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.main_grad.dtype for p in model.parameters()} == {torch.float32}
    data = batches(2)
    # The reference: the same bf16 model's gradient of each micro-batch by plain autograd, summed in float32.
    expected = {name: torch.zeros(p.shape) for name, p in model.named_parameters()}
    for x, y in data:
        grads = torch.autograd.grad(nn.functional.mse_loss(model(x.bfloat16()), y.bfloat16()),
                                    list(model.parameters()))
        for (name, _), grad in zip(model.named_parameters(), grads):
            expected[name] += grad.float()
    optimizer.zero_grad()
    for x, y in data:
        nn.functional.mse_loss(model(x.bfloat16()), y.bfloat16()).backward()
    for name, p in model.named_parameters():
        assert p.grad is None, f"{name}: .grad must be moved into main_grad by the hook"
        torch.testing.assert_close(p.main_grad, expected[name], rtol=1e-6, atol=0, msg=name)
    # zero_grad defers the zeroing: the next gradient is cast in, a parameter that gets none is zeroed by the
    # sync's reattach_grads. Here only `up` gets a gradient: nothing of the previous step may leak into any view.
    optimizer.zero_grad()
    x, _ = data[0]
    grad_up = torch.autograd.grad(model.up(x.bfloat16()).float().sum(), [model.up.weight])[0].float()
    model.up(x.bfloat16()).float().sum().backward()
    ddp.fused.reattach_grads()
    assert torch.equal(model.up.weight.main_grad, grad_up)
    for name, p in model.named_parameters():
        if name != "up.weight" and name != "up.bias":
            assert float(p.main_grad.abs().max()) == 0, f"{name} kept the previous step's gradient"
    optimizer.zero_grad()
    ddp.fused.reattach_grads()
    assert all(float(p.main_grad.abs().max()) == 0 for p in model.parameters())


def test_main_parameters_keep_updates_that_bf16_rounds_away(groups):
    """AdamW's step is about lr per element; at lr 1e-4 on weights of about 0.1 that is below half of bf16's
    resolution there (2^-8 relative). torch AdamW on bf16 parameters loses most of them; the float32 main copy keeps every
    one, equals torch AdamW on a float32 copy with the same gradients bit for bit, and the model's parameter is
    always the main value rounded to bf16."""
    model, ddp, optimizer = mixed(groups, lr=1e-4)
    reference = TinyMLP()  # the same float32 initial values
    reference_optimizer = build_optimizer(reference, OptimConfig(lr=1e-4, weight_decay=0.01))
    plain_bf16 = TinyMLP().to(torch.bfloat16)
    plain_optimizer = torch.optim.AdamW(plain_bf16.parameters(), lr=1e-4, weight_decay=0.01)
    start = {name: p.detach().float().clone() for name, p in reference.named_parameters()}
    for x, y in batches(5):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x.bfloat16()), y.bfloat16()).backward()
        for p_ref, p, p_plain in zip(reference.parameters(), model.parameters(), plain_bf16.parameters()):
            p_ref.grad = p.main_grad.clone()
            p_plain.grad = p.main_grad.to(torch.bfloat16)
        norm, finite = optimizer.grad_norm_and_finite()
        assert finite and norm > 0
        optimizer.step()
        reference_optimizer.step()
        plain_optimizer.step()
    main = optimizer.gather_main_params()
    lost = 0
    for name, p_ref in reference.named_parameters():
        assert main[name].dtype == torch.float32
        assert torch.equal(main[name], p_ref.detach()), f"{name}: main parameters differ from torch AdamW in fp32"
        assert torch.equal(dict(model.named_parameters())[name].detach(), main[name].to(torch.bfloat16)), name
        moved = (main[name] - start[name]).abs() > 0
        assert bool(moved.all()), f"{name}: some main values never moved"
        plain_moved = (dict(plain_bf16.named_parameters())[name].detach().float() - start[name].bfloat16().float())
        lost += int((plain_moved == 0).sum())
    total = sum(p.numel() for p in reference.parameters())
    assert lost > 0.5 * total, f"bf16 AdamW lost only {lost} of {total} updates: the test's premise does not hold"


def test_the_gradient_norm_and_clipping_match_the_float32_functions(groups):
    from megatron_protein.training.optimizer import clip_grad_norm

    model, ddp, optimizer = mixed(groups, dtype=torch.float32)
    reference = TinyMLP()
    x, y = batches(1)[0]
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    nn.functional.mse_loss(reference(x), y).backward()
    norm, finite = optimizer.grad_norm_and_finite(torch.tensor(1.0))
    expected = clip_grad_norm(list(reference.parameters()), 0.1, groups)
    assert finite and norm == pytest.approx(expected, rel=1e-6)
    optimizer.clip_(0.1, norm)
    for p, p_ref in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-6, atol=1e-9)
    assert not optimizer.grad_norm_and_finite(torch.tensor(float("nan")))[1], "a NaN loss must flag the step"
    next(model.parameters()).grad.view(-1)[0] = float("inf")
    assert not optimizer.grad_norm_and_finite()[1], "an inf gradient must flag the step"


def test_padded_buckets_and_a_bucket_of_its_own():
    model = TinyMLP()
    values = {name: p.detach().clone() for name, p in model.named_parameters()}
    fused = FusedParameters(model, key=weight_decay_group, bucket_numel=100, pad_buckets_to=3,
                            own_bucket=lambda name, p: name == "up.weight")
    for buf in fused.buffers:
        spans = [(b.start, b.end, b.padded_end) for b in buf.buckets]
        assert spans[0][0] == 0 and all(s[2] == t[0] for s, t in zip(spans, spans[1:])), spans
        assert buf.data.numel() == spans[-1][2]
        for b in buf.buckets:
            assert b.padded_numel % 3 == 0 and b.padded_numel - b.numel < 3
            assert float(b.padded_data[b.numel:].abs().sum()) == 0.0  # the padding is zero
            assert sum(p.numel() for p in b.params) == b.numel
    lone = [b for b in fused.buckets if any(p is model.up.weight for p in b.params)]
    assert len(lone) == 1 and lone[0].params == [model.up.weight]
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), values[name])
    assert fused.numel() == sum(v.numel() for v in values.values())
    with pytest.raises(ValueError, match="pad_buckets_to"):
        FusedParameters(TinyMLP(), pad_buckets_to=0)


def test_a_buffer_mixing_weight_decay_groups_is_refused(groups):
    model = TinyMLP()
    with pytest.raises(ValueError, match="key=weight_decay_group"):
        MixedPrecisionOptimizer(DataParallel(model, groups), OptimConfig(), torch.bfloat16, groups)


def _train(optimizer, model, steps, dtype=torch.bfloat16):
    for x, y in batches(steps):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype)).backward()
        optimizer.step()


def test_state_round_trip_and_conversions_to_and_from_torch_adamw(groups):
    """Our state -> a fresh optimizer continues bit for bit; torch AdamW's state of the same model converts
    into ours and back by name, moments and step unchanged; a state of another model is refused by name."""
    model, _, optimizer = mixed(groups)
    _train(optimizer, model, 3)
    saved, main = optimizer.state_dict(), {k: v.clone() for k, v in optimizer.gather_main_params().items()}
    model2, _, optimizer2 = mixed(groups)
    optimizer2.load_main_params(main)
    optimizer2.check_states([saved], "here")
    optimizer2.load_states([saved])
    _train(optimizer, model, 2)
    _train(optimizer2, model2, 2)
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), name

    reference = TinyMLP()
    torch_optimizer = build_optimizer(reference, OptimConfig(lr=1e-3))
    _train(torch_optimizer, reference, 2, dtype=torch.float32)
    flat_model = dict(reference.state_dict())
    _, _, optimizer3 = mixed(groups)
    converted = pieces_from_torch_adamw(torch_optimizer.state_dict(), flat_model, optimizer3.numels)
    optimizer3.check_states([converted], "torch")
    optimizer3.load_states([converted])
    assert optimizer3.steps_taken == 2
    names = {id(p): n for n, p in reference.named_parameters()}
    back = torch_adamw_state_from_pieces([optimizer3.state_dict()], torch_optimizer, names)
    original = torch_optimizer.state_dict()
    for index, entry in original["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(back["state"][index][key], entry[key]), (index, key)
        assert float(back["state"][index]["step"]) == float(entry["step"])

    other = dict(saved, numels={**saved["numels"], "extra.weight": 3})
    with pytest.raises(OptimizerStateError, match="another model.*extra.weight"):
        optimizer2.check_states([other], "ckpt")
    partial = dict(saved, pieces={k: v for k, v in saved["pieces"].items() if k != "down.bias"})
    with pytest.raises(OptimizerStateError, match="do not cover.*down.bias"):
        optimizer2.check_states([partial], "ckpt")
