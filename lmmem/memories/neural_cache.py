"""Neural cache (Grave, Joulin, Usunier, "Improving Neural Language Models with a Continuous
Cache", ICLR 2017), exact and vectorised.

The cache of a stream holds its last ``W`` pairs ``(h_i, w_{i+1})``: the final activation at
position ``i`` (the vector fed to the softmax) and the word that followed it. At position ``t``::

    p_cache(w) = Σ_{i ∈ [t-W, t-1]} 1[w_{i+1} = w] · softmax_i(θ · h_t · h_i)
    p(w)       = (1 − λ) · p_model(w) + λ · p_cache(w)

Perplexity only needs ``p_cache(target)``, so no ``W × V`` one-hot buffer is ever built: for a
chunk of ``T`` positions of ``B`` streams the candidates are the ``W`` stored pairs followed by
the chunk's own ``T`` pairs; one batched matmul gives the ``(B, T, W + T)`` scores, a band mask
keeps for query ``t`` exactly the ``W`` candidates that precede it (candidate ``j`` is allowed iff
``t ≤ j ≤ t + W − 1`` and it holds a real pair), and

    p_cache(target) = Σ_{allowed, value = target} softmax_{allowed}(θ s).

Each stream (row of the batch) has its own cache, which spans BPTT chunk boundaries; its size is
fixed (a ring buffer of ``W`` keys and values per row) whatever the length of the stream.

Convention for an empty cache (the first position of a stream): ``p_cache := p_model``, so the
mixture equals the model there (Grave et al. leave this case unspecified).

Defaults: ``θ = 0.3``, ``λ = 0.1``, ``W = 2000`` — Grave et al. report θ≈0.3 and λ≈0.1 as good
values for a 2000-pair cache on WikiText-2/103 (their Fig. 2/Table 2 use windows 100–2000; larger
windows help on WikiText-103). Tune them on the validation split with ``evaluate.py --tune``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmmem.output_layers.base import IGNORE_INDEX


@dataclass
class CacheConfig:
    window: int = field(default=2000, metadata={"help": "cache size W (pairs per stream)"})
    theta: float = field(default=0.3, metadata={"help": "cache flatness θ"})
    lam: float = field(default=0.1, metadata={"flag": "lambda", "help": "cache interpolation λ"})

    def __post_init__(self):
        if self.window <= 0:
            raise ValueError(f"the cache window must be positive, got {self.window}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"the cache λ must be in [0, 1], got {self.lam}")


class StreamMemory:
    """Per-row bounded history of (key, value) pairs: a ring buffer of ``size`` slots per row.

    ``keys`` ``(B, size, D)``, ``values`` ``(B, size)`` (IGNORE_INDEX where empty), optional
    ``aux`` ``(B, size)`` float64. All rows advance together (one BPTT chunk at a time), so one
    write position ``head`` serves every row; slot ``s`` holds the pair that is ``(s − head) mod
    size`` places from the oldest. The buffers are allocated once and never grow; a chunk is
    written in place (``T`` rows per stream), nothing is shifted.
    """

    def __init__(self, rows: int, size: int, dim: int, *, device, dtype, aux: bool = False, norms: bool = False):
        self.size = size
        self.head = 0
        self.keys = torch.zeros(rows, size, dim, device=device, dtype=dtype)
        self.values = torch.full((rows, size), IGNORE_INDEX, device=device, dtype=torch.long)
        # optional float64 scalar per pair (MbPA stores the log-normaliser of the key's base logits)
        self.aux = torch.zeros(rows, size, device=device, dtype=torch.float64) if aux else None
        # optional squared norm of every stored key (MbPA's distances), computed once when it is written
        self.norms = torch.zeros(rows, size, device=device, dtype=dtype) if norms else None

    @property
    def valid(self) -> torch.Tensor:
        return self.values != IGNORE_INDEX

    def masks(self, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Which stored slots ``(T, size)`` and which chunk positions ``(T, T)`` query ``t`` of a
        chunk may use: exactly the ``size`` pairs just before it (validity not included)."""
        t = torch.arange(T, device=device)[:, None]
        age = (torch.arange(self.size, device=device) - self.head) % self.size  # 0 = oldest slot
        mem = age[None, :] >= t  # chronological index j = age is allowed iff t <= j
        u = torch.arange(T, device=device)[None, :]
        chunk = (u < t) & (u >= t - self.size)
        return mem, chunk

    def products(self, h: torch.Tensor) -> torch.Tensor:
        """``h · k`` of a chunk's queries ``(B, T, D)`` with its candidates, in :meth:`allowed`'s
        order: the stored keys (slot order), then the chunk's own, ``(B, T, size + T)``. Two
        products, so that the candidates' keys are never concatenated; memories that hold the same
        keys (the cache and MbPA over the same window) share one result."""
        h = h.to(self.keys.dtype)
        return torch.cat([torch.bmm(h, self.keys.transpose(1, 2)), torch.bmm(h, h.transpose(1, 2))], dim=2)

    def allowed(self, values: torch.Tensor) -> torch.Tensor:
        """The ``(B, T, size + T)`` mask of the candidates (the stored pairs, then the chunk's
        ``(B, T)`` values) that each query of the chunk may use."""
        mem, chunk = self.masks(values.shape[1], values.device)
        return torch.cat([mem[None] & self.valid[:, None, :], chunk[None] & (values != IGNORE_INDEX)[:, None, :]], dim=2)

    def candidates_aux(self, aux: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.aux, aux.to(self.aux.dtype)], dim=1)

    def append(self, keys: torch.Tensor, values: torch.Tensor, aux: torch.Tensor | None = None) -> None:
        """Write a chunk's pairs over the oldest slots (the last ``size`` of them if T > size)."""
        T = keys.shape[1]
        if T > self.size:
            keys, values = keys[:, -self.size:], values[:, -self.size:]
            aux = aux[:, -self.size:] if aux is not None else None
            self.head = (self.head + T - self.size) % self.size
            T = self.size
        slots = (self.head + torch.arange(T, device=keys.device)) % self.size
        keys = keys.to(self.keys.dtype)
        self.keys.index_copy_(1, slots, keys)
        self.values.index_copy_(1, slots, values)
        if self.aux is not None:
            self.aux.index_copy_(1, slots, aux.to(self.aux.dtype))
        if self.norms is not None:
            self.norms.index_copy_(1, slots, (keys * keys).sum(-1))
        self.head = (self.head + T) % self.size

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.aux, self.norms) if t is not None)


class NeuralCache:
    """The cache of ``rows`` parallel streams. :meth:`target_log_probs` scores a chunk and then
    stores it; call it on consecutive chunks of the same streams."""

    def __init__(self, rows: int, dim: int, window: int = 2000, *, device="cpu", dtype=torch.float32):
        self.window = window
        self.memory = StreamMemory(rows, window, dim, device=device, dtype=dtype)

    @torch.no_grad()
    def target_log_probs(self, hidden: torch.Tensor, targets: torch.Tensor, thetas,
                         products: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``log p_cache(target)`` of every position of a chunk for each θ: ``(len(thetas), B, T)``
        (−inf where the target is not in the cache), and the ``(B, T)`` mask of positions whose
        cache is non-empty. Then appends the chunk to the cache. ``products``: the chunk's
        :meth:`StreamMemory.products` with this cache's keys, where the caller has them."""
        mem = self.memory
        # (B, T, W + T) scores against the stored keys (slot order) and the chunk's own keys
        scores = mem.products(hidden) if products is None else products
        cand_v = torch.cat([mem.values, targets], dim=1)
        allowed = mem.allowed(targets)
        match = cand_v[:, None, :] == targets[:, :, None]
        # a stream's first position has an empty cache; any later one has at least the pair before
        # it (padding only ever ends a row). Rows with no allowed candidate give NaN, ignored.
        T = targets.shape[1]
        nonempty = (torch.arange(T, device=targets.device) > 0)[None, :] | mem.valid.any(1)[:, None]
        blocked, other = ~allowed, ~match
        out = []
        for theta in thetas:
            p = torch.softmax((scores * theta).masked_fill_(blocked, float("-inf")), dim=-1)
            out.append(torch.log(p.masked_fill_(other, 0).sum(-1)))
        self.memory.append(hidden, targets)
        return torch.stack(out), nonempty


def cache_reference(hidden: torch.Tensor, targets: torch.Tensor, window: int, theta: float) -> torch.Tensor:
    """Naive per-position loop over ONE stream (``(N, D)``, ``(N,)``): log p_cache(target), NaN
    where the cache is empty. For tests."""
    out = torch.full((len(targets),), float("nan"), dtype=torch.float64)
    for t in range(len(targets)):
        lo = max(0, t - window)
        if t == lo:
            continue
        logits = theta * (hidden[lo:t] @ hidden[t])
        p = torch.softmax(logits.double(), 0)
        out[t] = torch.log(p[targets[lo:t] == targets[t]].sum())
    return out
