"""The folding model under DP x DAP x BP (gloo, CPU) against one process on the same batches.

Every parallel run trains a tiny AlphaFold (the real model class: embedders, extra-MSA stack, Evoformer, structure
module, heads) for STEPS SGD steps on real chains (``data/structures/chains_sample.npz`` with their MSAs),
cropped to N_res = 13 with N_seq = 5 clusters and N_extra = 3 extra sequences, so no size divides by 2 and every
DAP axis is padded. Each rank builds the model from the same seed, ``dp.param_sync`` broadcasts rank 0's weights,
the optimizer gets :func:`dist_trunk.parameter_groups` packed one flat buffer per group, and after backward the
syncs run in the seeds' order (``bp.grad_sync``, ``dap.grad_sync``, ``dp.grad_sync``); the gradient is then clipped
by its global norm (computed locally: after the syncs every rank holds the whole gradient). The reference is the
same function in this (one) process, on the whole global batch. Dropout is off (the model's rates are 0).

Compared per step: the loss (mean over dp ranks) and every parameter's synced gradient; and that all ranks hold
the same gradients and, at the end, the same weights. Tolerance: float32, loss rtol 1e-5; gradients atol 1e-5 +
rtol 1e-4 (a few thousand terms summed in a different order across ranks; the differences seen are ~1e-7).

The loss is a test loss that reaches every output head (structure, distogram, masked MSA, pLDDT); the launcher
test compares the trainer's own loss (``metrics.jsonl``).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from harness import run_distributed
from megatron_protein.data import folding_features as ff
from megatron_protein.data.folding_dataset import FoldingDataset, collate_features
from megatron_protein.models.folding.config import preset
from megatron_protein.models.folding.dist_trunk import DistEmbeddingsAndEvoformer, GROUP_TAGS, parameter_groups
from megatron_protein.models.folding.model import AlphaFold
from megatron_protein.parallel import bp, dap, dp, fused_params, scg

STEPS = 3
N_RES, N_SEQ, N_EXTRA = 13, 5, 3
LOSS_TOL = dict(atol=1e-6, rtol=1e-5)
GRAD_TOL = dict(atol=1e-5, rtol=1e-4)
PERTURB = 0.05


def tiny_config(opm_position: str = "middle", extra_opm_position: str | None = None):
    cfg = preset("tiny")
    m = cfg.model
    m.c_m, m.c_z, m.c_s, m.c_e = 16, 16, 16, 8
    m.evoformer.num_blocks, m.extra_msa.num_blocks = 2, 1
    m.evoformer.c_hidden_mul, m.extra_msa.c_hidden_mul = 16, 8
    m.evoformer.outer_product_mean_position = opm_position
    m.extra_msa.outer_product_mean_position = extra_opm_position or opm_position
    m.structure_module.num_layers = 2
    m.heads.c_hidden_plddt = 8
    return cfg


def batches(global_batch: int):
    """The same global batches in every process: step -> list of examples (real chains, cropped)."""
    dataset = FoldingDataset(config=ff.FeatureConfig(crop_size=N_RES, max_msa_clusters=N_SEQ,
                                                     max_extra_msa=N_EXTRA), seed=0)
    deep = []   # samples with a full MSA sample: N_seq = 5 clusters and N_extra = 3 (some chains have no MSA)
    sample = 0
    while len(deep) < STEPS * global_batch:
        example = dataset.train_example(sample)
        if example["msa_feat"].shape[0] == N_SEQ and example["extra_msa"].shape[0] == N_EXTRA:
            deep.append(example)
        sample += 1
    return [deep[step * global_batch:(step + 1) * global_batch] for step in range(STEPS)]


def loss_of_every_head(outputs: dict, batch: dict) -> torch.Tensor:
    """Per-example masked terms of every head, averaged over the batch (as the model's loss is)."""
    seq = batch["seq_mask"].float()
    pair = seq[..., :, None] * seq[..., None, :]
    ca = outputs["positions"][..., 1, :]
    true_ca = batch["all_atom_positions"][..., 1, :]
    ca_mask = batch["all_atom_mask"][..., 1].float()
    d_pred = (ca[..., :, None, :] - ca[..., None, :, :]).norm(dim=-1)
    d_true = (true_ca[..., :, None, :] - true_ca[..., None, :, :]).norm(dim=-1)
    both = ca_mask[..., :, None] * ca_mask[..., None, :]
    structure = ((d_pred - d_true).abs() * both).sum((-1, -2)) / (both.sum((-1, -2)) + 1e-6) / 10.0
    bins = torch.bucketize(d_true, torch.linspace(2.3125, 21.6875, 63))
    logits = outputs["distogram_logits"]
    disto = F.cross_entropy(logits.flatten(0, -2), bins.flatten(), reduction="none").view(bins.shape)
    disto = (disto * pair * both).sum((-1, -2)) / ((pair * both).sum((-1, -2)) + 1e-6)
    msa_logits = outputs["masked_msa_logits"]
    bert = batch["bert_mask"].float()
    msa = F.cross_entropy(msa_logits.flatten(0, -2), batch["true_msa"].flatten(), reduction="none").view(bert.shape)
    msa = (msa * bert).sum((-1, -2)) / (bert.sum((-1, -2)) + 1e-6)
    plddt = (outputs["plddt_logits"].log_softmax(-1)[..., -1] * seq).sum(-1) / seq.sum(-1)
    return (structure + 0.3 * disto + 2.0 * msa - 0.01 * plddt).mean()


def num_recycles(step: int) -> int:
    return (step + 1) % 2  # 1, 0, 1: recycled inputs are non-zero at steps 0 and 2


def perturbed_model(cfg) -> AlphaFold:
    """The model with seed 1234 and every weight perturbed, the same on every rank. AF2's zero-initialised final
    layers make a fresh block the identity, so most gradients of a fresh model are exactly zero (and would compare
    equal trivially): perturb every weight first."""
    torch.manual_seed(1234)
    model = AlphaFold(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=PERTURB)
    dp.param_sync(model, src_rank=0)
    return model


def train(cfg, step_batches, groups: scg.ParallelGroups, async_dap: bool = True, recompute: bool = False,
          clip: float = 1.0):
    """STEPS steps on this rank's part of each global batch; returns losses, synced gradients, final weights."""
    cfg = copy.deepcopy(cfg)
    cfg.model.evoformer.recompute = recompute
    model = perturbed_model(cfg)
    param_groups = parameter_groups(model)
    fused = fused_params.fuse_param_groups(param_groups)
    # SGD: the weights after the steps are a linear function of the gradients, so they compare at the gradients'
    # tolerance (Adam divides by sqrt(v) and turns rounding-level differences of near-zero gradients into lr-sized
    # steps). The optimizer runs on every rank alike; what is under test is the synced, clipped gradient.
    optimizer = torch.optim.SGD(param_groups, lr=0.05)
    n_dp, r_dp = dp.get_world_size(groups), dp.get_rank_in_group(groups)
    names = {id(p): n for n, p in model.named_parameters()}
    losses, grads, collectives = [], [], []
    previous_async = dap.set_async(async_dap)
    try:
        for step, examples in enumerate(step_batches):
            local = examples[r_dp * len(examples) // n_dp:(r_dp + 1) * len(examples) // n_dp]
            batch = collate_features(local)
            fused.zero_grad()
            outputs = model(batch, num_recycles=num_recycles(step))
            loss = loss_of_every_head(outputs, batch)
            loss.backward()
            collectives.append((bp.grad_sync(optimizer.param_groups), dap.grad_sync(optimizer.param_groups)))
            dp.grad_sync(optimizer.param_groups)
            grads.append({names[id(p)]: p.grad.clone() for g in optimizer.param_groups for p in g["params"]})
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
            optimizer.step()
            losses.append(loss.detach())
    finally:
        dap.set_async(previous_async)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    group_of = {names[id(p)]: g["group"] for g in optimizer.param_groups for p in g["params"]}
    return {"losses": losses, "grads": grads, "weights": weights, "groups": group_of, "collectives": collectives}


def reference(cfg, global_batch: int):
    with scg.as_single_process() as pg:
        return train(cfg, batches(global_batch), pg)


def _worker(layout, opm_position, global_batch, variants):
    pg = scg.init_process_group(parallel_degree=layout, seed=0)
    cfg = tiny_config(opm_position)
    step_batches = batches(global_batch)
    out = {}
    for name, kw in variants.items():
        out[name] = train(cfg, step_batches, pg, **kw)
        out[name]["dp_rank"] = dp.get_rank_in_group(pg)
    return out


def _check(results, ref, variants):
    for name in variants:
        per_rank = [r[name] for r in results]
        n_dp = max(r["dp_rank"] for r in per_rank) + 1
        for step in range(STEPS):
            # The global loss is the mean of the dp ranks' local losses (each rank's dap/bp peers agree).
            by_dp = {r["dp_rank"]: r["losses"][step] for r in per_rank}
            assert len(by_dp) == n_dp
            global_loss = sum(by_dp.values()) / n_dp
            torch.testing.assert_close(global_loss, ref["losses"][step], **LOSS_TOL,
                                       msg=lambda m: f"{name} step {step} loss: {m}")
            for rank, r in enumerate(per_rank):
                for key, expected in ref["grads"][step].items():
                    torch.testing.assert_close(r["grads"][step][key], expected, **GRAD_TOL,
                                               msg=lambda m: f"{name} rank {rank} step {step} grad {key}: {m}")
        for rank, r in enumerate(per_rank):
            for key, expected in ref["weights"].items():
                torch.testing.assert_close(r["weights"][key], expected, **GRAD_TOL,
                                           msg=lambda m: f"{name} rank {rank} weight {key}: {m}")
            assert r["groups"] == ref["groups"]


# ------------------------------------------------------------------------------------------ training, 2 processes

@pytest.mark.slow
def test_dap2_trains_like_one_process_sync_async_and_recompute():
    variants = {"async": {}, "sync": {"async_dap": False}, "recompute": {"recompute": True}}
    ref = reference(tiny_config("middle"), 1)
    results = run_distributed(_worker, 2, [("dp", None), ("dap", 2), ("bp", 1)], "middle", 1, variants,
                              timeout=300)
    _check(results, ref, variants)
    # One all-reduce per dap-tagged group per step (the flat buffer), none over bp.
    assert all(c == (0, 1) for c in results[0]["async"]["collectives"])


@pytest.mark.slow
def test_bp2_trains_like_one_process_with_and_without_recompute():
    # Recompute replays each block's forward, exchange included, in backward: on both bp ranks alike.
    variants = {"bp": {}, "recompute": {"recompute": True}}
    ref = reference(tiny_config("end"), 1)
    results = run_distributed(_worker, 2, [("dp", None), ("dap", 1), ("bp", 2)], "end", 1, variants, timeout=300)
    _check(results, ref, variants)
    assert all(c == (1, 0) for c in results[0]["bp"]["collectives"])


@pytest.mark.slow
def test_dp2_trains_like_one_process_on_the_global_batch():
    variants = {"dp": {}}
    ref = reference(tiny_config("middle"), 2)
    results = run_distributed(_worker, 2, [("dp", None), ("dap", 1), ("bp", 1)], "middle", 2, variants,
                              timeout=300)
    _check(results, ref, variants)


# ------------------------------------------------------------------------------------------ training, 4 processes

@pytest.mark.slow
def test_dap2_x_bp2_trains_like_one_process():
    variants = {"dap_bp": {}}
    ref = reference(tiny_config("end"), 1)
    results = run_distributed(_worker, 4, [("dp", None), ("dap", 2), ("bp", 2)], "end", 1, variants, timeout=400)
    _check(results, ref, variants)
    assert all(c == (1, 1) for c in results[0]["dap_bp"]["collectives"])  # one group, tagged dap and bp


@pytest.mark.slow
def test_dp2_x_dap2_trains_like_one_process():
    variants = {"dp_dap": {}}
    ref = reference(tiny_config("middle"), 2)
    results = run_distributed(_worker, 4, [("dp", None), ("dap", 2), ("bp", 1)], "middle", 2, variants,
                              timeout=400)
    _check(results, ref, variants)


# ------------------------------------------------------------------------------------------ groups, one process

def test_every_parameter_is_in_exactly_one_group_tagged_by_where_it_runs_and_gets_a_gradient():
    # The main stack branched (Parallel Evoformer), the extra-MSA stack not: all three groups exist.
    cfg = tiny_config("end", extra_opm_position="middle")
    ref = reference(cfg, 1)
    model = AlphaFold(cfg)
    groups = parameter_groups(model)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in model.parameters() if p.requires_grad)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["group"]: [names[id(p)] for p in g["params"]] for g in groups}
    assert [{k: g[k] for k in ("dap", "bp") if k in g} for g in groups] == list(GROUP_TAGS)
    # Where each runs: block parameters (both branches, incl. the pair transition) under dap and bp; the stacks'
    # output projection, embedders, structure module, heads replicated.
    assert all(n.startswith("trunk.evoformer.blocks.") for n in by_group["dap_bp"])
    assert all(n.startswith("trunk.extra_msa_stack.blocks.") for n in by_group["dap"])
    assert any(".pair_transition." in n for n in by_group["dap_bp"])
    assert "trunk.evoformer.linear.weight" in by_group["replicated"]
    assert any(n.startswith("structure_module.") for n in by_group["replicated"])
    # With OPM in the middle the blocks are not branched: dap only.
    middle = parameter_groups(AlphaFold(tiny_config("middle")))
    assert [g["group"] for g in middle] == ["dap", "replicated"]
    # Every parameter received a non-zero gradient at the first step of the one-process run.
    for name, grad in ref["grads"][0].items():
        assert grad.abs().max() > 0, f"{name} received no gradient"


def test_trunk_is_the_model_trunk_at_degree_one():
    model = AlphaFold(tiny_config())
    assert isinstance(model.trunk, DistEmbeddingsAndEvoformer)
    assert not any(isinstance(m, DistEmbeddingsAndEvoformer) for m in model.trunk.modules() if m is not model.trunk)


# ------------------------------------------------------------------------------------------ inference

INFER_TOL = dict(atol=1e-4, rtol=1e-4)   # positions in Angstrom, logits; float32, chunked


def infer(cfg, example, chunk_size):
    model = perturbed_model(cfg)
    model.eval()
    batch = collate_features([example])
    with torch.no_grad():
        out = model(batch, num_recycles=2, chunk_size=chunk_size)
    return {k: out[k] for k in ("positions", "plddt", "distogram_logits", "masked_msa_logits", "single")}


def _infer_worker(layout, chunk_sizes):
    scg.init_process_group(parallel_degree=layout, seed=0)
    example = batches(1)[0][0]
    return {c: infer(tiny_config("middle"), example, c) for c in chunk_sizes}


@pytest.mark.slow
def test_dap2_inference_equals_one_process():
    chunk_sizes = (None, 4)
    example = batches(1)[0][0]
    with scg.as_single_process():
        ref = {c: infer(tiny_config("middle"), example, c) for c in chunk_sizes}
    results = run_distributed(_infer_worker, 2, [("dp", None), ("dap", 2)], chunk_sizes, timeout=300)
    for rank, per_chunk in enumerate(results):
        for c, out in per_chunk.items():
            for key, expected in ref[c].items():
                torch.testing.assert_close(out[key], expected, **INFER_TOL,
                                           msg=lambda m: f"rank {rank} chunk_size {c} {key}: {m}")


# ------------------------------------------------------------------------------------------ bad input

class BlockWithoutHooks(torch.nn.Module):
    """A block with the Evoformer block's signature that never calls the dap/bp hooks (e.g. a peer's)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, m, z, msa_mask=None, pair_mask=None, chunk_size=None):
        return m * self.scale, z * self.scale


def _model_without_hooks_worker():
    scg.init_process_group(parallel_degree=[("dp", None), ("dap", 2), ("bp", 1)], seed=0)
    model = AlphaFold(tiny_config("middle"))
    model.trunk.evoformer.blocks[1] = BlockWithoutHooks()
    try:
        model(collate_features(batches(1)[0]), num_recycles=0)
    except dap.DAPHookError as exc:   # each rank reports its own; one that entered a collective would hang instead
        return f"DAPHookError: {exc}"
    return "ran"


@pytest.mark.slow
def test_dap_with_a_block_without_hooks_fails_on_every_rank_before_any_collective():
    for rank, outcome in enumerate(run_distributed(_model_without_hooks_worker, 2, timeout=120)):
        assert outcome.startswith("DAPHookError"), f"rank {rank}: {outcome}"
        assert "BlockWithoutHooks does not" in outcome and "parallel_hooks = True" in outcome


def test_bp_without_the_parallel_evoformer_is_refused():
    trunk = AlphaFold(tiny_config("middle")).trunk
    layout = scg.ParallelGroups(axes=("dp", "dap", "bp"), degrees={"dp": 1, "dap": 1, "bp": 2})
    with pytest.raises(scg.ParallelConfigError, match="outer_product_mean_position=end"):
        trunk.check_parallel(layout)
    AlphaFold(tiny_config("end")).trunk.check_parallel(layout)      # the Parallel Evoformer is accepted
    trunk.evoformer.blocks[0] = BlockWithoutHooks()
    with pytest.raises(dap.DAPHookError, match="BlockWithoutHooks"):
        trunk.check_parallel(scg.ParallelGroups(axes=("dp", "dap"), degrees={"dp": 1, "dap": 2}))
    trunk.check_parallel(scg.ParallelGroups(axes=("dp",), degrees={"dp": 1}))   # degree 1: any block runs
