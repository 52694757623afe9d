"""Known errors become one line and exit status 2; everything else keeps its traceback.

A *known* error is one the project raises on purpose about its input or configuration, with a message that names
the file (and the line or record) and says what was expected:

* any exception that derives from :class:`UserError` (``InputFormatError``, both ``CheckpointError`` classes,
  ``DataFileError``, ``LockError``, ``UnsafeFileError``, ... carry it as a mixin beside ``ValueError`` or
  ``RuntimeError``, so existing ``except ValueError`` code keeps working);
* a ``FileNotFoundError``/``FileExistsError``/``IsADirectoryError``/``NotADirectoryError``/``PermissionError``
  (a missing or unwritable file: the user's environment, not a bug);
* a ``ValueError`` raised inside :func:`config_phase` (where flags become configs: every such ``ValueError`` is a
  message about a flag), re-raised as :class:`ConfigError`.

:func:`run_cli` wraps a command's ``main``: a known error prints ``error: <file>[:<line>]: <what was expected>``
on stderr and the process exits with 2; any other exception propagates with its traceback (set
``MEGATRON_PROTEIN_TRACEBACK=1`` to see the traceback of a known error too).

Under torchrun every rank usually raises the same error (same flags, same files), but it must be printed once. The
first rank to report claims the report in the process group's key-value store (an atomic counter, not a
collective, so it works while other ranks are blocked in a collective); a rank that loses the claim exits with 2
silently. Before a process group exists (argument errors), only rank 0 prints. A command calls
:func:`claim_report` in an ``except`` around its work, before it destroys the process group.
``python -m megatron_protein.launch`` (torchrun without its report for exit status 2) completes the picture: the
user sees the one line and nothing else.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import signal
import sys
from typing import Callable, Iterator, Optional, Sequence

#: Exit status of a known error (argparse's, and what shell tools use for bad usage).
EXIT_USAGE = 2
TRACEBACK_ENV = "MEGATRON_PROTEIN_TRACEBACK"
_KNOWN_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
_REPORT_ATTR = "_megatron_protein_reports_here"


class UserError(Exception):
    """Mixin of every error about the user's input or configuration (see the module docstring)."""


class ConfigError(UserError, ValueError):
    """A flag or a combination of flags that cannot work; the message names the flag and what was expected."""


class NonFiniteLossError(UserError, RuntimeError):
    """Too many consecutive steps had a NaN or inf loss or gradient (each was skipped; the weights are finite)."""


class Terminated(BaseException):
    """SIGTERM (or SIGHUP) arrived; raised in the main thread by :func:`terminate_on_signals` so that ``finally``
    blocks and ``except BaseException`` clean-ups run before the process dies."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by {signal.Signals(signum).name}")
        self.signum = signum


def is_known(exc: BaseException) -> bool:
    if isinstance(exc, UserError):
        return True
    return isinstance(exc, _KNOWN_OS_ERRORS)


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (continuation lines joined with '; ')."""
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or exc}"
        if exc.filename2 is not None:
            text += f" ({exc.filename2})"
    else:
        text = str(exc)
    parts = [part.strip() for part in text.splitlines() if part.strip()]
    return "; ".join(parts) if parts else type(exc).__name__


@contextlib.contextmanager
def config_phase() -> Iterator[None]:
    """ValueErrors raised inside become :class:`ConfigError` (flags and configs are validated here)."""
    try:
        yield
    except UserError:
        raise
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def one_line_parse_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` raise :class:`ConfigError` instead of printing its usage and exiting (so that under torchrun
    a bad flag is reported once, on one line, like every other known error)."""

    def error(message: str):
        raise ConfigError(f"{message} (see {parser.prog} --help)")

    parser.error = error  # type: ignore[method-assign]
    return parser


def _claim_in_store() -> Optional[bool]:
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        store = dist.distributed_c10d._get_default_store()
        with contextlib.suppress(Exception):
            store.set_timeout(datetime.timedelta(seconds=10))  # the error path must not wait for long
        key = f"megatron_protein/error_reported/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        return store.add(key, 1) == 1
    except Exception:  # noqa: BLE001 - no store (or it went away): fall back to the rank rule
        return None


def claim_report(exc: BaseException) -> bool:
    """Whether this process prints ``exc``; decided once per exception (see the module docstring)."""
    decided = getattr(exc, _REPORT_ATTR, None)
    if decided is not None:
        return decided
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        decision = True
    else:
        claimed = _claim_in_store()
        decision = claimed if claimed is not None else os.environ.get("RANK", "0") == "0"
    with contextlib.suppress(Exception):
        setattr(exc, _REPORT_ATTR, decision)
    return decision


def report(exc: BaseException, file=None) -> None:
    """Print ``exc`` as the one line of a known error if this process holds the report."""
    if claim_report(exc):
        print(f"error: {one_line(exc)}", file=file or sys.stderr, flush=True)


def run_cli(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None) -> int:
    """Run a command's ``main(argv)``; return its exit status (2 for a known error, printed as one line)."""
    try:
        status = main(argv)
        return 0 if status is None else int(status)
    except Terminated as exc:
        print(f"{exc}; temporary files removed", file=sys.stderr, flush=True)
        # Die of the signal itself, so the parent sees the usual status (128 + signum).
        signal.signal(exc.signum, signal.SIG_DFL)
        os.kill(os.getpid(), exc.signum)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except BaseException as exc:  # noqa: BLE001 - re-raised unless known
        if not is_known(exc) or os.environ.get(TRACEBACK_ENV):
            raise
        report(exc)
        return EXIT_USAGE


@contextlib.contextmanager
def terminate_on_signals(signals: Sequence[int] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into :class:`Terminated` in the main thread for the duration of the block (SIGINT already
    raises KeyboardInterrupt), so temporary files are removed by the code's own clean-up paths."""
    def handler(signum, frame):
        raise Terminated(signum)

    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in signals:
        with contextlib.suppress(ValueError, OSError):
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signum, old)
