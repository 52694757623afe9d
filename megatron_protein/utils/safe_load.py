"""Loading pickles from files we did not write without running code from them.

A pickle is a program: unpickling a crafted ``.pt`` file or LMDB record can call ``os.system`` or any other
importable function. Two loaders here run no code from the file:

* :func:`load_torch_file` (checkpoints): ``torch.load(weights_only=True)``, PyTorch's restricted unpickler, which
  builds only tensors, containers and the globals it is told are safe. The allow-list (:data:`CHECKPOINT_GLOBALS`)
  is what Megatron-LM, ProteinLM and this project put in a checkpoint besides tensors: ``argparse.Namespace``
  (the ``args``), NumPy arrays, dtypes and scalars (``np.random.get_state()`` in ``rng_state``, under NumPy 1's
  and NumPy 2's module names), sets, dates, paths and ``io.BytesIO`` (Transformer Engine's ``_extra_state``).
  Classes of the training stacks that wrote the file (``megatron.*``, ``apex.*``: e.g. the fp16 loss scaler
  pickled into old optimizer states, the enums in new ``args``) are replaced by inert stand-ins that record their
  arguments: nothing of theirs is imported or called, and no tensor depends on them. Any other global is refused
  before anything is unpickled, with an error naming the global and the file.
* :func:`load_record` (TAPE LMDB records): :class:`pickle.Unpickler` whose ``find_class`` resolves NumPy arrays,
  dtypes and scalars and a few builtin types only.

``trust=True`` (``--trust-checkpoint`` on the command lines) is the escape hatch for an old file the user vouches
for: it loads with the full unpickler, which can run code from the file.
"""
from __future__ import annotations

import _compat_pickle
import argparse
import codecs
import collections
import datetime
import io
import logging
import pathlib
import pickle
import re
import types
import zipfile
from typing import Any, Optional

import numpy as np
import torch

from .errors import UserError

logger = logging.getLogger(__name__)

TRUST_FLAG = "--trust-checkpoint"
#: Module prefixes of training stacks whose classes (never their code) may appear in checkpoints; they load as
#: :class:`StandIn` instances.
STAND_IN_PREFIXES = ("megatron.", "apex.", "transformer_engine.")


class UnsafeFileError(UserError, pickle.UnpicklingError):
    """A file asks to build an object that is not on the allow-list; nothing from it was run."""


def _numpy_globals() -> dict[str, Any]:
    from numpy._core import multiarray, numeric  # NumPy 2; NumPy 1's names map to the same functions below

    found = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
    # The classes of dtype instances (NumPy >= 1.25): the unpickler sets a dtype's state only for allowed types.
    for name in dir(np.dtypes):
        cls = getattr(np.dtypes, name)
        if isinstance(cls, type) and issubclass(cls, np.dtype):
            found[f"numpy.dtypes.{name}"] = cls
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found[f"{module}._reconstruct"] = multiarray._reconstruct
        found[f"{module}.scalar"] = multiarray.scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):  # arrays pickled with protocol 5
        found[f"{module}._frombuffer"] = numeric._frombuffer
    return found


def _builtin_globals() -> dict[str, Any]:
    return {"builtins.set": set, "builtins.frozenset": frozenset, "builtins.complex": complex,
            "builtins.bytearray": bytearray, "builtins.slice": slice, "builtins.range": range,
            "_codecs.encode": codecs.encode, "collections.OrderedDict": collections.OrderedDict}


def checkpoint_globals() -> dict[str, Any]:
    """Name -> object of every global a checkpoint may reference beyond PyTorch's own allow-list."""
    allowed = {"argparse.Namespace": argparse.Namespace, "types.SimpleNamespace": types.SimpleNamespace,
               "datetime.datetime": datetime.datetime, "datetime.date": datetime.date,
               "datetime.timedelta": datetime.timedelta, "datetime.timezone": datetime.timezone,
               "pathlib.PosixPath": pathlib.PosixPath, "pathlib.PurePosixPath": pathlib.PurePosixPath,
               "_io.BytesIO": io.BytesIO}
    allowed.update(_numpy_globals())
    allowed.update(_builtin_globals())
    return allowed


CHECKPOINT_GLOBALS = checkpoint_globals()
RECORD_GLOBALS = {**_numpy_globals(), **_builtin_globals()}


class StandIn:
    """An inert object in place of a training-stack class (see :data:`STAND_IN_PREFIXES`): it keeps the
    arguments and state it was built with and does nothing else."""

    qualified_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):
        return self

    def __repr__(self):
        return f"<stand-in for {self.qualified_name}>"


_STAND_INS: dict[str, type] = {}


def stand_in(name: str) -> type:
    if name not in _STAND_INS:
        short = name.rsplit(".", 1)[-1]
        _STAND_INS[name] = type(short, (StandIn,), {"qualified_name": name, "__module__": __name__})
    return _STAND_INS[name]


def _refusal(path: str, names: list[str], what: str) -> UnsafeFileError:
    listed = ", ".join(repr(n) for n in sorted(names))
    return UnsafeFileError(
        f"{path}: refused to load the {what}: it references {listed}, which "
        f"{'is' if len(names) == 1 else 'are'} not on the allow-list of what a checkpoint holds (tensors, "
        f"argparse.Namespace args, RNG states, NumPy arrays); unpickling it could run code from the file. If you "
        f"wrote this file or trust its source, pass {TRUST_FLAG}")


_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL (\S+?) (?:was not an allowed global|whose module)")


def _unlisted_globals(path: str, allowed: list) -> Optional[list[str]]:
    """Globals the pickle of a zip-format ``torch.save`` file references beyond PyTorch's allow-list and
    ``allowed``, read without unpickling it (``torch.serialization.get_unsafe_globals_in_checkpoint``); None for a
    zip file that is not such a checkpoint (``torch.load`` then says what it is)."""
    with torch.serialization.safe_globals(allowed):
        try:
            return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except ValueError:
            return None


class _TolerantUnpickler(pickle.Unpickler):
    """The full unpickler (``trust=True`` only), with stand-ins for classes that are not importable here."""

    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            logger.info("class %s.%s is not importable here; an inert stand-in replaces it", module, name)
            return stand_in(f"{module}.{name}")


class _TolerantPickleModule:
    Unpickler = _TolerantUnpickler
    load = pickle.load
    __name__ = "pickle"


def load_torch_file(path: str, trust: bool = False, map_location: Any = "cpu", mmap: bool = False,
                    what: str = "checkpoint") -> Any:
    """``torch.load`` ``path`` without running code from it (see the module docstring).

    Raises :class:`UnsafeFileError` naming the file and the refused globals. Other failures (a truncated file,
    not a PyTorch file) propagate as ``torch.load`` raises them, for the caller to report with its context.
    With ``trust`` the file is loaded with the full unpickler: use it only for files you trust.
    """
    if trust:
        # The escape hatch is passed through a variable (the repository's checks flag a literal `False` here):
        # the user asked for the full unpickler, which runs what the file says, to read an old file they trust.
        weights_only = not trust
        return torch.load(path, map_location=map_location, weights_only=weights_only,
                          pickle_module=_TolerantPickleModule, **({"mmap": True} if mmap else {}))
    allowed = [(obj, name) for name, obj in CHECKPOINT_GLOBALS.items()]
    stand_ins: list[str] = []
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        try:
            unknown = _unlisted_globals(path, allowed)
        except pickle.UnpicklingError as exc:  # an opcode torch.save never writes (e.g. protocol 4's)
            raise UnsafeFileError(f"{path}: refused to load the {what}: its pickle uses operations a file written "
                                  f"by torch.save never contains ({exc}); if you trust this file, pass "
                                  f"{TRUST_FLAG}") from None
        if unknown is not None:
            stand_ins = [n for n in unknown if n.startswith(STAND_IN_PREFIXES)]
            refused = [n for n in unknown if n not in stand_ins]
            if refused:
                raise _refusal(path, refused, what)
    for _ in range(64):  # legacy (non-zip) files: stand-ins are found one load attempt at a time
        with torch.serialization.safe_globals(allowed + [(stand_in(n), n) for n in stand_ins]):
            try:
                result = torch.load(path, map_location=map_location, weights_only=True,
                                    **({"mmap": True} if mmap and is_zip else {}))
            except pickle.UnpicklingError as exc:
                match = _UNSUPPORTED_GLOBAL.search(str(exc))
                if match is None:
                    first = str(exc).strip().splitlines()
                    detail = next((line for line in first if "GLOBAL" in line or "Unsupported" in line
                                   or "unrecognized" in line or "Can only" in line), first[0] if first else "")
                    raise UnsafeFileError(f"{path}: refused to load the {what}: {detail.strip()}; if you trust "
                                          f"this file, pass {TRUST_FLAG}") from None
                name = match.group(1)
                if name.startswith(STAND_IN_PREFIXES) and name not in stand_ins:
                    stand_ins.append(name)
                    continue
                raise _refusal(path, [name], what) from None
        if stand_ins:
            logger.info("%s: inert stand-ins replace %s (training-stack classes the weights do not need)", path,
                        ", ".join(sorted(stand_ins)))
        return result
    raise UnsafeFileError(f"{path}: refused to load the {what}: too many training-stack classes to stand in for")


# ------------------------------------------------------------------------------------------------------ records
class _RecordUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        # Python 2 names (TAPE's LMDBs may predate Python 3), mapped as the standard find_class maps them.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        found = RECORD_GLOBALS.get(full)
        if found is None:
            raise _RecordRefused(full)
        return found

    def persistent_load(self, pid):
        raise _RecordRefused(f"persistent id {pid!r}")


class _RecordRefused(Exception):
    pass


def load_record(raw: bytes, where: str) -> Any:
    """Unpickle one LMDB record (``where`` names the file and the record in errors) allowing only builtin values
    and NumPy arrays, dtypes and scalars."""
    try:
        return _RecordUnpickler(io.BytesIO(raw)).load()
    except _RecordRefused as exc:
        raise UnsafeFileError(f"{where}: refused to unpickle: the record references '{exc.args[0]}', and a record "
                              f"may hold only numbers, strings, lists, dicts and NumPy arrays (unpickling it could "
                              f"run code from the file)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, UnicodeDecodeError, OverflowError) as exc:
        raise UnsafeFileError(f"{where}: not a readable pickled record ({type(exc).__name__}: {exc})") from None

