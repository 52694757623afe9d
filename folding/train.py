#!/usr/bin/env python
"""Train the AlphaFold2-style folding model (thin entry point; the logic is in
megatron_protein/training/folding_*.py). ``bash scripts/train_folding.sh`` runs it with the defaults; see
``--help`` and docs/folding.md."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_protein.training.folding_main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
