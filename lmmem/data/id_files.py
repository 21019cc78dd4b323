"""The binary passes over a split's token-id file (little-endian uint32, ``lmmem.data.corpus``).

While a corpus is written, each split's ids first go to ``.{split}.bin.tmp`` in the staging
folder (provisional ids for a word vocabulary, final ids for SentencePiece). Two passes follow,
each in fixed-size chunks so that memory does not grow with the corpus: :func:`bincount_file`
counts the ids (the vocabulary's counts), and :func:`finish_split` remaps provisional ids to final
ones in place and counts ``<unk>``, out-of-vocabulary tokens and units on the way.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lmmem.data.corpus import TOKEN_DTYPE
from lmmem.data.text_source import make_progress
from lmmem.data.vocab import Vocabulary

assert array("I").itemsize == 4, "array('I') must be 32-bit for the uint32 token files"
ARRAY_CHUNK = 1 << 22  # tokens per numpy chunk in the count and remap passes (16 MiB of uint32)
TMP_SUFFIX = ".bin.tmp"


def tmp_path(out: Path, split: str) -> Path:
    """Where a split's ids are written before they are final."""
    return out / f".{split}{TMP_SUFFIX}"


def read_chunks(f, n_tokens: int) -> Iterator[np.ndarray]:
    """The uint32 ids of an open file, ``ARRAY_CHUNK`` at a time. Plain reads, not a memmap:
    mapped pages count as resident memory, and a memmap of a 4-billion-token file would make the
    process look (and, under memory pressure, behave) like it held the whole file."""
    left = n_tokens
    while left > 0:
        chunk = np.fromfile(f, dtype=TOKEN_DTYPE, count=min(ARRAY_CHUNK, left))
        if len(chunk) == 0:
            raise RuntimeError(f"{f.name} ended {left} tokens early")
        left -= len(chunk)
        yield chunk


def bincount_file(path: Path, n_tokens: int, minlength: int) -> np.ndarray:
    """How often each id occurs in the first ``n_tokens`` ids of ``path`` (int64, ``minlength`` long)."""
    total = np.zeros(minlength, dtype=np.int64)
    with open(path, "rb") as f:
        for chunk in read_chunks(f, n_tokens):
            total += np.bincount(chunk, minlength=minlength)
    return total


def finish_split(path: Path, n_tokens: int, perm: np.ndarray | None, vocab: Vocabulary, quiet: bool, desc: str) -> dict:
    """Remap provisional ids in place (``perm``; None when ids are final already) and count."""
    stats = {"unk": 0, "oov": 0, "units": 0}
    unk, eos = vocab.unk_id, vocab.eos_id
    bar = make_progress(n_tokens, desc, quiet, unit="tok")
    with open(path, "r+b" if perm is not None else "rb") as f:
        pos = 0
        for prov in read_chunks(f, n_tokens):
            ids = perm[prov] if perm is not None else prov
            is_unk = ids == unk
            stats["unk"] += int(is_unk.sum())
            if perm is not None:
                # out-of-vocabulary: mapped to <unk> although the text did not say <unk> (id 1)
                stats["oov"] += int((is_unk & (prov != 1)).sum())
                f.seek(pos)
                ids.tofile(f)
            pos += prov.nbytes
            f.seek(pos)
            stats["units"] += int((ids == eos).sum())
            if bar is not None:
                bar.update(len(prov))
    if bar is not None:
        bar.close()
    return stats
