"""A cache of preprocessed data keyed on what the data is made from, complete or absent.

    python -m megatron_protein.data.cache --input Pfam-A.fasta --cache-dir runs/x/data --split-by-family 0.9,0.05,0.05

prints the indexed-dataset prefix to give ``--data-path`` (the last line of its output), preprocessing first if the
cache does not hold it yet. ``scripts/pretrain_pfam.sh`` uses it.

The key is a hash of the input's real path, size and modification time (of every file inside, for an LMDB
directory), the split fractions (families and in-family held-out sequences), the seed and the tokenizer (and its
model file's identity): another input, a
changed input, or another split gets another directory, ``CACHE_DIR/<input name>-<key>/``. A directory is used only
when its completion stamp ``COMPLETE`` (written last, after every output and the summary, and fsynced) records the
same key, so a preprocessing that was killed half-way (say, with only ``_train`` written) is run again, not
mistaken for data. Concurrent preparations of one key are serialised by preprocess's lock on the prefix; on a
cluster, node 0 prepares and the other nodes pass ``--wait-seconds`` to wait for the stamp instead.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from typing import Optional

from megatron_protein.utils import errors, fs

logger = logging.getLogger(__name__)

STAMP = "COMPLETE"
#: Bumped when the preprocessing output changes for the same inputs (older cache entries are then not used).
FORMAT_VERSION = 1


def _identity(path: str) -> dict:
    """Real path, size and mtime of a file, or of every file of a directory (an LMDB environment)."""
    real = os.path.realpath(path)
    if os.path.isdir(real):
        files = []
        for root, _, names in sorted(os.walk(real)):
            for name in sorted(names):
                if name == "lock.mdb":
                    continue  # LMDB's reader table changes when the data is read, not when it changes
                st = os.stat(os.path.join(root, name))
                files.append([os.path.relpath(os.path.join(root, name), real), st.st_size, st.st_mtime_ns])
        return {"path": real, "files": files}
    st = os.stat(real)
    return {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _holdout(holdout: Optional[str]) -> Optional[str]:
    """``--holdout-sequences`` normalised: None when absent or all zero."""
    if not holdout:
        return None
    from megatron_protein.data.preprocess import parse_holdout

    values = parse_holdout(holdout)
    return ",".join(f"{v:g}" for v in values) if sum(values) > 0 else None


def cache_key(input_path: str, split: Optional[str], seed: int, tokenizer_type: str,
              tokenizer_model: Optional[str] = None, holdout: Optional[str] = None) -> tuple[str, dict]:
    """(hex key, the description it hashes) of the preprocessed data made from these inputs."""
    if not os.path.exists(input_path):
        raise FileNotFoundError(2, "no such file or directory (the INPUT to preprocess)", input_path)
    description = {"format_version": FORMAT_VERSION, "input": _identity(input_path), "split_by_family": split,
                   "seed": seed, "tokenizer_type": tokenizer_type,
                   "tokenizer_model": _identity(tokenizer_model) if tokenizer_model else None}
    if _holdout(holdout):
        description["holdout_sequences"] = _holdout(holdout)
    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
    return digest, description


def input_stem(input_path: str) -> str:
    """The input's name without directories and extensions (``/data/Pfam-A.fasta.gz`` -> ``Pfam-A``)."""
    name = os.path.basename(os.path.realpath(input_path).rstrip(os.sep))
    return name.split(".")[0] or "data"


def cache_prefix(cache_dir: str, input_path: str, key: str) -> str:
    stem = input_stem(input_path)
    return os.path.join(cache_dir, f"{stem}-{key}", stem)


def is_complete(prefix: str, key: str) -> bool:
    stamp = os.path.join(os.path.dirname(prefix), STAMP)
    try:
        with open(stamp) as f:
            return json.load(f).get("key") == key
    except (OSError, ValueError, AttributeError):
        return False


def prepare(input_path: str, cache_dir: str, split: Optional[str] = "0.9,0.05,0.05", seed: int = 1234,
            tokenizer_type: str = "iupac", tokenizer_model: Optional[str] = None, workers: int = 1,
            wait_seconds: float = 0.0, progress: bool = True, holdout: Optional[str] = None) -> str:
    """The prefix of the preprocessed data of these inputs; preprocessed now unless the cache holds it complete
    (with ``wait_seconds`` > 0: wait that long for another process to complete it instead)."""
    from megatron_protein.data.preprocess import format_summary, parse_fractions, parse_holdout, preprocess

    key, description = cache_key(input_path, split, seed, tokenizer_type, tokenizer_model, holdout)
    prefix = cache_prefix(cache_dir, input_path, key)
    if is_complete(prefix, key):
        logger.info("using the preprocessed data in %s (key %s)", os.path.dirname(prefix), key)
        return prefix
    if wait_seconds > 0:
        deadline = time.monotonic() + wait_seconds
        while time.monotonic() < deadline:
            if is_complete(prefix, key):
                return prefix
            time.sleep(max(0.0, min(2.0, deadline - time.monotonic())))
        raise errors.ConfigError(f"{os.path.join(os.path.dirname(prefix), STAMP)}: the preprocessed data of "
                                 f"{input_path} did not appear within {wait_seconds:g} s (node 0 prepares it)")
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    stamp = os.path.join(os.path.dirname(prefix), STAMP)
    if os.path.exists(stamp):
        os.remove(stamp)  # another key's stamp (cannot happen by construction) or an unreadable one
    logger.info("preprocessing %s -> %s (key %s)", input_path, prefix, key)
    holdout = _holdout(holdout)
    summary = preprocess([input_path], prefix,
                         split_by_family=parse_fractions(split, "--split-by-family") if split else None,
                         holdout_sequences=parse_holdout(holdout) if holdout else None, seed=seed,
                         workers=workers, tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model,
                         progress=progress)
    logger.info("%s", format_summary(summary))
    fs.write_text_durably(stamp, json.dumps({"key": key, **description}, indent=1) + "\n")
    return prefix


def main(argv=None) -> int:
    p = errors.one_line_parse_errors(argparse.ArgumentParser(
        prog="python -m megatron_protein.data.cache", description=__doc__.split("\n\n")[0]))
    p.add_argument("--input", required=True)
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--split-by-family", default="0.9,0.05,0.05")
    p.add_argument("--holdout-sequences", default=None, metavar="VALID,TEST",
                   help="in-family held-out sequences (preprocess's flag); 0,0 or absent: none")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tokenizer-type", default="iupac")
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--wait-seconds", type=float, default=0.0,
                   help="wait for another process (node 0) to complete the data instead of preprocessing")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    prefix = prepare(args.input, args.cache_dir, args.split_by_family or None, args.seed, args.tokenizer_type,
                     args.tokenizer_model, args.workers, args.wait_seconds, progress=not args.no_progress,
                     holdout=args.holdout_sequences)
    print(prefix)
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_cli(main))
