"""Tensor-parallel layers at TP=2 and TP=4 against the unsplit computation built under the same seed.

For each layer: outputs, input gradients, and each rank's weight-gradient shard against the slice (along the
parameter's ``partition_dim``) of the full gradient; replicated parameters against the full gradient. The
reference is a plain torch module (nn.Linear, F.embedding, F.cross_entropy) for the single layers, and for the
transformer block the same block class built at TP=1 (so TP=1 runs the same code). Tolerance: float32,
atol = rtol = 1e-5 (partial sums are added in a different order).

One spawned run per world size: world 2 runs TP=2; world 4 runs TP=4, then TP=2 x DP=2 (layers again, inside each
data-parallel replica, plus the RNG tracker: dropout masks differ across tp ranks and match across dp ranks).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import run_distributed
from megatron_protein.parallel import scg
from megatron_protein.parallel import tensor_parallel as tp

ATOL = RTOL = 1e-5
SEED = 1234


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _single_tp_groups():
    """A TP=1 layout inside a multi-process run: no group, so every collective is the identity."""
    return scg.ParallelGroups(axes=("tp",), degrees={"tp": 1})


def _shard(full, param, pg):
    """This rank's slice of ``full`` for ``param`` (the whole tensor for a replicated parameter)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    return full.chunk(pg.size("tp"), dim=param.partition_dim)[pg.rank_in("tp")]


class _Failures(list):
    def close(self, name, got, expected):
        if got.shape != expected.shape:
            self.append(f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}")
        elif not torch.allclose(got, expected, atol=ATOL, rtol=RTOL):
            self.append(f"{name}: max abs diff {(got - expected).abs().max().item():.3g}")


def _reference_linear(in_features, out_features, seed, bias):
    """nn.Linear holding the full weight the parallel layers draw under ``seed`` (N(0, 0.02^2)) and ``bias``."""
    torch.manual_seed(seed)
    full = torch.empty(out_features, in_features)
    tp.init_method_normal(0.02)(full)
    ref = nn.Linear(in_features, out_features)
    with torch.no_grad():
        ref.weight.copy_(full)
        ref.bias.copy_(bias)
    return ref


# ---------------------------------------------------------------------------------------------------------------
# Single layers
# ---------------------------------------------------------------------------------------------------------------

def _check_linear_layers(pg, fails):
    t, r = pg.size("tp"), pg.rank_in("tp")
    x = torch.randn(2, 3, 8, generator=_gen(1))
    w_out = torch.randn(2, 3, 12, generator=_gen(2))
    bias = torch.randn(12, generator=_gen(3))
    ref = _reference_linear(8, 12, SEED, bias)
    x_ref = x.clone().requires_grad_()
    (ref(x_ref) * w_out).sum().backward()

    for gather_output in (True, False):
        torch.manual_seed(SEED)
        col = tp.ColumnParallelLinear(8, 12, gather_output=gather_output, groups=pg)
        name = f"tp{t} ColumnParallelLinear(gather_output={gather_output})"
        with torch.no_grad():
            col.bias.copy_(bias.chunk(t)[r])
        fails.close(f"{name} weight init", col.weight.detach(), ref.weight.detach().chunk(t, 0)[r])
        xi = x.clone().requires_grad_()
        y = col(xi)
        if gather_output:
            fails.close(f"{name} output", y, ref(x))
            (y * w_out).sum().backward()
        else:
            fails.close(f"{name} output shard", y, ref(x).chunk(t, -1)[r])
            (y * w_out.chunk(t, -1)[r]).sum().backward()  # this rank's part of the same loss
        fails.close(f"{name} input grad", xi.grad, x_ref.grad)
        fails.close(f"{name} weight grad shard", col.weight.grad, _shard(ref.weight.grad, col.weight, pg))
        fails.close(f"{name} bias grad shard", col.bias.grad, _shard(ref.bias.grad, col.bias, pg))

    torch.manual_seed(SEED)
    col = tp.ColumnParallelLinear(8, 12, gather_output=True, groups=pg, skip_bias_add=True)
    with torch.no_grad():
        col.bias.copy_(bias.chunk(t)[r])
    y, b = col(x)
    fails.close(f"tp{t} ColumnParallelLinear(skip_bias_add) output + bias", y + b, ref(x))

    # RowParallelLinear: 12 -> 8.
    x = torch.randn(2, 3, 12, generator=_gen(4))
    w_out = torch.randn(2, 3, 8, generator=_gen(5))
    bias = torch.randn(8, generator=_gen(6))
    ref = _reference_linear(12, 8, SEED + 1, bias)
    x_ref = x.clone().requires_grad_()
    (ref(x_ref) * w_out).sum().backward()
    for input_is_parallel in (False, True):
        torch.manual_seed(SEED + 1)
        row = tp.RowParallelLinear(12, 8, input_is_parallel=input_is_parallel, groups=pg)
        name = f"tp{t} RowParallelLinear(input_is_parallel={input_is_parallel})"
        with torch.no_grad():
            row.bias.copy_(bias)
        xi = (x.chunk(t, -1)[r] if input_is_parallel else x).clone().requires_grad_()
        y = row(xi)
        fails.close(f"{name} output", y, ref(x))
        (y * w_out).sum().backward()
        fails.close(f"{name} input grad", xi.grad,
                    x_ref.grad.chunk(t, -1)[r] if input_is_parallel else x_ref.grad)
        fails.close(f"{name} weight grad shard", row.weight.grad, _shard(ref.weight.grad, row.weight, pg))
        fails.close(f"{name} bias grad", row.bias.grad, _shard(ref.bias.grad, row.bias, pg))
        if row.bias.tensor_model_parallel or not row.weight.tensor_model_parallel or row.weight.partition_dim != 1:
            fails.append(f"{name}: wrong tensor_model_parallel/partition_dim attributes")
    torch.manual_seed(SEED + 1)
    row = tp.RowParallelLinear(12, 8, groups=pg, skip_bias_add=True)
    with torch.no_grad():
        row.bias.copy_(bias)
    y, b = row(x)
    fails.close(f"tp{t} RowParallelLinear(skip_bias_add) output + bias", y + b, ref(x))


def _check_embedding_and_loss(pg, fails):
    t, r = pg.size("tp"), pg.rank_in("tp")
    vocab, dim = 32, 6
    torch.manual_seed(SEED)
    full = torch.empty(vocab, dim)
    tp.init_method_normal(0.02)(full)
    torch.manual_seed(SEED)
    emb = tp.VocabParallelEmbedding(vocab, dim, groups=pg)
    ids = torch.randint(0, vocab, (3, 7), generator=_gen(7))
    ids[0, :4] = torch.tensor([0, vocab // t, vocab - 1, vocab // 2])  # ids at every shard boundary
    w_out = torch.randn(3, 7, dim, generator=_gen(8))
    full_ref = full.clone().requires_grad_()
    ref_out = F.embedding(ids, full_ref)
    (ref_out * w_out).sum().backward()
    out = emb(ids)
    (out * w_out).sum().backward()
    fails.close(f"tp{t} VocabParallelEmbedding output", out, ref_out.detach())
    fails.close(f"tp{t} VocabParallelEmbedding weight grad shard", emb.weight.grad, full_ref.grad.chunk(t, 0)[r])

    # Tied decoder logits: hidden @ W^T + b, this rank's vocab shard; hidden's gradient all-reduced.
    hidden = torch.randn(3, 7, dim, generator=_gen(9))
    b_full = torch.randn(vocab, generator=_gen(10))
    h_ref = hidden.clone().requires_grad_()
    w_logits = torch.randn(3, 7, vocab, generator=_gen(11))
    (F.linear(h_ref, full, b_full) * w_logits).sum().backward()
    hi = hidden.clone().requires_grad_()
    logits = tp.vocab_parallel_logits(hi, emb.weight.detach(), b_full.chunk(t)[r], groups=pg)
    (logits * w_logits.chunk(t, -1)[r]).sum().backward()
    fails.close(f"tp{t} vocab_parallel_logits shard", logits, F.linear(hidden, full, b_full).chunk(t, -1)[r])
    fails.close(f"tp{t} vocab_parallel_logits hidden grad", hi.grad, h_ref.grad)
    gathered = tp.vocab_parallel_logits(hidden, emb.weight.detach(), b_full.chunk(t)[r], groups=pg,
                                        gather_output=True)
    fails.close(f"tp{t} vocab_parallel_logits gathered", gathered, F.linear(hidden, full, b_full))

    # Cross-entropy from logit shards vs F.cross_entropy on the full logits, with ignored (-100) positions.
    full_logits = torch.randn(4, 5, vocab, generator=_gen(12)) * 3
    target = torch.randint(0, vocab, (4, 5), generator=_gen(13))
    target[0, 0], target[2, 3], target[1, 1], target[3, 4] = -100, -100, vocab - 1, 0
    token_weight = torch.rand(4, 5, generator=_gen(14))
    ref_logits = full_logits.clone().requires_grad_()
    ref_loss = F.cross_entropy(ref_logits.flatten(0, 1), target.flatten(), reduction="none").view(4, 5)
    (ref_loss * token_weight).sum().backward()
    shard = full_logits.chunk(t, -1)[r].clone().requires_grad_()
    loss = tp.vocab_parallel_cross_entropy(shard, target, groups=pg)
    (loss * token_weight).sum().backward()
    fails.close(f"tp{t} vocab_parallel_cross_entropy loss", loss, ref_loss.detach())
    fails.close(f"tp{t} vocab_parallel_cross_entropy logit grad shard", shard.grad, ref_logits.grad.chunk(t, -1)[r])
    if loss[0, 0].item() != 0.0 or shard.grad[0, 0].abs().max().item() != 0.0:
        fails.append(f"tp{t} vocab_parallel_cross_entropy: ignored position has nonzero loss or gradient")
    half = tp.vocab_parallel_cross_entropy(shard.detach().bfloat16(), target, groups=pg)
    if half.dtype != torch.float32 or not torch.allclose(half, ref_loss.detach(), atol=0.05, rtol=0.02):
        fails.append(f"tp{t} vocab_parallel_cross_entropy: bfloat16 logits give a wrong float32 loss")


# ---------------------------------------------------------------------------------------------------------------
# A transformer block built from the parallel layers (reference at TP=1 is the same class)
# ---------------------------------------------------------------------------------------------------------------

class ParallelBlock(nn.Module):
    """Pre-LN transformer layer: x + dense(attn(LN(x))), then h + fc2(gelu(fc1(LN(h)))).

    QKV is one column-parallel projection whose output rows are laid out per head as [heads, 3, head_dim]
    (Megatron checkpoint_version >= 2), so a contiguous shard of rows holds whole heads; the attention output
    projection and fc2 are row-parallel and take their input already split. Dropout is off: this block checks
    the TP arithmetic, and the RNG test checks dropout.
    """

    def __init__(self, hidden, heads, groups):
        super().__init__()
        t = groups.size("tp")
        self.local_heads = tp.divide(heads, t, "num_attention_heads")
        self.head_dim = hidden // heads
        self.input_layernorm = nn.LayerNorm(hidden)
        self.query_key_value = tp.ColumnParallelLinear(hidden, 3 * hidden, gather_output=False, groups=groups)
        self.dense = tp.RowParallelLinear(hidden, hidden, input_is_parallel=True, groups=groups)
        self.post_attention_layernorm = nn.LayerNorm(hidden)
        self.dense_h_to_4h = tp.ColumnParallelLinear(hidden, 4 * hidden, gather_output=False, groups=groups)
        self.dense_4h_to_h = tp.RowParallelLinear(4 * hidden, hidden, input_is_parallel=True, groups=groups)
        for ln in (self.input_layernorm, self.post_attention_layernorm):
            for p in ln.parameters():
                tp.set_tensor_model_parallel_attributes(p, False)

    def forward(self, x, mask):
        b, s, _ = x.shape
        # [b, s, h] -> [b, s, heads/tp, 3, d] -> q, k, v: [b, heads/tp, s, d]
        qkv = self.query_key_value(self.input_layernorm(x)).view(b, s, self.local_heads, 3, self.head_dim)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        scores = (q @ k.transpose(-1, -2)) / self.head_dim ** 0.5
        probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
        context = (probs @ v).transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim)
        h = x + self.dense(context)
        return h + self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(self.post_attention_layernorm(h))))


def _check_block(pg, fails):
    t = pg.size("tp")
    hidden, heads = 16, 4
    x = torch.randn(2, 5, hidden, generator=_gen(20))
    mask = torch.zeros(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., 3:] = True  # padding keys of the second sample
    w_out = torch.randn(2, 5, hidden, generator=_gen(21))

    results = {}
    for name, groups in (("tp1", _single_tp_groups()), ("tpN", pg)):
        torch.manual_seed(SEED)
        block = ParallelBlock(hidden, heads, groups)
        with torch.no_grad():  # nonzero biases and LayerNorm affine, drawn identically on every rank
            g = _gen(22)
            for p_name, p in sorted(block.named_parameters()):
                if p_name.endswith("bias") or "layernorm" in p_name:
                    full_shape = list(p.shape)
                    if getattr(p, "tensor_model_parallel", False):
                        full_shape[p.partition_dim] *= groups.size("tp")
                    full = torch.randn(full_shape, generator=g) * 0.1 + (1.0 if p_name.endswith("weight") else 0.0)
                    p.copy_(_shard(full, p, groups))
        xi = x.clone().requires_grad_()
        y = block(xi, mask)
        (y * w_out).sum().backward()
        results[name] = (block, y, xi.grad)

    ref_block, ref_y, ref_xgrad = results["tp1"]
    block, y, xgrad = results["tpN"]
    fails.close(f"tp{t} block output", y, ref_y)
    fails.close(f"tp{t} block input grad", xgrad, ref_xgrad)
    ref_params = dict(ref_block.named_parameters())
    for p_name, p in block.named_parameters():
        ref_p = ref_params[p_name]
        fails.close(f"tp{t} block param {p_name}", p.detach(), _shard(ref_p.detach(), p, pg))
        fails.close(f"tp{t} block grad {p_name}", p.grad, _shard(ref_p.grad, p, pg))
    # Layers keep working after a deep copy (an EMA copy of the model, for instance).
    clone = copy.deepcopy(block)
    fails.close(f"tp{t} deep-copied block output", clone(x, mask), ref_y.detach())


# ---------------------------------------------------------------------------------------------------------------
# RNG tracker
# ---------------------------------------------------------------------------------------------------------------

def _dropout_masks(pg):
    seeds = tp.model_parallel_seed(SEED, pg)
    tracker = tp.get_rng_tracker()
    ones = torch.ones(4096)
    outside = F.dropout(ones, 0.5) != 0          # replicated region: default generator
    after_outside = torch.get_rng_state()
    with tracker.fork():
        inside = F.dropout(ones, 0.5) != 0       # tensor-parallel region: model-parallel stream
    default_untouched = torch.equal(torch.get_rng_state(), after_outside)
    saved = tracker.get_states()
    with tracker.fork():
        first = torch.rand(16)
    tracker.set_states(saved)
    with tracker.fork():
        replay = torch.rand(16)
    return {"seeds": seeds, "outside": outside, "inside": inside, "default_untouched": default_untouched,
            "replay_equal": torch.equal(first, replay), "tp": pg.rank_in("tp"), "dp": pg.rank_in("dp")}


# ---------------------------------------------------------------------------------------------------------------
# Spawned runs
# ---------------------------------------------------------------------------------------------------------------

def _run_tp(world):
    fails = _Failures()
    pg = scg.init_process_group([("dp", None), ("tp", world)])
    _check_linear_layers(pg, fails)
    _check_embedding_and_loss(pg, fails)
    _check_block(pg, fails)
    result = {"fails": list(fails), "rng": None}
    if world == 4:
        pg22 = scg.init_process_group([("dp", None), ("tp", 2)])
        fails22 = _Failures()
        _check_linear_layers(pg22, fails22)
        _check_embedding_and_loss(pg22, fails22)
        _check_block(pg22, fails22)
        result["fails"] += [f"[tp2 x dp2] {f}" for f in fails22]
        result["rng"] = _dropout_masks(pg22)
    return result


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_layers_match_unsplit(world):
    results = run_distributed(_run_tp, world, world)
    for rank, res in enumerate(results):
        assert not res["fails"], f"rank {rank}:\n" + "\n".join(res["fails"])
    if world == 4:
        rng = [res["rng"] for res in results]
        for res in rng:
            assert res["default_untouched"], "fork() moved the default generator"
            assert res["replay_equal"], "set_states() did not replay the model-parallel stream"
            assert res["seeds"].default == SEED + 1_000_003 * res["dp"]
            assert res["seeds"].model_parallel == res["seeds"].default + 2718 + res["tp"]
        for a in rng:
            for b in rng:
                same_dp = a["dp"] == b["dp"]
                assert torch.equal(a["outside"], b["outside"]) == same_dp, (
                    "dropout outside TP regions must match across the tp ranks of a replica and differ across "
                    "replicas")
                same_rank = a["tp"] == b["tp"] and same_dp
                assert torch.equal(a["inside"], b["inside"]) == same_rank, (
                    f"model-parallel dropout masks of (tp {a['tp']}, dp {a['dp']}) and (tp {b['tp']}, dp {b['dp']})"
                    f" must {'match' if same_rank else 'differ'}")


# ---------------------------------------------------------------------------------------------------------------
# In-process checks (no communication needed)
# ---------------------------------------------------------------------------------------------------------------

def _fake_tp(degree, rank=0):
    """A layout of the given tp degree for construction-time checks only (no process group)."""
    pg = scg.ParallelGroups(axes=("tp",), degrees={"tp": degree})
    pg._coords["tp"] = rank
    return pg


@pytest.mark.parametrize("build, message", [
    (lambda pg: tp.ColumnParallelLinear(8, 10, groups=pg), "ColumnParallelLinear out_features = 10"),
    (lambda pg: tp.RowParallelLinear(10, 8, groups=pg), "RowParallelLinear in_features = 10"),
    (lambda pg: tp.VocabParallelEmbedding(30, 8, groups=pg), "VocabParallelEmbedding num_embeddings.* = 30"),
    (lambda pg: ParallelBlock(24, 6, pg), "num_attention_heads = 6"),
])
def test_uneven_splits_raise(build, message):
    with pytest.raises(scg.ParallelConfigError, match=message + ".*tensor-parallel degree 4"):
        build(_fake_tp(4))


def test_shards_are_slices_of_the_tp1_weight():
    full = tp.ColumnParallelLinear(8, 12, groups=_fake_tp(1))
    for rank in range(4):
        torch.manual_seed(0)
        full = tp.ColumnParallelLinear(8, 12, groups=_fake_tp(1))
        torch.manual_seed(0)
        col = tp.ColumnParallelLinear(8, 12, groups=_fake_tp(4, rank))
        torch.manual_seed(0)
        row = tp.RowParallelLinear(12, 8, groups=_fake_tp(4, rank))
        torch.manual_seed(0)
        row_full = tp.RowParallelLinear(12, 8, groups=_fake_tp(1))
        torch.manual_seed(0)
        emb = tp.VocabParallelEmbedding(32, 4, groups=_fake_tp(4, rank))
        torch.manual_seed(0)
        emb_full = tp.VocabParallelEmbedding(32, 4, groups=_fake_tp(1))
        assert torch.equal(col.weight, full.weight[3 * rank:3 * rank + 3])
        assert torch.equal(row.weight, row_full.weight[:, 3 * rank:3 * rank + 3])
        assert torch.equal(emb.weight, emb_full.weight[8 * rank:8 * rank + 8])
        assert (emb.vocab_start_index, emb.vocab_end_index) == (8 * rank, 8 * rank + 8)
        assert col.weight.tensor_model_parallel and col.weight.partition_dim == 0
        assert col.bias.tensor_model_parallel and col.bias.partition_dim == 0


def test_single_process_layers_equal_torch_modules():
    torch.manual_seed(5)
    col = tp.ColumnParallelLinear(6, 10)
    torch.manual_seed(5)
    full = torch.empty(10, 6)
    tp.init_method_normal(0.02)(full)
    x = torch.randn(3, 6)
    assert torch.equal(col(x), F.linear(x, full, torch.zeros(10)))
    logits = torch.randn(5, 30, requires_grad=True)
    target = torch.tensor([0, 29, -100, 7, 4])
    loss = tp.vocab_parallel_cross_entropy(logits, target)
    ref = F.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    g, = torch.autograd.grad(loss.sum(), logits)
    g_ref, = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-6)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="target id 40 is outside the vocabulary"):
        tp.vocab_parallel_cross_entropy(torch.randn(2, 32), torch.tensor([1, 40]))
    with pytest.raises(ValueError, match="does not match target shape"):
        tp.vocab_parallel_cross_entropy(torch.randn(2, 3, 32), torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="ColumnParallelLinear: the input's last dim is 5 but in_features is 8"):
        tp.ColumnParallelLinear(8, 4)(torch.randn(2, 5))


def test_pad_vocab_size():
    assert [tp.pad_vocab_size(30, 8, n) for n in (1, 2, 4, 8)] == [32, 32, 32, 64]
    assert tp.pad_vocab_size(32, 8, 1) == 32 and tp.pad_vocab_size(33, 128, 1) == 128
    with pytest.raises(ValueError):
        tp.pad_vocab_size(30, 0, 2)
