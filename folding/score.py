#!/usr/bin/env python
"""Score predictions against a reference: lDDT-CA, TM-score, GDT-TS/HA, RMSD (logic and docs:
megatron_protein/structure/scoring.py, docs/structure.md).

    python folding/score.py PRED.pdb REF.pdb [--chain A --ref-chain A] [--align] [--json] [--output FILE]
                            [--search-step N]
    python folding/score.py predictions/ REF.cif          # one row per file, then the mean
    python folding/score.py 'runs/*/model.pdb' REF.pdb    # a quoted glob
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_protein.structure.scoring import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
