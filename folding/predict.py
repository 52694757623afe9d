#!/usr/bin/env python
"""Predict structures with a trained folding model: one PDB per FASTA record with pLDDT in the B-factor column and
a JSON summary (thin entry point; the logic is in megatron_protein/inference/predict.py). See ``--help`` and
docs/folding.md."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_protein.inference.predict import predict  # noqa: E402

if __name__ == "__main__":
    sys.exit(predict())
