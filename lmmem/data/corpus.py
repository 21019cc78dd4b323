"""A prepared corpus folder, as written by ``python -m data_prep``.

Layout::

    DIR/vocab.txt        token<TAB>training count, specials first (see lmmem.data.vocab)
    DIR/train.bin        token ids, little-endian uint32, one flat stream (documents joined,
    DIR/valid.bin        each line/paragraph followed by <eos> for word vocabularies)
    DIR/test.bin
    DIR/meta.json        format version, corpus, source, options, sizes, counts, vocab fingerprint

uint32 because WikiText-103's 267,735 types do not fit uint16. The ``.bin`` files are opened as
read-only memmaps, so a 4-billion-token GigaWord stream costs no resident memory up front.

Untrusted on open: a split's ``file`` must be a plain name inside the folder (never ``../x`` or an
absolute path), and every id must be below the vocabulary size (one chunked numpy pass per split,
about 0.1 s per 100M tokens), so a mixed-up folder fails here and not as an index error mid-run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmmem.data.vocab import Vocabulary
from lmmem.errors import DataError

META_FORMAT_VERSION = 1
TOKEN_DTYPE = np.dtype("<u4")
SPLITS = ("train", "valid", "test")


_CHECK_CHUNK = 1 << 24  # ids per step of the range check (64 MiB of a memmap at a time)


@dataclass
class PreparedCorpus:
    root: Path
    meta: dict
    vocab: Vocabulary
    _checked: set = field(default_factory=set, repr=False)  # splits whose ids were range-checked

    @classmethod
    def open(cls, root: str | Path) -> "PreparedCorpus":
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise DataError(f"{root} is a file; --data takes a prepared-corpus folder (the one given to `python -m data_prep ... --out`)")
        if not root.is_dir():
            raise DataError(f"prepared-data folder {root} does not exist; create it with `python -m data_prep <corpus> --out {root}`")
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{root} has no meta.json: it is not a prepared corpus; run `python -m data_prep <corpus> --out {root}`")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{meta_path} is not valid JSON ({e}); prepare the corpus again") from None
        if meta.get("format_version") != META_FORMAT_VERSION:
            raise DataError(
                f"{meta_path} has format version {meta.get('format_version')!r}, this lmmem reads {META_FORMAT_VERSION}; "
                "prepare the corpus again with this version of `python -m data_prep`"
            )
        vocab = Vocabulary.load(root / "vocab.txt")
        if meta.get("vocab_fingerprint") != vocab.fingerprint:
            raise DataError(
                f"{root}/vocab.txt does not match meta.json (fingerprint {vocab.fingerprint} vs "
                f"{meta.get('vocab_fingerprint')}): the folder mixes two preparations; prepare it again"
            )
        return cls(root, meta, vocab)

    @property
    def fingerprint(self) -> str:
        return self.vocab.fingerprint

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLITS if s in self.meta.get("splits", {})]

    def tokens(self, split: str) -> np.ndarray:
        """The split's token ids as a read-only uint32 memmap (no copy)."""
        info = self.meta.get("splits", {}).get(split)
        if info is None:
            have = ", ".join(self.splits) or "none"
            raise DataError(f"{self.root} has no '{split}' split (it has: {have}); choose another with --split, or prepare that split")
        name = info.get("file", f"{split}.bin")
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise DataError(
                f"{self.root}/meta.json names {name!r} as the '{split}' file; split files must be plain names inside the "
                "corpus folder: prepare the corpus again"
            )
        path = self.root / name
        if not path.is_file():
            raise DataError(f"{path} is missing; prepare the corpus again")
        n = int(info["tokens"])
        size = path.stat().st_size
        if size != n * TOKEN_DTYPE.itemsize:
            raise DataError(
                f"{path} holds {size} bytes but meta.json promises {n} uint32 tokens ({n * 4} bytes): "
                "the file is truncated or from another preparation; prepare the corpus again"
            )
        if n == 0:
            raise DataError(f"{path} is empty; the '{split}' split has no text")
        tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", shape=(n,))
        if split not in self._checked:
            top = max(int(tokens[i : i + _CHECK_CHUNK].max()) for i in range(0, n, _CHECK_CHUNK))
            if top >= len(self.vocab):
                raise DataError(
                    f"{path} holds token id {top} but {self.root}/vocab.txt has {len(self.vocab)} entries: the folder mixes "
                    "two preparations; prepare the corpus again"
                )
            self._checked.add(split)
        return tokens

    def text_units(self, split: str, chunk: int = 1 << 20):
        """The split as text, one string per unit (a line or paragraph: the tokens up to an ``<eos>``,
        which is left out), so that a model with its own tokenizer (a Hugging Face model) reads
        exactly the text, splits and ``<unk>`` words an lmmem model of this corpus reads, and their
        word-level numbers compare. Word tokens are joined by one space; SentencePiece pieces are
        joined and their ``▁`` word marks become spaces. Streams the split in chunks: memory does not
        grow with it. A last unit without ``<eos>`` is yielded too."""
        tokens = self.tokens(split)
        vocab = self.vocab.tokens
        eos = self.vocab.eos_id
        tok = self.meta.get("tokenizer")
        pieces = isinstance(tok, dict) and tok.get("type") == "sentencepiece"
        pending: list[int] = []
        for start in range(0, len(tokens), chunk):
            ids = np.asarray(tokens[start : start + chunk]).tolist()
            for i in ids:
                if i == eos:
                    yield _join(pending, vocab, pieces)
                    pending = []
                else:
                    pending.append(i)
        if pending:
            yield _join(pending, vocab, pieces)

    def train_counts(self) -> np.ndarray:
        """Training-split occurrence count of every vocabulary entry (for frequency buckets)."""
        return np.asarray(self.vocab.counts, dtype=np.int64)


def _join(ids: list[int], vocab: list[str], pieces: bool) -> str:
    if pieces:
        return "".join(vocab[i] for i in ids).replace("\u2581", " ").strip()
    return " ".join(vocab[i] for i in ids)
