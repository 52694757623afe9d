"""Exclusive outputs: one running job per output directory or prefix.

``with OutputLock(path, "--save"):`` holds ``PATH.lock`` (a sibling of the output, so it can exist before the
output does and survives the output being renamed into place) for the duration of the block. A second job that
asks for the same lock fails at once with :class:`LockError`, naming the holder: host, pid, start time and
command line, as recorded in the lock file.

How liveness is decided: the holder keeps the lock file open with an exclusive ``flock`` for its lifetime, and the
kernel drops that lock when the process dies, however it dies (``kill -9`` included). A challenger that obtains the
``flock`` of an existing lock file written by a process of the *same host* that is gone (no such pid, or the pid
now belongs to a process started at another time) takes the lock over, with a warning. A lock file written on
another host is never taken over (whether that job is alive cannot be known from here): the error says which file
to remove once that job is known to be dead.

What is not promised: on a network file system whose locking is disabled (``nolock`` NFS mounts) ``flock`` is
local to each host, so two jobs on two hosts are still told apart by the recorded host name, but a dead job of
another host needs its lock file removed by hand.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from typing import Optional

from .errors import UserError
from .fs import fsync_dir as fs_fsync_dir

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"


class LockError(UserError, RuntimeError):
    """The output is in use by another job (or its lock file cannot be written)."""


def lock_path(target: str) -> str:
    """The lock file of ``target`` (a directory or a file prefix): ``TARGET.lock`` beside it."""
    return os.path.abspath(target).rstrip(os.sep) + LOCK_SUFFIX


def _process_start_ticks(pid: int) -> Optional[int]:
    """Start time of ``pid`` in clock ticks since boot (Linux /proc), to tell a reused pid from the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _host_tag() -> str:
    return socket.gethostname().replace(".", "_").replace(os.sep, "_") or "host"


def describe_holder(info: dict) -> str:
    parts = [f"host {info.get('host', '?')}", f"pid {info.get('pid', '?')}",
             f"started {info.get('started', '?')}"]
    if info.get("command"):
        parts.append(f"command: {info['command']}")
    return ", ".join(parts)


class OutputLock:
    """An exclusive lock on ``target`` held by this process (see the module docstring).

    ``what`` names the output in messages (e.g. ``--save``, ``--output-prefix``). Re-entrant within one process for
    the same path is *not* supported: a second lock on a path this process already holds fails like another job.
    """

    def __init__(self, target: str, what: str = "output"):
        self.target = os.path.abspath(target)
        self.what = what
        self.path = lock_path(target)
        self._fd: Optional[int] = None
        self._info: Optional[dict] = None

    # ------------------------------------------------------------------------------------------------ acquire
    def _my_info(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "process_start_ticks": _process_start_ticks(os.getpid()),
                "command": " ".join(sys.argv)[:400], "target": self.target}

    def _read(self, fd: int) -> Optional[dict]:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            raw = os.read(fd, 1 << 16)
            info = json.loads(raw.decode("utf-8"))
            return info if isinstance(info, dict) else None
        except (OSError, ValueError):
            return None

    def _write(self, fd: int, info: dict) -> None:
        data = (json.dumps(info, indent=1) + "\n").encode("utf-8")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, data)
        os.fsync(fd)

    def _busy(self, info: Optional[dict]) -> LockError:
        holder = describe_holder(info) if info else "a job whose lock file is unreadable"
        advice = (f"wait for it to finish or use another {self.what}" if info is None
                  or info.get("host") == socket.gethostname() else
                  f"wait for it to finish or use another {self.what}; if that job is dead, remove {self.path}")
        return LockError(f"{self.target}: {self.what} is in use by another job ({holder}); lock file {self.path}; "
                         f"{advice}")

    def _is_stale(self, info: Optional[dict]) -> bool:
        """Same host and the recorded process is gone (we hold the file's flock, so it holds nothing)."""
        if info is None:
            return True  # flock free and no readable owner: a crash between creating and writing the file
        if info.get("host") != socket.gethostname():
            return False
        pid = info.get("pid")
        if not isinstance(pid, int):
            return True
        if pid == os.getpid():
            return True  # left by this process, which no longer holds its flock
        if not _pid_alive(pid):
            return True
        recorded, now = info.get("process_start_ticks"), _process_start_ticks(pid)
        return recorded is not None and now is not None and recorded != now

    def acquire(self, wait_seconds: float = 0.0) -> "OutputLock":
        """Take the lock or raise :class:`LockError` naming the holder; with ``wait_seconds`` > 0, retry while
        another job holds it (for short critical sections such as merging a results file)."""
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                return self._acquire_once()
            except LockError:
                if self._fd is not None or time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def _acquire_once(self) -> "OutputLock":
        """One attempt (see the module docstring). The lock file appears with its record already in it (written to
        a private file, flocked, then hard-linked into place), so a challenger always reads who holds it."""
        if self._fd is not None:
            raise LockError(f"{self.path}: this lock object is already held")
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        info = self._my_info()
        fd, private = self._private_file(info)
        try:
            for _ in range(50):
                if self._link(private):
                    return self._held(fd, info)
                try:
                    existing = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:
                    continue  # released in between: try to create it again
                try:
                    try:
                        fcntl.flock(existing, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        holder = self._read(existing)
                        if holder is not None and holder.get("pid") != os.getpid() and self._is_stale(holder):
                            time.sleep(0.05)  # another challenger is taking over a dead holder's lock
                            continue
                        raise self._busy(holder) from None
                    # We hold the file's flock: is it still the one at self.path (not released meanwhile)?
                    try:
                        same = os.fstat(existing).st_ino == os.stat(self.path).st_ino
                    except FileNotFoundError:
                        same = False
                    if not same:
                        continue
                    holder = self._read(existing)
                    if holder is None and time.time() - os.fstat(existing).st_mtime < 5.0:
                        time.sleep(0.05)  # being created without hard links (see _link): not stale yet
                        continue
                    if not self._is_stale(holder):
                        raise self._busy(holder)
                    if holder is not None:
                        logger.warning("%s: taking over the lock of %s, whose process is gone (%s)", self.path,
                                       self.target, describe_holder(holder))
                    # Ours replaces the dead one in one rename; holding the dead one's flock meanwhile keeps any
                    # other challenger from doing the same.
                    os.replace(private, self.path)
                    private = None
                    return self._held(fd, info)
                finally:
                    os.close(existing)
            raise LockError(f"{self.path}: could not acquire the lock of {self.target} (it kept changing)")
        except BaseException:
            os.close(fd)
            raise
        finally:
            if private is not None and os.path.exists(private):
                os.remove(private)

    def _private_file(self, info: dict) -> tuple[int, str]:
        private = f"{self.path}.{_host_tag()}.{os.getpid()}.{os.urandom(4).hex()}.new"
        try:
            fd = os.open(private, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            raise LockError(f"{self.path}: cannot create the lock file of {self.what} {self.target} "
                            f"({exc.strerror})") from None
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new private file: nobody else can hold it
        self._write(fd, info)
        return fd, private

    def _link(self, private: str) -> bool:
        """Put the private file in place as the lock if there is none; False if a lock file exists."""
        try:
            os.link(private, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:  # a file system without hard links: exclusive creation, then a rename over it
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise LockError(f"{self.path}: cannot create the lock file of {self.what} {self.target} "
                                f"({exc.strerror})") from None
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:
                return False
            os.replace(private, self.path)
            return True

    def _held(self, fd: int, info: dict) -> "OutputLock":
        self._fd, self._info = fd, info
        self._remove_dead_private_files()
        fs_fsync_dir(os.path.dirname(self.path))
        atexit.register(self.release)
        return self

    def _remove_dead_private_files(self) -> None:
        """Private files (``TARGET.lock.<host>.<pid>.<hex>.new``) of processes of this host killed while locking."""
        directory, base = os.path.split(self.path)
        mine = f"{base}.{_host_tag()}."
        for name in os.listdir(directory):
            if not (name.startswith(mine) and name.endswith(".new")):
                continue
            pid = name[len(mine):].split(".", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(directory, name))

    # ------------------------------------------------------------------------------------------------ release
    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                os.remove(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)  # drops the flock
            atexit.unregister(self.release)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "OutputLock":
        # ``with OutputLock(p):`` takes the lock; ``with OutputLock(p).acquire(wait_seconds=...):`` already has it.
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
