"""WikiText-103 (and WikiText-2, which has the same format).

Input: a folder with ``wiki.{train,valid,test}.tokens`` (the official release), or the hub's
``Salesforce/wikitext`` (``--source hub``, config ``wikitext-103-v1``; ``--hub-config
wikitext-2-v1`` for WikiText-2), streamed: field ``text``, one row per line, splits
train/validation/test.

The official tokenisation is kept: tokens are split on whitespace, ``<unk>`` stays as it is, and
every line -- blank ones included, as in the PyTorch word-language-model example and
Transformer-XL -- ends with ``<eos>`` (``--skip-blank-lines`` leaves blank lines out). The
vocabulary is every train type (``--min-count 1``): 267,735 entries on the full WikiText-103.
Documents are counted by article titles (`` = Title = `` lines).

``--train-from valid`` makes train out of the *valid* file and carves its last
``--holdout-fraction`` (at an article boundary) into the valid split; test stays the test file.
That is "train on WikiText-2's validation split, test on its test split" in one command.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from lmmem.data.corpus import SPLITS
from lmmem.data.text_source import ReadContext, TextSource
from lmmem.errors import DataError

from data_prep import options as O
from data_prep.reading import ReadOptions, iter_blocks, nth_line_end, require_folder
from data_prep.text import hub_column_fix, row_text

NAME = "wikitext-103"
HUB_DATASET = "Salesforce/wikitext"
HUB_CONFIG = "wikitext-103-v1"
SPLIT_FILES = {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"}
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}

# An article title is a line " = Title = " (sections are " = = Section = = "). Matching from the
# preceding line break gives the regex a literal prefix to search for: 6x faster than ^...$ .
TITLE_RE = re.compile(r"\n = [^=\n][^\n]* = (?=\n)")
FIRST_TITLE_RE = re.compile(r" = [^=\n][^\n]* = \n")  # a title on a block's first line
BLANK_LINE_RE = re.compile(r"^[^\S\n]*\n", re.MULTILINE)
HUB_BLOCK_CHARS = 1 << 20


def title_lines(text: str, first_line: int) -> Iterator[int]:
    """Line numbers of the article titles in ``text``, whose first line is ``first_line``."""
    if FIRST_TITLE_RE.match(text):
        yield first_line
    pos, line = 0, first_line
    for m in TITLE_RE.finditer(text):
        line += text.count("\n", pos, m.start() + 1)
        pos = m.start() + 1
        yield line


def count_titles(text: str) -> int:
    """Article titles in ``text``, which starts at a line start (documents, for meta.json)."""
    return len(TITLE_RE.findall(text)) + (1 if FIRST_TITLE_RE.match(text) else 0)


BlockFactory = Callable[[ReadContext], Iterator[tuple[int, str]]]


def add_arguments(p) -> None:
    O.add_source_argument(p, "folder with wiki.{train,valid,test}.tokens", f"{HUB_DATASET} ({HUB_CONFIG})")
    w = p.add_argument_group("wikitext")
    w.add_argument("--skip-blank-lines", action="store_true", help="no <eos> for blank lines (default: every line ends with <eos>)")
    w.add_argument("--train-from", choices=("train", "valid"), default="train",
                   help="valid: train on the valid file, carving its last --holdout-fraction into the valid split (default train)")
    w.add_argument("--holdout-fraction", type=O.fraction, default=0.1,
                   help="with --train-from valid: the share of the valid file, from its end, kept as the valid split (default 0.1)")
    w.add_argument("--hub-config", default=HUB_CONFIG, help=f"hub configuration (default {HUB_CONFIG}; wikitext-2-v1 for WikiText-2)")
    O.add_common_arguments(p, min_count=1, rule="whitespace")


def run(args) -> dict:
    hub = O.hub_name(args.source, HUB_DATASET)
    if hub:
        source = hub_source(hub, args.hub_config, skip_blank_lines=args.skip_blank_lines, train_from=args.train_from,
                            holdout_fraction=args.holdout_fraction, allow_missing_splits=args.allow_missing_splits)
    else:
        source = local_source(args.source, O.read_options(args), skip_blank_lines=args.skip_blank_lines,
                              allow_missing_splits=args.allow_missing_splits, train_from=args.train_from,
                              holdout_fraction=args.holdout_fraction)
    return O.run_prepare(args, source, rule="whitespace", min_count=1)


# ---------------------------------------------------------------------------------------------


def _plan(files: dict[str, BlockFactory | None], where: str, allow_missing: bool, train_from: str) -> dict[str, str]:
    """{output split: the input split it is read from}, from the input splits that exist."""
    needed = ["valid", "test"] if train_from == "valid" else list(SPLITS)
    missing = [s for s in needed if files.get(s) is None]
    if missing and not allow_missing:
        what = ", ".join(SPLIT_FILES[s] for s in missing)
        raise DataError(
            f"{where} has no {what}; point --source at a complete WikiText folder, or pass --allow-missing-splits "
            "to prepare only the splits that exist (the vocabulary then comes from them)"
        )
    if train_from == "valid":
        if files.get("valid") is None:
            raise DataError(f"--train-from valid needs {SPLIT_FILES['valid']}, which {where} does not have")
        plan = {"train": "valid", "valid": "valid"}
        if files.get("test") is not None:
            plan["test"] = "test"
        return plan
    return {s: s for s in SPLITS if files.get(s) is not None}


def _carve_line(blocks: BlockFactory, holdout: float) -> tuple[int, int]:
    """(first line of the held-out part, total lines): the first article title at or after
    ``(1 - holdout)`` of the lines, so that no article is cut in two (or that line if none)."""
    ctx = ReadContext(wanted=frozenset())
    total = 0
    titles: list[int] = []
    for lineno, text in blocks(ctx):
        titles.extend(title_lines(text, lineno))
        total = lineno + text.count("\n") - 1
    target = max(2, math.ceil(total * (1.0 - holdout)) + 1)
    cut = next((t for t in titles if t >= target), target)
    return cut, total


def _make_source(files: dict[str, BlockFactory | None], where: str, source_name: str, *, skip_blank_lines: bool,
                 allow_missing_splits: bool, train_from: str, holdout_fraction: float, total_bytes: int | None) -> TextSource:
    if all(f is None for f in files.values()):
        raise DataError(
            f"{where} holds none of {', '.join(SPLIT_FILES.values())}; point --source at the WikiText folder (or use --source hub)"
        )
    plan = _plan(files, where, allow_missing_splits, train_from)
    cut = None
    info: dict = {}
    if train_from == "valid":
        if holdout_fraction <= 0:
            raise DataError("--train-from valid needs --holdout-fraction above 0 to leave a valid split")
        cut, total = _carve_line(files["valid"], holdout_fraction)
        info["carved"] = {"from": SPLIT_FILES["valid"], "train_lines": [1, cut - 1], "valid_lines": [cut, total]}

    def emit(ctx: ReadContext, split: str, text: str):
        if skip_blank_lines:
            text = BLANK_LINE_RE.sub("", text)
        ctx.documents[split] += count_titles(text)
        return split, text

    def read(ctx: ReadContext) -> Iterator[tuple[str, str]]:
        done: set[str] = set()
        for split, origin in plan.items():
            if origin in done or not ({split} | {s for s, o in plan.items() if o == origin}) & ctx.wanted:
                continue
            done.add(origin)
            for lineno, text in files[origin](ctx):
                if cut is None or origin != "valid":  # a whole file is one split
                    yield emit(ctx, split, text)
                    continue
                end = lineno + text.count("\n")  # first line of the next block
                if end <= cut:
                    yield emit(ctx, "train", text)
                elif lineno >= cut:
                    yield emit(ctx, "valid", text)
                else:
                    at = nth_line_end(text, cut - lineno)
                    yield emit(ctx, "train", text[:at])
                    yield emit(ctx, "valid", text[at:])

    return TextSource(
        corpus=NAME, source=source_name, splits=tuple(s for s in SPLITS if s in plan), read=read, unit="line",
        total_bytes=total_bytes, info=info,
        split_info={s: {"from": SPLIT_FILES[o]} for s, o in plan.items() if o != s},
    )


def local_source(folder, read_opts: ReadOptions, *, skip_blank_lines=False, allow_missing_splits=False,
                 train_from="train", holdout_fraction=0.1) -> TextSource:
    folder = require_folder(folder, "wiki.{train,valid,test}.tokens")
    paths = {s: folder / name for s, name in SPLIT_FILES.items()}

    def factory(path: Path) -> BlockFactory:
        return lambda ctx: iter_blocks(path, read_opts, progress=ctx.progress)

    files = {s: factory(p) if p.is_file() else None for s, p in paths.items()}
    if train_from == "valid":
        files["train"] = None  # not read: train comes from the valid file
    total = sum(p.stat().st_size for s, p in paths.items() if files[s] is not None)
    return _make_source(files, str(folder), str(folder.resolve()), skip_blank_lines=skip_blank_lines,
                        allow_missing_splits=allow_missing_splits, train_from=train_from,
                        holdout_fraction=holdout_fraction, total_bytes=total)


def _hub_blocks(dataset: str, config: str, split: str) -> BlockFactory:
    def blocks(ctx: ReadContext) -> Iterator[tuple[int, str]]:
        rows = open_hub_split(dataset, config, split)
        parts, size, first = [], 0, 1
        for row in rows:
            line = row_text(row, "text", f"{dataset}/{config} [{split}]", hub_column_fix(dataset))
            if not line.endswith("\n"):
                line += "\n"  # the hub drops the line break of blank lines
            parts.append(line)
            size += len(line)
            if size >= HUB_BLOCK_CHARS:
                text = "".join(parts)
                yield first, text
                if ctx.progress is not None:
                    ctx.progress.update(len(text))
                first += text.count("\n")
                parts, size = [], 0
        if parts:
            yield first, "".join(parts)

    return blocks


def open_hub_split(dataset: str, config: str | None, split: str):
    """A streaming hub split; any failure (no network, unknown name) becomes a DataError."""
    try:
        from datasets import load_dataset

        return load_dataset(dataset, config, split=split, streaming=True) if config else \
            load_dataset(dataset, split=split, streaming=True)
    except Exception as e:  # the datasets library raises many kinds; all mean "cannot open it"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"cannot stream {dataset}{'/' + config if config else ''} split {split} from the Hugging Face hub ({first}); "
            "download the files and pass their folder with --source"
        ) from None


def hub_split_names(dataset: str, config: str | None) -> list[str]:
    """The splits a hub dataset has (one streaming open of the whole dataset); a DataError if it cannot be opened."""
    try:
        from datasets import load_dataset

        return list(load_dataset(dataset, config, streaming=True) if config else load_dataset(dataset, streaming=True))
    except Exception as e:  # the datasets library raises many kinds; all mean "cannot open it"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot open {dataset}{'/' + config if config else ''} on the Hugging Face hub ({first}); "
                        "download the files and pass their folder with --source") from None


def hub_source(dataset: str, config: str, *, skip_blank_lines=False, train_from="train", holdout_fraction=0.1,
               allow_missing_splits=False) -> TextSource:
    # With --allow-missing-splits the dataset is asked which splits it has (a train-only dataset is
    # then prepared as train only); without, every split is opened and a missing one is an error.
    have = set(hub_split_names(dataset, config)) if allow_missing_splits else set(HUB_SPLITS.values())
    files = {s: _hub_blocks(dataset, config, HUB_SPLITS[s]) if HUB_SPLITS[s] in have else None for s in SPLITS}
    if train_from == "valid":
        files["train"] = None
    return _make_source(files, f"hub:{dataset}", f"hub:{dataset}/{config}", skip_blank_lines=skip_blank_lines,
                        allow_missing_splits=allow_missing_splits, train_from=train_from, holdout_fraction=holdout_fraction,
                        total_bytes=None)
