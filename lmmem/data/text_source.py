"""What a corpus reader hands the corpus writer: a :class:`TextSource`.

A reader (``data_prep``'s ``wikitext``, ``gutenberg``, ``gigaword``, ``text``; the synthetic
generator in :mod:`lmmem.data.synthetic`) only turns its input into a stream of ``(split, text)``
pairs whose text holds one unit (line, paragraph, sentence) per line, plus what ``meta.json``
should say about it. :func:`lmmem.data.writer.prepare` does everything else, once for all corpora.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm


@dataclass
class ReadContext:
    """Passed to a reader's ``read``; the reader fills ``documents`` and ``info`` as it goes."""

    wanted: frozenset[str]  # splits the writer wants this pass (a reader may skip the others)
    progress: Any = None  # a tqdm bar counting bytes read, or None
    documents: Counter = field(default_factory=Counter)
    info: dict = field(default_factory=dict)  # extra top-level meta.json fields found while reading
    split_info: dict = field(default_factory=dict)  # extra per-split meta.json fields


@dataclass
class TextSource:
    corpus: str  # meta.json "corpus"
    source: str  # meta.json "source": folder or hub dataset
    splits: tuple[str, ...]  # the splits this source will produce, in SPLITS order
    read: Callable[[ReadContext], Iterator[tuple[str, str]]]  # yields (split, text, one unit per line)
    unit: str  # what one <eos> ends: "line", "paragraph", "sentence", ...
    total_bytes: int | None = None  # for the progress bar
    info: dict = field(default_factory=dict)  # static extra meta.json fields
    split_info: dict = field(default_factory=dict)  # static extra per-split fields, {split: {...}}


class _Bar(tqdm):
    # No monitor thread: it is not needed here, and a live thread would make the tokeniser
    # workers fall back from fork to the much slower spawn.
    monitor_interval = 0


def make_progress(total: int | None, desc: str, quiet: bool, unit: str = "B"):
    """A tqdm bar on stderr when it is a terminal, else None (logs and CI stay clean)."""
    if quiet or not sys.stderr.isatty():
        return None
    return _Bar(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, dynamic_ncols=True)
