"""``lmmem train|evaluate|datastore|prepare ...`` (installed console script) and ``python -m lmmem ...``.

The same commands as ``python train.py``, ``python evaluate.py`` and ``python -m data_prep`` in a
checkout; each subcommand's ``--help`` lists its options.
"""

from __future__ import annotations

import sys

from lmmem.cli import run_cli

USAGE = """usage: lmmem {train,evaluate,datastore,prepare} ...

  lmmem train ...      train a language model          (lmmem train --help)
  lmmem evaluate ...   perplexity of a model            (lmmem evaluate --help)
  lmmem datastore ...  kNN-LM datastore of a model      (lmmem datastore --help)
  lmmem prepare ...    prepare a corpus                 (lmmem prepare --help)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    # Each command's module is imported when that command runs: `lmmem prepare` never imports
    # torch, and a command's start-up does not pay for the others'.
    if command == "train":
        from lmmem.training.cli import main as train_main

        return run_cli(lambda a: train_main(a, prog="lmmem train", evaluate="lmmem evaluate"), rest)
    if command == "evaluate":
        from lmmem.evaluation.cli import main as evaluate_main

        return run_cli(lambda a: evaluate_main(a, prog="lmmem evaluate"), rest)
    if command == "datastore":
        from lmmem.evaluation.datastore import main as datastore_main

        return run_cli(datastore_main, rest)
    if command == "prepare":
        from data_prep.__main__ import main as prepare_main

        return prepare_main(rest, prog="lmmem prepare")
    print(USAGE, end="", file=sys.stderr)
    print(f"lmmem: error: unknown command {command!r}; choose train, evaluate, datastore or prepare", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
