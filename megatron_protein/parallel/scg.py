"""One builder for every parallel axis: tp, pp, dp, dap, bp (and any other named axis).

``init_process_group(parallel_degree=[('dp', None), ('pp', 2), ('tp', 2)])`` lays the global ranks out as a grid
whose shape is the list of degrees, the last axis innermost (adjacent ranks), and cuts one process group per axis
from it, as HelixFold's ``comm_group.py`` does for (dp, dap, bp). A degree of ``None`` is inferred from the world
size. The result is a :class:`ParallelGroups` object: layers take it as an argument, and ``current()`` returns the
one made by the last ``init_process_group`` for code that cannot be handed it.

Worked layout: 8 ranks, ``[('dp', None), ('pp', 2), ('tp', 2)]`` -> dp = 2, grid shape (dp=2, pp=2, tp=2)::

    rank = dp_rank * 4 + pp_rank * 2 + tp_rank
    tp groups : [0, 1] [2, 3] [4, 5] [6, 7]         (innermost: the tensor-parallel pair shares a node)
    pp groups : [0, 2] [1, 3] [4, 6] [5, 7]
    dp groups : [0, 4] [1, 5] [2, 6] [3, 7]
    mp groups : [0, 1, 2, 3] [4, 5, 6, 7]           (every axis but dp: one model replica)

The order of the list is the rank order. Megatron-LM's (what the protein-LM pretraining uses by default) puts pp
outermost, then dp, then tp: ``[('pp', P), ('dp', None), ('tp', T)]``, ``rank = (pp_rank * dp + dp_rank) * T +
tp_rank``, so whole tp groups and then whole dp groups of one stage share a node and only pipeline sends cross nodes
when tp x dp fits in one; :func:`nodes_spanned` tells for a layout and a node size.

At world size 1 (a plain ``python script.py``) no process group is created, every degree is 1, every group is
``None``, and every collective in :mod:`megatron_protein.parallel.collectives` returns its input: the single-process
run executes the same code path as the parallel one.
"""
from __future__ import annotations

import contextlib
import datetime
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_protein.utils.errors import UserError

#: The axis that replicates the model; every other axis splits it (and together they form the 'mp' group).
DATA_PARALLEL_AXIS = "dp"

#: Axes that split activations of one replica (the folding model): all of their ranks compute parts of the same
#: forward pass, so they must draw the same random numbers; ``init_process_group`` demands a seed for them.
SEEDED_AXES = ("dap", "bp")

#: Largest degree an axis supports. Branch parallelism has two branches (the MSA branch and the pair branch of
#: the Parallel Evoformer block, see ``parallel/bp.py``), so bp is 1 or 2.
MAX_DEGREE = {"bp": 2}


class ParallelConfigError(UserError, ValueError):
    """The requested degrees cannot be laid out on the world size (raised before any collective runs)."""


@dataclass
class ParallelGroups:
    """Process groups, ranks and sizes of every named axis for this process.

    ``group(axis)`` is ``None`` when the axis has degree 1 (nothing to communicate) or when there is no process
    group at all (world size 1). ``ranks(axis)`` lists the global ranks of this process's group along ``axis`` in
    axis order, so ``ranks('pp')[0]`` is the first pipeline stage of this replica.
    """

    axes: tuple[str, ...]
    degrees: dict[str, int]
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None
    _groups: dict[str, object] = field(default_factory=dict, repr=False)
    _ranks: dict[str, list[int]] = field(default_factory=dict, repr=False)
    _coords: dict[str, int] = field(default_factory=dict, repr=False)

    def size(self, axis: str) -> int:
        """Degree of ``axis``; 1 for an axis that was not requested."""
        return self.degrees.get(axis, 1)

    def rank_in(self, axis: str) -> int:
        """This process's index along ``axis`` (0 for an axis that was not requested)."""
        return self._coords.get(axis, 0)

    def group(self, axis: str):
        """The process group of ``axis`` that holds this process, or ``None`` when there is nothing to talk to."""
        return self._groups.get(axis)

    def ranks(self, axis: str) -> list[int]:
        """Global ranks of this process's group along ``axis`` (``[self.rank]`` for an absent axis)."""
        return list(self._ranks.get(axis, [self.rank]))

    def is_first(self, axis: str) -> bool:
        return self.rank_in(axis) == 0

    def is_last(self, axis: str) -> bool:
        return self.rank_in(axis) == self.size(axis) - 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def __deepcopy__(self, memo):
        # Process groups cannot be copied and need not be: a deep copy of a model (an EMA copy, say) shares them.
        return self

    def describe(self) -> str:
        parts = ", ".join(f"{a}={self.degrees[a]}(rank {self.rank_in(a)})" for a in self.axes)
        return f"rank {self.rank}/{self.world_size} on {self.device} [{parts}]"


_CURRENT: Optional[ParallelGroups] = None


def current() -> ParallelGroups:
    """The groups made by the last :func:`init_process_group`; a single-process layout if none was made."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = _single_process(("dp",), {"dp": 1})
    return _CURRENT


def resolve_degrees(parallel_degree: Sequence[tuple[str, Optional[int]]], world_size: int) -> dict[str, int]:
    """Check ``parallel_degree`` against ``world_size`` and fill in the one ``None`` degree.

    Raises :class:`ParallelConfigError` naming the axes and sizes when they cannot be laid out.
    """
    names = [name for name, _ in parallel_degree]
    if len(set(names)) != len(names):
        raise ParallelConfigError(f"parallel_degree names an axis twice: {names}")
    if not names:
        raise ParallelConfigError("parallel_degree is empty; give at least one axis, e.g. [('dp', None)]")
    unknown = [name for name, degree in parallel_degree if degree is None]
    if len(unknown) > 1:
        raise ParallelConfigError(f"only one degree may be None (inferred), got None for {unknown}")
    for name, degree in parallel_degree:
        if degree is not None and (not isinstance(degree, int) or degree < 1):
            raise ParallelConfigError(f"degree of axis '{name}' must be a positive integer or None, got {degree!r}")
    known = math.prod(degree for _, degree in parallel_degree if degree is not None)
    if world_size % known != 0:
        raise ParallelConfigError(
            f"the degrees {dict(parallel_degree)} multiply to {known}, which does not divide the world size "
            f"{world_size}")
    degrees = {name: (degree if degree is not None else world_size // known) for name, degree in parallel_degree}
    if math.prod(degrees.values()) != world_size:
        raise ParallelConfigError(
            f"the degrees {degrees} multiply to {math.prod(degrees.values())} but the world size is {world_size}; "
            f"make one degree None to infer it or change the number of processes")
    return degrees


def grid_groups(degrees: dict[str, int], axes: Sequence[str]) -> list[list[int]]:
    """All groups (as lists of global ranks) of the ranks that differ only along ``axes``.

    Ranks are laid out row-major over ``degrees`` (insertion order), the last axis innermost.
    """
    names = list(degrees)
    shape = [degrees[n] for n in names]
    strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    fixed = [n for n in names if n not in axes]
    groups = []
    for fixed_coords in itertools.product(*(range(degrees[n]) for n in fixed)):
        base = sum(c * strides[names.index(n)] for n, c in zip(fixed, fixed_coords))
        members = []
        for moving in itertools.product(*(range(degrees[n]) for n in names if n in axes)):
            offset = sum(c * strides[names.index(n)] for n, c in zip([n for n in names if n in axes], moving))
            members.append(base + offset)
        groups.append(sorted(members))
    return groups


def nodes_spanned(degrees: dict[str, int], ranks_per_node: int) -> dict[str, int]:
    """For each axis, how many nodes its widest group spans when consecutive global ranks fill nodes of
    ``ranks_per_node`` (what torchrun does: node n runs ranks ``[n * ranks_per_node, (n + 1) * ranks_per_node)``).
    An axis with 1 keeps its traffic inside a node. Computed from the layout alone, without processes."""
    if ranks_per_node < 1:
        raise ParallelConfigError(f"ranks_per_node must be >= 1, got {ranks_per_node}")
    return {axis: max(len({rank // ranks_per_node for rank in members}) for members in grid_groups(degrees, [axis]))
            for axis in degrees}


def coordinates(rank: int, degrees: dict[str, int]) -> dict[str, int]:
    """Index of ``rank`` along every axis of the grid."""
    coords = {}
    for name in reversed(list(degrees)):
        coords[name] = rank % degrees[name]
        rank //= degrees[name]
    return coords


def default_device() -> torch.device:
    """CUDA device of this local rank when a GPU is there, else CPU. Code asks this instead of calling .cuda()."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def _single_process(axes: tuple[str, ...], degrees: dict[str, int]) -> ParallelGroups:
    pg = ParallelGroups(axes=axes, degrees=dict(degrees), device=default_device())
    for axis in list(axes) + ["mp", "world"]:
        pg._ranks[axis] = [0]
        pg._coords[axis] = 0
    return pg


def init_process_group(
    parallel_degree: Sequence[tuple[str, Optional[int]]] = (("dp", None),),
    backend: Optional[str] = None,
    timeout: datetime.timedelta = datetime.timedelta(minutes=10),
    seed: Optional[int] = None,
) -> ParallelGroups:
    """Build every group of ``parallel_degree`` and make the result :func:`current`.

    Under torchrun (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set) or after the caller's own
    ``torch.distributed.init_process_group``, the default group is created or reused; in a plain single process
    no process group is created. ``backend`` defaults to NCCL with a GPU and gloo without. ``timeout`` bounds how
    long a collective waits for the other ranks (Megatron's ``--distributed-timeout-minutes``, default 10).

    Besides one group per axis, two compound groups are made: ``'mp'`` (every axis but ``dp``: the ranks that hold
    one replica of the model, over which a global gradient norm is summed) and ``'world'``. When a ``pp`` axis of
    degree > 1 exists, ``'pp_ends'`` holds the first and last pipeline stage of each replica (tied embeddings).

    ``seed``: when given, seeds every rank's generators with it (through ``random.model_parallel_seed``). It is
    required when ``dap`` or ``bp`` has degree > 1 (the seeds' rule: the ranks of those axes compute one forward
    pass between them, so their dropout masks must agree). Every check (degrees against the world size, the bp
    limit, the missing seed) raises :class:`ParallelConfigError` on every rank before any collective.
    """
    global _CURRENT
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    else:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    degrees = resolve_degrees(parallel_degree, world_size)
    axes = tuple(degrees)
    check_folding_degrees(degrees, seed)

    if world_size == 1 and not dist.is_initialized():
        _CURRENT = _single_process(axes, degrees)
        _seed(seed, _CURRENT)
        return _CURRENT

    if not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise ParallelConfigError(
                f"WORLD_SIZE={world_size} asks for {world_size} processes but {', '.join(missing)} is not set; "
                "launch with torchrun (which sets them) or export MASTER_ADDR and MASTER_PORT")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        device = default_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
    backend = dist.get_backend()
    pg = ParallelGroups(axes=axes, degrees=degrees, rank=rank, world_size=world_size,
                        device=default_device(), backend=backend)
    pg._coords.update(coordinates(rank, degrees))

    compound: dict[str, list[str]] = {axis: [axis] for axis in axes}
    compound["mp"] = [a for a in axes if a != DATA_PARALLEL_AXIS]
    compound["world"] = list(axes)
    for name, members_axes in compound.items():
        # Every rank creates every group in the same order (torch.distributed.new_group is collective).
        for members in grid_groups(degrees, members_axes):
            group = dist.new_group(members, timeout=timeout) if len(members) > 1 else None
            if rank in members:
                pg._ranks[name] = members
                pg._groups[name] = group
    if degrees.get("pp", 1) > 1:
        for members in grid_groups(degrees, ["pp"]):
            ends = [members[0], members[-1]]
            group = dist.new_group(ends, timeout=timeout)
            if rank in ends:
                pg._ranks["pp_ends"] = ends
                pg._groups["pp_ends"] = group
    _CURRENT = pg
    _seed(seed, pg)
    return pg


def check_folding_degrees(degrees: dict[str, int], seed: Optional[int]) -> None:
    """The per-axis limits (:data:`MAX_DEGREE`) and the seed rule (:data:`SEEDED_AXES`); raise before any
    collective, with the same message on every rank (it depends only on the arguments)."""
    for axis, limit in MAX_DEGREE.items():
        if degrees.get(axis, 1) > limit:
            raise ParallelConfigError(
                f"degree {degrees[axis]} for axis '{axis}' is not supported (at most {limit}): branch parallelism "
                f"splits an Evoformer block into its two branches (MSA and pair), so --bp_degree is 1 or 2; use "
                f"dap or dp for more ranks")
    split = {a: degrees[a] for a in SEEDED_AXES if degrees.get(a, 1) > 1}
    if split and seed is None:
        raise ParallelConfigError(
            f"init_process_group(..., seed=None) with {', '.join(f'{a}={d}' for a, d in split.items())}: a seed is "
            f"required when dap or bp > 1, so that the ranks that share one forward pass draw the same random "
            f"numbers; pass seed=S (the launcher's --seed)")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ParallelConfigError(f"seed must be a non-negative integer, got {seed!r}")


#: Seeds a rank's generators from (seed, groups): ``random.model_parallel_seed``, installed by
#: ``megatron_protein.parallel.random`` when it is imported (the package's ``__init__`` always imports it). The
#: group builder knows nothing of generators; the RNG module, which builds on the groups, plugs itself in here.
_seeder: Optional[Callable[[int, "ParallelGroups"], object]] = None


def install_seeder(seeder: Callable[[int, "ParallelGroups"], object]) -> None:
    """Called once by ``megatron_protein.parallel.random``: what ``init_process_group(..., seed=S)`` calls."""
    global _seeder
    _seeder = seeder


def _seed(seed: Optional[int], pg: ParallelGroups) -> None:
    if seed is None:
        return
    if _seeder is None:  # pragma: no cover - megatron_protein.parallel's __init__ imports random first
        raise RuntimeError("megatron_protein.parallel.random is not imported; import megatron_protein.parallel")
    _seeder(seed, pg)


@contextlib.contextmanager
def as_single_process():
    """Run the block as one process would: ``current()`` is a layout with every degree 1, so every hook of
    ``dap``/``bp`` and every collective called through ``current()`` is the identity.

    For references computed inside a multi-process run (tests compare a rank's parallel result with the same
    model at degree 1 on the same inputs) and for work one rank does alone. Run the backward of anything computed
    here inside the block too: activation recomputation in a later backward would see the real layout.
    """
    global _CURRENT
    saved = _CURRENT
    _CURRENT = _single_process(("dp",), {"dp": 1})
    try:
        yield _CURRENT
    finally:
        _CURRENT = saved


def destroy_process_group() -> None:
    """Tear down torch.distributed (if this module set it up) and forget the current layout."""
    global _CURRENT
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CURRENT = None
