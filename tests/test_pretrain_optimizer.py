"""Optimizer pieces: weight-decay groups, the LR schedule, global-norm clipping, the fp16 loss scaler, the flags.

(The global gradient norm across tp/pp/dp ranks is checked against one process in test_pretrain_parallel.py.)
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_protein.models.bert import BertConfig, ProteinBertModel
from megatron_protein.parallel import scg
from megatron_protein.parallel.tensor_parallel import model_parallel_seed
from megatron_protein.training.arguments import configs_from_args, parse_args, resolve_batch
from megatron_protein.training.optimizer import DynamicLossScaler, LRScheduler, clip_grad_norm, param_groups


def test_no_weight_decay_on_biases_and_norms():
    model_parallel_seed(1, scg.init_process_group([("dp", None)]))
    model = ProteinBertModel(BertConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                                        max_position_embeddings=8))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {g["name"]: (g["weight_decay"], sorted(names[id(p)] for p in g["params"]))
              for g in param_groups(model, 0.01)}
    decay, no_decay = groups["decay"], groups["no_decay"]
    assert decay[0] == 0.01 and no_decay[0] == 0.0
    assert all(n.endswith("weight") and "layernorm" not in n for n in decay[1])
    assert "language_model.embedding.word_embeddings.weight" in decay[1]
    assert all(n.endswith("bias") or "layernorm" in n for n in no_decay[1])
    assert "lm_head.bias" in no_decay[1] and "language_model.encoder.final_layernorm.weight" in no_decay[1]
    assert len(decay[1]) + len(no_decay[1]) == len(names)


def lrs(style, steps=10, warmup=2, decay=8):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = LRScheduler(opt, max_lr=1.0, min_lr=0.1, warmup_steps=warmup, decay_steps=decay, decay_style=style)
    values = []
    for _ in range(steps):
        values.append(opt.param_groups[0]["lr"])
        scheduler.step()
    return values, scheduler


def test_lr_schedule_warmup_then_decay():
    linear, _ = lrs("linear")
    assert linear[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert linear[5] == pytest.approx(0.1 + 0.9 * (1 - 3 / 6))
    assert linear[8:] == pytest.approx([0.1, 0.1])
    cosine, _ = lrs("cosine")
    assert cosine[5] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert cosine[8] == pytest.approx(0.1)
    constant, _ = lrs("constant")
    assert constant == pytest.approx([0.5] + [1.0] * 9)


def test_lr_schedule_resumes_its_position():
    _, scheduler = lrs("cosine", steps=4)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    fresh = LRScheduler(opt, 1.0, 0.1, 2, 8, "cosine")
    fresh.load_state_dict(scheduler.state_dict())
    assert fresh.num_steps == 4 and opt.param_groups[0]["lr"] == pytest.approx(scheduler.lr)


def test_clip_grad_norm_uses_the_global_norm():
    scg.init_process_group([("dp", None)])
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 0.0, 0.0])
    norm = clip_grad_norm([a, b], max_norm=1.0)
    assert norm == pytest.approx(5.0)
    assert torch.cat([a.grad, b.grad]).norm().item() == pytest.approx(1.0, rel=1e-5)
    shared = torch.nn.Parameter(torch.zeros(2))
    shared.grad, shared.shared = torch.ones(2), True  # the pipeline's second copy of a tied weight: not counted
    assert clip_grad_norm([a, b, shared], max_norm=0.0) == pytest.approx(1.0, rel=1e-5)


def test_loss_scaler_backs_off_after_hysteresis_and_grows_after_window():
    scaler = DynamicLossScaler(initial_scale=1024, window=3, hysteresis=2)
    scaler.update(found_overflow=True)
    assert scaler.scale == 1024  # first overflow absorbed by hysteresis
    scaler.update(found_overflow=True)
    assert scaler.scale == 512
    for _ in range(3):
        scaler.update(found_overflow=False)
    assert scaler.scale == 1024
    restored = DynamicLossScaler()
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()


def test_flags_become_configs_with_megatron_names():
    args = parse_args(["--data-path", "x", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                       "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
                       "--train-iters", "100", "--lr-warmup-fraction", "0.1", "--tensor-model-parallel-size", "2",
                       "--no-bias-gelu-fusion", "--checkpoint-activations", "--bf16"])
    config = configs_from_args(args)
    assert args.max_position_embeddings == 64 and args.ffn_hidden_size == 256
    assert config.optim.lr_warmup_steps == 10 and config.optim.bf16
    assert config.model.checkpoint_activations and not config.model.bias_gelu_fusion
    assert config.model.masked_softmax_fusion
    assert config.parallel.degrees() == [("pp", 1), ("dp", None), ("tp", 2)]  # Megatron-LM's order
    assert resolve_batch(config.train, dp_size=2) == 2  # 8 = 2 x 2 micro-batches x dp 2


@pytest.mark.parametrize("flags, message", [
    (["--num-attention-heads", "3"], "not divisible by num_attention_heads"),
    (["--tensor-model-parallel-size", "3"], "does not divide num_attention_heads"),
    (["--fp16", "--bf16"], "exclusive"),
    (["--seq-length", "128", "--max-position-embeddings", "64"], "exceeds --max-position-embeddings"),
])
def test_bad_flags_fail_with_the_reason(flags, message):
    base = ["--data-path", "x", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]
    with pytest.raises(ValueError, match=message):
        configs_from_args(parse_args(base + flags))


def test_global_batch_must_divide_into_micro_batches():
    config = configs_from_args(parse_args(["--data-path", "x", "--micro-batch-size", "3",
                                           "--global-batch-size", "8"]))
    with pytest.raises(ValueError, match="not a multiple of micro batch 3 x data-parallel size 1"):
        resolve_batch(config.train, dp_size=1)
