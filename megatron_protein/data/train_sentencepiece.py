"""Train a SentencePiece model on protein sequences, for ``preprocess --tokenizer-type sentencepiece``.

    python -m megatron_protein.data.train_sentencepiece --input data/pfam/pfam_sample.fasta \\
        --model-prefix /tmp/pfam_sp --vocab-size 1000 [--model-type unigram|bpe]

Sequences stream from any reader of ``preprocess`` (FASTA, Stockholm, TAPE LMDB/JSON), normalised like the IUPAC
tokenizer (upper case, gaps removed), and feed SentencePiece's trainer through an iterator. The special tokens get
the IUPAC ids (``<pad>``=0, ``<mask>``=1, ``<cls>``=2, ``<sep>``=3, ``<unk>``=4), so MLM masking and the models treat
both tokenizers alike. Writes ``PREFIX.model`` and ``PREFIX.vocab`` (renamed into place when complete).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile

from .readers import FORMATS, read_records
from .tokenizer import SentencePieceTokenizer

logger = logging.getLogger(__name__)


def train_sentencepiece(inputs: list[str], model_prefix: str, vocab_size: int = 1000, model_type: str = "unigram",
                        input_format: str | None = None, max_sentences: int = 1_000_000,
                        max_sentence_length: int = 8192, seed: int = 1234) -> str:
    """Train and return the path of ``model_prefix.model``."""
    import sentencepiece as spm

    def sentences():
        count = 0
        for path in inputs:
            for record in read_records(path, input_format):
                sequence = SentencePieceTokenizer.normalise(record.sequence)
                if sequence:
                    yield sequence
                    count += 1
                    if count >= max_sentences:
                        return

    directory = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(directory, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".spm.", dir=directory)
    tmp_prefix = os.path.join(tmp_dir, "model")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_prefix=tmp_prefix, vocab_size=vocab_size, model_type=model_type,
            character_coverage=1.0, max_sentence_length=max_sentence_length, split_by_whitespace=False,
            pad_id=0, pad_piece="<pad>", bos_id=2, bos_piece="<cls>", eos_id=3, eos_piece="<sep>", unk_id=4,
            unk_piece="<unk>", control_symbols=["<mask>"], minloglevel=2,
            add_dummy_prefix=False)
        for suffix in (".vocab", ".model"):  # .model last: its presence means the pair is complete
            os.replace(tmp_prefix + suffix, model_prefix + suffix)
    finally:
        for name in os.listdir(tmp_dir):
            os.unlink(os.path.join(tmp_dir, name))
        os.rmdir(tmp_dir)
    SentencePieceTokenizer(model_prefix + ".model")  # checks the special ids
    return model_prefix + ".model"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_protein.data.train_sentencepiece", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+")
    p.add_argument("--input-format", choices=FORMATS, default=None)
    p.add_argument("--model-prefix", required=True)
    p.add_argument("--vocab-size", type=int, default=1000)
    p.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    p.add_argument("--max-sentences", type=int, default=1_000_000, help="train on at most this many sequences")
    p.add_argument("--seed", type=int, default=1234)
    from megatron_protein.utils import errors

    args = errors.one_line_parse_errors(p).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    path = train_sentencepiece(args.input, args.model_prefix, args.vocab_size, args.model_type, args.input_format,
                               args.max_sentences, seed=args.seed)
    print(f"wrote {path} ({args.vocab_size} pieces)")
    return 0


if __name__ == "__main__":
    from megatron_protein.utils.errors import run_cli

    sys.exit(run_cli(main))
