"""Project Gutenberg books: a local folder of ``.txt`` books, or the hub's ``deepmind/pg19``.

Licence header and footer
    The header ends at the first of these lines within a book's first 2,000 lines:
    ``*** START OF THE/THIS PROJECT GUTENBERG EBOOK ... ***`` (modern books) or
    ``*END*THE SMALL PRINT! ...`` / ``*END THE SMALL PRINT! ...`` (old etexts, whose header ends
    with the "small print" licence). After such a header, the producer's front matter is dropped
    too: every paragraph up to the last one, among those starting in the next 150 lines, that
    mentions Project Gutenberg, etexts/ebooks, "produced by", "proofread", "prepared by",
    "scanned", "transcribed" or an e-mail address (the credits line, the repeated title banner,
    the Shakespeare folios' director's and scanner's notes, Milton's 1992 release notes). A book
    with no header marker is kept from its first line (e.g. PG-19, whose texts are already
    stripped). The body ends before the first line that starts
    ``*** END OF THE/THIS PROJECT GUTENBERG``, ``End of [the/this] Project Gutenberg`` or
    ``***START**THE SMALL PRINT`` (a licence printed at the end).

Units
    ``--eos paragraph`` (default): one ``<eos>`` per paragraph, paragraphs being separated by
    blank lines; the hard line wraps inside a paragraph are just spaces (verse and plays: a
    stanza or a speech is a paragraph). ``--eos line``: one ``<eos>`` per non-blank line.

Encodings
    ``--encoding auto`` (default): each book is read in the encoding its header declares
    (``Character set encoding: ISO-8859-1``; a declared ASCII is read as UTF-8, its superset),
    UTF-8 when it declares none; with ``--encoding-errors fallback`` (the default here) a line
    that is not valid in that encoding is read as Windows-1252, or Latin-1. meta.json's
    ``decoding`` records how many lines of which book were decoded how (books read entirely as
    undeclared UTF-8 are only counted), and the summary prints it. ``--encoding-errors strict``
    stops at the first invalid byte instead; ``--encoding NAME`` reads every book as NAME.

Tokens
    The ``regex`` rule of ``lmmem.data.tokenization`` (words with internal apostrophes and
    hyphens, numbers, each punctuation mark on its own); case kept unless ``--lowercase``.

Splits
    By book, deterministically: books are ordered by the SHA-256 of their file name; the first
    ``round(n * --test-fraction)`` are test, the next ``round(n * --valid-fraction)`` valid, the
    rest train; with at least 3 books each split gets at least one. Valid gets at least
    ``--min-valid-books`` books (default 3) while test and valid together stay within half of the
    books: one book as the valid split measures one author and one layout (on the 13 books of
    ../shared/data, *Macbeth* alone; docs/results/long-training-gutenberg-three-books.md), and
    choices made on valid should not hang on that. ``--min-valid-books 1`` is the rule before it
    (one valid book out of 13). PG-19 from the hub keeps its own train/validation/test splits.

Vocabulary
    Count-based from train: ``--min-count`` (default 3) and/or ``--max-vocab``; rarer words
    become ``<unk>``.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

from lmmem.data.corpus import SPLITS
from lmmem.data.text_source import ReadContext, TextSource
from lmmem.errors import DataError

from data_prep import options as O
from data_prep.options import check_split_coverage
from data_prep.reading import ReadOptions, declared_encoding, iter_blocks, nth_line_end, require_folder, text_as_file
from data_prep.text import hub_column_fix, row_text
from data_prep.wikitext import open_hub_split

NAME = "gutenberg"
HUB_DATASET = "deepmind/pg19"
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
HEADER_LOOKAHEAD_LINES = 2000
FRONT_MATTER_LINES = 150
MAX_PARAGRAPH_CHARS = 1 << 20  # a "paragraph" longer than this (no blank lines at all) is cut
MAX_LISTED_BOOKS = 1000  # meta.json lists book names per split up to this many

START_RE = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*START[ \t]+OF[ \t]+(?:THE|THIS)[ \t]+PROJECT[ \t]+GUTENBERG"
    r"|\*END\*?[ \t]*THE[ \t]+SMALL[ \t]+PRINT).*$",
    re.MULTILINE | re.IGNORECASE,
)
END_RE = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*END[ \t]+OF[ \t]+(?:THE|THIS)[ \t]+PROJECT[ \t]+GUTENBERG"
    r"|End[ \t]+of[ \t]+(?:the[ \t]+|this[ \t]+)?Project[ \t]+Gutenberg"
    r"|\*{3}[ \t]*START\*\*[ \t]*THE[ \t]+SMALL[ \t]+PRINT)",
    re.MULTILINE | re.IGNORECASE,
)
BOILERPLATE_RE = re.compile(
    r"project\s+gutenberg|\be-?texts?\b|\be-?books?\b|produced\s+by|proof-?read|prepared\s+by|scanned|transcri|@",
    re.IGNORECASE,
)
BLANK_RUN_RE = re.compile(r"\n(?:[^\S\n]*\n)+")  # a line break followed by one or more blank lines
BLANK_LINE_RE = re.compile(r"^[^\S\n]*\n", re.MULTILINE)


def add_arguments(p) -> None:
    O.add_source_argument(p, "folder of Project Gutenberg .txt books (searched recursively)", HUB_DATASET)
    g = p.add_argument_group("gutenberg")
    g.add_argument("--eos", choices=("paragraph", "line"), default="paragraph", help="one <eos> per paragraph (default) or per non-blank line")
    g.add_argument("--valid-fraction", type=O.fraction, default=0.1, help="share of the books in the valid split (default 0.1)")
    g.add_argument("--test-fraction", type=O.fraction, default=0.1, help="share of the books in the test split (default 0.1)")
    g.add_argument("--min-valid-books", type=O.positive_int, default=3,
                   help="at least this many books in valid, while test and valid stay within half of the books (default 3; "
                        "1 = the rule before this option)")
    O.add_common_arguments(p, min_count=3, rule="regex", encoding="auto", encoding_errors="fallback",
                           encoding_help="auto: each book in the encoding its header declares "
                                         "(\"Character set encoding: ...\"), UTF-8 when none; or a codec name for every book (default auto)")


def run(args) -> dict:
    hub = O.hub_name(args.source, HUB_DATASET)
    if hub:
        source = hub_source(hub, unit=args.eos, max_line_chars=args.max_line_chars)
    else:
        source = local_source(args.source, O.read_options(args), unit=args.eos, valid_fraction=args.valid_fraction,
                              test_fraction=args.test_fraction, min_valid_books=args.min_valid_books,
                              allow_missing_splits=args.allow_missing_splits)
    return O.run_prepare(args, source, rule="regex", min_count=3)


# ---------------------------------------------------------------------------------------------
# one book


def strip_header(text: str) -> tuple[str, bool]:
    """``text`` (a book's first block) without the licence header and the producer's front
    matter; and whether a header was found."""
    m = START_RE.search(text, 0, nth_line_end(text, HEADER_LOOKAHEAD_LINES))
    if m is None:
        return text, False
    body = text[nth_line_end(text, 1, m.start()):]
    zone = nth_line_end(body, FRONT_MATTER_LINES)
    footer = END_RE.search(body, 0, zone)
    if footer is not None:  # a short book: its footer mentions Project Gutenberg too
        zone = footer.start()
    start = cut = 0
    for gap in BLANK_RUN_RE.finditer(body, 0, zone):
        if BOILERPLATE_RE.search(body, start, gap.start()):
            cut = gap.end()
        start = gap.end()
    return body[cut:], True


def paragraphs_as_lines(text: str) -> str:
    """Complete paragraphs, one per line: wraps become spaces, blank-line runs become one break."""
    text = text.strip()
    if not text:
        return ""
    if "\x00" in text:
        text = text.replace("\x00", " ")
    # Three C-level passes instead of a Python loop over paragraphs.
    return BLANK_RUN_RE.sub("\x00", text).replace("\n", " ").replace("\x00", "\n") + "\n"


def _last_paragraph_end(text: str) -> int | None:
    last = None
    for last in BLANK_RUN_RE.finditer(text):
        pass
    return last.end() if last is not None else None


def book_units(blocks: Iterator[tuple[int, str]], unit: str, stats: dict | None = None) -> Iterator[str]:
    """The book's text without licence header and footer, one unit (paragraph or line) per line."""
    carry = ""
    first = True
    try:
        for _, text in blocks:
            if first:
                text, found = strip_header(text)
                first = False
                if stats is not None and found:
                    stats["headers"] = stats.get("headers", 0) + 1
            end = END_RE.search(text)
            if end is not None:
                text = text[: end.start()]
                if stats is not None:
                    stats["footers"] = stats.get("footers", 0) + 1
            if unit == "line":
                out = BLANK_LINE_RE.sub("", text)
                if out:
                    yield out
            else:
                text = carry + text if carry else text
                cut = _last_paragraph_end(text)
                if cut is None and len(text) <= MAX_PARAGRAPH_CHARS:
                    carry = text  # the paragraph goes on in the next block
                else:
                    cut = len(text) if cut is None else cut
                    carry = text[cut:]
                    out = paragraphs_as_lines(text[:cut])
                    if out:
                        yield out
            if end is not None:
                break
        if carry:
            out = paragraphs_as_lines(carry)
            if out:
                yield out
    finally:
        close = getattr(blocks, "close", None)
        if close is not None:
            close()  # stop reading (and close the file) after the footer


# ---------------------------------------------------------------------------------------------
# collections of books


def assign_books(names: list[str], valid_fraction: float, test_fraction: float, min_valid_books: int = 1) -> dict[str, str]:
    """{book name: split}, by the rank of each name's SHA-256 (independent of listing order).
    Valid is raised to ``min_valid_books`` where test and valid stay within half of the books."""
    order = sorted(names, key=lambda n: (hashlib.sha256(n.encode("utf-8")).hexdigest(), n))
    n = len(order)
    n_test, n_valid = round(n * test_fraction), round(n * valid_fraction)
    if n >= 3:
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
        n_valid = max(n_valid, 1 if valid_fraction > 0 else 0)
        while n_test + n_valid > n - 1:  # keep at least one train book
            if n_valid >= n_test and n_valid > 1:
                n_valid -= 1
            elif n_test > 1:
                n_test -= 1
            else:
                break
        if valid_fraction > 0:
            n_valid = max(n_valid, min(min_valid_books, n // 2 - n_test))
    out = {}
    for i, name in enumerate(order):
        out[name] = "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
    return out


def book_read_options(path, read_opts: ReadOptions) -> tuple[ReadOptions, str | None]:
    """The options to read one book with, and the encoding its header declares (None when it
    declares none): ``--encoding auto`` reads the book in its declared encoding (UTF-8 when it
    declares none or a name Python does not know); any other ``--encoding`` is used as given."""
    if read_opts.encoding != "auto":
        return read_opts, None
    declared, codec = declared_encoding(path)
    return replace(read_opts, encoding=codec or "utf-8"), declared


def local_source(folder, read_opts: ReadOptions, *, unit="paragraph", valid_fraction=0.1, test_fraction=0.1,
                 min_valid_books=3, allow_missing_splits=False) -> TextSource:
    folder = require_folder(folder, "Project Gutenberg .txt books")
    books = sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not books:
        raise DataError(f"{folder} holds no .txt books; point --source at a folder of Project Gutenberg .txt files (or use --source hub)")
    names = {p: p.relative_to(folder).as_posix() for p in books}
    assignment = assign_books(list(names.values()), valid_fraction, test_fraction, min_valid_books)
    produced = [s for s in SPLITS if s in assignment.values()]
    check_split_coverage(produced, valid_fraction=valid_fraction, test_fraction=test_fraction,
                         allow_missing=allow_missing_splits, what=f"{folder} has {len(books)} book(s)",
                         unit="to split by book into", advice="add books")
    by_split = {s: [names[p] for p in books if assignment[names[p]] == s] for s in produced}

    def read(ctx: ReadContext) -> Iterator[tuple[str, str]]:
        stats = ctx.info.setdefault("licence_stripped", {"headers": 0, "footers": 0})
        decoding = ctx.info.setdefault("decoding", {"encoding": read_opts.encoding, "errors": read_opts.encoding_errors,
                                                     "lines": {}, "books": {}})
        total = Counter()
        for path in books:
            split = assignment[names[path]]
            if split not in ctx.wanted:
                if ctx.progress is not None:
                    ctx.progress.update(path.stat().st_size)
                continue
            ctx.documents[split] += 1
            opts, declared = book_read_options(path, read_opts)
            lines = Counter()
            for text in book_units(iter_blocks(path, opts, progress=ctx.progress, lines=lines), unit, stats):
                yield split, text
            total.update(lines)
            # A book read entirely as undeclared UTF-8 is the unremarkable case: only counted.
            if declared or set(lines) - {"utf-8"}:
                decoding["books"][names[path]] = {"declared": declared, "read_as": opts.encoding,
                                                  "lines": dict(lines.most_common())}
            decoding["lines"] = dict(total.most_common())

    split_info = {s: {"books": len(v), **({"book_names": v} if len(books) <= MAX_LISTED_BOOKS else {})} for s, v in by_split.items()}
    return TextSource(
        corpus=NAME, source=str(folder.resolve()), splits=tuple(produced), read=read, unit=unit,
        total_bytes=sum(p.stat().st_size for p in books), split_info=split_info,
        info={"split_rule": "by book: SHA-256 of the file name ranks the books; first test, then valid, then train"},
    )


def hub_source(dataset: str, *, unit="paragraph", max_line_chars=1_000_000) -> TextSource:
    # Hub rows are already text: no encoding to choose.
    read_opts = ReadOptions(max_line_chars=max_line_chars)

    def read(ctx: ReadContext) -> Iterator[tuple[str, str]]:
        stats = ctx.info.setdefault("licence_stripped", {"headers": 0, "footers": 0})
        for split in SPLITS:
            if split not in ctx.wanted:
                continue
            for i, row in enumerate(open_hub_split(dataset, None, HUB_SPLITS[split])):
                name = row.get("short_book_title") or row.get("url") or f"{split}-{i}"
                body = row_text(row, "text", f"{dataset} [{HUB_SPLITS[split]}]", hub_column_fix(dataset))
                ctx.documents[split] += 1
                for text in book_units(iter_blocks(text_as_file(body, name), read_opts), unit, stats):
                    yield split, text
                if ctx.progress is not None:
                    ctx.progress.update(len(body))

    return TextSource(corpus=NAME, source=f"hub:{dataset}", splits=SPLITS, read=read, unit=unit,
                      info={"split_rule": f"the hub's own splits of {dataset}"})
