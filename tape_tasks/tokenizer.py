"""TAPE's ``iupac`` tokenizer: one token per amino-acid letter, <cls> first and <sep> last.

The ids are TAPE's (``tape/tokenizers.py``) and the project's shared convention, so a converted model needs no
remapping: <pad>=0, <mask>=1, <cls>=2, <sep>=3, <unk>=4, then the 25 IUPAC letters A..Z without J (A=5 ... Z=29).

Unlike TAPE, a letter outside the vocabulary (J, a digit, a gap '-', lower case) raises :class:`TokenizationError`
naming the letter, its position and the record, instead of a bare ``KeyError``; ``X`` is the letter for an unknown
residue.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from megatron_protein.utils.errors import UserError

_SPECIALS = ["<pad>", "<mask>", "<cls>", "<sep>", "<unk>"]
_LETTERS = "ABCDEFGHIKLMNOPQRSTUVWXYZ"  # 25 IUPAC letters, no J
IUPAC_VOCAB: dict[str, int] = {tok: i for i, tok in enumerate(_SPECIALS + list(_LETTERS))}


class TokenizationError(UserError, ValueError):
    """A sequence holds a letter the vocabulary does not have."""


class TAPETokenizer:
    """``encode(sequence)`` -> int64 array ``[<cls>, residues..., <sep>]``; ``decode`` reverses it."""

    def __init__(self, vocab: str = "iupac"):
        if vocab != "iupac":
            raise ValueError(f"unknown tokenizer vocabulary {vocab!r}; this project uses TAPE's 'iupac' ids")
        self.vocab = dict(IUPAC_VOCAB)
        self.tokens = {i: t for t, i in self.vocab.items()}
        self._lookup = np.full(128, -1, dtype=np.int64)
        for letter in _LETTERS:
            self._lookup[ord(letter)] = self.vocab[letter]

    vocab_size = len(IUPAC_VOCAB)
    pad_id = IUPAC_VOCAB["<pad>"]
    mask_id = IUPAC_VOCAB["<mask>"]
    cls_id = IUPAC_VOCAB["<cls>"]
    sep_id = IUPAC_VOCAB["<sep>"]
    unk_id = IUPAC_VOCAB["<unk>"]

    @property
    def start_token(self) -> str:
        return "<cls>"

    @property
    def stop_token(self) -> str:
        return "<sep>"

    def residue_ids(self, sequence: str, record: Optional[str] = None) -> np.ndarray:
        """Ids of the letters of ``sequence`` (no specials); raise naming the first bad letter and ``record``."""
        codes = np.frombuffer(sequence.encode("ascii", errors="replace"), dtype=np.uint8)
        ids = self._lookup[np.minimum(codes, 127)]
        bad = np.flatnonzero(ids < 0)
        if bad.size:
            letters = sorted({sequence[i] for i in bad})
            where = f"record {record}: " if record is not None else ""
            raise TokenizationError(
                f"{where}sequence has {bad.size} letter(s) outside the IUPAC vocabulary, first {sequence[bad[0]]!r} "
                f"at position {bad[0]} (all: {letters}); allowed: {_LETTERS} (X for unknown residues)")
        return ids

    def encode(self, sequence: str, record: Optional[str] = None) -> np.ndarray:
        ids = self.residue_ids(sequence, record)
        return np.concatenate([[self.cls_id], ids, [self.sep_id]]).astype(np.int64)

    def tokenize(self, sequence: str) -> list[str]:
        return list(sequence)

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        return [self.vocab[t] if t in self.vocab else self.unk_id for t in tokens]

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self.tokens[int(i)] for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """Letters of ``ids``, specials dropped."""
        return "".join(self.tokens[int(i)] for i in ids if int(i) >= len(_SPECIALS))
