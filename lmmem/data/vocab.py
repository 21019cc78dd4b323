"""Word vocabularies: ordered tokens with their training counts, saved as ``vocab.txt``.

File format (UTF-8, one entry a line): ``token<TAB>count``. Special tokens come first, in the
order given when the vocabulary was built, then every other token by training count, most
frequent first, ties broken by the token's string so that the order is deterministic. The id of
a token is its line number (0-based). The counts are the token's occurrences in the *training*
split after rare words were mapped to ``<unk>``; evaluation buckets perplexity by them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from lmmem.errors import DataError

EOS = "<eos>"
UNK = "<unk>"
DEFAULT_SPECIALS = (EOS, UNK)


class Vocabulary:
    """An ordered token list; ``ids[token]`` is the token's row in the embedding and softmax."""

    def __init__(self, tokens: list[str], counts: list[int], specials: Iterable[str] = DEFAULT_SPECIALS):
        if len(tokens) != len(counts):
            raise ValueError("tokens and counts must have the same length")
        self.tokens = list(tokens)
        self.counts = [int(c) for c in counts]
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        if len(self.ids) != len(self.tokens):
            dup = next(t for t in self.tokens if self.tokens.count(t) > 1)
            raise DataError(f"vocabulary lists {dup!r} twice; rebuild it with `python -m data_prep`")
        self.specials = tuple(s for s in specials if s in self.ids)
        self.unk_id = self.ids.get(UNK)
        self.eos_id = self.ids.get(EOS)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_counts(
        cls,
        counts: Mapping[str, int],
        *,
        min_count: int = 1,
        max_size: int | None = None,
        specials: Iterable[str] = DEFAULT_SPECIALS,
    ) -> "Vocabulary":
        """Keep tokens seen at least ``min_count`` times (and at most ``max_size`` entries in all,
        specials included); every dropped token's count is added to ``<unk>``."""
        specials = tuple(specials)
        kept = sorted(
            ((t, c) for t, c in counts.items() if t not in specials and c >= min_count),
            key=lambda tc: (-tc[1], tc[0]),
        )
        if max_size is not None:
            if max_size <= len(specials):
                raise DataError(f"--max-vocab {max_size} leaves no room beside the {len(specials)} special tokens")
            kept = kept[: max_size - len(specials)]
        kept_set = {t for t, _ in kept}
        special_counts = {s: int(counts.get(s, 0)) for s in specials}
        if UNK in special_counts:
            special_counts[UNK] += sum(c for t, c in counts.items() if t not in kept_set and t not in specials)
        tokens = list(specials) + [t for t, _ in kept]
        return cls(tokens, [special_counts[s] for s in specials] + [c for _, c in kept], specials)

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for tok, cnt in zip(self.tokens, self.counts):
                f.write(f"{tok}\t{cnt}\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, specials: Iterable[str] = DEFAULT_SPECIALS) -> "Vocabulary":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"no vocabulary at {path}; prepare the corpus first with `python -m data_prep`")
        tokens, counts = [], []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\n")
                tok, sep, cnt = line.rpartition("\t")
                if not sep or not (cnt.isascii() and cnt.isdigit()):  # str.isdigit alone accepts "²" and "٣"
                    raise DataError(f"{path}:{lineno} is not `token<TAB>count`; re-run `python -m data_prep`")
                tokens.append(tok)
                counts.append(int(cnt))
        if not tokens:
            raise DataError(f"{path} is empty; re-run `python -m data_prep`")
        return cls(tokens, counts, specials)

    # -- use ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self.ids

    def encode(self, words: Iterable[str]) -> list[int]:
        unk = self.unk_id
        if unk is None:
            return [self.ids[w] for w in words]
        get = self.ids.get
        return [get(w, unk) for w in words]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[i] for i in ids]

    @property
    def fingerprint(self) -> str:
        """A short hash of the token list (not the counts): checkpoints and prepared data carry it
        so that a model is never evaluated with a vocabulary other than the one it was trained on."""
        h = hashlib.sha256()
        for tok in self.tokens:
            h.update(tok.encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()[:16]
