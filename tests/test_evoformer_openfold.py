"""Every Evoformer module against OpenFold's, weight for weight: same outputs, input gradients and weight gradients
to float32 rounding (|a - b| <= 2e-5 max(1, max|b|) + 1e-5 |b|), unchunked and chunked.

OpenFold (commit ce0029e, unpacked as /work/shared/peers/README.md describes) is a peer, not a dependency: these
tests skip when it is absent (CI has no /work/peers). Dropout is off (eval) in every comparison: the two
implementations draw their masks differently.
"""
from __future__ import annotations

import pytest
import torch

from megatron_protein.models.folding import evoformer as evo
from megatron_protein.models.folding.evoformer import EvoformerConfig, load_openfold_state_dict, openfold_key
from megatron_protein.models.folding.msa import (MSAColumnAttention, MSAColumnGlobalAttention,
                                                 MSARowAttentionWithPairBias)
from megatron_protein.models.folding.outer_product_mean import OuterProductMean
from megatron_protein.models.folding.transition import Transition
from megatron_protein.models.folding.triangle_attention import TriangleAttention
from megatron_protein.models.folding.triangle_multiplication import TriangleMultiplicativeUpdate
from tests.test_evoformer_common import import_openfold, random_inputs, random_masks, randomize_, tiny_config

OF = import_openfold()
pytestmark = pytest.mark.skipif(OF is None, reason="OpenFold is not unpacked at OPENFOLD_DIR (or its "
                                                    "dependencies scipy, dm-tree, biopython, modelcif are missing)")
ATOL, RTOL = 2e-5, 1e-5
S, R = 5, 7
C_M, C_Z = 12, 10
INF, EPS = 1e9, 1e-8


def _assert_close(ours, theirs, what):
    """float32 rounding, scaled to the tensor: |a - b| <= ATOL * max(1, max|b|) + RTOL |b|."""
    scale = max(1.0, float(theirs.abs().max()))
    torch.testing.assert_close(ours, theirs, atol=ATOL * scale, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def compare(ours, theirs, our_call, their_call, inputs, num_grad_inputs=1, seed=0):
    """Copy OpenFold's random weights into ours, then compare outputs and all gradients (of the parameters and of
    the first ``num_grad_inputs`` inputs; the rest are masks)."""
    randomize_(theirs, seed)
    load_openfold_state_dict(ours, theirs.state_dict())
    ours.eval(), theirs.eval()
    ins_a = [t.clone().requires_grad_(i < num_grad_inputs) for i, t in enumerate(inputs)]
    ins_b = [t.clone().requires_grad_(a.requires_grad) for t, a in zip(inputs, ins_a)]
    out_a, out_b = our_call(ours, *ins_a), their_call(theirs, *ins_b)
    if not isinstance(out_a, tuple):
        out_a, out_b = (out_a,), (out_b,)
    g = torch.Generator().manual_seed(seed + 7)
    cotangents = [torch.randn(o.shape, generator=g) for o in out_b]
    for i, (a, b) in enumerate(zip(out_a, out_b)):
        _assert_close(a, b, f"output {i}")
    torch.autograd.backward(out_a, cotangents)
    torch.autograd.backward(out_b, cotangents)
    for i, (a, b) in enumerate(zip(ins_a, ins_b)):
        if a.requires_grad:
            _assert_close(a.grad, b.grad, f"gradient of input {i}")
    our_params = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        _assert_close(our_params[openfold_key(name)].grad, p.grad, f"gradient of {name}")
    with torch.no_grad():  # chunked inference gives the same outputs (both sides chunked)
        chunked_a = our_call(ours, *[t.clone() for t in inputs], chunk_size=2)
        chunked_b = their_call(theirs, *[t.clone() for t in inputs], chunk_size=2)
    if not isinstance(chunked_a, tuple):
        chunked_a, chunked_b = (chunked_a,), (chunked_b,)
    for i, (a, b) in enumerate(zip(chunked_a, chunked_b)):
        _assert_close(a, b, f"chunked output {i}")


@pytest.fixture(params=[(), (2,)], ids=["unbatched", "batch2"])
def batch(request):
    return request.param


def test_msa_row_attention_with_pair_bias(batch):
    m, z = random_inputs(batch, S, R, C_M, C_Z)
    msa_mask, _ = random_masks(batch, S, R)
    compare(MSARowAttentionWithPairBias(C_M, C_Z, 4, 3), OF.msa.MSARowAttentionWithPairBias(C_M, C_Z, 4, 3, inf=INF),
            lambda mod, m, z, mask, chunk_size=None: mod(m, z, mask, chunk_size),
            lambda mod, m, z, mask, chunk_size=None: mod(m, z=z, mask=mask, chunk_size=chunk_size),
            [m, z, msa_mask], num_grad_inputs=2)


def test_msa_column_attention(batch):
    m, _ = random_inputs(batch, S, R, C_M, C_Z)
    msa_mask, _ = random_masks(batch, S, R)
    compare(MSAColumnAttention(C_M, 4, 3), OF.msa.MSAColumnAttention(C_M, 4, 3, inf=INF),
            lambda mod, m, mask, chunk_size=None: mod(m, mask, chunk_size),
            lambda mod, m, mask, chunk_size=None: mod(m, mask=mask, chunk_size=chunk_size), [m, msa_mask])


def test_msa_column_global_attention(batch):
    m, _ = random_inputs(batch, S, R, C_M, C_Z)
    msa_mask, _ = random_masks(batch, S, R)
    compare(MSAColumnGlobalAttention(C_M, 4, 3, eps=EPS), OF.msa.MSAColumnGlobalAttention(C_M, 4, 3, inf=INF, eps=EPS),
            lambda mod, m, mask, chunk_size=None: mod(m, mask, chunk_size),
            lambda mod, m, mask, chunk_size=None: mod(m, mask=mask, chunk_size=chunk_size), [m, msa_mask])


@pytest.mark.parametrize("which", ["msa", "pair"])
def test_transitions(batch, which):
    m, z = random_inputs(batch, S, R, C_M, C_Z)
    msa_mask, pair_mask = random_masks(batch, S, R)
    if which == "msa":
        theirs, x, mask, c = OF.evoformer.MSATransition(C_M, 3), m, msa_mask, C_M
    else:
        theirs, x, mask, c = OF.pair_transition.PairTransition(C_Z, 3), z, pair_mask, C_Z
    compare(Transition(c, 3), theirs,
            lambda mod, x, mask, chunk_size=None: mod(x, mask, chunk_size),
            lambda mod, x, mask, chunk_size=None: mod(x, mask=mask, chunk_size=chunk_size), [x, mask])


def test_outer_product_mean(batch):
    m, _ = random_inputs(batch, S, R, C_M, C_Z)
    msa_mask, _ = random_masks(batch, S, R)
    compare(OuterProductMean(C_M, C_Z, 5), OF.outer_product_mean.OuterProductMean(C_M, C_Z, 5),
            lambda mod, m, mask, chunk_size=None: mod(m, mask, chunk_size),
            lambda mod, m, mask, chunk_size=None: mod(m, mask=mask, chunk_size=chunk_size), [m, msa_mask])


@pytest.mark.parametrize("outgoing", [True, False], ids=["outgoing", "incoming"])
def test_triangle_multiplication(batch, outgoing):
    _, z = random_inputs(batch, S, R, C_M, C_Z)
    _, pair_mask = random_masks(batch, S, R)
    mod = OF.triangular_multiplicative_update
    theirs = (mod.TriangleMultiplicationOutgoing if outgoing else mod.TriangleMultiplicationIncoming)(C_Z, 6)
    # OpenFold's triangle multiplication has no chunked mode; its inplace_safe inference path is the same function.
    compare(TriangleMultiplicativeUpdate(C_Z, 6, outgoing=outgoing), theirs,
            lambda mod, z, mask, chunk_size=None: mod(z, mask),
            lambda mod, z, mask, chunk_size=None: (mod(z.clone(), mask=mask, inplace_safe=True,
                                                       _add_with_inplace=False) if chunk_size else
                                                   mod(z, mask=mask)),
            [z, pair_mask])


@pytest.mark.parametrize("starting", [True, False], ids=["starting", "ending"])
def test_triangle_attention(batch, starting):
    _, z = random_inputs(batch, S, R, C_M, C_Z)
    _, pair_mask = random_masks(batch, S, R)
    compare(TriangleAttention(C_Z, 4, 2, starting=starting),
            OF.triangular_attention.TriangleAttention(C_Z, 4, 2, starting=starting, inf=INF),
            lambda mod, z, mask, chunk_size=None: mod(z, mask, chunk_size),
            lambda mod, z, mask, chunk_size=None: mod(z, mask=mask, chunk_size=chunk_size), [z, pair_mask])


def _openfold_block_kwargs(cfg: EvoformerConfig) -> dict:
    return dict(c_m=cfg.c_m, c_z=cfg.c_z, c_hidden_msa_att=cfg.c_hidden_msa_att, c_hidden_opm=cfg.c_hidden_opm,
                c_hidden_mul=cfg.c_hidden_mul, c_hidden_pair_att=cfg.c_hidden_pair_att, no_heads_msa=cfg.num_heads_msa,
                no_heads_pair=cfg.num_heads_pair, transition_n=cfg.transition_n, msa_dropout=cfg.msa_dropout,
                pair_dropout=cfg.pair_dropout, opm_first=cfg.outer_product_mean_position == "first",
                fuse_projection_weights=False, inf=INF, eps=EPS)


def _stack_call(mod, m, z, msa_mask, pair_mask, chunk_size=None):
    return mod(m, z, msa_mask, pair_mask, chunk_size)


def _of_block_call(mod, m, z, msa_mask, pair_mask, chunk_size=None):
    return mod(m, z, msa_mask=msa_mask, pair_mask=pair_mask, chunk_size=chunk_size,
               inplace_safe=chunk_size is not None)


@pytest.mark.parametrize("position", ["middle", "first"])
def test_evoformer_block(batch, position):
    cfg = tiny_config(outer_product_mean_position=position)
    m, z = random_inputs(batch, S, R, cfg.c_m, cfg.c_z)
    masks = random_masks(batch, S, R)
    theirs = OF.evoformer.EvoformerBlock(no_column_attention=False, **_openfold_block_kwargs(cfg))
    compare(evo.EvoformerBlock(cfg), theirs, _stack_call, _of_block_call, [m, z, *masks], num_grad_inputs=2)


def test_evoformer_stack_with_single_representation():
    cfg = tiny_config()
    m, z = random_inputs((), S, R, cfg.c_m, cfg.c_z)
    masks = random_masks((), S, R)
    kwargs = _openfold_block_kwargs(cfg)
    theirs = OF.evoformer.EvoformerStack(c_s=cfg.c_s, no_blocks=cfg.num_blocks, no_column_attention=False,
                                         blocks_per_ckpt=None, **kwargs)
    compare(evo.EvoformerStack(cfg), theirs, _stack_call,
            lambda mod, m, z, mm, pm, chunk_size=None: mod(m, z, mm, pm, chunk_size=chunk_size,
                                                          inplace_safe=chunk_size is not None),
            [m, z, *masks], num_grad_inputs=2)


def test_extra_msa_stack():
    cfg = tiny_config(global_column_attention=True, global_attention_eps=EPS)
    m, z = random_inputs((), S, R, cfg.c_m, cfg.c_z)
    masks = random_masks((), S, R)
    theirs = OF.evoformer.ExtraMSAStack(no_blocks=cfg.num_blocks, ckpt=False, **_openfold_block_kwargs(cfg))
    compare(evo.ExtraMSAStack(cfg), theirs, _stack_call,
            # use_lma: OpenFold's plain-PyTorch low-memory attention (exact); its default here is a CUDA-only kernel.
            lambda mod, m, z, mm, pm, chunk_size=None: mod(m, z, msa_mask=mm, pair_mask=pm, chunk_size=chunk_size,
                                                          use_lma=True, inplace_safe=chunk_size is not None),
            [m, z, *masks], num_grad_inputs=2)


def test_key_mapping_covers_every_openfold_parameter():
    cfg = tiny_config()
    theirs = OF.evoformer.EvoformerStack(c_s=cfg.c_s, no_blocks=2, no_column_attention=False, blocks_per_ckpt=None,
                                         **_openfold_block_kwargs(cfg))
    ours = evo.EvoformerStack(cfg)
    assert {openfold_key(k) for k in theirs.state_dict()} == set(ours.state_dict())
    for k, v in theirs.state_dict().items():
        assert ours.state_dict()[openfold_key(k)].shape == v.shape, k
