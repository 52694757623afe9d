"""The process-group builder: layouts, inference of None, errors before any collective, and the test harness."""
import os

import pytest
import torch
import torch.distributed as dist

from harness import DistributedTestError, run_distributed
from megatron_protein.parallel import scg


def test_grid_groups_match_worked_layout():
    degrees = scg.resolve_degrees([("dp", None), ("pp", 2), ("tp", 2)], 8)
    assert degrees == {"dp": 2, "pp": 2, "tp": 2}
    assert scg.grid_groups(degrees, ["tp"]) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert scg.grid_groups(degrees, ["pp"]) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert scg.grid_groups(degrees, ["dp"]) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert scg.grid_groups(degrees, ["pp", "tp"]) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert scg.coordinates(6, degrees) == {"dp": 1, "pp": 1, "tp": 0}


@pytest.mark.parametrize("degrees, world, message", [
    ([("dp", None), ("tp", 3)], 4, "does not divide the world size 4"),
    ([("tp", 2), ("pp", 4)], 4, "multiply to 8"),
    ([("tp", 2), ("tp", 2)], 4, "names an axis twice"),
    ([("tp", None), ("dp", None)], 4, "only one degree may be None"),
    ([("tp", 0)], 4, "positive integer"),
])
def test_bad_degrees_raise_before_any_collective(degrees, world, message):
    with pytest.raises(scg.ParallelConfigError, match=message):
        scg.resolve_degrees(degrees, world)


def test_single_process_needs_no_process_group(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    pg = scg.init_process_group([("dp", None), ("tp", 1)])
    assert not dist.is_initialized()
    assert pg.degrees == {"dp": 1, "tp": 1}
    assert pg.group("tp") is None and pg.size("tp") == 1 and pg.rank_in("tp") == 0
    assert pg.size("dap") == 1  # absent axis
    assert scg.current() is pg
    scg.destroy_process_group()


def test_missing_master_addr_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(scg.ParallelConfigError, match="MASTER_ADDR is not set"):
        scg.init_process_group([("dp", None)])


def _layout(parallel_degree):
    pg = scg.init_process_group(parallel_degree)
    result = {}
    for axis in list(pg.axes) + ["mp"]:
        t = torch.tensor([float(pg.rank)])
        if pg.group(axis) is not None:
            dist.all_reduce(t, group=pg.group(axis))
        result[axis] = (pg.rank_in(axis), pg.size(axis), pg.ranks(axis), t.item())
    return result


@pytest.mark.parametrize("world", [2, 4])
def test_groups_communicate_along_their_axis(world):
    results = run_distributed(_layout, world, [("dp", None), ("pp", 2 if world == 4 else 1), ("tp", 2)])
    degrees = scg.resolve_degrees([("dp", None), ("pp", 2 if world == 4 else 1), ("tp", 2)], world)
    for rank, res in enumerate(results):
        for axis in degrees:
            members = [g for g in scg.grid_groups(degrees, [axis]) if rank in g][0]
            rank_in, size, ranks, total = res[axis]
            assert ranks == members and size == degrees[axis]
            assert rank_in == members.index(rank)
            assert total == sum(members)  # the all-reduce ran in exactly this group


def _raise_on_rank_one():
    pg = scg.init_process_group([("dp", None)])
    if pg.rank == 1:
        raise RuntimeError("deliberate failure on rank 1")
    dist.barrier()  # rank 0 would wait here for ever without the harness
    return pg.rank


def test_a_failing_rank_fails_the_run_with_its_traceback_and_no_hang():
    with pytest.raises(DistributedTestError, match="deliberate failure on rank 1"):
        run_distributed(_raise_on_rank_one, 2, timeout=60)


def _bad_degree_in_worker():
    scg.init_process_group([("dp", None), ("tp", 3)])


def test_bad_degree_under_torchrun_env_raises_on_every_rank():
    with pytest.raises(DistributedTestError, match="does not divide the world size 2"):
        run_distributed(_bad_degree_in_worker, 2, timeout=60)
