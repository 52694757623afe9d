"""What every conversion writes with: dtype parsing, all-or-nothing output directories, the tensor table."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, TextIO

import torch

from megatron_protein.utils import fs

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}


def parse_dtype(text: Optional[str]) -> Optional[torch.dtype]:
    """``torch.float16`` / ``float16`` / ``fp16`` / ``half`` / ``bfloat16`` / ... -> torch dtype (None -> None).

    The string is looked up in a table, never evaluated (ProteinLM's converter ran ``eval`` on it).
    """
    if text is None:
        return None
    name = text.strip().lower()
    name = name[len("torch."):] if name.startswith("torch.") else name
    if name not in _DTYPES:
        accepted = ", ".join(sorted({f"torch.{k}" for k in _DTYPES if k.startswith(("float", "bfloat"))}))
        raise ValueError(f"unknown destination dtype {text!r}; expected one of {accepted} (or fp16, bf16, fp32)")
    return _DTYPES[name]


def _fsync_tree(root: str) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            fs.fsync_file(os.path.join(directory, name))
        fs.fsync_dir(directory)


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_directory(out: str, overwrite_files: bool = True, remove_stale: bool = True) -> Iterator[str]:
    """Write into a temporary sibling of ``out`` and publish it only when the block finishes without error.

    If ``out`` does not exist the temporary directory is renamed to it (one atomic rename). If it exists (e.g.
    made by ``mkdir -p``), each new file is moved into it with :func:`os.replace`. On any error the temporary
    directory is removed, so a failed conversion leaves neither a partial ``out`` nor a stray temporary. Every file
    is fsynced before it is published and every directory after, so a power cut cannot publish half a file.
    The directory gets the mode a plain ``mkdir`` would (0777 less the umask), not ``mkdtemp``'s 0700.
    ``remove_stale`` removes the staging directories of earlier conversions into ``out`` that were killed (call it
    while holding ``out``'s lock, as the converters do).
    """
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{out}: exists and is not a directory")
    prefix = f".{os.path.basename(out)}.tmp-"
    if remove_stale:
        fs.remove_stale_temp_files(parent, [re.escape(prefix) + fs.MKSTEMP_RANDOM])
    staging = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it 0700; the published directory follows the umask
    try:
        yield staging
        _fsync_tree(staging)
        if not os.path.exists(out):
            fs.replace_durably(staging, out)
            return
        for root, _, files in os.walk(staging):
            rel = os.path.relpath(root, staging)
            target_dir = os.path.join(out, rel) if rel != "." else out
            os.makedirs(target_dir, exist_ok=True)
            for name in files:
                target = os.path.join(target_dir, name)
                if os.path.exists(target) and not overwrite_files:
                    raise FileExistsError(f"{target}: exists")
                os.replace(os.path.join(root, name), target)
            fs.fsync_dir(target_dir)
        shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@dataclass
class TableRow:
    target: str
    source: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    note: str = ""


def print_table(rows: Sequence[TableRow], title: str, file: TextIO = sys.stdout) -> None:
    """A fixed-width table: target key, shape, dtype, source key(s) and what was done to them."""
    width_t = max([len(r.target) for r in rows] + [6])
    width_s = max([len(str(tuple(r.shape))) for r in rows] + [5])
    print(title, file=file)
    print(f"{'target':<{width_t}}  {'shape':<{width_s}}  {'dtype':<8}  source", file=file)
    print("-" * (width_t + width_s + 40), file=file)
    total = 0
    for r in rows:
        dtype = str(r.dtype).replace("torch.", "")
        note = f"  [{r.note}]" if r.note else ""
        print(f"{r.target:<{width_t}}  {str(tuple(r.shape)):<{width_s}}  {dtype:<8}  {r.source}{note}", file=file)
        count = 1
        for d in r.shape:
            count *= d
        total += count
    print(f"{len(rows)} tensors, {total:,} values", file=file)
