"""Command-line options shared by the corpus subcommands, and their translation to the writer's
option dataclasses (``lmmem.data.encoding``; the writer is ``lmmem.data.writer``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmmem.data.corpus import SPLITS
from lmmem.data.encoding import TokenizerOptions, VocabOptions
from lmmem.data.text_source import TextSource
from lmmem.data.writer import prepare
from lmmem.errors import DataError

from data_prep.reading import ReadOptions
from data_prep.vocab_from import check_no_conflicts, load_vocab_source


def positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value


def split_list(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s not in SPLITS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated split names among {','.join(SPLITS)}, got {text!r}")
    return names


def check_split_coverage(produced, *, valid_fraction: float, test_fraction: float, allow_missing: bool,
                         what: str, unit: str, advice: str) -> None:
    """Refuse (unless --allow-missing-splits) a source too small to fill every split it was asked for.
    ``what`` describes the source ("FOLDER has N book(s)"), ``unit`` how it is split ("to split by
    book into"), ``advice`` what to add ("add books")."""
    expected = [s for s, f in (("train", 1.0), ("valid", valid_fraction), ("test", test_fraction)) if f > 0]
    if any(s not in produced for s in expected) and not allow_missing:
        raise DataError(
            f"{what}, too few {unit} {', '.join(expected)} (at least 3 are needed); "
            f"{advice}, or pass --allow-missing-splits to write only " + ", ".join(produced)
        )


def add_source_argument(p: argparse.ArgumentParser, local_help: str, hub_default: str) -> None:
    p.add_argument(
        "--source", required=True, metavar="FOLDER|hub[:NAME]",
        help=f"{local_help}; or `hub` to stream {hub_default} from the Hugging Face hub (`hub:NAME` for another dataset)",
    )


def add_common_arguments(p: argparse.ArgumentParser, *, min_count: int, rule: str, encoding: str = "utf-8",
                         encoding_errors: str = "strict", encoding_help: str = "") -> None:
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write vocab.txt, {train,valid,test}.bin, meta.json into")
    g = p.add_argument_group("vocabulary")
    g.add_argument("--min-count", type=positive_int, default=None,
                   help=f"keep word types seen at least this often in the vocabulary splits; rarer ones become <unk> (default {min_count})")
    g.add_argument("--max-vocab", type=positive_int, default=None, help="keep at most this many entries, specials included (most frequent first)")
    g.add_argument("--vocab-splits", type=split_list, default=None, metavar="LIST",
                   help="comma-separated splits the vocabulary and its counts come from (default: train; all written splits when train is absent)")
    g.add_argument("--keep-eval-types", action="store_true",
                   help="add types that occur only outside the vocabulary splits to the vocabulary with count 0 instead of mapping them to <unk>")
    g.add_argument("--vocab-from", default=None, metavar="RUN_OR_CORPUS",
                   help="encode with a trained model's own vocabulary and tokeniser (a checkpoint, a run folder or a "
                        "prepared corpus) instead of building one; unknown words become <unk> and are counted, so that "
                        "evaluate.py can score the model on this text")
    g.add_argument("--allow-missing-splits", action="store_true",
                   help="prepare only the splits that exist instead of stopping when one is missing")
    g.add_argument("--lowercase", action="store_true", help="lowercase all text")
    t = p.add_argument_group("tokenizer")
    t.add_argument("--tokenizer", choices=("words", "sentencepiece"), default="words",
                   help=f"words: a word vocabulary ({rule} rule, see README); sentencepiece: train a subword model (default words)")
    t.add_argument("--vocab-size", type=positive_int, default=None, help="SentencePiece vocabulary size (required with --tokenizer sentencepiece)")
    t.add_argument("--spm-model-type", choices=("unigram", "bpe"), default="unigram", help="SentencePiece model type (default unigram)")
    t.add_argument("--spm-sentences", type=positive_int, default=1_000_000,
                   help="at most this many train units are sampled to train SentencePiece (its input_sentence_size; default 1,000,000)")
    t.add_argument("--seed", type=int, default=0, help="seed of SentencePiece's sampling (default 0)")
    r = p.add_argument_group("reading")
    r.add_argument("--encoding", default=encoding,
                   help=encoding_help or f"text encoding of the input files (default {encoding})")
    r.add_argument("--encoding-errors", choices=("strict", "fallback", "replace"), default=encoding_errors,
                   help="strict: stop at bytes that are not valid in --encoding; fallback: read such lines as "
                        "Windows-1252/Latin-1 (old Gutenberg etexts, newswire); replace: read such bytes as U+FFFD "
                        f"(default {encoding_errors})")
    r.add_argument("--max-line-chars", type=positive_int, default=1_000_000,
                   help="refuse lines longer than this many bytes instead of holding them in memory (default 1,000,000)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="tokeniser processes (default 1); more only pay off with idle physical cores, each holds its own "
                        "type table; the output is identical for any number")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no summary")
    add_overwrite_argument(p)


def add_overwrite_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace a different prepared corpus in --out (without it: refused; re-preparing the same corpus "
                        "with the same options needs no flag); the old corpus stays until the new one is complete")


def read_options(args) -> ReadOptions:
    return ReadOptions(encoding=args.encoding, encoding_errors=args.encoding_errors, max_line_chars=args.max_line_chars)


def hub_name(source: str, default: str) -> str | None:
    """``hub`` -> the default dataset, ``hub:NAME`` -> NAME, a folder -> None."""
    if source == "hub":
        return default
    if source.startswith("hub:") and len(source) > 4:
        return source[4:]
    return None


# Options that do not change the output: left out of meta.json so that it stays byte-identical.
_NOT_RECORDED = {"run", "out", "workers", "quiet", "source", "overwrite"}


def recorded_options(args) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
            for k, v in sorted(vars(args).items()) if k not in _NOT_RECORDED}


def run_prepare(args, source: TextSource, rule: str, min_count: int) -> dict:
    """Prepare ``source`` with the options in ``args``; ``min_count`` is the corpus's default."""
    if getattr(args, "vocab_from", None):
        return _run_prepare_with_vocab(args, source)
    if args.tokenizer == "sentencepiece":
        if args.min_count is not None or args.max_vocab is not None:
            raise DataError("--min-count and --max-vocab apply to word vocabularies; with SentencePiece set --vocab-size")
        args.min_count = 1
    elif args.min_count is None:
        args.min_count = min_count
    tokenizer = TokenizerOptions(
        kind=args.tokenizer, rule=rule, lowercase=args.lowercase, vocab_size=args.vocab_size,
        spm_model_type=args.spm_model_type, spm_sentences=args.spm_sentences, seed=args.seed,
    )
    vocab = VocabOptions(min_count=args.min_count, max_vocab=args.max_vocab, vocab_splits=args.vocab_splits,
                         keep_eval_types=args.keep_eval_types)
    return prepare(args.out, source, tokenizer, vocab, options=recorded_options(args), workers=args.workers, quiet=args.quiet,
                   overwrite=args.overwrite)


def _run_prepare_with_vocab(args, source: TextSource) -> dict:
    """``--vocab-from``: the vocabulary, word rule, case and SentencePiece model of a trained model."""
    fixed = load_vocab_source(args.vocab_from)
    check_no_conflicts(args, fixed)
    tok = fixed.tokenizer
    if tok["type"] == "sentencepiece":
        tokenizer = TokenizerOptions(kind="sentencepiece", lowercase=bool(tok.get("lowercase")),
                                     spm_model_type=tok.get("model_type", "unigram"))
    else:
        tokenizer = TokenizerOptions(kind="words", rule=tok.get("rule", "whitespace"), lowercase=bool(tok.get("lowercase")))
    vocab = VocabOptions(min_count=1, fixed=fixed)
    return prepare(args.out, source, tokenizer, vocab, options=recorded_options(args), workers=args.workers, quiet=args.quiet,
                   overwrite=args.overwrite)
