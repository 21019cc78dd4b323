"""Any text: a ``.txt`` / ``.jsonl`` / ``.parquet`` file or folder, or a Hugging Face hub dataset.

Input, by what ``--source`` is:

* ``hub:NAME`` (``--hub-config`` for a configuration): the dataset's splits, streamed with
  ``datasets.load_dataset(NAME, CONFIG, streaming=True)``; ``train``, ``validation`` (or
  ``valid`` / ``dev``) and ``test`` are used, other splits ignored.
* a folder: its files whose names carry a split (``train.jsonl``, ``valid.txt``,
  ``data/test-00000-of-00001.parquet``, ``validation.parquet``, ``dev.txt``), searched
  recursively, one format per split.
* a single file: one split, ``--as-split`` (default train; test with ``--vocab-from``, where the
  point is to score the text).

``.parquet`` and ``.jsonl`` / ``.json`` (JSON lines) are read with ``datasets`` (the ``parquet`` and
``json`` builders, streamed); the text is the ``--text-column`` field (default ``text``) of every row.
Any other file is plain text, read with the bounded reader of ``data_prep.reading`` (``--encoding``,
``--encoding-errors``, ``--max-line-chars``); its lines are the rows.

A dataset without a valid or test split (many hub datasets have only train) is refused unless
``--allow-missing-splits``, which writes the splits that exist.

Units: ``--eos line`` (default) puts one ``<eos>`` after every non-blank line of a row's text;
``--eos row`` one after every row (its line breaks become spaces). Tokens: ``--rule regex``
(default; untokenised text) or ``whitespace`` (text that is already tokenised). Vocabulary:
count-based from train, ``--min-count`` (default 3) and/or ``--max-vocab`` -- or, with
``--vocab-from RUN_OR_CORPUS``, a trained model's own vocabulary and tokeniser.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from lmmem.data.corpus import SPLITS
from lmmem.data.text_source import ReadContext, TextSource
from lmmem.errors import DataError

from data_prep import options as O
from data_prep.reading import ReadOptions, iter_blocks

NAME = "text"
HUB_SPLIT_NAMES = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}
DATASETS_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
# a split name as a whole word of a file name: train.jsonl, valid-00000.parquet, wiki.test.txt
SPLIT_IN_NAME_RE = re.compile(r"(?:^|[-_.])(train|validation|valid|dev|test)(?=[-_.]|$)", re.IGNORECASE)
BLANK_LINE_RE = re.compile(r"^[^\S\n]*\n", re.MULTILINE)
TEXT_SUFFIXES = {".txt", ".text", ".tokens", ".raw", ""}


def add_arguments(p) -> None:
    p.add_argument("--source", required=True, metavar="FILE|FOLDER|hub:NAME",
                   help="a .txt/.jsonl/.parquet file, a folder of such files named by split (train.*, valid.*/validation.*, "
                        "test.*), or hub:NAME for a Hugging Face hub dataset")
    g = p.add_argument_group("text")
    g.add_argument("--text-column", default="text", help="the field holding the text in .jsonl/.parquet/hub rows (default text)")
    g.add_argument("--hub-config", default=None, help="configuration of the hub dataset, if it has several")
    g.add_argument("--as-split", choices=SPLITS, default=None,
                   help="the split a single --source file becomes (default train; test with --vocab-from)")
    g.add_argument("--eos", choices=("line", "row"), default="line",
                   help="one <eos> per non-blank line of the text (default), or per row")
    g.add_argument("--rule", choices=("regex", "whitespace"), default="regex",
                   help="word rule: regex for untokenised text (default), whitespace for tokenised text")
    O.add_common_arguments(p, min_count=3, rule="the --rule")


def run(args) -> dict:
    hub = args.source[4:] if args.source.startswith("hub:") and len(args.source) > 4 else None
    if hub:
        source = hub_source(hub, args.hub_config, args.text_column, unit=args.eos, allow_missing_splits=args.allow_missing_splits)
    else:
        if args.as_split is None and Path(args.source).is_file():  # recorded in meta.json as resolved
            args.as_split = "test" if getattr(args, "vocab_from", None) else "train"
        source = local_source(args.source, O.read_options(args), text_column=args.text_column, unit=args.eos,
                              as_split=args.as_split or "train", allow_missing_splits=args.allow_missing_splits)
    return O.run_prepare(args, source, rule=args.rule, min_count=3)


# ---------------------------------------------------------------------------------------------


def units(text: str, unit: str) -> str:
    """A row's text as units, one per line, ending with a line break ("" when it has none)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if unit == "row":
        text = " ".join(text.split())
        return text + "\n" if text else ""
    text = BLANK_LINE_RE.sub("", text if text.endswith("\n") else text + "\n")
    return text


def row_text(row: dict, column: str, where: str, fix: str = "pass --text-column with one of them"):
    """``row[column]``, or a DataError naming the columns there are (not a KeyError)."""
    try:
        return row[column]
    except KeyError:
        have = ", ".join(map(str, row)) or "none"
        raise DataError(f"{where} has no column {column!r} (its columns: {have}); {fix}") from None


def hub_column_fix(dataset: str) -> str:
    """What to do when a corpus subcommand's hub dataset lacks the column it reads."""
    return f"for another dataset use `python -m data_prep text --source hub:{dataset} --text-column COLUMN`"


def _rows_text(rows, column: str, where: str, unit: str, ctx: ReadContext, split: str) -> Iterator[tuple[str, str]]:
    for row in rows:
        value = row_text(row, column, where)
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(f"{where}: column {column!r} holds {type(value).__name__}, not text; pass --text-column with a text column")
        ctx.documents[split] += 1
        out = units(value, unit)
        if out:
            yield split, out


def _load(builder: str, data_files: dict, where: str):
    try:
        from datasets import load_dataset

        return load_dataset(builder, data_files=data_files, streaming=True)
    except Exception as e:  # the datasets library raises many kinds; all mean "cannot read it"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot read {where} as {builder} ({first}); check the file") from None


def _iterate(dataset, where: str):
    """Rows of a streamed dataset; a file that turns out unreadable mid-way becomes a DataError."""
    try:
        yield from dataset
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow / json errors of a malformed file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot read {where} ({first}); check the file") from None


def split_of(path: Path) -> str | None:
    """The split a file name names (``valid`` for validation/dev), or None."""
    m = None
    for m in SPLIT_IN_NAME_RE.finditer(path.name):
        pass
    if m is None:
        return None
    name = m.group(1).lower()
    return "valid" if name in ("validation", "dev") else name


def _kind(path: Path) -> str:
    return DATASETS_BUILDERS.get(path.suffix.lower(), "text")


def local_source(source, read_opts: ReadOptions, *, text_column="text", unit="line", as_split="train",
                 allow_missing_splits=False) -> TextSource:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist; pass a .txt/.jsonl/.parquet file or a folder of them with --source")
    if path.is_file():
        files = {as_split: [path]}
    else:
        candidates = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        files: dict[str, list[Path]] = {}
        for p in candidates:
            s = split_of(p.relative_to(path))
            if s is not None and (p.suffix.lower() in DATASETS_BUILDERS or p.suffix.lower() in TEXT_SUFFIXES):
                files.setdefault(s, []).append(p)
        if not files:
            raise DataError(f"{path} holds no file named by a split (train.*, valid.* or validation.*, test.*); "
                            "name the files so, or pass one file as --source")
        missing = [s for s in SPLITS if s not in files]
        if missing and not allow_missing_splits:
            raise DataError(f"{path} has no {', '.join(missing)} file(s); add them, or pass --allow-missing-splits to "
                            f"write only {', '.join(s for s in SPLITS if s in files)}")
    for split, paths in files.items():
        kinds = {_kind(p) for p in paths}
        if len(kinds) > 1:
            raise DataError(f"the {split} files of {path} mix formats ({', '.join(sorted(kinds))}); use one format per split")
    splits = tuple(s for s in SPLITS if s in files)

    def read(ctx: ReadContext) -> Iterator[tuple[str, str]]:
        for split in splits:
            if split not in ctx.wanted:
                continue
            kind = _kind(files[split][0])
            if kind == "text":
                for p in files[split]:
                    ctx.documents[split] += 1
                    for _, text in iter_blocks(p, read_opts, progress=ctx.progress):
                        out = units(text, "line")  # a line of a text file is a row: the same units either way
                        if out:
                            yield split, out
            else:
                where = ", ".join(map(str, files[split]))
                ds = _load(kind, {split: [str(p) for p in files[split]]}, where)[split]
                yield from _rows_text(_iterate(ds, where), text_column, where, unit, ctx, split)

    return TextSource(
        corpus=NAME, source=str(path.resolve()), splits=splits, read=read, unit=unit if unit == "row" else "line",
        total_bytes=sum(p.stat().st_size for ps in files.values() for p in ps),
        split_info={s: {"files": [str(p.relative_to(path)) if path.is_dir() else p.name for p in ps]} for s, ps in files.items()},
        info={"text_column": text_column} if any(_kind(p) != "text" for ps in files.values() for p in ps) else {},
    )


def hub_source(dataset: str, config: str | None, text_column: str = "text", *, unit="line",
               allow_missing_splits=False) -> TextSource:
    where = f"{dataset}{'/' + config if config else ''}"
    try:
        from datasets import load_dataset

        splits_found = load_dataset(dataset, config, streaming=True) if config else load_dataset(dataset, streaming=True)
    except Exception as e:  # the datasets library raises many kinds; all mean "cannot open it"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot open {where} on the Hugging Face hub ({first}); check the name and --hub-config, "
                        "or download the files and pass them with --source") from None
    names = {}
    for split, candidates in HUB_SPLIT_NAMES.items():
        name = next((c for c in candidates if c in splits_found), None)
        if name is not None:
            names[split] = name
    if not names:
        raise DataError(f"{where} has none of the splits train, validation, test (it has: {', '.join(splits_found)})")
    missing = [s for s in SPLITS if s not in names]
    if missing and not allow_missing_splits:
        raise DataError(f"{where} has no {', '.join(missing)} split (it has: {', '.join(splits_found)}); pass "
                        f"--allow-missing-splits to write only {', '.join(names)}")

    def read(ctx: ReadContext) -> Iterator[tuple[str, str]]:
        for split, name in names.items():
            if split in ctx.wanted:
                yield from _rows_text(_iterate(splits_found[name], f"{where} [{name}]"), text_column, f"{where} [{name}]",
                                      unit, ctx, split)

    return TextSource(corpus=NAME, source=f"hub:{where}", splits=tuple(s for s in SPLITS if s in names), read=read,
                      unit=unit if unit == "row" else "line",
                      info={"text_column": text_column, "split_rule": f"the hub's own splits of {where}"},
                      split_info={s: {"from": n} for s, n in names.items() if n != s})
