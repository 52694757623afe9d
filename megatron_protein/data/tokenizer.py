"""Protein tokenizers: TAPE's IUPAC vocabulary (the default) and an optional SentencePiece sub-word model.

The IUPAC ids are exactly TAPE's (``tape/tokenizers.py``, the ``iupac`` vocabulary), so a model pretrained here is
read by TAPE code with no id remapping::

    <pad>=0 <mask>=1 <cls>=2 <sep>=3 <unk>=4 A=5 B=6 C=7 D=8 ... I=13 K=14 ... Z=29   (no J; 30 ids)

Input handling (shared by every reader, so FASTA, Stockholm and TAPE inputs give the same ids):

* lower case is upper-cased (Stockholm insert states are written in lower case);
* the alignment gap characters ``-`` and ``.`` are removed;
* anything else that is not one of the 25 letters above (``J``, ``*``, digits, ...) becomes ``<unk>`` and is
  counted, so the preprocess summary can report how many there were.

Encoding is a 256-entry byte lookup table applied with numpy, so it runs at memory speed on long inputs.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np

SPECIAL_TOKENS = ("<pad>", "<mask>", "<cls>", "<sep>", "<unk>")
IUPAC_LETTERS = "ABCDEFGHIKLMNOPQRSTUVWXYZ"  # TAPE's iupac order: A..Z without J
IUPAC_VOCAB = SPECIAL_TOKENS + tuple(IUPAC_LETTERS)
GAP_CHARACTERS = "-."
STANDARD_AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"

_GAP = -1  # lookup-table marker for characters that are dropped


def _build_lookup(unk_id: int) -> np.ndarray:
    table = np.full(256, unk_id, dtype=np.int16)
    for token_id, letter in enumerate(IUPAC_LETTERS, start=len(SPECIAL_TOKENS)):
        table[ord(letter)] = token_id
        table[ord(letter.lower())] = token_id
    for gap in GAP_CHARACTERS:
        table[ord(gap)] = _GAP
    return table


class IUPACTokenizer:
    """TAPE's IUPAC tokenizer: one id per residue letter, plus the five special tokens.

    ``encode`` returns residue ids only (no ``<cls>``/``<sep>``): the MLM dataset adds the specials when it builds a
    sample, and the indexed dataset stores bare sequences, as Megatron's preprocess does for text.
    """

    pad_token, mask_token, cls_token, sep_token, unk_token = SPECIAL_TOKENS
    pad_id, mask_id, cls_id, sep_id, unk_id = range(5)
    vocab: tuple[str, ...] = IUPAC_VOCAB
    vocab_size: int = len(IUPAC_VOCAB)

    def __init__(self) -> None:
        self.token_to_id = {token: i for i, token in enumerate(self.vocab)}
        self._lookup = _build_lookup(self.unk_id)
        self._id_to_char = np.array([t if len(t) == 1 else "?" for t in self.vocab])
        #: ids of the residue letters (5..29): the candidates for the 10% "random token" replacement in MLM.
        self.residue_ids = np.arange(len(SPECIAL_TOKENS), self.vocab_size)
        #: ids of the 20 standard amino acids.
        self.standard_residue_ids = np.array([self.token_to_id[a] for a in STANDARD_AMINO_ACIDS])

    # ----------------------------------------------------------------------------------------------- encode
    def encode_array(self, sequence: str | bytes) -> tuple[np.ndarray, int]:
        """Return (ids as int16 array, number of characters mapped to ``<unk>``); gaps are removed."""
        raw = sequence.encode("latin-1", errors="replace") if isinstance(sequence, str) else sequence
        ids = self._lookup[np.frombuffer(raw, dtype=np.uint8)]
        if ids.size and ids.min() < 0:
            ids = ids[ids != _GAP]
        return ids, int(np.count_nonzero(ids == self.unk_id))

    def encode_batch(self, sequences: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Encode many sequences in one vectorised pass.

        Returns (ids of all sequences concatenated, int16; residues per sequence, int64; unknowns per sequence).
        """
        raw_lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        ids = self._lookup[np.frombuffer("".join(sequences).encode("latin-1", errors="replace"), dtype=np.uint8)]
        owner = np.repeat(np.arange(len(sequences)), raw_lengths)
        if ids.size and ids.min() < 0:
            kept = ids != _GAP
            ids, owner = ids[kept], owner[kept]
        lengths = np.bincount(owner, minlength=len(sequences))
        unknown = np.bincount(owner[ids == self.unk_id], minlength=len(sequences))
        return ids, lengths, unknown

    def encode(self, sequence: str) -> list[int]:
        """Residue string -> list of ids, without special tokens (see the module docstring for the rules)."""
        return self.encode_array(sequence)[0].tolist()

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> string. Residues are single letters; specials are written as ``<cls>`` etc. unless skipped."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the IUPAC vocabulary (0..{self.vocab_size - 1})")
            if i < len(SPECIAL_TOKENS):
                if not skip_special_tokens:
                    out.append(self.vocab[i])
            else:
                out.append(self.vocab[i])
        return "".join(out)

    def tokenize(self, sequence: str) -> list[str]:
        return [self.vocab[i] for i in self.encode(sequence)]

    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int]:
        try:
            return [self.token_to_id[t] for t in tokens]
        except KeyError as err:
            raise KeyError(f"token {err.args[0]!r} is not in the IUPAC vocabulary") from None

    # ------------------------------------------------------------------------------------------- vocab file
    def save_vocabulary(self, path: str) -> str:
        """Write the vocabulary, one token per line, line number = id (TAPE/BERT vocab.txt layout)."""
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write("\n".join(self.vocab) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def from_vocab_file(cls, path: str) -> "IUPACTokenizer":
        """Read a vocab file and check that it is TAPE's IUPAC vocabulary (ids are a shared contract)."""
        with open(path) as f:
            tokens = [line.rstrip("\n") for line in f if line.strip()]
        for line_no, (got, want) in enumerate(zip(tokens, IUPAC_VOCAB), start=1):
            if got != want:
                raise ValueError(f"{path}:{line_no}: expected token {want!r} (TAPE IUPAC id {line_no - 1}), "
                                 f"found {got!r}")
        if len(tokens) != len(IUPAC_VOCAB):
            raise ValueError(f"{path}: expected {len(IUPAC_VOCAB)} tokens (TAPE IUPAC), found {len(tokens)}")
        return cls()


class SentencePieceTokenizer:
    """Sub-word units from a SentencePiece model trained by ``python -m megatron_protein.data.train_sentencepiece``.

    The model is trained with the same special ids as the IUPAC vocabulary (``<pad>``=0, ``<mask>``=1, ``<cls>``=2,
    ``<sep>``=3, ``<unk>``=4), so the MLM dataset and the models treat both tokenizers alike. Sequences are
    normalised like IUPAC input (upper case, gaps removed) before they reach SentencePiece.
    """

    pad_id, mask_id, cls_id, sep_id, unk_id = range(5)

    def __init__(self, model_file: str) -> None:
        import sentencepiece as spm

        if not os.path.isfile(model_file):
            raise FileNotFoundError(f"SentencePiece model {model_file!r} does not exist; train one with "
                                    "`python -m megatron_protein.data.train_sentencepiece`")
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        expected = dict(zip(SPECIAL_TOKENS, range(5)))
        for token, want in expected.items():
            got = self.sp.piece_to_id(token)
            if got != want:
                raise ValueError(f"{model_file}: special token {token} has id {got}, expected {want}; "
                                 "train the model with megatron_protein.data.train_sentencepiece")
        self.vocab_size = self.sp.get_piece_size()
        # Candidates for MLM's random replacement: every ordinary piece.
        self.residue_ids = np.arange(5, self.vocab_size)
        self.standard_residue_ids = self.residue_ids

    @staticmethod
    def normalise(sequence: str) -> str:
        return sequence.upper().replace("-", "").replace(".", "")

    def encode_array(self, sequence: str) -> tuple[np.ndarray, int]:
        ids = np.asarray(self.sp.encode(self.normalise(sequence)), dtype=np.int32)
        return ids, int(np.count_nonzero(ids == self.unk_id))

    def encode(self, sequence: str) -> list[int]:
        return self.encode_array(sequence)[0].tolist()

    def encode_batch(self, sequences: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Same contract as :meth:`IUPACTokenizer.encode_batch`."""
        encoded = self.sp.encode([self.normalise(s) for s in sequences])
        lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        ids = np.fromiter((i for e in encoded for i in e), dtype=np.int32, count=int(lengths.sum()))
        owner = np.repeat(np.arange(len(sequences)), lengths)
        return ids, lengths, np.bincount(owner[ids == self.unk_id], minlength=len(sequences))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i >= 5]
        return self.sp.decode(ids)


def build_tokenizer(tokenizer_type: str = "iupac", model_file: str | None = None):
    """Tokenizer by name: ``iupac`` (TAPE ids, default) or ``sentencepiece`` (needs ``model_file``)."""
    if tokenizer_type == "iupac":
        return IUPACTokenizer()
    if tokenizer_type == "sentencepiece":
        if model_file is None:
            raise ValueError("--tokenizer-type sentencepiece needs --tokenizer-model PATH.model")
        return SentencePieceTokenizer(model_file)
    raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; expected 'iupac' or 'sentencepiece'")
