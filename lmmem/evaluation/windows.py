"""Window conventions: how a token stream is cut into the model's inputs, and which targets each
window scores. Every result names its convention and parameters, because the same model on the
same text scores differently under each, and tools quote different ones.

* ``bptt`` (:class:`BpttWindows`, lmmem's own): the stream is cut into ``streams`` equally long
  rows read side by side in chunks of ``bptt`` inputs (:class:`lmmem.data.batching.StreamBatcher`);
  an LSTM carries its state from chunk to chunk, a Transformer starts every chunk afresh. Every
  target is scored once.
* ``sliding`` (:class:`SlidingWindows`): Hugging Face's strided evaluation ("Perplexity of
  fixed-length models"): windows of ``max_length = W + 1`` tokens start every ``stride = W − C``
  tokens; each window scores only the targets no earlier window scored (labels −100 on the
  overlap), so every target but those of the first window is predicted from at least ``C + 1``
  tokens (its input and C before it). Here a window is given as its ``W`` inputs: the window's last
  token is only a target, and a causal model's predictions do not depend on inputs after them.
* ``lm-eval`` (:class:`LmEvalWindows`): lm-evaluation-harness's ``loglikelihood_rolling``:
  every document separately, its first token predicted from a prefix token (BOS, else EOS), then
  disjoint windows of ``W`` predictions (``get_rolling_token_windows(context_len=1)`` and
  ``make_disjoint_window``), the last window filled with as much context as fits.

A convention yields *groups* of batches. A group starts fresh memories (and a fresh LSTM state);
within a group, batch row ``r`` always continues the same *stream*, so the cache and MbPA see each
stream's targets in order. ``Batch.order`` says which flattened batch positions are a stream's
scored targets, in stream order (None: the rows are the streams, position by position, as ``bptt``
lays them out).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from lmmem.data.batching import StreamBatcher
from lmmem.errors import LmmemError
from lmmem.output_layers.base import IGNORE_INDEX

WINDOW_CONVENTIONS = ("bptt", "sliding", "lm-eval")


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64, IGNORE_INDEX where not scored
    positions: np.ndarray  # (B, T) index of each target in the stream, -1 where not scored
    order: np.ndarray | None = None  # (streams, T'): flat indices of each stream's targets in order, -1 padding


@dataclass
class Group:
    rows: int  # streams (memory rows) of this group
    steps: int
    batch: "callable"  # step -> Batch


class BpttWindows:
    """lmmem's layout: ``streams`` rows (default: ``batch_size``) read ``batch_size`` at a time in
    chunks of ``bptt``. ``context`` C > 0 is score_stream's row-wise sliding window (each chunk's
    inputs start C positions earlier); ``shard=(rank, world)`` keeps one rank's rows of one group
    (data-parallel validation)."""

    convention = "bptt"

    def __init__(self, tokens: np.ndarray, *, batch_size: int, bptt: int, streams: int | None = None, context: int = 0,
                 shard: tuple[int, int] | None = None):
        self.tokens, self.bptt, self.context = tokens, bptt, context
        self.streams = streams or batch_size
        if self.streams % batch_size:
            raise LmmemError(f"--streams ({self.streams}) must be a multiple of --batch-size ({batch_size})")
        self.batch_size = batch_size
        if shard is not None:
            rank, world = shard
            self._batchers = [StreamBatcher(tokens, batch_size, bptt, rank=rank, world_size=world, pad=True, context=context)]
        else:
            groups = self.streams // batch_size
            self._batchers = [StreamBatcher(tokens, self.streams, bptt, rank=g, world_size=groups, pad=True, context=context)
                              for g in range(groups)]

    def describe(self) -> dict:
        out = {"convention": "bptt", "bptt": self.bptt, "streams": self.streams, "batch_size": self.batch_size}
        if self.context:
            out["row_context"] = self.context
        return out

    def groups(self) -> list[Group]:
        def batch_of(batcher):
            def batch(step: int) -> Batch:
                b = batcher.batch(step)
                return Batch(b.inputs, b.targets, b.target_positions)
            return batch
        return [Group(len(b.rows), len(b), batch_of(b)) for b in self._batchers]


@dataclass
class _Window:
    inputs: np.ndarray  # (T,) ids
    first: int  # stream index of the target of input 0
    scored: int  # targets from this offset on are scored (the earlier ones are context)


class _StreamWindows:
    """Windows of several streams, ``per_stream`` of each stream per batch; the rows of a batch
    are stream-major (stream 0's windows, then stream 1's ...)."""

    def __init__(self, windows: list[list[_Window]], targets: np.ndarray, per_stream: int, pad_id: int = 0):
        self.windows, self.targets, self.per_stream, self.pad_id = windows, targets, per_stream, pad_id

    def group(self) -> Group:
        steps = max((math.ceil(len(w) / self.per_stream) for w in self.windows), default=0)
        return Group(len(self.windows), steps, self.batch)

    def batch(self, step: int) -> Batch:
        rows: list[_Window | None] = []
        for stream in self.windows:
            part = stream[step * self.per_stream : (step + 1) * self.per_stream]
            rows += part + [None] * (self.per_stream - len(part))
        width = max((len(w.inputs) for w in rows if w is not None), default=1)
        inputs = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        positions = np.full((len(rows), width), -1, dtype=np.int64)
        for r, w in enumerate(rows):
            if w is None:
                continue
            n = len(w.inputs)
            inputs[r, :n] = w.inputs
            positions[r, w.scored:n] = w.first + np.arange(w.scored, n)
        targets = np.where(positions >= 0, np.asarray(self.targets[np.maximum(positions, 0)], dtype=np.int64), IGNORE_INDEX)
        return Batch(torch.from_numpy(inputs), torch.from_numpy(targets), positions, self._order(positions))

    def _order(self, positions: np.ndarray) -> np.ndarray:
        flat = positions.reshape(len(self.windows), -1)  # stream-major rows: one line per stream
        width = flat.shape[1]
        lines = []
        for s, line in enumerate(flat):
            idx = np.flatnonzero(line >= 0)
            idx = idx[np.argsort(line[idx], kind="stable")]
            lines.append(s * width + idx)
        out = np.full((len(lines), max((len(x) for x in lines), default=0)), -1, dtype=np.int64)
        for s, idx in enumerate(lines):
            out[s, : len(idx)] = idx
        return out


def _stretches(n_targets: int, streams: int) -> list[tuple[int, int]]:
    """[first target, end) of each of ``streams`` equal stretches of targets 1..n_targets."""
    per = math.ceil(n_targets / streams)
    return [(1 + s * per, min(1 + (s + 1) * per, n_targets + 1)) for s in range(streams) if 1 + s * per <= n_targets]


class SlidingWindows:
    """Hugging Face's strided loop over each of ``streams`` stretches (default one: the stream as
    HF reads it). ``window`` W inputs (max_length W + 1), ``context`` C: stride W − C.
    ``batch_size`` windows per batch (a multiple of ``streams``)."""

    convention = "sliding"

    def __init__(self, tokens: np.ndarray, *, window: int, context: int, batch_size: int, streams: int = 1):
        if not 0 <= context < window:
            raise LmmemError(f"--context {context} must be between 0 and the window − 1 = {window - 1} (each window of "
                             f"{window} inputs scores window − context new tokens); lower --context or raise --bptt")
        if batch_size % streams:
            raise LmmemError(f"--batch-size ({batch_size}) must be a multiple of --streams ({streams}) with --window sliding")
        self.tokens, self.window, self.context, self.streams, self.batch_size = tokens, window, context, streams, batch_size
        stride = window - context
        per_stream = []
        for first, end in _stretches(len(tokens) - 1, streams):
            per_stream.append(self._windows(first - 1, end, stride))
        self._inner = _StreamWindows(per_stream, tokens, batch_size // streams)

    def _windows(self, start: int, end: int, stride: int) -> list[_Window]:
        """HF's loop over tokens [start, end): windows [begin, min(begin + W + 1, end)), scoring the
        targets from the previous window's end on (from start + 1 for the first)."""
        out, prev_end = [], start + 1
        for begin in range(start, end, stride):
            stop = min(begin + self.window + 1, end)
            if stop > prev_end:
                out.append(_Window(np.asarray(self.tokens[begin : stop - 1], dtype=np.int64), begin + 1, prev_end - begin - 1))
            prev_end = stop
            if stop == end:
                break
        return out

    def describe(self) -> dict:
        return {"convention": "sliding", "window": self.window, "context": self.context, "stride": self.window - self.context,
                "max_length": self.window + 1, "streams": self.streams, "batch_size": self.batch_size}

    def groups(self) -> list[Group]:
        return [self._inner.group()]


class LmEvalWindows:
    """lm-evaluation-harness's rolling loglikelihood, per document (``doc_starts``: the stream index
    of each document's first token, and the stream's length last). ``window`` W: the model's
    max_length. Documents are dealt to ``streams`` in contiguous blocks."""

    convention = "lm-eval"

    def __init__(self, tokens: np.ndarray, doc_starts: np.ndarray, *, window: int, prefix_token: int, batch_size: int,
                 streams: int = 1):
        if batch_size % streams:
            raise LmmemError(f"--batch-size ({batch_size}) must be a multiple of --streams ({streams}) with --window lm-eval")
        self.window, self.prefix_token, self.streams, self.batch_size = window, prefix_token, streams, batch_size
        docs = [(int(a), int(b)) for a, b in zip(doc_starts[:-1], doc_starts[1:]) if b > a]
        blocks = np.array_split(np.arange(len(docs)), min(streams, max(len(docs), 1)))
        per_stream = [[w for d in block for w in self._windows(tokens, *docs[d])] for block in blocks if len(block)]
        self._inner = _StreamWindows(per_stream, tokens, batch_size // streams)

    def _windows(self, tokens: np.ndarray, a: int, b: int) -> list[_Window]:
        W, n = self.window, b - a
        doc = np.asarray(tokens[a:b], dtype=np.int64)
        first = min(W, n)
        out = [_Window(np.concatenate([[self.prefix_token], doc[: first - 1]]), a, 0)]
        done = first
        while done < n:
            take = min(n - done, W)
            end = done + take  # lm-eval feeds the W tokens before the last prediction and scores the last `take`
            out.append(_Window(doc[end - W - 1 : end - 1], a + end - W, W - take))
            done = end
        return out

    def describe(self) -> dict:
        return {"convention": "lm-eval", "max_length": self.window, "prefix_token": self.prefix_token,
                "streams": self.streams, "batch_size": self.batch_size}

    def groups(self) -> list[Group]:
        return [self._inner.group()]


def total_steps(groups: list[Group]) -> int:
    return sum(g.steps for g in groups)


def iterate(groups: list[Group]) -> Iterator[tuple[int, int, Batch]]:
    """(group index, step, batch) in order."""
    for gi, g in enumerate(groups):
        for step in range(g.steps):
            yield gi, step, g.batch(step)
