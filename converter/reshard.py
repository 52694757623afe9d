#!/usr/bin/env python
"""Rewrite a Megatron protein BERT checkpoint for other tensor/pipeline-parallel degrees.

    python converter/reshard.py --src SAVE_TP8 --out SAVE_TP2 --tp 2 --pp 1

Model weights, args (new degrees, re-padded vocabulary), iteration and LR schedule are carried; optimizer moments
and RNG states are not (resume with the optimizer restarted). Logic: megatron_protein.conversion.reshard.
Errors print one line ``error: <file>: <what was expected>`` and exit with status 2 (docs/security.md).
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_protein.conversion.reshard import reshard  # noqa: E402
from megatron_protein.utils import errors  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", required=True, help="Megatron checkpoint (save, iter_*, mp_rank_* dir or file)")
    parser.add_argument("--out", required=True, help="output save directory")
    parser.add_argument("--tp", type=int, required=True, help="new tensor-model-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="new pipeline-model-parallel size (default 1)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="unpadded vocabulary size (default: args.vocab_size or the detected vocabulary)")
    parser.add_argument("--vocab", default="auto", help="auto, tape, proteinlm or a vocabulary file")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load --src with the full unpickler, which can run code from the file (only for old "
                             "checkpoints you trust that the safe loader refuses)")
    parser.add_argument("--allow-replicated-mismatch", action="store_true",
                        help="reshard although a tensor replicated across tensor-parallel ranks differs between "
                             "shards; tp rank 0's copy is used")
    args = errors.one_line_parse_errors(parser).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with errors.config_phase():
        written = reshard(args.src, args.out, args.tp, args.pp, vocab_size=args.vocab_size, vocab=args.vocab,
                          trust=args.trust_checkpoint, allow_replicated_mismatch=args.allow_replicated_mismatch)
    for (t, p), path in sorted(written.items()):
        print(f"tp {t} pp {p}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_cli(main))
