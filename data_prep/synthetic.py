"""``python -m data_prep synthetic --out DIR``: the embedded synthetic corpus (``lmmem.data.synthetic``),
written through the same writer as the real corpora. Same seed and sizes, byte-identical files."""

from __future__ import annotations

from pathlib import Path

from lmmem.data.synthetic import write_synthetic_corpus

from data_prep import options as O


def add_arguments(p) -> None:
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write the prepared corpus into")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--train-tokens", type=O.positive_int, default=500_000, help="train tokens, about (default 500,000)")
    p.add_argument("--valid-tokens", type=O.positive_int, default=50_000, help="valid tokens, about (default 50,000)")
    p.add_argument("--test-tokens", type=O.positive_int, default=50_000, help="test tokens, about (default 50,000)")
    p.add_argument("--quiet", action="store_true", help="no summary")
    O.add_overwrite_argument(p)


def run(args) -> Path:
    return write_synthetic_corpus(args.out, seed=args.seed, train_tokens=args.train_tokens, valid_tokens=args.valid_tokens,
                                  test_tokens=args.test_tokens, quiet=args.quiet,
                                  overwrite=args.overwrite)
