"""Test-time memories as *methods* of the engine, and the grid of mixtures one pass scores.

Every memory gives, for each scored target, ``log p_memory(target)`` for each of its *variants*
(the cache: one per θ; kNN-LM: one per (k, temperature); MbPA: one), and is mixed into the model's
distribution with each λ of its grid, in a fixed order::

    p = (1 − λ_k)·[(1 − λ_m)·[(1 − λ_c)·p_model + λ_c·p_cache] + λ_m·p_mbpa] + λ_k·p_kNN

The mixture is computed in log space with ``logaddexp`` (:func:`log_mix`), so λ = 0 gives the
model's log-probability *exactly* (``log 0 = −inf``) and every λ of every memory comes out of one
pass: tuning costs one pass over the validation split per grid, not one per value. The grid is the
product of every memory's (variant, λ) axes; a *point* of it names one value per axis
(:class:`Grid`), and one method of the results table (plain, +cache, +cache+mbpa, ...) is one
point. The cache and MbPA keep one memory per stream (:meth:`MemorySet.start_group`), read in the
stream's order; kNN-LM reads a fixed datastore and needs no order.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from lmmem.errors import LmmemError
from lmmem.memories.mbpa import MbPA, MbPAConfig
from lmmem.memories.neural_cache import CacheConfig, NeuralCache
from lmmem.output_layers.base import IGNORE_INDEX

MEMORY_ORDER = ("cache", "mbpa", "knn")  # the order of the mixture (and of the names: +cache+mbpa+knn)


def log_mix(lp: torch.Tensor, lam: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """log((1 − λ) e^lp + λ e^lq), exact (= lp) where λ = 0."""
    return torch.logaddexp(torch.log1p(-lam) + lp, torch.log(lam) + lq)


@dataclass
class Axis:
    name: str  # theta, cache_lambda, mbpa_lambda, knn, knn_lambda
    values: list
    memory: str  # which memory it belongs to
    is_lambda: bool


@dataclass
class Grid:
    """The product of the memories' axes, flattened in C order (the last axis fastest)."""

    axes: list[Axis] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(a.values) for a in self.axes)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def point(self, flat: int) -> dict:
        idx = np.unravel_index(flat, self.shape) if self.axes else ()
        return {a.name: a.values[i] for a, i in zip(self.axes, idx)}

    def index(self, **values) -> int:
        """Flat index of the point with these values (an axis not named: its first value)."""
        idx = [a.values.index(values[a.name]) if a.name in values else 0 for a in self.axes]
        return int(np.ravel_multi_index(idx, self.shape)) if self.axes else 0

    def uses(self, flat: int) -> tuple[str, ...]:
        """The memories a point mixes in (λ > 0), in mixture order."""
        p = self.point(flat)
        return tuple(a.memory for a in self.axes if a.is_lambda and p[a.name] > 0)

    def best(self, totals: np.ndarray, memories: tuple[str, ...]) -> int:
        """Flat index of the lowest total among the points using exactly ``memories``."""
        mask = np.array([set(self.uses(i)) == set(memories) for i in range(self.size)])
        if not mask.any():
            raise LmmemError(f"the λ grid has no positive value for {'+'.join(memories)}")
        masked = np.where(mask, totals, np.inf)
        return int(np.argmin(masked))


def lambda_grid(values) -> list[float]:
    """A λ list sorted, deduplicated, with 0 (the model alone) always in."""
    return sorted({float(v) for v in values} | {0.0})


class CacheMemory:
    name = "cache"

    def __init__(self, cfg: CacheConfig, thetas, lambdas):
        self.cfg, self.thetas, self.lambdas = cfg, list(thetas), lambda_grid(lambdas)
        self.cache: NeuralCache | None = None

    def axes(self) -> list[Axis]:
        return [Axis("theta", self.thetas, "cache", False), Axis("cache_lambda", self.lambdas, "cache", True)]

    def start(self, rows, dim, *, device, dtype, **_):
        self.cache = NeuralCache(rows, dim, self.cfg.window, device=device, dtype=dtype)

    def score(self, h, y, view) -> torch.Tensor:
        lq, nonempty = self.cache.target_log_probs(h, y, self.thetas, view.products)  # (nθ, R, T'), (R, T')
        lq = view.to_flat(lq.double())
        return torch.where(view.to_flat_mask(nonempty), lq, view.lp)  # an empty cache: p_cache := p_model

    def nbytes(self) -> int:
        return self.cache.memory.nbytes() if self.cache is not None else 0


class MbPAMemory:
    name = "mbpa"

    def __init__(self, cfg: MbPAConfig, lambdas, prefill=None):
        self.cfg, self.lambdas, self.prefill = cfg, lambda_grid(lambdas), prefill
        self.mbpa: MbPA | None = None

    def axes(self) -> list[Axis]:
        return [Axis("mbpa_lambda", self.lambdas, "mbpa", True)]

    def start(self, rows, dim, *, device, dtype, **_):
        self.mbpa = MbPA(rows, dim, self.cfg, device=device, dtype=dtype)
        if self.prefill is not None:
            self.mbpa.prefill(*self.prefill)

    def score(self, h, y, view) -> torch.Tensor:
        logits, lp = view.base_logits, view.base_lp
        lq = self.mbpa.target_log_probs(h, y, view.head, base_logits=logits, base_log_probs=lp if logits is not None else None,
                                        logit_rows=view.logit_rows, products=view.products)
        return view.to_flat(lq.double()[None])[0]

    def nbytes(self) -> int:
        return self.mbpa.memory.nbytes() if self.mbpa is not None else 0


@dataclass
class KNNVariants:
    ks: list[int]
    temperatures: list[float]

    @property
    def pairs(self) -> list[tuple[int, float]]:
        return list(itertools.product(self.ks, self.temperatures))


class KNNMemory:
    """kNN-LM over a datastore (lmmem.memories.knn): one retrieval at the largest k per batch, then
    ``p_kNN(target)`` for every (k, temperature) of the grid from the same neighbours."""

    name = "knn"

    def __init__(self, datastore, variants: KNNVariants, lambdas, *, distances: str = "auto", nprobe: int | None = None,
                 rerank: int | None = None):
        self.datastore, self.variants, self.lambdas = datastore, variants, lambda_grid(lambdas)
        self.distances, self.nprobe, self.rerank = distances, nprobe, rerank

    def axes(self) -> list[Axis]:
        return [Axis("knn", self.variants.pairs, "knn", False), Axis("knn_lambda", self.lambdas, "knn", True)]

    def start(self, *_, **__):
        pass

    def score(self, h, y, view) -> torch.Tensor:
        from lmmem.memories.knn import knn_target_log_probs

        flat_h, flat_y = view.flat_hidden, view.flat_targets
        live = (flat_y != IGNORE_INDEX).nonzero()[:, 0]
        out = view.lp.expand(len(self.variants.pairs), -1).clone()
        if len(live):
            dists, values = self.datastore.search(flat_h[live], max(self.variants.ks), distances=self.distances,
                                                  nprobe=self.nprobe, rerank=self.rerank)
            dists, values = dists.to(out.device), values.to(out.device)
            for i, (k, t) in enumerate(self.variants.pairs):
                out[i, live] = knn_target_log_probs(dists, values, flat_y[live], k=k, temperature=t).to(out.dtype)
        return out

    def nbytes(self) -> int:
        return 0


class MemoryView:
    """A batch as the memories see it: each stream's scored targets in order (``order``; None: the
    batch's rows are the streams), and the way back to flat batch positions."""

    def __init__(self, hidden: torch.Tensor, targets: torch.Tensor, order: np.ndarray | None, lp: torch.Tensor, head,
                 base_logits: torch.Tensor | None, base_lp: torch.Tensor | None):
        B, T, D = hidden.shape
        self.flat_hidden = hidden.reshape(B * T, D)
        self.flat_targets = targets.reshape(-1)
        self.lp, self.head = lp, head
        self.order = None if order is None else torch.as_tensor(order, device=hidden.device)
        # the batch's (N, V) logits stay in batch order; stream position i's are row logit_rows[i]
        # (None: the same order). Copying them into stream order would be another (N, V) a batch.
        self.base_logits, self.logit_rows = base_logits, None
        self.products = None  # h · k with the stored keys, where memories share them (MemorySet.mix)
        if self.order is None:
            self.hidden, self.targets = hidden, targets
            self.base_lp = base_lp
            return
        idx = self.order.clamp_min(0)
        self._pad = self.order < 0
        self.hidden = self.flat_hidden[idx].masked_fill_(self._pad[..., None], 0.0)
        self.targets = self.flat_targets[idx].masked_fill_(self._pad, IGNORE_INDEX)
        self.logit_rows = idx.reshape(-1) if base_logits is not None else None
        self.base_lp = base_lp[idx.reshape(-1)] if base_lp is not None else None

    def to_flat(self, lq: torch.Tensor) -> torch.Tensor:
        """(variants, R, T') in the memories' layout → (variants, N) flat; ``lp`` where no stream holds the position."""
        if self.order is None:
            return lq.reshape(lq.shape[0], -1)
        out = self.lp.expand(lq.shape[0], -1).clone()
        keep = ~self._pad
        out[:, self.order[keep]] = lq[:, keep].to(out.dtype)
        return out

    def to_flat_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if self.order is None:
            return mask.reshape(-1)
        out = torch.zeros_like(self.flat_targets, dtype=torch.bool)
        keep = ~self._pad
        out[self.order[keep]] = mask[keep]
        return out


class MemorySet:
    """The memories of one pass, in mixture order, and their grid."""

    def __init__(self, memories: list):
        order = {n: i for i, n in enumerate(MEMORY_ORDER)}
        self.memories = sorted(memories, key=lambda m: order[m.name])
        self.grid = Grid([a for m in self.memories for a in m.axes()])

    @property
    def needs_hidden(self) -> bool:
        return bool(self.memories)

    @property
    def needs_logits(self) -> bool:
        return any(isinstance(m, MbPAMemory) and m.cfg.vocab > 0 for m in self.memories)

    @property
    def needs_order(self) -> bool:
        return any(not isinstance(m, KNNMemory) for m in self.memories)

    def start_group(self, rows: int, dim: int, *, device, dtype) -> None:
        for m in self.memories:
            m.start(rows, dim, device=device, dtype=dtype)

    def _same_keys(self):
        """The cache, where MbPA's memory holds the same keys as the cache (the same window, no
        training pairs; both store every chunk's activations), else None: then one product of each
        chunk with those keys serves both."""
        cache = next((m for m in self.memories if isinstance(m, CacheMemory)), None)
        mbpa = next((m for m in self.memories if isinstance(m, MbPAMemory)), None)
        if cache is None or mbpa is None or mbpa.prefill is not None or cache.cfg.window != mbpa.cfg.memory:
            return None
        return cache.cache

    def mix(self, lp: torch.Tensor, view: MemoryView | None) -> torch.Tensor:
        """The grid's log-probabilities ``(grid size, N)`` from the model's ``lp`` ``(N,)`` (float64)."""
        mixed = lp
        shared = self._same_keys()
        if shared is not None:  # before either memory appends the chunk
            view.products = shared.memory.products(view.hidden)
        for m in self.memories:
            lq = m.score(view.hidden, view.targets, view)
            lam = torch.tensor(m.lambdas, dtype=torch.float64, device=lp.device)
            if isinstance(m, MbPAMemory):  # no variant axis
                mixed = log_mix(mixed[..., None, :], lam[:, None], lq)
            else:
                mixed = log_mix(mixed[..., None, None, :], lam[:, None], lq[:, None, :])
        return mixed.reshape(-1, lp.shape[-1])

    def nbytes(self) -> dict:
        return {m.name: m.nbytes() for m in self.memories if m.nbytes()}
