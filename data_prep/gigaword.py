"""News: LDC English GigaWord (LDC2011T07), plain sentence-per-line newswire, or the hub's ``gigaword``.

Input, by what ``--source`` holds:

* GigaWord SGML: files starting with ``<DOC`` (gzip-compressed, as LDC ships them, or not; any
  file name; the folder is searched recursively and ``*.gz`` files are taken when there are any).
  Only ``<DOC ... type="story">`` documents are kept; their ``<TEXT>``'s ``<P>`` paragraphs
  (which span several lines) are the units, one ``<eos>`` each; a ``<TEXT>`` without ``<P>`` is
  one paragraph. ``--headlines`` adds the ``<HEADLINE>`` as a first unit. SGML escapes such as
  ``&amp;`` are unescaped.
* Plain text (``*.txt``, e.g. ``../shared/data/news-abc``): one sentence or headline a line, one
  ``<eos>`` each; blank lines separate stories (documents).
* ``--source hub``: the hub's ``gigaword`` dataset (field ``document``, its own splits); each row
  is one unit and one document.

Tokens: the ``regex`` rule of ``lmmem.data.tokenization``. Splits: by document order (files sorted
by path, documents in file order); the last ``--test-fraction`` of the documents are test, the
``--valid-fraction`` before them valid, the rest train. This needs the number of documents, so
the files are read twice (a fast counting pass first). Vocabulary: count-based from train,
``--min-count`` (default 3) and/or ``--max-vocab``.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from pathlib import Path

from lmmem.data.corpus import SPLITS
from lmmem.data.text_source import ReadContext, TextSource, make_progress
from lmmem.errors import DataError

from data_prep import options as O
from data_prep.options import check_split_coverage
from data_prep.reading import ReadOptions, iter_blocks, require_folder
from data_prep.text import hub_column_fix, row_text
from data_prep.wikitext import open_hub_split

NAME = "gigaword"
HUB_DATASET = "gigaword"
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}

DOC_RE = re.compile(r"(<DOC\b[^>]*>)(.*?)</DOC>", re.DOTALL | re.IGNORECASE)
STORY_OPEN_RE = re.compile(r"<DOC\b[^>]*\btype\s*=\s*[\"']?story\b", re.IGNORECASE)
DOC_TYPE_RE = re.compile(r"\btype\s*=\s*[\"']?([^\"'\s>]+)", re.IGNORECASE)
TEXT_RE = re.compile(r"<TEXT>(.*?)</TEXT>", re.DOTALL | re.IGNORECASE)
P_RE = re.compile(r"<P>(.*?)</P>", re.DOTALL | re.IGNORECASE)
HEADLINE_RE = re.compile(r"<HEADLINE>(.*?)</HEADLINE>", re.DOTALL | re.IGNORECASE)
TAG_RE = re.compile(r"<[^>]*>")
MAX_DOC_CHARS = 1 << 24  # an unterminated <DOC> longer than this means the file is not GigaWord SGML


def add_arguments(p) -> None:
    O.add_source_argument(p, "folder of GigaWord SGML files (.gz) or of sentence-per-line .txt files", HUB_DATASET)
    g = p.add_argument_group("gigaword")
    g.add_argument("--valid-fraction", type=O.fraction, default=0.05, help="share of the documents, before the test ones, in valid (default 0.05)")
    g.add_argument("--test-fraction", type=O.fraction, default=0.05, help="share of the documents, at the end, in test (default 0.05)")
    g.add_argument("--headlines", action="store_true", help="SGML: keep each story's <HEADLINE> as its first unit")
    O.add_common_arguments(p, min_count=3, rule="regex")


def run(args) -> dict:
    hub = O.hub_name(args.source, HUB_DATASET)
    if hub:
        source = hub_source(hub)
    else:
        source = local_source(args.source, O.read_options(args), valid_fraction=args.valid_fraction,
                              test_fraction=args.test_fraction, headlines=args.headlines,
                              allow_missing_splits=args.allow_missing_splits, quiet=args.quiet)
    return O.run_prepare(args, source, rule="regex", min_count=3)


# ---------------------------------------------------------------------------------------------


def _clean(text: str) -> str:
    """One unit: inner tags dropped, line wraps joined, SGML/HTML escapes undone."""
    if "<" in text:
        text = TAG_RE.sub(" ", text)
    text = " ".join(text.split())
    return html.unescape(text) if "&" in text else text


def story_units(body: str, headlines: bool) -> str:
    """A story's units, one per line ("" when it has no text)."""
    units = []
    if headlines:
        h = HEADLINE_RE.search(body)
        if h is not None:
            units.append(_clean(h.group(1)))
    m = TEXT_RE.search(body)
    if m is not None:
        paragraphs = P_RE.findall(m.group(1)) or [m.group(1)]
        units.extend(_clean(p) for p in paragraphs)
    units = [u for u in units if u]
    return "\n".join(units) + "\n" if units else ""


def sgml_documents(path: Path, read_opts: ReadOptions, progress=None) -> Iterator[tuple[str | None, str]]:
    """(opening tag, body) of every ``<DOC>`` of a SGML file, in order; one document in memory at a time."""
    buf = ""
    for lineno, text in iter_blocks(path, read_opts, progress=progress):
        buf = buf + text if buf else text
        end = buf.rfind("</DOC>")
        if end < 0:
            if len(buf) > MAX_DOC_CHARS:
                raise DataError(f"{path}:{lineno}: no </DOC> in {MAX_DOC_CHARS:,} characters; is this GigaWord SGML? "
                                "(sentence-per-line text must be in .txt files)")
            continue
        end += len("</DOC>")
        complete, buf = buf[:end], buf[end:]
        for m in DOC_RE.finditer(complete):
            yield m.group(1), m.group(2)
    if "<DOC" in buf.upper():
        raise DataError(f"{path} ends inside a <DOC> (truncated file?); re-download or re-extract it")


def _is_sgml(path: Path, read_opts: ReadOptions) -> bool:
    for _, text in iter_blocks(path, ReadOptions(read_opts.encoding, "replace", read_opts.max_line_chars), block_bytes=1 << 14):
        stripped = text.lstrip()
        if stripped:
            return stripped[:4].upper() == "<DOC"
    return False


def txt_documents(path: Path, read_opts: ReadOptions, progress=None) -> Iterator[str]:
    """The stories of a sentence-per-line file (blank lines between stories), one sentence a line."""
    lines: list[str] = []
    for _, text in iter_blocks(path, read_opts, progress=progress):
        if "&" in text:
            text = html.unescape(text)  # newswire text often carries &eacute; and the like
        for line in text.split("\n"):
            if line.strip():
                lines.append(line)
            elif lines:
                yield "\n".join(lines) + "\n"
                lines = []
    if lines:
        yield "\n".join(lines) + "\n"


def split_by_order(n_docs: int, valid_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(first valid document, first test document): the last fractions, at least one each from 3 docs."""
    n_test, n_valid = round(n_docs * test_fraction), round(n_docs * valid_fraction)
    if n_docs >= 3:
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
        n_valid = max(n_valid, 1 if valid_fraction > 0 else 0)
        n_test = min(n_test, n_docs - 1 - n_valid) if n_test + n_valid > n_docs - 1 else n_test
        n_valid = min(n_valid, n_docs - 1 - n_test)
    return n_docs - n_test - n_valid, n_docs - n_test


def local_source(folder, read_opts: ReadOptions, *, valid_fraction=0.05, test_fraction=0.05, headlines=False,
                 allow_missing_splits=False, quiet=True) -> TextSource:
    folder = require_folder(folder, "GigaWord SGML .gz files or sentence-per-line .txt files")
    files = sorted(p for p in folder.rglob("*.gz") if p.is_file()) or sorted(p for p in folder.rglob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"{folder} holds no .gz or .txt files; point --source at the GigaWord data folder or a folder of news .txt files")
    kinds = {p: _is_sgml(p, read_opts) for p in files}

    def documents(progress=None, parse: bool = True) -> Iterator[tuple[str, str]]:
        """(document type, its units text) for every document of every file, in order."""
        for path in files:
            if kinds[path]:
                for open_tag, body in sgml_documents(path, read_opts, progress):
                    if STORY_OPEN_RE.match(open_tag):
                        yield "story", story_units(body, headlines) if parse else ""
                    else:
                        t = DOC_TYPE_RE.search(open_tag)
                        yield (t.group(1).lower() if t else "untyped"), ""
            else:
                for doc in txt_documents(path, read_opts, progress):
                    yield "story", doc

    # Counting pass: documents kept, so that the last fractions can go to valid and test.
    total_bytes = sum(p.stat().st_size for p in files)
    bar = make_progress(total_bytes, f"{NAME}: counting documents", quiet)
    n_docs = sum(1 for kind, _ in documents(bar, parse=False) if kind == "story")
    if bar is not None:
        bar.close()
    if n_docs == 0:
        raise DataError(f"{folder} has no documents (no <DOC type=\"story\"> and no text lines); check --source")
    first_valid, first_test = split_by_order(n_docs, valid_fraction, test_fraction)
    sizes = {"train": first_valid, "valid": first_test - first_valid, "test": n_docs - first_test}
    produced = tuple(s for s in SPLITS if sizes[s] > 0)
    check_split_coverage(produced, valid_fraction=valid_fraction, test_fraction=test_fraction,
                         allow_missing=allow_missing_splits, what=f"{folder} has {n_docs} document(s)",
                         unit="for the splits", advice="add text")

    def read(ctx: ReadContext) -> Iterator[tuple[str, str]]:
        index = 0
        dropped: dict[str, int] = {}
        for kind, text in documents(ctx.progress):
            if kind != "story":
                dropped[kind] = dropped.get(kind, 0) + 1
                continue
            split = "train" if index < first_valid else "valid" if index < first_test else "test"
            index += 1
            if split in ctx.wanted:
                ctx.documents[split] += 1
                if text:
                    yield split, text
        if dropped:
            ctx.info["documents_dropped_by_type"] = dict(sorted(dropped.items()))

    has_sgml = any(kinds.values())
    return TextSource(
        corpus=NAME, source=str(folder.resolve()), splits=produced, read=read,
        unit="paragraph" if has_sgml else "line",
        total_bytes=total_bytes,
        info={"input": "sgml" if has_sgml else "text", "files": len(files),
              "split_rule": "by document order: the last --test-fraction of the documents are test, the --valid-fraction before them valid"},
    )


def hub_source(dataset: str) -> TextSource:
    def read(ctx: ReadContext) -> Iterator[tuple[str, str]]:
        for split in SPLITS:
            if split not in ctx.wanted:
                continue
            for row in open_hub_split(dataset, None, HUB_SPLITS[split]):
                text = " ".join(row_text(row, "document", f"{dataset} [{HUB_SPLITS[split]}]", hub_column_fix(dataset)).split())
                ctx.documents[split] += 1
                if text:
                    yield split, text + "\n"
                if ctx.progress is not None:
                    ctx.progress.update(len(text) + 1)

    return TextSource(corpus=NAME, source=f"hub:{dataset}", splits=SPLITS, read=read, unit="line",
                      info={"split_rule": f"the hub's own splits of {dataset}"})
