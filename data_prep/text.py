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

from collections.abc import Iterator
from pathlib import Path

from lmmem.data.corpus import SPLITS
from lmmem.data.text_reading import (  # noqa: F401  (units, row_text, split_of: used by the other readers too)
    iterate_rows as _iterate, kind_of as _kind, load_streamed as _load, open_hub, row_text, split_files, split_of, text_of,
    units,
)
from lmmem.data.text_source import ReadContext, TextSource

from data_prep import options as O
from data_prep.reading import ReadOptions, iter_blocks

NAME = "text"


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


def hub_column_fix(dataset: str) -> str:
    """What to do when a corpus subcommand's hub dataset lacks the column it reads."""
    return f"for another dataset use `python -m data_prep text --source hub:{dataset} --text-column COLUMN`"


def _rows_text(rows, column: str, where: str, unit: str, ctx: ReadContext, split: str) -> Iterator[tuple[str, str]]:
    for row in rows:
        value = text_of(row, column, where)
        if value is None:
            continue
        ctx.documents[split] += 1
        out = units(value, unit)
        if out:
            yield split, out


def local_source(source, read_opts: ReadOptions, *, text_column="text", unit="line", as_split="train",
                 allow_missing_splits=False) -> TextSource:
    path = Path(source).expanduser()
    files = split_files(path, as_split=as_split, allow_missing_splits=allow_missing_splits)
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
    splits_found, names, where = open_hub(dataset, config, allow_missing_splits=allow_missing_splits)

    def read(ctx: ReadContext) -> Iterator[tuple[str, str]]:
        for split, name in names.items():
            if split in ctx.wanted:
                yield from _rows_text(_iterate(splits_found[name], f"{where} [{name}]"), text_column, f"{where} [{name}]",
                                      unit, ctx, split)

    return TextSource(corpus=NAME, source=f"hub:{where}", splits=tuple(s for s in SPLITS if s in names), read=read,
                      unit=unit if unit == "row" else "line",
                      info={"text_column": text_column, "split_rule": f"the hub's own splits of {where}"},
                      split_info={s: {"from": n} for s, n in names.items() if n != s})
