"""``python -m data_prep <corpus> --source ... --out DIR [options]``; see ``--help`` of each corpus.

Exit status: 0 on success, 2 on a problem with the input, the options or the disk (one ``error:``
line on stderr that says what to do, no traceback), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys

from lmmem.cli import ArgumentParser, run_cli
from lmmem.config_file import add_config_argument, argv_with_config
from lmmem.validation import check_flags

from data_prep import gigaword, gutenberg, synthetic, text, wikitext

CORPORA = {
    "wikitext-103": (wikitext, "WikiText-103 / WikiText-2 (.tokens files or the hub): official tokens, <eos> per line"),
    "gutenberg": (gutenberg, "Project Gutenberg books (folder of .txt or PG-19 on the hub): licence stripped, split by book"),
    "gigaword": (gigaword, "GigaWord SGML (.gz), sentence-per-line news .txt, or the hub's gigaword: split by document order"),
    "text": (text, "any text: a .txt/.jsonl/.parquet file or folder named by split, or a hub dataset (hub:NAME, --text-column)"),
    "synthetic": (synthetic, "the embedded synthetic corpus (Zipfian words, recurring rare names), offline and deterministic"),
}


def build_parser(prog: str = "python -m data_prep") -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog,
        description="Prepare a corpus for lmmem: vocab.txt, {train,valid,test}.bin (uint32 token ids) and meta.json.",
    )
    sub = parser.add_subparsers(dest="corpus", required=True, metavar="CORPUS")
    for name, (module, help_text) in CORPORA.items():
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).split("\n\n")[0])
        module.add_arguments(p)
        add_config_argument(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m data_prep") -> int:
    """The CLI: errors (input, options, a full disk) become one ``error:`` line and status 2."""
    return run_cli(lambda a: _main(a, prog), argv)


def _main(argv: list[str] | None = None, prog: str = "python -m data_prep") -> int:
    parser = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    # --config FILE: the file's options go right after the corpus name, before the command line's own
    at = next((i for i, a in enumerate(argv) if a in CORPORA), None)
    if at is not None:
        sub = parser._subparsers._group_actions[0].choices[argv[at]]  # the corpus's own parser
        argv = argv_with_config(argv, sub, "prepare", insert_at=at + 1)
    args = parser.parse_args(argv)  # unknown flags: argparse prints usage and exits 2
    check_flags(vars(args))  # the same numeric rules as every other CLI (lmmem.validation)
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("error: interrupted; the previous corpus in --out (if any) is unchanged", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
