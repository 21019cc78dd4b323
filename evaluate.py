"""Evaluate a checkpoint: ``python evaluate.py --help``.

A thin wrapper: the command is lmmem.evaluation.cli (also ``lmmem evaluate`` once installed).
"""

import sys

from lmmem.cli import run_cli
from lmmem.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
