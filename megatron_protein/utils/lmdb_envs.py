"""One read-only LMDB environment per file and process, shared by every reader of it.

py-lmdb refuses to open an environment that is already open in the process ("The environment ... is already
open in this process", py-lmdb >= 1.5, also through another path to the same file), so two readers of one TAPE
split (a training and an evaluation dataset, two tasks over one file, a reader made twice) cannot each open their
own. :func:`acquire` returns the environment already open for the file, identified by its device and inode (a file
replaced under the same name is a new file and gets its own environment), and counts its users; :func:`release`
closes it when the last one is done. Environments are opened read-only without locking (``lock=False``), as
TAPE's ``LMDBDataset`` opens them.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

_LOCK = threading.Lock()
_OPEN: dict[tuple[int, int], list] = {}  # (st_dev, st_ino) of the data file -> [environment, users]


def _identity(path: str) -> tuple[int, int]:
    data = os.path.join(path, "data.mdb") if os.path.isdir(path) else path
    info = os.stat(data)
    return info.st_dev, info.st_ino


def acquire(path: str):
    """The shared read-only environment of the LMDB at ``path`` (a directory or, ``subdir=False``, a file).
    Raises ``lmdb.Error`` as ``lmdb.open`` does and ``FileNotFoundError`` when there is nothing at ``path``."""
    import lmdb

    key = _identity(path)
    with _LOCK:
        entry = _OPEN.get(key)
        if entry is None:
            env = lmdb.open(path, max_readers=1, readonly=True, lock=False, readahead=False, meminit=False,
                            subdir=os.path.isdir(path))
            entry = _OPEN[key] = [env, 0]
        entry[1] += 1
        return entry[0]


def release(env) -> None:
    """One user less of ``env``; the last one closes it."""
    with _LOCK:
        for key, entry in list(_OPEN.items()):
            if entry[0] is env:
                entry[1] -= 1
                if entry[1] <= 0:
                    del _OPEN[key]
                    env.close()
                return


@contextlib.contextmanager
def shared(path: str) -> Iterator:
    """``with shared(path) as env:`` :func:`acquire` and :func:`release` around the block."""
    env = acquire(path)
    try:
        yield env
    finally:
        release(env)


def open_count() -> int:
    """How many environments are open (for tests)."""
    with _LOCK:
        return len(_OPEN)
