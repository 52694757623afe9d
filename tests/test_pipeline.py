"""Pipeline parallelism: stage split, GPipe and 1F1B against one process running the unsplit model.

The model is a small BERT-shaped stack (word + position embedding, pre-LN residual blocks that read a per-micro-batch
padding mask, an MLM-style head tied to the word embeddings). Each pipeline rank builds its stage from the same
seeded full model; the reference is one process running the full model over the same micro-batches with a plain
loop (mean of micro-batch losses, one backward). Tolerance: fp32, atol 1e-6 / rtol 1e-5 on losses and gradients
(only the summation order differs).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import run_distributed
from megatron_protein.parallel import scg
from megatron_protein.parallel.dp import DataParallel
from megatron_protein.parallel.pipeline import (all_reduce_tied_gradients, run_pipeline, stage_layer_range,
                                                sync_tied_parameters)

VOCAB, HIDDEN, SEQ, MICRO_BATCH = 13, 8, 6, 3
ATOL, RTOL = 1e-6, 1e-5


# ----------------------------------------------------------------------------- stage split
@pytest.mark.parametrize("num_layers, pp, expected", [
    (8, 4, [2, 2, 2, 2]),
    (10, 4, [2, 2, 3, 3]),
    (7, 2, [3, 4]),
    (5, 5, [1, 1, 1, 1, 1]),
    (3, 1, [3]),
])
def test_stage_layer_range_is_balanced_contiguous_and_complete(num_layers, pp, expected):
    ranges = [stage_layer_range(num_layers, pp, r) for r in range(pp)]
    assert [len(r) for r in ranges] == expected
    assert [i for r in ranges for i in r] == list(range(num_layers))


def test_stage_layer_range_rejects_fewer_layers_than_stages():
    with pytest.raises(ValueError, match="cannot split 3 layers into 4 pipeline stages"):
        stage_layer_range(3, 4, 0)
    with pytest.raises(ValueError, match="pp_rank must be in"):
        stage_layer_range(8, 4, 4)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="unknown pipeline schedule 'interleaved'"):
        run_pipeline(lambda x, mb: x, [{}], lambda out, mb: out.sum(), None, schedule="interleaved")


# ----------------------------------------------------------------------------- the model
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.fc1 = nn.Linear(HIDDEN, 2 * HIDDEN)
        self.fc2 = nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, x, mask):
        # The mask is a per-micro-batch input every stage reads from the micro-batch dict (never sent).
        return (x + self.fc2(F.gelu(self.fc1(self.norm(x))))) * mask[..., None]


class FullModel(nn.Module):
    def __init__(self, num_layers):
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, HIDDEN)
        self.position_embeddings = nn.Parameter(torch.randn(SEQ, HIDDEN) * 0.1)
        self.layers = nn.ModuleList(Block() for _ in range(num_layers))
        self.head_dense = nn.Linear(HIDDEN, HIDDEN)
        self.head_bias = nn.Parameter(torch.randn(VOCAB) * 0.1)

    def loss(self, mb):
        h = self.word_embeddings(mb["tokens"]) + self.position_embeddings
        for layer in self.layers:
            h = layer(h, mb["mask"])
        logits = F.gelu(self.head_dense(h)) @ self.word_embeddings.weight.T + self.head_bias
        return masked_loss(logits, mb)


def masked_loss(logits, mb):
    per_token = F.cross_entropy(logits.reshape(-1, VOCAB), mb["labels"].reshape(-1), reduction="none")
    weight = mb["mask"].reshape(-1)
    return (per_token * weight).sum() / weight.sum()


class Stage(nn.Module):
    """Pipeline stage ``pp_rank`` of ``pp`` cut from the full model; layer names are local, as Megatron stores them."""

    def __init__(self, full: FullModel, pp: int, pp_rank: int):
        super().__init__()
        self.layer_range = stage_layer_range(len(full.layers), pp, pp_rank)
        self.first, self.last = pp_rank == 0, pp_rank == pp - 1
        if self.first:
            self.word_embeddings = copy.deepcopy(full.word_embeddings)
            self.position_embeddings = copy.deepcopy(full.position_embeddings)
        self.layers = nn.ModuleList(copy.deepcopy(full.layers[i]) for i in self.layer_range)
        if self.last:
            self.head_dense = copy.deepcopy(full.head_dense)
            self.head_bias = copy.deepcopy(full.head_bias)
            if not self.first:
                # Deliberately different from the first stage: sync_tied_parameters must fix it.
                self.word_embeddings_for_head = nn.Parameter(torch.randn(VOCAB, HIDDEN))

    def tied(self):
        if self.first:
            return [self.word_embeddings.weight]
        if self.last:
            return [self.word_embeddings_for_head]
        return []

    def forward(self, stage_input, mb):
        h = self.word_embeddings(mb["tokens"]) + self.position_embeddings if self.first else stage_input
        for layer in self.layers:
            h = layer(h, mb["mask"])
        if not self.last:
            return h
        head_weight = self.word_embeddings.weight if self.first else self.word_embeddings_for_head
        return F.gelu(self.head_dense(h)) @ head_weight.T + self.head_bias

    def global_name(self, name):
        """Name of this parameter in the full model."""
        if name == "word_embeddings_for_head":
            return "word_embeddings.weight"
        if name.startswith("layers."):
            _, local, rest = name.split(".", 2)
            return f"layers.{self.layer_range[int(local)]}.{rest}"
        return name


def make_micro_batches(num, seed):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num):
        mask = (torch.rand(MICRO_BATCH, SEQ, generator=g) > 0.25).float()
        mask[:, 0] = 1.0
        batches.append({"tokens": torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=g),
                        "labels": torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=g),
                        "mask": mask})
    return batches


def build_full(num_layers):
    torch.manual_seed(1234)
    return FullModel(num_layers)


def reference(num_layers, micro_batches):
    """One process, unsplit model, plain loop: the mean micro-batch loss and every gradient."""
    model = build_full(num_layers)
    loss = torch.stack([model.loss(mb) for mb in micro_batches]).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_grads_match(stage_grads: dict, ref_grads: dict, what: str):
    for name, grad in stage_grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=ATOL, rtol=RTOL, msg=lambda m: f"{what} {name}: {m}")


def _one_process():
    return scg._single_process(("pp",), {"pp": 1})


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pp1_is_gradient_accumulation_of_the_mean_loss(schedule):
    micro_batches = make_micro_batches(3, seed=3)
    ref_loss, ref_grads = reference(4, micro_batches)
    stage = Stage(build_full(4), 1, 0)
    stats = {}
    loss = run_pipeline(stage, micro_batches, masked_loss, None, schedule=schedule, groups=_one_process(),
                        stats=stats)
    assert loss.item() == pytest.approx(ref_loss, rel=RTOL, abs=ATOL)
    assert_grads_match({n: p.grad for n, p in stage.named_parameters()}, ref_grads, schedule)
    assert stats["max_in_flight"] == (3 if schedule == "gpipe" else 1)


def test_loss_fn_must_return_a_scalar():
    stage = Stage(build_full(1), 1, 0)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar, got shape \(3, 6\)"):
        run_pipeline(stage, make_micro_batches(1, seed=0), lambda out, mb: out.sum(-1), None,
                     groups=_one_process())


# ----------------------------------------------------------------------------- workers
def _pipeline_worker(num_layers, runs):
    """Run each (schedule, activation_shape given?, micro-batches) of ``runs`` on a fresh stage; return losses and
    gradients, plus a forward-only evaluation of the first run's micro-batches."""
    pg = scg.init_process_group([("pp", None)])
    pp, rank = pg.size("pp"), pg.rank_in("pp")
    results = {}
    for schedule, known_shape, num_micro in runs:
        stage = Stage(build_full(num_layers), pp, rank)
        sync_tied_parameters(stage.tied(), pg)
        stats = {}
        loss = run_pipeline(stage, make_micro_batches(num_micro, seed=7), masked_loss,
                            activation_shape=(MICRO_BATCH, SEQ, HIDDEN) if known_shape else None,
                            schedule=schedule, groups=pg, stats=stats)
        all_reduce_tied_gradients(stage.tied(), pg)
        results[(schedule, known_shape, num_micro)] = {
            "loss": loss.item(),
            "grads": {stage.global_name(n): p.grad.clone() for n, p in stage.named_parameters()},
            "tied_values": [t.detach().clone() for t in stage.tied()],
            "max_in_flight": stats["max_in_flight"],
        }
    # Evaluation: forward only leaves no gradient behind and gives the same loss.
    stage = Stage(build_full(num_layers), pp, rank)
    sync_tied_parameters(stage.tied(), pg)
    results["forward_only"] = run_pipeline(stage, make_micro_batches(runs[0][2], seed=7), masked_loss,
                                           (MICRO_BATCH, SEQ, HIDDEN), groups=pg, forward_only=True).item()
    results["forward_only_grads"] = [p.grad for p in stage.parameters() if p.grad is not None]
    # A wrong activation_shape is caught on the sending stage before anything is sent (the peer is not involved).
    if rank == 0:
        try:
            run_pipeline(stage, make_micro_batches(1, seed=7), masked_loss, (MICRO_BATCH, SEQ, HIDDEN + 1), groups=pg)
        except ValueError as error:
            results["shape_error"] = str(error)
    return results


def _check_pipeline(results, num_layers, runs):
    references = {n: reference(num_layers, make_micro_batches(n, seed=7)) for n in {run[2] for run in runs}}
    first_stage_embedding = results[0][runs[0]]["tied_values"][0]
    covered = set()
    for rank, res in enumerate(results):
        for run in runs:
            ref_loss, ref_grads = references[run[2]]
            out = res[run]
            # Every stage reports the mean loss (broadcast from the last stage).
            assert out["loss"] == pytest.approx(ref_loss, rel=RTOL, abs=ATOL), (rank, run)
            assert_grads_match(out["grads"], ref_grads, f"rank {rank} {run}")
            covered |= set(out["grads"])
            for tied in out["tied_values"]:
                torch.testing.assert_close(tied, first_stage_embedding, atol=0, rtol=0)
            # Activation memory: GPipe holds every micro-batch, 1F1B at most pp - stage of them.
            schedule, _, num_micro = run
            expected = num_micro if schedule == "gpipe" else min(len(results) - rank, num_micro)
            assert out["max_in_flight"] == expected, (rank, run, out["max_in_flight"])
        assert res["forward_only"] == pytest.approx(references[runs[0][2]][0], rel=RTOL, abs=ATOL)
        assert res["forward_only_grads"] == []
    # The stages together hold every parameter of the full model.
    assert covered == set(references[runs[0][2]][1])


def test_pp2_gpipe_and_1f1b_match_one_process():
    runs = [("gpipe", True, 4), ("1f1b", True, 4), ("1f1b", False, 4), ("gpipe", False, 4), ("1f1b", True, 1)]
    results = run_distributed(_pipeline_worker, 2, 5, runs)
    _check_pipeline(results, 5, runs)
    assert results[0]["shape_error"] == ("stage output has shape (3, 6, 8) but activation_shape is (3, 6, 9); "
                                         "pass the right activation_shape or None to send shapes")


# 6 layers on 4 stages: 1, 1, 2, 2. Five micro-batches (more than stages) exercise the 1F1B steady state;
# two micro-batches on four stages cut the warm-up short (min(pp - rank - 1, M)).
PP4_RUNS = [("1f1b", True, 5), ("gpipe", True, 5), ("1f1b", True, 2)]


def _four_process_worker():
    """PP=4, then PP=2 x DP=2 in the same four processes (one spawn: process start-up dominates these tests)."""
    return {"pp4": _pipeline_worker(6, PP4_RUNS), "pp2_dp2": _pipeline_dp_worker(4, 3)}


@pytest.fixture(scope="module")
def four_process_results():
    return run_distributed(_four_process_worker, 4)


def test_pp4_uneven_layers_more_and_fewer_micro_batches_than_stages(four_process_results):
    _check_pipeline([res["pp4"] for res in four_process_results], 6, PP4_RUNS)


def _pipeline_dp_worker(num_layers, num_micro):
    """PP=2 x DP=2: each replica runs half of the global batch; average over dp, then tied sum over pp ends.
    Runs once with the all-reduce after the schedule and once overlapped with the last backward pass."""
    pg = scg.init_process_group([("dp", 2), ("pp", 2)])
    micro_batches = make_micro_batches(2 * num_micro, seed=11)
    mine = micro_batches[pg.rank_in("dp") * num_micro:(pg.rank_in("dp") + 1) * num_micro]
    results = {}
    for overlap in (False, True):
        stage = Stage(build_full(num_layers), 2, pg.rank_in("pp"))
        sync_tied_parameters(stage.tied(), pg)
        ddp = DataParallel(stage, groups=pg, bucket_numel=64, overlap_grad_reduce=overlap)
        ddp.broadcast_parameters()
        loss = run_pipeline(stage, mine, masked_loss, (MICRO_BATCH, SEQ, HIDDEN), groups=pg, schedule="1f1b",
                            no_sync=ddp.no_sync)
        # Order matters with overlap: the dp all-reduce of the bucket holding the embedding may still be in
        # flight until sync_gradients returns, so the tied sum over the pipeline ends comes after it.
        ddp.sync_gradients()
        all_reduce_tied_gradients(stage.tied(), pg)
        results[overlap] = {"loss": loss.item(),
                            "grads": {stage.global_name(n): p.grad.clone() for n, p in stage.named_parameters()}}
    return results


def test_pp2_x_dp2_matches_one_process_on_the_global_batch(four_process_results):
    results = [res["pp2_dp2"] for res in four_process_results]
    ref_loss, ref_grads = reference(4, make_micro_batches(6, seed=11))
    for overlap in (False, True):
        # The mean of the two replicas' losses is the global mean loss (equal micro-batch counts).
        dp_losses = [results[0][overlap]["loss"], results[2][overlap]["loss"]]
        assert sum(dp_losses) / 2 == pytest.approx(ref_loss, rel=RTOL, abs=ATOL)
        for rank, res in enumerate(results):
            assert_grads_match(res[overlap]["grads"], ref_grads, f"rank {rank} overlap={overlap}")
