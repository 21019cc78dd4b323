"""Choosing the test-time methods' settings on the validation split, one pass per grid.

The memories' grid (θ and λ of the cache, λ of MbPA, k, temperature and λ of kNN-LM) is scored in
one pass: every point's per-bucket NLL sums come out of the same per-token probabilities
(lmmem.evaluation.methods). For each memory alone and for all of them together the point of
lowest validation NLL is chosen. Dynamic evaluation costs one pass per learning rate (the rms rule's
training statistics are computed once); each of these passes carries the memories' grid too, so
``+dynamic+<memories>`` gets its λs at the learning rate chosen for ``+dynamic``. The test split is
then scored once with the chosen values (lmmem.evaluation.run).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from lmmem.errors import LmmemError
from lmmem.evaluation.config import Methods, TuneGrid
from lmmem.evaluation.engine import DynamicRun
from lmmem.evaluation.methods import KNNVariants, MemorySet
from lmmem.evaluation.results import Row, row_name
from lmmem.output_layers.base import IGNORE_INDEX

AXES_OF = {"cache": ("theta", "cache_lambda"), "mbpa": ("mbpa_lambda",), "knn": ("knn", "knn_lambda")}


def _round(x: float) -> float:
    """A grid value without binary noise (3e-4 × 0.3 is 8.999999999999999e-05; this gives 9e-05)."""
    return float(f"{x:.12g}")


def untuned_rows(methods: Methods, knn=None) -> list:
    """The rows of the table with the configured values: plain, each memory alone, all of them
    together (two or more), then dynamic evaluation alone and with all the memories."""
    points = {}
    if methods.cache is not None:
        points["cache"] = {"theta": methods.cache.theta, "cache_lambda": methods.cache.lam}
    if methods.mbpa is not None:
        points["mbpa"] = {"mbpa_lambda": methods.mbpa.lam}
    if knn is not None:
        cfg = knn.config
        points["knn"] = {"knn": (cfg.k, cfg.temperature), "knn_lambda": cfg.lam}
    mems = methods.memories
    union = {k: v for m in mems for k, v in points[m].items()}
    rows = [Row("plain", False)] + [Row(row_name((m,)), False, points[m]) for m in mems]
    if len(mems) > 1:
        rows.append(Row(row_name(mems), False, union))
    if methods.dynamic is not None:
        rows.append(Row("+dynamic", True))
        if mems:
            rows.append(Row(row_name(mems, dynamic=True), True, union))
    return rows


def _subset(point: dict, memories: tuple[str, ...]) -> dict:
    return {k: point[k] for m in memories for k in AXES_OF[m]}


def knn_variants(ev, knn, grid: TuneGrid) -> KNNVariants:
    """k: the grid's, else --knn-k, a quarter and a sixteenth of it; temperature: the grid's, else
    multiples of the mean squared distance to the nearest neighbour on the first valid batch."""
    from lmmem.evaluation.config import DEFAULT_KNN_TEMPERATURE_FACTORS

    k = knn.config.k
    ks = sorted(set(grid.knn_ks or (k, max(1, k // 4), max(1, k // 16))))
    if grid.knn_temperatures:
        return KNNVariants(ks, sorted(set(grid.knn_temperatures)))
    d1 = _nearest_distance(ev, knn)
    return KNNVariants(ks, [_round(f * d1) for f in DEFAULT_KNN_TEMPERATURE_FACTORS])


@torch.no_grad()
def _nearest_distance(ev, knn) -> float:
    data = ev.split_data("valid")
    batch = ev.windows(data).groups()[0].batch(0)
    adapter = ev.adapter
    fwd = adapter.forward(batch.inputs.to(adapter.device), adapter.init_state(batch.inputs.shape[0]))
    keep = (batch.targets.reshape(-1) != IGNORE_INDEX).to(adapter.device)
    dists, _ = knn.datastore.search(fwd.hidden.reshape(-1, fwd.hidden.shape[-1])[keep], 1, distances=knn.config.distances)
    d = dists[torch.isfinite(dists)]
    return float(d.mean()) if d.numel() and float(d.mean()) > 0 else 1.0


def _memory_grid(ev, methods: Methods, knn, grid: TuneGrid) -> MemorySet:
    variants = knn_variants(ev, knn, grid) if knn is not None else None
    lam = [_round(x) for x in grid.lambdas]
    return ev.memory_set(methods, knn, thetas=list(grid.thetas), cache_lambdas=lam, mbpa_lambdas=lam, knn_variants=variants,
                         knn_lambdas=[_round(x) for x in grid.knn_lambdas])


def choose(ev, methods: Methods, knn, grid: TuneGrid) -> tuple[dict, list]:
    """``(tuned: what was chosen and its valid perplexities, rows: the table's rows with those values)``."""
    mems = methods.memories
    tuned: dict = {"split": "valid", "grid": _describe(grid, methods), "choice": {}, "valid_perplexity": {}}
    rows = [Row("plain", False)]
    memset = _memory_grid(ev, methods, knn, grid) if mems else MemorySet([])
    if mems:
        res = ev.run_pass("valid", memset, desc=f"tune valid: {memset.grid.size} mixtures")
        totals = res.sums.totals()
        combos = [(m,) for m in mems] + ([mems] if len(mems) > 1 else [])
        for combo in combos:
            i = memset.grid.best(totals, combo)
            point = _subset(memset.grid.point(i), combo)
            rows.append(Row(row_name(combo), False, point))
            tuned["choice"][row_name(combo)] = point
            tuned["valid_perplexity"][row_name(combo)] = res.sums.report(ev.buckets, i).perplexity
    if methods.dynamic is not None:
        rows += _choose_dynamic(ev, methods, memset, grid, tuned)
    return tuned, rows


def _choose_dynamic(ev, methods: Methods, memset: MemorySet, grid: TuneGrid, tuned: dict) -> list:
    cfg, mems = methods.dynamic, methods.memories
    stats = ev.gradient_statistics(cfg)
    ppl: dict[float, float | None] = {}
    combined: dict[float, tuple[float, int, float]] = {}
    for f in grid.lr_factors:
        lr = _round(cfg.lr * f)
        res = ev.run_pass("valid", memset, desc=f"tune valid: +dynamic lr {lr:g}", dynamic=DynamicRun(replace(cfg, lr=lr), stats))
        totals, n = res.sums.totals(), float(res.sums.count.sum())
        loss = totals[0] / max(n, 1)
        ppl[lr] = math.exp(loss) if np.isfinite(loss) and loss < 700 else None  # None: diverged (JSON holds no inf)
        if mems and ppl[lr] is not None:
            i = memset.grid.best(totals, mems)
            combined[lr] = (totals[i], i, res.sums.report(ev.buckets, i).perplexity)
    finite = {lr: p for lr, p in ppl.items() if p is not None}
    if not finite:
        raise LmmemError(f"dynamic evaluation diverged on the valid split at every learning rate tried "
                         f"({', '.join(f'{lr:g}' for lr in ppl)}); give a smaller --dynamic-lr")
    best = min(finite, key=finite.get)
    tuned["choice"]["+dynamic"] = {"lr": best}
    tuned["valid_perplexity"]["+dynamic"] = finite[best]
    tuned["dynamic_lr_grid"] = {f"{lr:g}": p for lr, p in ppl.items()}
    rows = [Row("+dynamic", True)]
    if mems and best in combined:
        _, i, valid_ppl = combined[best]
        point = _subset(memset.grid.point(i), mems)
        name = row_name(mems, dynamic=True)
        rows.append(Row(name, True, point))
        tuned["choice"][name] = {"lr": best, **point}
        tuned["valid_perplexity"][name] = valid_ppl
    return rows


def _describe(grid: TuneGrid, methods: Methods) -> dict:
    out: dict = {}
    if methods.cache is not None:
        out.update(thetas=list(grid.thetas), lambdas=list(grid.lambdas))
    elif methods.mbpa is not None:
        out["lambdas"] = list(grid.lambdas)
    if methods.knn is not None:
        out.update(knn_ks=grid.knn_ks, knn_temperatures=grid.knn_temperatures, knn_lambdas=list(grid.knn_lambdas))
    if methods.dynamic is not None:
        out["lr_factors"] = list(grid.lr_factors)
    return out
