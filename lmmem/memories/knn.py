"""kNN-LM (Khandelwal, Levy, Jurafsky, Zettlemoyer, Lewis, "Generalization through Memorization:
Nearest Neighbor Language Models", ICLR 2020): a datastore of (context key → next token) pairs.

For a query ``q`` (the hidden state the output layer reads) with retrieved neighbours ``(d_j, v_j)``,
``d_j`` the squared L2 distance to key ``j`` and ``v_j`` the token that followed it::

    p_kNN(w) = Σ_{j < k, v_j = w} exp(−d_j / T) / Σ_{j < k} exp(−d_j / T)
    p(w)     = λ · p_kNN(w) + (1 − λ) · p_LM(w)

The paper's WikiText-103 setting: k = 1,024, T = 1, λ = 0.25, IVFPQ with 4,096 lists, 64-byte
codes and 32 probes. Here an IVFPQ datastore's probes and exact re-ranking depth are instead
calibrated when it is built, to find ≥ 90% of the exact neighbours (see ``knn_index.calibrate``),
and on a CPU with the memory for it a large-k search scans the probed lists exactly instead of
reading PQ codes (``knn_scan``; faster at k = 1,024, and it needs no re-ranking);
``KNNConfig(nprobe=32, rerank=1, distances="index")`` is the paper's search. Everything here is in log space (``logsumexp``) and float64, so a temperature
sweep with tiny T or a far neighbour never under- or overflows; a target no neighbour holds gets
``log p_kNN = −inf`` exactly (its mixture is then ``log(1 − λ) + log p_LM``).

One retrieval at ``k_max`` serves a sweep over ``k ≤ k_max`` and any ``T``: the functions use the
first ``k`` of the (ascending) neighbours. The model and the text are the caller's business: this
package stores and searches tensors (see :mod:`lmmem.memories.knn_store` for the files and
:mod:`lmmem.memories.knn_datastore` for searching).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lmmem.memories.knn_datastore import BACKENDS, DISTANCES, Datastore
from lmmem.memories.knn_index import FLAT_MAX_MACS, FaissMissingWarning, ivfpq_params
from lmmem.memories.knn_store import DatastoreWriter

__all__ = ["BACKENDS", "DISTANCES", "FLAT_MAX_MACS", "Datastore", "DatastoreWriter", "FaissMissingWarning", "KNNConfig",
           "ivfpq_params", "knn_interpolate", "knn_log_probs", "knn_target_log_probs"]


@dataclass
class KNNConfig:
    """Test-time settings of kNN-LM (the evaluate CLI's ``--knn-*`` flags are built from these fields)."""

    k: int = field(default=1024, metadata={"help": "neighbours used for p_kNN (Khandelwal et al. 2020: 1024)"})
    temperature: float = field(default=1.0, metadata={"help": "p_kNN ∝ exp(−d / temperature), d the squared L2 distance"})
    lam: float = field(default=0.25, metadata={"flag": "lambda", "help": "interpolation weight: p = λ·p_kNN + (1−λ)·p_LM"})
    distances: str = field(default="auto", metadata={
        "help": "exact: recomputed from the stored fp16 keys; index: the index's own (PQ-approximate for IVFPQ); "
                "auto: exact while the keys fit in memory", "choices": DISTANCES})
    nprobe: int | None = field(default=None, metadata={
        "help": "IVF lists probed per query (IVFPQ datastores; default: the setting calibrated at build time for "
                "recall ≥ 0.9 at this k; the paper used 32)"})
    rerank: int | None = field(default=None, metadata={
        "help": "IVFPQ searched by its PQ codes with exact distances: fetch rerank·max(k, 64) candidates (rerank ≥ 2), "
                "keep the k nearest by exact distance (default: the calibrated setting; 1: no re-ranking, the paper's; "
                "an exact scan of the lists needs none)"})

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"the kNN k must be at least 1, got {self.k}")
        if not self.temperature > 0:
            raise ValueError(f"the kNN temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"the kNN λ must be in [0, 1], got {self.lam}")
        if self.distances not in DISTANCES:
            raise ValueError(f"unknown kNN distances {self.distances!r}; choose {', '.join(DISTANCES)}")
        if self.nprobe is not None and self.nprobe < 1:
            raise ValueError(f"the kNN nprobe must be at least 1, got {self.nprobe}")
        if self.rerank is not None and self.rerank < 1:
            raise ValueError(f"the kNN rerank must be at least 1, got {self.rerank}")


def _neighbour_logits(dists: torch.Tensor, values: torch.Tensor, k: int, temperature: float):
    if dists.shape != values.shape or dists.dim() != 2:
        raise ValueError(f"dists and values must both be (N, k_retrieved); got {tuple(dists.shape)} and {tuple(values.shape)}")
    if not 1 <= k <= dists.shape[1]:
        raise ValueError(f"k = {k} must be between 1 and the {dists.shape[1]} neighbours retrieved")
    if not temperature > 0:
        raise ValueError(f"the temperature must be positive, got {temperature}")
    logits = dists[:, :k].to(torch.float64).neg() / temperature  # +inf distances (padding) → −inf
    return logits, values[:, :k]


def knn_target_log_probs(dists: torch.Tensor, values: torch.Tensor, targets: torch.Tensor, *, k: int,
                         temperature: float) -> torch.Tensor:
    """``log p_kNN(target)`` per row, (N,) float64, from the first ``k`` retrieved neighbours:
    ``logsumexp`` over the neighbours holding the target minus ``logsumexp`` over all; ``−inf``
    where none holds it (or none was retrieved)."""
    logits, vals = _neighbour_logits(dists, values, k, temperature)
    hit = (vals == targets.to(vals.device).unsqueeze(1)) & (vals >= 0)
    total = torch.logsumexp(logits, dim=1)
    held = torch.logsumexp(logits.masked_fill(~hit, -math.inf), dim=1)
    return torch.where(hit.any(1) & torch.isfinite(total), held - total, -math.inf)


def knn_log_probs(dists: torch.Tensor, values: torch.Tensor, *, k: int, temperature: float, vocab_size: int,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``log p_kNN(w)`` for every token, (N, vocab_size): per token a logsumexp over the
    neighbours that hold it (a scatter of per-token maxima, then of shifted exponentials, so no
    term underflows before its group is summed); ``−inf`` for tokens no neighbour holds."""
    logits, vals = _neighbour_logits(dists, values, k, temperature)
    if vals.numel() and int(vals.max()) >= vocab_size:
        raise ValueError(f"a neighbour's value {int(vals.max())} is outside the vocabulary of {vocab_size}")
    weights = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # log of each neighbour's share
    valid = (vals >= 0) & torch.isfinite(weights)
    weights = weights.masked_fill(~valid, -math.inf)
    idx = vals.clamp_min(0)
    group_max = torch.full((vals.shape[0], vocab_size), -math.inf, dtype=torch.float64, device=vals.device)
    group_max.scatter_reduce_(1, idx, weights, reduce="amax")
    shifted = torch.exp(weights - group_max.gather(1, idx)).masked_fill(~valid, 0.0)
    sums = torch.zeros_like(group_max).scatter_add_(1, idx, shifted)
    return (sums.log() + group_max).to(dtype)


def knn_interpolate(lm_log_probs: torch.Tensor, knn_log_probs: torch.Tensor, lam: float) -> torch.Tensor:
    """``log(λ·p_kNN + (1 − λ)·p_LM)`` in log space; λ = 0 returns ``lm_log_probs`` exactly (in
    its dtype promoted with the kNN one) and λ = 1 ``knn_log_probs``."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"the kNN λ must be in [0, 1], got {lam}")
    if lam == 0.0:
        return lm_log_probs.to(torch.promote_types(lm_log_probs.dtype, knn_log_probs.dtype))
    if lam == 1.0:
        return knn_log_probs.to(torch.promote_types(lm_log_probs.dtype, knn_log_probs.dtype))
    return torch.logaddexp(lm_log_probs + math.log1p(-lam), knn_log_probs + math.log(lam))
