"""Random-number streams for model parallelism: which ranks must draw the same numbers and which must not.

Two streams, following Megatron-LM's ``CudaRNGStatesTracker`` (Shoeybi et al. 2019, section 3: "we maintain a
separate random number generator for dropout within model parallel regions"):

* the **default generator** (``torch.manual_seed``) is seeded identically on every tensor-parallel rank of a
  replica. Dropout *outside* tensor-parallel regions draws from it: those activations are replicated across tp
  ranks and must get the same mask there;
* the **model-parallel stream**, entered with ``with get_rng_tracker().fork():``, is seeded with
  ``default seed + 2718 + tp_rank``: different on each tp rank (dropout on attention heads or hidden units that
  live on different ranks must be independent).

Both seeds are offset by ``100 * pp_rank`` (Megatron's convention) so pipeline stages do not repeat each other's
dropout masks, and by ``1_000_003 * dp_rank`` so that data-parallel replicas draw independent masks: DP = N then
samples dropout as one replica accumulating N micro-batches would (the same distribution; not the same masks,
which no layout could give). Megatron-LM does the same with ``--data-parallel-random-init`` (offset ``10 *
dp_rank``, which collides with the pipeline offset from dp = 10 on; ours does not below 10^4 stages). Weight
initialisation does not use these generators: the model draws its weights from local generators seeded by the
block (``models.bert.seeded_init``), so every replica starts from the same weights whatever the dp rank (and the
data-parallel wrapper broadcasts rank 0's anyway).

The tracker works on the generator of the device the groups run on (CPU generator on CPU, CUDA generator on a
GPU); ``get_states`` / ``set_states`` save and restore it for exact resumption from a checkpoint, which keeps one
RNG state per data-parallel rank (``training.checkpointing``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from . import scg

__all__ = [
    "MODEL_PARALLEL_RNG", "TENSOR_PARALLEL_SEED_OFFSET", "PIPELINE_SEED_STRIDE", "DATA_PARALLEL_SEED_STRIDE",
    "RNGStatesTracker", "get_rng_tracker", "model_parallel_seed", "ParallelSeeds",
]

#: Name of the tracked stream used inside tensor-parallel regions.
MODEL_PARALLEL_RNG = "model-parallel-rng"
#: Offset between the default seed and the model-parallel seed (Megatron's constant).
TENSOR_PARALLEL_SEED_OFFSET = 2718
#: Seed difference between consecutive pipeline stages (Megatron's constant).
PIPELINE_SEED_STRIDE = 100
#: Seed difference between data-parallel replicas (a prime far above the pipeline and tensor-parallel offsets).
DATA_PARALLEL_SEED_STRIDE = 1_000_003


def _get_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class RNGStatesTracker:
    """Named generator states that can be swapped in for the device's default generator.

    ``fork(name)`` saves the default generator's state, installs the tracked one, runs the block, stores the
    advanced tracked state back and restores the default state, so random ops inside the block draw from the
    tracked stream and leave the default stream exactly where it was.
    """

    def __init__(self, device: Optional[torch.device] = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._states: dict[str, torch.Tensor] = {}
        self._seeds: dict[str, int] = {}

    def reset(self, device: Optional[torch.device] = None) -> None:
        """Forget every tracked stream (and move to ``device`` if given)."""
        if device is not None:
            self.device = torch.device(device)
        self._states.clear()
        self._seeds.clear()

    def add(self, name: str, seed: int) -> None:
        """Create the stream ``name`` seeded with ``seed`` without disturbing the default generator."""
        if name in self._states:
            raise ValueError(f"RNG stream '{name}' already exists (seed {self._seeds[name]}); reset() first")
        for other, other_seed in self._seeds.items():
            if other_seed == seed:
                raise ValueError(f"seed {seed} is already used by RNG stream '{other}'; streams must differ")
        saved = _get_state(self.device)
        try:
            if self.device.type == "cuda":
                torch.cuda.manual_seed(seed)
            else:
                torch.manual_seed(seed)
            self._states[name] = _get_state(self.device)
        finally:
            _set_state(saved, self.device)
        self._seeds[name] = seed

    def names(self) -> list[str]:
        return list(self._states)

    def get_states(self) -> dict[str, torch.Tensor]:
        """A copy of every stream's state, for a checkpoint's ``rng_state``."""
        return {name: state.clone() for name, state in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Restore streams saved by :meth:`get_states` (replaces the tracked streams)."""
        self._states = {name: state.clone() for name, state in states.items()}
        self._seeds = {name: self._seeds.get(name, -1) for name in self._states}

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the block on stream ``name``; the default generator is left untouched."""
        if name not in self._states:
            raise RuntimeError(
                f"RNG stream '{name}' does not exist; call "
                f"megatron_protein.parallel.tensor_parallel.model_parallel_seed(seed, groups) before training")
        saved = _get_state(self.device)
        _set_state(self._states[name], self.device)
        try:
            yield
        finally:
            self._states[name] = _get_state(self.device)
            _set_state(saved, self.device)


_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker (one per process, like the default generator it complements)."""
    return _TRACKER


@dataclass(frozen=True)
class ParallelSeeds:
    """The seeds :func:`model_parallel_seed` installed on this rank (for logging)."""

    default: int
    model_parallel: int


def model_parallel_seed(seed: int, groups: Optional[scg.ParallelGroups] = None) -> ParallelSeeds:
    """Seed the default generator and the model-parallel stream of this rank.

    default seed        = seed + 100 * pp_rank + 1_000_003 * dp_rank               (same on every tp rank)
    model-parallel seed = default seed + 2718 + tp_rank                            (differs across tp)

    At dp rank 0 these are Megatron-LM's seeds. ``torch.manual_seed`` seeds the CPU and, on a GPU, every CUDA
    device (each process drives one).
    """
    pg = groups if groups is not None else scg.current()
    default = seed + PIPELINE_SEED_STRIDE * pg.rank_in("pp") + DATA_PARALLEL_SEED_STRIDE * pg.rank_in("dp")
    model_parallel = default + TENSOR_PARALLEL_SEED_OFFSET + pg.rank_in("tp")
    torch.manual_seed(default)
    _TRACKER.reset(pg.device)
    _TRACKER.add(MODEL_PARALLEL_RNG, model_parallel)
    return ParallelSeeds(default=default, model_parallel=model_parallel)


scg.install_seeder(model_parallel_seed)  # what scg.init_process_group(..., seed=S) calls
