"""Scoring a model object on a token array through the engine, for tests: the grid of the memories
(cache θ/λ, MbPA λ) and dynamic evaluation, with lmmem's bptt layout."""

from __future__ import annotations

import numpy as np

from lmmem.evaluation.adapters import LmmemAdapter
from lmmem.evaluation.dynamic import DynamicConfig, gradient_statistics
from lmmem.evaluation.engine import DynamicRun, run_pass, training_pairs
from lmmem.evaluation.methods import CacheMemory, MbPAMemory, MemorySet
from lmmem.evaluation.sinks import GridSums
from lmmem.evaluation.windows import BpttWindows


class Scores:
    def __init__(self, sums: GridSums, grid, result):
        self.sums, self.grid, self.result = sums, grid, result
        self.count = sums.count.cpu().numpy()

    def at(self, **point) -> np.ndarray:
        """Per-bucket NLL sums of the grid point (unnamed axes: their first value, λ = 0)."""
        return self.sums.nll[self.grid.index(**point)].cpu().numpy()

    @property
    def nll(self) -> np.ndarray:
        return self.sums.nll.cpu().numpy()


def score(model, tokens, *, bucket_of=None, num_buckets=1, batch_size=4, bptt=8, streams=None, cache=None, mbpa=None,
          thetas=None, cache_lambdas=(), mbpa_lambdas=(), train_tokens=None, dynamic: DynamicConfig | None = None,
          on_scores=None) -> Scores:
    adapter = LmmemAdapter(model)
    mems = []
    if cache is not None:
        mems.append(CacheMemory(cache, thetas or [cache.theta], list(cache_lambdas) or [cache.lam]))
    if mbpa is not None:
        prefill = None
        if mbpa.train_pairs:
            if train_tokens is None:
                raise ValueError("MbPA's train_pairs needs the train split's tokens")
            prefill = training_pairs(adapter, train_tokens, mbpa.train_pairs, bptt=bptt, with_lse=mbpa.vocab > 0)
        mems.append(MbPAMemory(mbpa, list(mbpa_lambdas) or [mbpa.lam], prefill=prefill))
    memset = MemorySet(mems)
    if bucket_of is None:
        bucket_of = np.zeros(adapter.vocab_size, dtype=np.int64)
    seg = (dynamic.segment if dynamic is not None else None) or bptt
    groups = BpttWindows(tokens, batch_size=batch_size, bptt=seg, streams=streams).groups()
    sums = GridSums(memset.grid.size, num_buckets, device="cpu", bucket_of_vocab=bucket_of)
    run = None
    if dynamic is not None:
        stats = None
        if dynamic.method == "rms":
            if train_tokens is None:
                raise ValueError("the rms variant needs training data for its gradient statistics")
            stats = gradient_statistics(adapter, train_tokens, batch_size=batch_size, bptt=seg, batches=dynamic.stat_batches)
        run = DynamicRun(dynamic, stats)
    result = run_pass(adapter, groups, memset, sums, dynamic=run, on_scores=on_scores)
    return Scores(sums, memset.grid, result)
