"""Sinks: what the engine's per-target log-probabilities become.

* :class:`GridSums`: per frequency bucket, the NLL sum of every grid point and the target count
  (float64, on the model's device: memory independent of the stream's length). Tuning reads the
  totals; each reported method reads its point's buckets (:meth:`GridSums.report`).
* :class:`TokenColumns`: the log-probability of every scored target under each *reported* method,
  by stream position (one float64 per token and method). The word-level and byte-level numbers and
  ``--word-probs`` are computed from these columns, so they hold exactly the numbers the reported
  perplexities come from.

A target's bucket is its vocabulary entry's training count (word-level corpora, and pieces of a
SentencePiece corpus) or, where words and tokens differ (Hugging Face tokenizers), the training
count of the whole word the token belongs to: ``bucket_of_position``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from lmmem.errors import LmmemError
from lmmem.evaluation.buckets import FrequencyBuckets, PerplexityReport


class GridSums:
    def __init__(self, points: int, num_buckets: int, *, device, bucket_of_vocab: np.ndarray | None = None,
                 bucket_of_position: np.ndarray | None = None):
        if (bucket_of_vocab is None) == (bucket_of_position is None):
            raise ValueError("give the buckets by vocabulary entry or by stream position (exactly one)")
        k = num_buckets
        self.nll = torch.zeros(points, k, dtype=torch.float64, device=device)
        self.count = torch.zeros(k, dtype=torch.float64, device=device)
        self._by_vocab = torch.as_tensor(bucket_of_vocab, dtype=torch.long, device=device) if bucket_of_vocab is not None else None
        self._by_position = bucket_of_position

    def add(self, positions: np.ndarray, targets: torch.Tensor, log_probs: torch.Tensor) -> None:
        """``log_probs`` ``(points, n)`` of ``n`` scored targets at these stream ``positions``."""
        if self._by_vocab is not None:
            bucket = self._by_vocab[targets]
        else:
            bucket = torch.as_tensor(self._by_position[positions], dtype=torch.long, device=self.nll.device)
        self.nll.index_add_(1, bucket, -log_probs)
        self.count.index_add_(0, bucket, torch.ones_like(log_probs[0]))

    def totals(self) -> np.ndarray:
        return self.nll.sum(-1).cpu().numpy()

    def report(self, buckets: FrequencyBuckets, point: int = 0) -> PerplexityReport:
        return PerplexityReport.from_sums(self.nll[point].cpu().numpy(), self.count.cpu().numpy(), buckets)

    def arrays(self, point: int = 0) -> tuple[np.ndarray, np.ndarray]:
        return self.nll[point].cpu().numpy(), self.count.cpu().numpy()


class TokenColumns:
    """``columns[name]``: float64 log-probability by stream position (NaN where not scored)."""

    def __init__(self, length: int, points: dict[str, int]):
        self.points = dict(points)
        self.columns = {name: np.full(length, np.nan) for name in points}

    def add(self, positions: np.ndarray, log_probs: torch.Tensor) -> None:
        for name, point in self.points.items():
            self.columns[name][positions] = log_probs[point].cpu().numpy()

    def nll(self, name: str) -> np.ndarray:
        return -self.columns[name]


class VocabLabels:
    """Row labels of ``--word-probs`` for a word (or piece) vocabulary: the target's entry, its
    training count and bucket."""

    def __init__(self, tokens: np.ndarray, vocab: list[str], train_counts: np.ndarray, buckets: FrequencyBuckets):
        self.tokens, self.vocab, self.counts = tokens, vocab, np.asarray(train_counts)
        self.bucket_of, self.names = buckets.assign(self.counts), buckets.names

    def row(self, i: int) -> dict:
        t = int(self.tokens[i])
        return {"word": self.vocab[t], "train_count": int(self.counts[t]), "bucket": self.names[self.bucket_of[t]]}


def write_word_probs(path, columns: dict[str, np.ndarray], labels) -> int:
    """One row per scored position — ``labels.row(position)`` then each method's natural-log
    probability — as TSV (default) or JSON lines (``.jsonl``), written to a temporary file and
    renamed into place. Returns the rows. Every column must have scored the same positions."""
    path = Path(path)
    methods = list(columns)
    scored = np.nonzero(~np.isnan(columns[methods[0]]))[0] if methods else np.zeros(0, dtype=np.int64)
    for m in methods[1:]:
        if not np.array_equal(np.nonzero(~np.isnan(columns[m]))[0], scored):
            raise LmmemError(f"method {m} scored other positions than {methods[0]}; cannot write one row per token")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    jsonl = path.suffix.lower() == ".jsonl"
    with open(tmp, "w", encoding="utf-8") as f:
        for n, i in enumerate(scored):
            label = labels.row(int(i))
            values = [float(columns[m][i]) for m in methods]
            if jsonl:
                f.write(json.dumps({"position": int(i), **label, "log_probs": dict(zip(methods, values))}, ensure_ascii=False,
                                   allow_nan=False) + "\n")
                continue
            if n == 0:
                f.write("\t".join(["position", *label, *methods]) + "\n")
            # repr: the shortest text that reads back as the same float, so sums reproduce the report
            f.write("\t".join([str(i), *map(str, label.values()), *map(repr, values)]) + "\n")
    tmp.replace(path)
    return len(scored)


class TokenLogProbs:
    """Log-probability of every scored target of a split under each method, by position, fed by
    ``on_scores`` hooks (:func:`lmmem.evaluation.perplexity.score_stream` takes one) and written by
    :meth:`write` (``positions`` index the split's token array; the first token has no prediction)."""

    def __init__(self, tokens: np.ndarray, max_tokens: int = 0):
        self.tokens = tokens[: max_tokens + 1] if max_tokens else tokens
        self.log_probs: dict[str, np.ndarray] = {}

    def hook(self, method: str) -> Callable[[np.ndarray, torch.Tensor], None]:
        """An ``on_scores`` hook that stores the log-probabilities of ``method``."""
        column = self.log_probs.setdefault(method, np.full(len(self.tokens), np.nan))

        def on_scores(positions: np.ndarray, log_probs: torch.Tensor) -> None:
            column[positions] = log_probs.detach().double().cpu().numpy()

        return on_scores

    def rename(self, names: dict[str, str]) -> None:
        self.log_probs = {names.get(m, m): v for m, v in self.log_probs.items()}

    def write(self, path, *, vocab: list[str], train_counts: np.ndarray, buckets: FrequencyBuckets) -> int:
        return write_word_probs(path, self.log_probs, VocabLabels(self.tokens, vocab, train_counts, buckets))
