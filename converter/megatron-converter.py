#!/usr/bin/env python
"""Convert a Megatron protein BERT checkpoint (TP/PP-sharded or not) into a TAPE model directory.

    python converter/megatron-converter.py --src models/mega --out models/out [--dst models/untrained_tape]
        [--dtp torch.float16] [--hidden 1024 --heads 16 --layers 16] [--vocab auto|tape|proteinlm|FILE]
        [--format tape,hf-esm]

The arguments are those of ProteinLM's converter (``-src -dst -out -dtp -hidden -heads -layers`` also work), but
``--src`` may be a save directory, an ``iter_*`` directory or one ``model_optim_rng.pt``, every partition is
merged on the fly, and ``--hidden/--heads/--layers`` are checked against the checkpoint instead of trusted.
The logic is in :mod:`megatron_protein.conversion.to_tape`; see docs/converter.md. Errors print one line
``error: <file>: <what was expected>`` and exit with status 2 (docs/security.md).
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_protein.conversion.to_tape import convert, loading_note  # noqa: E402
from megatron_protein.utils import errors  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", "-src", required=True,
                        help="Megatron checkpoint: save directory, iter_* directory, mp_rank_* directory or one "
                             "model_optim_rng.pt")
    parser.add_argument("--out", "-out", required=True, help="output TAPE model directory")
    parser.add_argument("--dst", "-dst", default=None,
                        help="TAPE model directory (or its pytorch_model.bin) to take config.json fields and any "
                             "tensor the checkpoint lacks from")
    parser.add_argument("--dtp", "-dtp", "--dtype", dest="dtype", default=None,
                        help="destination dtype: torch.float32 (default: the checkpoint's), torch.float16, "
                             "torch.bfloat16, ...")
    parser.add_argument("--hidden", "-hidden", "--hidden_dim", dest="hidden", type=int, default=None,
                        help="hidden size; checked against the checkpoint, taken from it when left out")
    parser.add_argument("--heads", "-heads", "--num_heads", dest="heads", type=int, default=None,
                        help="attention heads; checked against the checkpoint, taken from it when left out")
    parser.add_argument("--layers", "-layers", "--num_layers", dest="layers", type=int, default=None,
                        help="layers; checked against the checkpoint, taken from it when left out")
    parser.add_argument("--vocab", default="auto",
                        help="source vocabulary: auto (default), tape (TAPE ids, ours), proteinlm (31 tokens with "
                             "[unused1]), or a vocabulary file with one token per line")
    parser.add_argument("--format", default="tape",
                        help="comma-separated outputs: tape (always written), hf-esm (also OUT/hf-esm, a Hugging "
                             "Face EsmForMaskedLM directory)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip loading the written models back and comparing their outputs with the Megatron "
                             "model's on a probe batch (done before the directory is published)")
    parser.add_argument("--quiet", action="store_true", help="do not print the table of converted tensors")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load --src with the full unpickler, which can run code from the file (only for old "
                             "checkpoints you trust that the safe loader refuses)")
    parser.add_argument("--allow-replicated-mismatch", action="store_true",
                        help="convert although a tensor replicated across tensor-parallel ranks (or the tied head "
                             "embedding) differs between shards; tp rank 0's copy is used")
    return errors.one_line_parse_errors(parser)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    if "tape" not in formats:
        formats.insert(0, "tape")
    with errors.config_phase():  # a bad --dtp, --format, --vocab
        convert(args.src, args.out, dst=args.dst, dtype=args.dtype, hidden=args.hidden, heads=args.heads,
                layers=args.layers, vocab=args.vocab, formats=formats,
                table_file=None if args.quiet else sys.stdout, verify=not args.no_verify,
                trust=args.trust_checkpoint, allow_replicated_mismatch=args.allow_replicated_mismatch)
    print(f"wrote {os.path.abspath(args.out)}" + (" (+ hf-esm)" if "hf-esm" in formats else ""))
    print(loading_note(os.path.abspath(args.out), formats))
    return 0


if __name__ == "__main__":
    sys.exit(errors.run_cli(main))
