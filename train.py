"""Train a word-level language model: ``python train.py --help``.

A thin wrapper: the command is lmmem.training.cli (also ``lmmem train`` once installed).
"""

import sys

from lmmem.cli import run_cli
from lmmem.training.cli import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
