"""The one place that decides which implementation of a fused op runs.

Every op in :mod:`megatron_protein.kernels` has three implementations:

``triton``     a Triton kernel pair (forward and backward) wrapped in a ``torch.autograd.Function``. It runs on CUDA
               tensors when ``triton`` is importable, and on CPU tensors only under Triton's interpreter
               (``TRITON_INTERPRET=1``, set before ``triton`` is imported), which is how the tests check it.
``reference``  the fast PyTorch path that runs everywhere: PyTorch's own fused primitives
               (``torch.nn.functional.layer_norm``, ``scaled_dot_product_attention``, ...) and memory-lean custom
               autograd functions. This is what ``fused=True`` gives on CPU.
``unfused``    the plain composition of elementary torch ops, the textbook formula. ``fused=False`` selects it;
               it is what Megatron's ``--no-masked-softmax-fusion``, ``--no-bias-gelu-fusion`` and
               ``--no-bias-dropout-fusion`` select, and the baseline of ``bench/kernels.py``.

As in Megatron's ``FusedScaleMaskSoftmax``, the choice between fused and unfused is made when a module is built
(``fused=...``), never through forward arguments. The choice between ``triton`` and ``reference`` for a fused
module is made per call from the tensors' device, because a module built on CPU may later be moved to CUDA.

When fusion is requested but Triton cannot run (no CUDA tensor, or triton not installed), the reference runs and
the fallback is logged once per op and reason; :func:`fallbacks` lists them so benchmarks can print them.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
from typing import Iterator, Optional

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("triton", "reference", "unfused")

_triton_import_error: Optional[str] = None
_triton_checked = False
_forced_backend: Optional[str] = None
_logged_fallbacks: dict[tuple[str, str], str] = {}


def triton_available() -> bool:
    """True when ``import triton`` works (the ``kernels`` extra is installed). Checked once."""
    global _triton_checked, _triton_import_error
    if not _triton_checked:
        _triton_checked = True
        try:
            importlib.import_module("triton")
            importlib.import_module("triton.language")
        except Exception as exc:  # noqa: BLE001 - any import failure means "no triton"
            _triton_import_error = f"{type(exc).__name__}: {exc}"
    return _triton_import_error is None


def triton_interpreter_enabled() -> bool:
    """True when Triton's interpreter is on, i.e. Triton kernels can run on CPU tensors (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def log_fallback_once(op: str, reason: str) -> None:
    key = (op, reason)
    if key not in _logged_fallbacks:
        _logged_fallbacks[key] = reason
        logger.info("kernels.%s: fused kernel requested but %s; using the PyTorch reference", op, reason)


def fallbacks() -> list[str]:
    """Human-readable list of the fallbacks taken so far in this process (one entry per op and reason)."""
    return [f"{op}: {reason}" for (op, reason) in sorted(_logged_fallbacks)]


def select_backend(op: str, fused: bool, *tensors: Optional[torch.Tensor]) -> str:
    """Return ``'triton'``, ``'reference'`` or ``'unfused'`` for one call of ``op`` on ``tensors``.

    ``fused=False`` always gives ``'unfused'``. Otherwise Triton is chosen when every given tensor is on CUDA and
    triton imports; a forced backend (see :func:`force_backend`) overrides the device check.
    """
    if not fused:
        return "unfused"
    if _forced_backend is not None:
        return _forced_backend
    present = [t for t in tensors if t is not None]
    if present and all(t.is_cuda for t in present):
        if triton_available():
            return "triton"
        log_fallback_once(op, f"triton is not importable ({_triton_import_error})")
        return "reference"
    log_fallback_once(op, "Triton kernels need CUDA tensors (got CPU)")
    return "reference"


@contextlib.contextmanager
def force_backend(backend: str) -> Iterator[None]:
    """Force the backend of every fused module inside the ``with`` block (tests and benchmarks only).

    ``force_backend('triton')`` runs the Triton kernels on CPU tensors, which works only under
    ``TRITON_INTERPRET=1``; it raises at once otherwise instead of failing deep inside Triton.
    """
    global _forced_backend
    if backend not in ("triton", "reference"):
        raise ValueError(f"force_backend: backend must be 'triton' or 'reference', got {backend!r}")
    if backend == "triton" and not triton_available():
        raise RuntimeError(f"force_backend('triton'): triton is not importable ({_triton_import_error}); "
                           "install the extra with `pip install -e .[kernels]`")
    previous = _forced_backend
    _forced_backend = backend
    try:
        yield
    finally:
        _forced_backend = previous


def check_triton_tensors(op: str, *tensors: Optional[torch.Tensor]) -> None:
    """Fail clearly when a Triton kernel is about to receive CPU tensors without the interpreter."""
    if any(t is not None and not t.is_cuda for t in tensors) and not triton_interpreter_enabled():
        raise RuntimeError(f"kernels.{op}: the Triton kernel got CPU tensors; set TRITON_INTERPRET=1 before "
                           "importing triton to run it on CPU (tests only), or use CUDA tensors")
