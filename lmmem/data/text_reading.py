"""Text sources: rows of a file, a folder of files named by split, or a Hugging Face hub dataset.

The same sources ``python -m data_prep text`` reads (which builds on these functions) and the
evaluation reads for a model with its own tokenizer (a Hugging Face model): ``hub:NAME`` (the
dataset's ``train``, ``validation``/``valid``/``dev`` and ``test`` splits, streamed), a folder whose
files carry a split in their names (``train.jsonl``, ``data/test-00000-of-00001.parquet``,
``valid.txt``; searched recursively, one format per split), or a single file (one split).
``.parquet`` and ``.jsonl``/``.json`` rows are read with ``datasets`` (streamed), their text from a
column (default ``text``); other files are plain text, one row per line.

A row's text becomes *units*, one per line (:func:`units`): every non-blank line (``unit="line"``)
or the whole row on one line (``unit="row"``). A unit is what one ``<eos>`` ends in a prepared
corpus, and a line of the text an evaluated model reads.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from lmmem.data.corpus import SPLITS
from lmmem.errors import DataError

HUB_SPLIT_NAMES = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}
DATASETS_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
# a split name as a whole word of a file name: train.jsonl, valid-00000.parquet, wiki.test.txt
SPLIT_IN_NAME_RE = re.compile(r"(?:^|[-_.])(train|validation|valid|dev|test)(?=[-_.]|$)", re.IGNORECASE)
BLANK_LINE_RE = re.compile(r"^[^\S\n]*\n", re.MULTILINE)
TEXT_SUFFIXES = {".txt", ".text", ".tokens", ".raw", ""}


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


def text_of(row: dict, column: str, where: str) -> str | None:
    """The text of a row (None for a null), refusing a non-text column."""
    value = row_text(row, column, where)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{where}: column {column!r} holds {type(value).__name__}, not text; pass --text-column with a text column")
    return value


def load_streamed(builder: str, data_files: dict, where: str):
    """``datasets.load_dataset(builder, data_files=..., streaming=True)``, a DataError if it fails."""
    try:
        from datasets import load_dataset

        return load_dataset(builder, data_files=data_files, streaming=True)
    except Exception as e:  # the datasets library raises many kinds; all mean "cannot read it"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot read {where} as {builder} ({first}); check the file") from None


def iterate_rows(dataset, where: str):
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


def kind_of(path: Path) -> str:
    """``parquet`` / ``json`` (read with datasets) or ``text``."""
    return DATASETS_BUILDERS.get(path.suffix.lower(), "text")


def split_files(source, *, as_split: str = "train", allow_missing_splits: bool = False) -> dict[str, list[Path]]:
    """``{split: files}`` of a file (one split, ``as_split``) or a folder of files named by split."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist; pass a .txt/.jsonl/.parquet file or a folder of them with --source")
    if path.is_file():
        return {as_split: [path]}
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
        kinds = {kind_of(p) for p in paths}
        if len(kinds) > 1:
            raise DataError(f"the {split} files of {path} mix formats ({', '.join(sorted(kinds))}); use one format per split")
    return {s: files[s] for s in SPLITS if s in files}


def open_hub(dataset: str, config: str | None, *, allow_missing_splits: bool = False) -> tuple[dict, dict[str, str], str]:
    """A hub dataset's streamed splits, ``{split: the hub's name for it}``, and its display name."""
    where = f"{dataset}{'/' + config if config else ''}"
    try:
        from datasets import load_dataset

        found = load_dataset(dataset, config, streaming=True) if config else load_dataset(dataset, streaming=True)
    except Exception as e:  # the datasets library raises many kinds; all mean "cannot open it"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot open {where} on the Hugging Face hub ({first}); check the name and --hub-config, "
                        "or download the files and pass them with --source") from None
    names = {}
    for split, candidates in HUB_SPLIT_NAMES.items():
        name = next((c for c in candidates if c in found), None)
        if name is not None:
            names[split] = name
    if not names:
        raise DataError(f"{where} has none of the splits train, validation, test (it has: {', '.join(found)})")
    missing = [s for s in SPLITS if s not in names]
    if missing and not allow_missing_splits:
        raise DataError(f"{where} has no {', '.join(missing)} split (it has: {', '.join(found)}); pass "
                        f"--allow-missing-splits to write only {', '.join(names)}")
    return found, names, where


def iter_documents(source: str, split: str, *, text_column: str = "text", hub_config: str | None = None,
                   unit: str = "line") -> Iterator[str]:
    """The documents of one split of a source, each a row's text as units (one per line, each
    ending in a line break): a line of a plain-text file, a row of a JSON-lines / parquet file or
    of a hub dataset. Blank rows are skipped."""
    if source.startswith("hub:") and len(source) > 4:
        found, names, where = open_hub(source[4:], hub_config, allow_missing_splits=True)
        if split not in names:
            raise DataError(f"{where} has no {split} split (it has: {', '.join(found)})")
        rows, where = iterate_rows(found[names[split]], f"{where} [{names[split]}]"), f"{where} [{names[split]}]"
    else:
        files = split_files(source, as_split=split, allow_missing_splits=True)
        if split not in files:
            raise DataError(f"{source} has no {split} file (it has: {', '.join(files)}); name the files by split")
        where = ", ".join(map(str, files[split]))
        kind = kind_of(files[split][0])
        builder, column = (kind, text_column) if kind != "text" else ("text", "text")
        rows = iterate_rows(load_streamed(builder, {split: [str(p) for p in files[split]]}, where)[split], where)
        text_column = column
    for row in rows:
        text = text_of(row, text_column, where)
        out = units(text, unit) if text is not None else ""
        if out:
            yield out
