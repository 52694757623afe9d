"""Dropout across data-parallel replicas: each replica draws its own masks (its streams are offset by the dp rank),
initialisation stays identical on every replica, and a run with dropout on 2 replicas resumes exactly because every
replica's RNG state is saved (Megatron-LM's list, one entry per dp rank) and restored on its own rank. The
interruption is a SIGTERM that only rank 1 receives (--exit-signal-handler): both ranks stop and save together.

Building the model must not reseed the process's generators (``torch.manual_seed`` would reseed every CUDA device
too, undoing the per-stage and per-replica seeds there): checked on CPU by building it with ``torch.manual_seed``
and ``torch.cuda.manual_seed_all`` made to fail."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from harness import run_distributed
from test_pretrain_parallel import make_tiny_data, tiny_argv, train_run

from megatron_protein.models.bert import BertConfig, ProteinBertModel
from megatron_protein.parallel import scg
from megatron_protein.parallel.tensor_parallel import model_parallel_seed


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory):
    return make_tiny_data(str(tmp_path_factory.mktemp("pfam")))


def tiny_model(groups) -> ProteinBertModel:
    return ProteinBertModel(BertConfig(num_layers=2, hidden_size=32, num_attention_heads=4, max_position_embeddings=16,
                                       hidden_dropout=0.3, attention_dropout=0.3, init_seed=3), groups)


def test_building_the_model_leaves_the_process_generators_alone(monkeypatch):
    groups = scg.init_process_group([("dp", None)])
    model_parallel_seed(5, groups)
    before = torch.get_rng_state()

    def refuse(*args, **kwargs):
        raise AssertionError("model initialisation reseeded a process generator")

    monkeypatch.setattr(torch, "manual_seed", refuse)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", refuse)
    monkeypatch.setattr(torch.cuda, "manual_seed", refuse)
    first = tiny_model(groups).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    second = tiny_model(groups).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)  # drawn from the seed alone


def _interrupt_on_rank1(argv):
    """Run ``argv``; rank 1 alone sends itself SIGTERM after its second step."""
    from megatron_protein.training import train_loop

    real_step, calls = train_loop.Pretrainer.train_step, [0]

    def step_then_sigterm(self, micro_batches):
        out = real_step(self, micro_batches)
        calls[0] += 1
        if calls[0] == 2 and self.groups.rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    train_loop.Pretrainer.train_step = step_then_sigterm
    try:
        return train_run(argv)
    finally:
        train_loop.Pretrainer.train_step = real_step


def _dp2(argvs):
    groups = scg.init_process_group([("dp", None)])
    model_parallel_seed(7, groups)
    model = tiny_model(groups)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.arange(5, 21).view(1, 16).repeat(2, 1)  # the same input on both replicas
    model.train()
    with torch.no_grad():
        dropped = model(tokens, None)
    model.eval()
    with torch.no_grad():
        plain = model(tokens, None)
    full, first, resumed = train_run(argvs[0]), _interrupt_on_rank1(argvs[1]), train_run(argvs[2])
    return {"init": init, "dropped": dropped, "plain": plain, "full": full, "first": first, "resumed": resumed}


@pytest.mark.slow
def test_dp2_replicas_draw_different_masks_and_resume_exactly(data_prefix, tmp_path):
    save = str(tmp_path / "ckpt")
    base = tiny_argv(data_prefix, dropout=0.1)
    base[base.index("--train-iters") + 1] = "5"
    stored = base + ["--save", save, "--load", save, "--exit-signal-handler"]
    r0, r1 = run_distributed(_dp2, 2, [base, stored, stored], timeout=300)
    for key in r0["init"]:
        assert torch.equal(r0["init"][key], r1["init"][key]), f"initialisation of {key} differs across replicas"
    torch.testing.assert_close(r0["plain"], r1["plain"], rtol=0, atol=0)  # dropout off: the same function
    assert not torch.allclose(r0["dropped"], r1["dropped"]), "both replicas drew the same dropout masks"
    for rank in (r0, r1):
        assert rank["first"]["exit_reason"] == "SIGTERM received (--exit-signal-handler)"
        assert len(rank["first"]["losses"]) == 2 and len(rank["resumed"]["losses"]) == 3
        assert rank["first"]["losses"] + rank["resumed"]["losses"] == rank["full"]["losses"]  # exact
    state = torch.load(os.path.join(save, "iter_0000002", "mp_rank_00", "model_optim_rng.pt"), weights_only=False)
    rng = state["rng_state"]
    assert isinstance(rng, list) and len(rng) == 2  # one entry per dp rank, gathered to the writer
    assert not torch.equal(rng[0]["torch_rng_state"], rng[1]["torch_rng_state"])
    assert not torch.equal(rng[0]["rng_tracker_states"]["model-parallel-rng"],
                           rng[1]["rng_tracker_states"]["model-parallel-rng"])
