"""Perplexity overall and bucketed by the target word's training frequency.

Rae et al. (2018) report WikiText-103 test perplexity in four buckets of training-set frequency:
>10K, 1K–10K, 100–1K and <100 occurrences. A bucket's perplexity is exp of the mean negative
log-likelihood over the test tokens whose *target* falls in it; its share is its fraction of the
scored tokens. Buckets are lower-inclusive: a word seen exactly 1,000 times is in 1K–10K.
``<unk>`` and ``<eos>`` are bucketed by their own training counts like any other entry.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

DEFAULT_BUCKET_EDGES = (10_000, 1_000, 100)


def _short(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000}K"
    return str(n)


@dataclass(frozen=True)
class FrequencyBuckets:
    """Descending lower edges, e.g. (10000, 1000, 100) → >10K, 1K–10K, 100–1K, <100."""

    edges: tuple[int, ...] = DEFAULT_BUCKET_EDGES

    def __post_init__(self):
        if not self.edges or list(self.edges) != sorted(set(self.edges), reverse=True) or min(self.edges) <= 0:
            raise ValueError(f"bucket edges must be distinct positive numbers, e.g. 10000,1000,100 (got {self.edges})")

    @classmethod
    def parse(cls, text: str) -> "FrequencyBuckets":
        try:
            edges = sorted({int(x) for x in text.split(",") if x.strip()}, reverse=True)
        except ValueError:
            raise ValueError(f"--buckets takes comma-separated counts such as 10000,1000,100, not {text!r}") from None
        return cls(tuple(edges))

    @property
    def names(self) -> list[str]:
        e = self.edges
        names = [f">{_short(e[0])}"]
        names += [f"{_short(lo)}–{_short(hi)}" for hi, lo in zip(e, e[1:])]
        names.append(f"<{_short(e[-1])}")
        return names

    @property
    def ranges(self) -> list[tuple[int, int | None]]:
        """[lo, hi) training-count range of each bucket (hi None = unbounded)."""
        e = self.edges
        return [(e[0], None)] + [(lo, hi) for hi, lo in zip(e, e[1:])] + [(0, e[-1])]

    def assign(self, counts: np.ndarray) -> np.ndarray:
        """Bucket index of every vocabulary entry from its training count."""
        counts = np.asarray(counts)
        out = np.full(counts.shape, len(self.edges), dtype=np.int64)
        for i in reversed(range(len(self.edges))):
            out[counts >= self.edges[i]] = i
        return out


@dataclass
class BucketResult:
    name: str
    min_count: int
    max_count: int | None  # exclusive; None = unbounded
    tokens: int
    share: float
    loss: float | None
    perplexity: float | None


@dataclass
class PerplexityReport:
    tokens: int
    loss: float
    perplexity: float
    buckets: list[BucketResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_sums(cls, nll: np.ndarray, count: np.ndarray, buckets: FrequencyBuckets) -> "PerplexityReport":
        total = int(count.sum())
        loss = float(nll.sum() / max(total, 1))
        rows = []
        for name, (lo, hi), s, c in zip(buckets.names, buckets.ranges, nll, count):
            c = int(c)
            bl = float(s / c) if c else None
            rows.append(BucketResult(name, lo, hi, c, c / total if total else 0.0, bl, _exp(bl)))
        return cls(total, loss, _exp(loss), rows)


def _exp(x: float | None) -> float | None:
    if x is None:
        return None
    return math.exp(x) if x < 700 else float("inf")


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)
