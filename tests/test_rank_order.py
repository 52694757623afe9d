"""Rank order of the pretraining: Megatron-LM's (pp outermost, then dp, then tp) by default, ours before that
(dp, pp, tp) with --use-tp-pp-dp-mapping. Which ranks share each group, computed from the layout alone for 16 and
32 ranks, how many nodes of 8 each group spans, and one small real run whose groups talk along those ranks."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from harness import run_distributed
from megatron_protein.parallel import scg
from megatron_protein.training.arguments import ParallelConfig, configs_from_args, parse_args


def layout(tp: int, pp: int, world: int, tp_pp_dp: bool = False) -> dict[str, int]:
    return scg.resolve_degrees(ParallelConfig(tp, pp, use_tp_pp_dp_mapping=tp_pp_dp).degrees(), world)


def test_megatron_order_is_the_default_and_the_flag_restores_dp_outermost():
    base = ["--data-path", "x", "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4",
            "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    assert configs_from_args(parse_args(base)).parallel.degrees() == [("pp", 2), ("dp", None), ("tp", 2)]
    assert configs_from_args(parse_args(base + ["--use-tp-pp-dp-mapping"])).parallel.degrees() == [
        ("dp", None), ("pp", 2), ("tp", 2)]


def test_which_ranks_share_each_group_at_16_ranks():
    # TP=2, PP=2, DP=4. Megatron-LM: rank = (pp * 4 + dp) * 2 + tp.
    megatron = layout(2, 2, 16)
    assert list(megatron) == ["pp", "dp", "tp"]
    assert scg.grid_groups(megatron, ["tp"]) == [[2 * i, 2 * i + 1] for i in range(8)]
    assert scg.grid_groups(megatron, ["dp"]) == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert scg.grid_groups(megatron, ["pp"]) == [[i, i + 8] for i in range(8)]
    assert scg.grid_groups(megatron, ["pp", "tp"])[:2] == [[0, 1, 8, 9], [2, 3, 10, 11]]  # 'mp': one replica
    # --use-tp-pp-dp-mapping: rank = (dp * 2 + pp) * 2 + tp.
    ours = layout(2, 2, 16, tp_pp_dp=True)
    assert list(ours) == ["dp", "pp", "tp"]
    assert scg.grid_groups(ours, ["tp"]) == [[2 * i, 2 * i + 1] for i in range(8)]
    assert scg.grid_groups(ours, ["dp"]) == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert scg.grid_groups(ours, ["pp"]) == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    # 16 ranks on 2 nodes of 8: Megatron's order keeps tp and dp inside a node; dp outermost sends dp across.
    assert scg.nodes_spanned(megatron, 8) == {"pp": 2, "dp": 1, "tp": 1}
    assert scg.nodes_spanned(ours, 8) == {"dp": 2, "pp": 1, "tp": 1}


def test_documented_multinode_layout_sends_only_pipeline_traffic_across_nodes():
    """scripts/pretrain_multinode.sh: 4 nodes x 8 GPUs, TP=4 PP=4 -> DP=2."""
    degrees = layout(4, 4, 32)
    assert degrees == {"pp": 4, "dp": 2, "tp": 4}
    assert scg.grid_groups(degrees, ["tp"])[:3] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert scg.grid_groups(degrees, ["dp"])[:5] == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12]]
    assert scg.grid_groups(degrees, ["pp"])[:2] == [[0, 8, 16, 24], [1, 9, 17, 25]]
    for members in scg.grid_groups(degrees, ["tp"]) + scg.grid_groups(degrees, ["dp"]):
        assert len({rank // 8 for rank in members}) == 1, members  # inside one node
    for members in scg.grid_groups(degrees, ["pp"]):
        assert sorted(rank // 8 for rank in members) == [0, 1, 2, 3]  # one stage per node
    assert scg.nodes_spanned(degrees, 8) == {"pp": 4, "dp": 1, "tp": 1}
    # The same GPUs in the other order: the gradient all-reduce crosses nodes, the pipeline does not.
    assert scg.nodes_spanned(layout(4, 4, 32, tp_pp_dp=True), 8) == {"dp": 2, "pp": 2, "tp": 1}
    # The TP=4 PP=2 (DP=4): Megatron's order halves the nodes a dp group spans; it cannot keep it in one.
    assert scg.nodes_spanned(layout(4, 2, 32), 8) == {"pp": 2, "dp": 2, "tp": 1}
    assert scg.nodes_spanned(layout(4, 2, 32, tp_pp_dp=True), 8) == {"dp": 4, "pp": 1, "tp": 1}


def _members_seen(tp_pp_dp: bool):
    """Build the pretraining's groups (PP=2 x DP=2) and learn each group's members by all-gathering ranks."""
    pg = scg.init_process_group(ParallelConfig(1, 2, use_tp_pp_dp_mapping=tp_pp_dp).degrees())
    seen = {}
    for axis in ("pp", "dp", "mp"):
        group = pg.group(axis)
        gathered = [torch.zeros(1) for _ in range(len(pg.ranks(axis)))]
        dist.all_gather(gathered, torch.tensor([float(pg.rank)]), group=group)
        seen[axis] = sorted(int(t.item()) for t in gathered)
    scg.destroy_process_group()
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("tp_pp_dp", [False, True])
def test_real_groups_follow_the_rank_order(tp_pp_dp):
    per_rank = run_distributed(_members_seen, 4, tp_pp_dp)
    degrees = layout(1, 2, 4, tp_pp_dp)
    for rank, seen in enumerate(per_rank):
        for axis in ("pp", "dp"):
            expected = next(g for g in scg.grid_groups(degrees, [axis]) if rank in g)
            assert seen[axis] == expected, (rank, axis)
    if tp_pp_dp:
        assert per_rank[0]["dp"] == [0, 2] and per_rank[0]["pp"] == [0, 1]
    else:  # Megatron-LM's order: the replicas of stage 0 are ranks 0 and 1
        assert per_rank[0]["dp"] == [0, 1] and per_rank[0]["pp"] == [0, 2]
    assert per_rank[0]["mp"] == per_rank[0]["pp"]  # tp = 1: one replica is its pipeline
