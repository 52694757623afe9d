"""Tokenizer: TAPE's IUPAC ids, normalisation rules, vocab file, and the SentencePiece option."""
import numpy as np
import pytest

from megatron_protein.data.tokenizer import IUPACTokenizer, SentencePieceTokenizer, build_tokenizer

# TAPE's iupac vocabulary (tape/tokenizers.py), written out independently of the implementation.
TAPE_IUPAC = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<sep>": 3, "<unk>": 4, "A": 5, "B": 6, "C": 7, "D": 8, "E": 9,
              "F": 10, "G": 11, "H": 12, "I": 13, "K": 14, "L": 15, "M": 16, "N": 17, "O": 18, "P": 19, "Q": 20,
              "R": 21, "S": 22, "T": 23, "U": 24, "V": 25, "W": 26, "X": 27, "Y": 28, "Z": 29}


def test_ids_are_tapes():
    tok = IUPACTokenizer()
    assert tok.vocab_size == 30
    assert {t: i for i, t in enumerate(tok.vocab)} == TAPE_IUPAC
    assert (tok.pad_id, tok.mask_id, tok.cls_id, tok.sep_id, tok.unk_id) == (0, 1, 2, 3, 4)
    letters = "ABCDEFGHIKLMNOPQRSTUVWXYZ"
    assert tok.encode(letters) == [TAPE_IUPAC[a] for a in letters]


def test_round_trip_and_normalisation():
    tok = IUPACTokenizer()
    sequence = ("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGE"
                "GLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDL"
                "DAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWUOBZX")
    ids = tok.encode(sequence)
    assert tok.decode(ids) == sequence
    # lower case (Stockholm inserts) is upper-cased; '-' and '.' gaps are removed
    assert tok.encode("ac-d.e") == tok.encode("ACDE")
    # J, '*', digits and other symbols are <unk> and counted
    ids, unknown = tok.encode_array("AJ*1C#")
    assert ids.tolist() == [5, 4, 4, 4, 7, 4] and unknown == 4
    assert tok.decode([2, 5, 3, 0]) == "<cls>A<sep><pad>"
    assert tok.decode([2, 5, 3, 0], skip_special_tokens=True) == "A"
    with pytest.raises(ValueError, match="outside the IUPAC vocabulary"):
        tok.decode([30])


def test_vocab_file(tmp_path):
    tok = IUPACTokenizer()
    path = tok.save_vocabulary(str(tmp_path / "vocab.txt"))
    assert open(path).read().split("\n")[:6] == ["<pad>", "<mask>", "<cls>", "<sep>", "<unk>", "A"]
    assert IUPACTokenizer.from_vocab_file(path).vocab == tok.vocab
    lines = open(path).read().split("\n")
    lines[7], lines[8] = lines[8], lines[7]
    (tmp_path / "bad.txt").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"bad.txt:8: expected token 'C'"):
        IUPACTokenizer.from_vocab_file(str(tmp_path / "bad.txt"))


def test_sentencepiece_option(tmp_path):
    from megatron_protein.data.train_sentencepiece import train_sentencepiece

    fasta = tmp_path / "seqs.fasta"
    rng = np.random.default_rng(0)
    motifs = ["MKVLA", "GGSGG", "HHHHH", "PEPTIDE", "WYWY"]
    with open(fasta, "w") as f:
        for i in range(300):
            parts = [motifs[j] if rng.random() < 0.5 else "ACDEFGHIKLMNPQRSTVWY"[j] for j in rng.integers(0, 5, 12)]
            f.write(f">s{i}\n{''.join(parts)}\n")
    model = train_sentencepiece([str(fasta)], str(tmp_path / "sp"), vocab_size=60)
    tok = build_tokenizer("sentencepiece", model)
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 60
    assert [tok.sp.id_to_piece(i) for i in range(5)] == ["<pad>", "<mask>", "<cls>", "<sep>", "<unk>"]
    ids = tok.encode("mkvla-GGSGG.hhhhh")
    assert min(ids) >= 5 and tok.decode(ids) == "MKVLAGGSGGHHHHH"
    assert len(ids) < len("MKVLAGGSGGHHHHH")  # sub-word units: fewer tokens than residues
    with pytest.raises(ValueError, match="needs --tokenizer-model"):
        build_tokenizer("sentencepiece")
