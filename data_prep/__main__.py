"""``python -m data_prep <corpus> --source ... --out DIR [options]``; see ``--help`` of each corpus.

Exit status: 0 on success, 2 on a problem with the input, the options or the disk (one ``error:``
line on stderr that says what to do, no traceback), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys

from lmmem.cli import run_cli
from lmmem.validation import check_flags

from data_prep import gigaword, gutenberg, synthetic, text, wikitext

CORPORA = {
    "wikitext-103": (wikitext, "WikiText-103 / WikiText-2 (.tokens files or the hub): official tokens, <eos> per line"),
    "gutenberg": (gutenberg, "Project Gutenberg books (folder of .txt or PG-19 on the hub): licence stripped, split by book"),
    "gigaword": (gigaword, "GigaWord SGML (.gz), sentence-per-line news .txt, or the hub's gigaword: split by document order"),
    "text": (text, "any text: a .txt/.jsonl/.parquet file or folder named by split, or a hub dataset (hub:NAME, --text-column)"),
    "synthetic": (synthetic, "the embedded synthetic corpus (Zipfian words, recurring rare names), offline and deterministic"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Prepare a corpus for lmmem: vocab.txt, {train,valid,test}.bin (uint32 token ids) and meta.json.",
    )
    sub = parser.add_subparsers(dest="corpus", required=True, metavar="CORPUS")
    for name, (module, help_text) in CORPORA.items():
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).split("\n\n")[0])
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The CLI: errors (input, options, a full disk) become one ``error:`` line and status 2."""
    return run_cli(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # unknown flags: argparse prints usage and exits 2
    check_flags(vars(args))  # the same numeric rules as every other CLI (lmmem.validation)
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("error: interrupted; the previous corpus in --out (if any) is unchanged", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
