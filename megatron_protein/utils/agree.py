"""Steps that every rank must pass or fail together (set-up: locks, trackers, checkpoint loading).

``on_all_ranks(fn, groups)`` runs ``fn`` on every rank and then exchanges one flag over the world (a MAX
all-reduce): if any rank failed, every rank raises, so no rank walks into the next collective while another has
left. The error is the lowest failing rank's: a known error (:class:`~megatron_protein.utils.errors.UserError`)
is raised on every rank with that rank's message (printed once, see :mod:`.errors`); any other exception is
re-raised with its traceback on the rank where it happened, and the other ranks raise :class:`PeerFailedError`.

``from_rank0(fn, groups)`` runs ``fn`` on global rank 0 only and gives its result to every rank (e.g. the
iteration in the tracker file, read once so that every rank loads the same checkpoint even when a shared file
system shows different ranks different versions of the file).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .errors import UserError


class PeerFailedError(UserError, RuntimeError):
    """Another rank failed with an unexpected error (its traceback is in that rank's output)."""


def _distributed(groups) -> bool:
    return groups is not None and groups.world_size > 1 and dist.is_available() and dist.is_initialized()


def _first_failure(failed: Optional[BaseException], groups) -> Optional[tuple[int, str, bool, str]]:
    flag = torch.tensor([1.0 if failed is not None else 0.0], device=groups.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() == 0.0:
        return None
    mine = None if failed is None else (type(failed).__name__, str(failed), isinstance(failed, UserError))
    gathered: list = [None] * groups.world_size
    dist.all_gather_object(gathered, mine)
    for rank, entry in enumerate(gathered):
        if entry is not None:
            name, message, known = entry
            return rank, name, known, message
    return None


def on_all_ranks(fn: Callable[[], Any], groups, error_type: type = UserError, what: str = "set-up") -> Any:
    """``fn()`` on every rank; all ranks return its (per-rank) result or all raise (see the module docstring).

    ``error_type`` is the class raised on the ranks that did not fail themselves when the first failure is a
    known error (it must accept one message argument)."""
    failed: Optional[BaseException] = None
    result = None
    try:
        result = fn()
    except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then re-raised
        failed = exc
    if not _distributed(groups):
        if failed is not None:
            raise failed
        return result
    first = _first_failure(failed, groups)
    if first is None:
        return result
    rank, name, known, message = first
    if failed is not None and (rank == groups.rank or not known):
        raise failed
    if known:
        raise error_type(message)
    raise PeerFailedError(f"rank {rank} failed during {what} with {name}: {message} (its traceback is in that "
                          f"rank's output)")


def from_rank0(fn: Callable[[], Any], groups, error_type: type = UserError, what: str = "set-up") -> Any:
    """``fn()`` on global rank 0; its result (or its error) on every rank."""
    if not _distributed(groups):
        return fn()
    value = on_all_ranks(lambda: fn() if groups.rank == 0 else None, groups, error_type, what)
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
