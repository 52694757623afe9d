"""Small real inputs shared by the pretraining, converter and TAPE end-to-end tests.

Everything comes from the embedded Pfam sample (data/pfam/pfam_sample.fasta) through the project's own FASTA
reader and tokenizer, so these tests exercise the same path as the main job.
"""
from __future__ import annotations

import itertools
import os

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE_FASTA = os.path.join(REPO, "data", "pfam", "pfam_sample.fasta")


def sample_sequences(limit: int) -> list[str]:
    """The first ``limit`` domain sequences of the embedded Pfam sample."""
    from megatron_protein.data.readers import read_fasta
    return [record.sequence for record in itertools.islice(read_fasta(SAMPLE_FASTA), limit)]


def write_pretraining_data(directory: str, train: int = 100, valid: int = 20, valid_infamily: int = 0) -> str:
    """PREFIX_{train,valid}.{bin,idx} (and PREFIX_valid_infamily when ``valid_infamily`` > 0): the first ``train`` +
    ``valid`` (+ ``valid_infamily``) sample domains as TAPE ids, in that order; returns PREFIX."""
    from megatron_protein.data.indexed_dataset import make_dataset
    from megatron_protein.data.tokenizer import IUPACTokenizer
    tokenizer = IUPACTokenizer()
    encoded = [tokenizer.encode(s) for s in sample_sequences(train + valid + valid_infamily)]
    prefix = os.path.join(directory, "pfam")
    make_dataset(prefix + "_train", encoded[:train])
    make_dataset(prefix + "_valid", encoded[train:train + valid])
    if valid_infamily:
        make_dataset(prefix + "_valid_infamily", encoded[train + valid:])
    return prefix


def probe_batch(seq_length: int, residues_per_row: tuple[int, ...], skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample domains (after the first ``skip``) as ``<cls> residues <sep> <pad>...``, one row per entry of
    ``residues_per_row`` (cropped to that many residues, so rows differ in length and padding is exercised).

    Returns ``tokens [rows, seq_length]`` and ``padding_mask [rows, seq_length]`` (True at real tokens).
    """
    from megatron_protein.data.tokenizer import IUPACTokenizer
    tokenizer = IUPACTokenizer()
    rows = len(residues_per_row)
    sequences = sample_sequences(skip + rows)[skip:]
    tokens = torch.zeros(rows, seq_length, dtype=torch.long)
    padding_mask = torch.zeros(rows, seq_length, dtype=torch.bool)
    for row, (sequence, length) in enumerate(zip(sequences, residues_per_row)):
        ids = [tokenizer.cls_id] + list(tokenizer.encode(sequence))[:length] + [tokenizer.sep_id]
        tokens[row, :len(ids)] = torch.tensor(ids)
        padding_mask[row, :len(ids)] = True
    return tokens, padding_mask
