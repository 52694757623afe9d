"""Source vocabularies of Megatron protein BERT checkpoints, and their rows in TAPE's id order.

Two vocabularies occur:

* ``tape``: TAPE's IUPAC ids, the project's convention (``<pad>`` 0 ... ``<unk>`` 4, ``A`` 5 ... ``Z`` 29). Rows
  past 30 are Megatron's vocabulary padding (``make-vocab-size-divisible-by`` x tp) and are dropped.
* ``proteinlm``: the 31 tokens of ProteinLM's ``protein_tools/iupac_vocab.txt`` (Xiao et al. 2021,
  arXiv:2108.07435): ``[PAD] [MASK] [CLS] [SEP] [UNK] [unused1] A B ... Z``. ``[unused1]`` (id 5) is never
  produced by its tokenizer and is dropped; every letter moves down by one to TAPE's id.

Rows are matched by token name, never by position, so a vocabulary file given explicitly (``--vocab FILE``, one
token per line as in Megatron/ProteinLM) works the same way.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import torch

from megatron_protein.data.tokenizer import IUPAC_VOCAB
from megatron_protein.utils.errors import UserError

TAPE_VOCAB: tuple[str, ...] = tuple(IUPAC_VOCAB)
PROTEINLM_VOCAB: tuple[str, ...] = ("[PAD]", "[MASK]", "[CLS]", "[SEP]", "[UNK]", "[unused1]") + tuple(
    "ABCDEFGHIKLMNOPQRSTUVWXYZ")
#: BERT-style special-token spellings and their TAPE names.
_SPECIAL_ALIASES = {"[PAD]": "<pad>", "[MASK]": "<mask>", "[CLS]": "<cls>", "[SEP]": "<sep>", "[UNK]": "<unk>"}
KNOWN_VOCABS = {"tape": TAPE_VOCAB, "proteinlm": PROTEINLM_VOCAB}


class VocabularyError(UserError, ValueError):
    """The source vocabulary cannot be mapped onto TAPE's."""


def read_vocab_file(path: str) -> tuple[str, ...]:
    """One token per line (blank lines are errors, as they would shift every id after them)."""
    tokens = []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            token = line.rstrip("\n").strip()
            if not token:
                raise VocabularyError(f"{path}: line {lineno}: empty line in a vocabulary file (one token per line "
                                      f"expected; an empty line would shift every later id)")
            tokens.append(token.split()[0])
    return tuple(tokens)


def resolve_source_vocab(choice: str, args: Optional[argparse.Namespace]) -> tuple[str, tuple[str, ...]]:
    """``(name, tokens)`` of the checkpoint's vocabulary.

    ``choice`` is ``tape``, ``proteinlm``, a path to a vocabulary file, or ``auto``: the checkpoint's
    ``args.vocab_file`` when that file exists here; ProteinLM's vocabulary when ``args.vocab_file`` is named
    ``iupac_vocab.txt`` (ProteinLM's file) or ``args.vocab_size`` is 31; TAPE's otherwise.
    """
    if choice in KNOWN_VOCABS:
        return choice, KNOWN_VOCABS[choice]
    if choice != "auto":
        if not os.path.isfile(choice):
            raise VocabularyError(f"--vocab {choice!r}: expected 'auto', 'tape', 'proteinlm' or a vocabulary file")
        return choice, read_vocab_file(choice)
    vocab_file = getattr(args, "vocab_file", None) if args is not None else None
    if vocab_file and os.path.isfile(vocab_file):
        return vocab_file, read_vocab_file(vocab_file)
    if vocab_file and os.path.basename(vocab_file) == "iupac_vocab.txt":
        return "proteinlm", PROTEINLM_VOCAB
    if args is not None and getattr(args, "vocab_size", None) == len(PROTEINLM_VOCAB):
        return "proteinlm", PROTEINLM_VOCAB
    return "tape", TAPE_VOCAB


def tape_rows(source_tokens: Sequence[str], padded_vocab_size: int, source_name: str = "source") -> torch.Tensor:
    """Index ``r`` such that ``source_matrix[r]`` is in TAPE's id order (length 30).

    Raises :class:`VocabularyError` naming the TAPE tokens the source vocabulary lacks, or when the source
    vocabulary is longer than the checkpoint's (padded) embedding.
    """
    if len(source_tokens) > padded_vocab_size:
        raise VocabularyError(f"the {source_name} vocabulary has {len(source_tokens)} tokens but the checkpoint's "
                              f"word embedding has only {padded_vocab_size} rows; wrong --vocab?")
    position = {}
    for index, token in enumerate(source_tokens):
        position.setdefault(_SPECIAL_ALIASES.get(token, token), index)
    missing = [token for token in TAPE_VOCAB if token not in position]
    if missing:
        raise VocabularyError(f"the {source_name} vocabulary lacks TAPE token(s) {missing}")
    return torch.tensor([position[token] for token in TAPE_VOCAB], dtype=torch.long)


def dropped_rows(source_tokens: Sequence[str], rows: torch.Tensor, padded_vocab_size: int) -> list[str]:
    """Human-readable list of what the row selection drops (for the conversion table)."""
    kept = set(rows.tolist())
    dropped = [f"{source_tokens[i]}@{i}" for i in range(len(source_tokens)) if i not in kept]
    padding = padded_vocab_size - len(source_tokens)
    if padding:
        dropped.append(f"{padding} padding row(s)")
    return dropped
