"""Perplexity over a token stream, overall and bucketed by the target word's training frequency.

Rae et al. (2018) report WikiText-103 test perplexity in four buckets of training-set frequency:
>10K, 1K–10K, 100–1K and <100 occurrences. A bucket's perplexity is exp of the mean negative
log-likelihood over the test tokens whose *target* falls in it; its share is its fraction of the
scored tokens. Buckets are lower-inclusive: a word seen exactly 1,000 times is in 1K–10K.
``<unk>`` and ``<eos>`` are bucketed by their own training counts like any other entry.

Scoring streams the split in BPTT chunks and keeps only per-bucket sums (float64) on the device,
so memory does not grow with the length of the split. The per-token log-probabilities behind those
sums can be kept as well (:class:`TokenLogProbs`, ``evaluate.py --word-probs FILE``): every scoring
loop (this one, test_time.score_test_time, dynamic.score_dynamic) hands each batch's scored
log-probabilities to an ``on_scores(positions, log_probs)`` hook, so the file holds exactly the
numbers the reported perplexities are computed from.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from lmmem.data.batching import StreamBatcher
from lmmem.errors import LmmemError
from lmmem.output_layers.base import IGNORE_INDEX

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


class TokenLogProbs:
    """Log-probability of every scored target of a split under each method, by position.

    ``positions`` are indices into the split's token array (the target's index; the first token
    has no prediction). Fed by the scoring loops' ``on_scores`` hooks; written by :meth:`write`.
    """

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

    def write(self, path, *, vocab: list[str], train_counts: np.ndarray, buckets: "FrequencyBuckets") -> int:
        """One row per scored position: TSV (default) or JSON lines (``.jsonl``). Returns the rows."""
        from pathlib import Path

        path = Path(path)
        methods = list(self.log_probs)
        scored = np.nonzero(~np.isnan(self.log_probs[methods[0]]))[0] if methods else np.zeros(0, dtype=np.int64)
        for m in methods[1:]:
            if not np.array_equal(np.nonzero(~np.isnan(self.log_probs[m]))[0], scored):
                raise LmmemError(f"method {m} scored other positions than {methods[0]}; cannot write one row per token")
        bucket_of = buckets.assign(train_counts)
        names = buckets.names
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        jsonl = path.suffix.lower() == ".jsonl"
        with open(tmp, "w", encoding="utf-8") as f:
            if not jsonl:
                f.write("\t".join(["position", "word", "train_count", "bucket", *methods]) + "\n")
            for i in scored:
                t = int(self.tokens[i])
                values = [float(self.log_probs[m][i]) for m in methods]
                if jsonl:
                    row = {"position": int(i), "word": vocab[t], "train_count": int(train_counts[t]), "bucket": names[bucket_of[t]],
                           "log_probs": dict(zip(methods, values))}
                    f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
                else:
                    # repr: the shortest text that reads back as the same float, so sums reproduce the report
                    f.write(f"{i}\t{vocab[t]}\t{int(train_counts[t])}\t{names[bucket_of[t]]}\t" + "\t".join(map(repr, values)) + "\n")
        tmp.replace(path)
        return len(scored)


def autocast_context(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


@torch.no_grad()
def score_stream(
    model: torch.nn.Module,
    tokens: np.ndarray,
    *,
    bucket_of: np.ndarray,
    num_buckets: int,
    batch_size: int = 16,
    bptt: int = 128,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    max_tokens: int = 0,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    desc: str = "eval",
    context: int = 0,
    on_scores: Callable[[np.ndarray, torch.Tensor], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-bucket (NLL sum, token count) of this rank's rows of the stream.

    Every position of the stream is scored exactly once across ranks (rows are padded, padding is
    ignored). The model runs in eval mode (no dropout, no Hebbian statistics) and is put back in
    the mode it was in. Sum the returned arrays over ranks for the global figures.

    ``context`` C > 0 (Transformer only): a sliding window, fairseq's ``--context-window``; each
    step scores ``bptt`` new positions per row from a window of ``C + bptt`` inputs, so every token
    is predicted from at least C tokens before its input (fewer only at the split's start).
    ``on_scores(positions, log_probs)`` receives each batch's scored targets (see TokenLogProbs).
    """
    device = torch.device(device)
    if max_tokens:
        tokens = tokens[: max_tokens + 1]
    was_training = model.training
    model.eval()
    batcher = StreamBatcher(tokens, batch_size, bptt, rank=rank, world_size=world_size, pad=True, context=context)
    bucket_t = torch.as_tensor(bucket_of, dtype=torch.long, device=device)
    nll_sum = torch.zeros(num_buckets, dtype=torch.float64, device=device)
    count = torch.zeros(num_buckets, dtype=torch.float64, device=device)
    state = model.init_state(len(batcher.rows), device)
    if context and state is not None:
        raise LmmemError("--context (a sliding window) is for the Transformer: an LSTM carries its state from chunk to chunk, "
                         "so every token already sees all the text before it in its row; drop --context")
    try:
        for step in tqdm(range(len(batcher)), desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
            b = batcher.batch(step)
            x = b.inputs.to(device, non_blocking=True)
            y = b.targets.to(device, non_blocking=True).reshape(-1)
            with autocast_context(device, amp_dtype):
                h, state = model.hidden_states(x, state)
            nll = -model.output.target_log_probs(h.reshape(-1, h.shape[-1]), y).double()
            valid = y != IGNORE_INDEX
            bucket = bucket_t[y.clamp_min(0)]
            nll_sum.index_add_(0, bucket[valid], nll[valid])
            count.index_add_(0, bucket[valid], torch.ones_like(nll[valid]))
            if on_scores is not None:
                on_scores(b.target_positions.reshape(-1)[valid.cpu().numpy()], -nll[valid])
    finally:
        model.train(was_training)
    return nll_sum.cpu().numpy(), count.cpu().numpy()
