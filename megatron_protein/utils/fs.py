"""Renames that survive a power cut, an atomic swap of two directories, and the removal of stale temporary files.

A rename is atomic but not durable until the directory that holds the entry is fsynced (POSIX; ext4 and XFS only
order the data of the renamed file, not the directory entry): :func:`replace_durably` does both. A directory that
is re-written under the same name (a checkpoint saved twice at the same iteration) is swapped in one step with
Linux's ``renameat2(RENAME_EXCHANGE)`` (:func:`exchange`), so its name never points at nothing; on systems without
it the caller falls back to two renames and says how readers bridge the gap.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import re
from typing import Iterable

logger = logging.getLogger(__name__)

#: The characters ``tempfile.mkstemp`` draws its 8 random name characters from.
MKSTEMP_RANDOM = r"[a-z0-9_]{8}"


def fsync_dir(path: str) -> None:
    """fsync the directory ``path`` (makes the renames and creations inside it durable). A file system that
    cannot fsync a directory (some network file systems answer EINVAL) is accepted silently."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def replace_durably(src: str, dst: str) -> None:
    """``os.replace(src, dst)``, then fsync the directory (or both directories) that changed."""
    os.replace(src, dst)
    dst_dir = os.path.dirname(os.path.abspath(dst))
    src_dir = os.path.dirname(os.path.abspath(src))
    fsync_dir(dst_dir)
    if src_dir != dst_dir:
        fsync_dir(src_dir)


def write_text_durably(path: str, text: str) -> None:
    """Write ``text`` to a temporary sibling, fsync it and :func:`replace_durably` it over ``path``."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        replace_durably(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None


def _load_renameat2():
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            function = libc.renameat2
            function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            function.restype = ctypes.c_int
            _renameat2 = function
        except (OSError, AttributeError):
            pass
    return _renameat2 or None


def exchange(a: str, b: str) -> bool:
    """Atomically swap the directory entries ``a`` and ``b`` (both must exist); fsync their directory.

    Returns False, having changed nothing, when the system cannot do it (not Linux, glibc < 2.28, or a file
    system without RENAME_EXCHANGE such as NFS).
    """
    function = _load_renameat2()
    if function is None:
        return False
    result = function(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result != 0:
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV, errno.EPERM):
            return False
        raise OSError(code, os.strerror(code), a, None, b)
    fsync_dir(os.path.dirname(os.path.abspath(a)))
    if os.path.dirname(os.path.abspath(a)) != os.path.dirname(os.path.abspath(b)):
        fsync_dir(os.path.dirname(os.path.abspath(b)))
    return True


def remove_stale_temp_files(directory: str, patterns: Iterable[str],
                            why: str | None = "left by an earlier run that was killed") -> list[str]:
    """Remove the files of ``directory`` whose names fully match one of the regular expressions ``patterns``;
    return their paths. Only call it while holding the output's lock: then no live job owns such files."""
    compiled = [re.compile(p) for p in patterns]
    removed = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        if any(p.fullmatch(name) for p in compiled):
            path = os.path.join(directory, name)
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    import shutil

                    shutil.rmtree(path)
                else:
                    os.remove(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    if removed and why:
        logger.warning("removed %d temporary file(s) %s: %s", len(removed), why,
                       ", ".join(os.path.basename(p) for p in removed[:6]) + (" ..." if len(removed) > 6 else ""))
    return removed
