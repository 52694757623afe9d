#!/usr/bin/env python
"""TAPE's `tape-train` for this project's models; flags in tape_tasks/cli.py, usage in docs/tape.md."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tape_tasks.cli import command, train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(command(train_main))
