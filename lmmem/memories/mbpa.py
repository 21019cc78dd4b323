"""Memory-based parameter adaptation (Sprechmann et al., "Memory-based Parameter Adaptation",
ICLR 2018) of the softmax layer, exact and batched.

Memory: per stream, the last ``M`` pairs (key = final activation ``h_i``, value = next word
``w_{i+1}``), filled from the evaluation stream as it is read (a bounded buffer: see
:class:`lmmem.memories.neural_cache.StreamMemory`). For the query ``h`` at position ``t``:

1. retrieve the ``K`` nearest keys among the ``M`` pairs preceding ``t`` (Euclidean distance),
   ``w_k = 1 / (ε + ‖h − h_k‖²)``;
2. starting from the output layer ``θ = (W, b)``, take ``steps`` gradient-ascent steps of
   learning rate ``η`` on ``L(θ′) = Σ_k w_k log p(v_k | h_k; θ′) − (α/2) ‖θ′ − θ‖²``
   (``‖·‖²`` over weight and bias);
3. score position ``t`` with ``θ′``; discard ``θ′`` (the model never changes).

The fast computation
--------------------
For a linear softmax, ``∇_W L = Σ_k g_k h_kᵀ − α (W′ − W)`` and ``∇_b L = Σ_k g_k − α (b′ − b)``
with ``g_k = w_k (onehot(v_k) − softmax(W′ h_k + b′))``. Starting from ``W′ = W``, every update
lies in the span of the neighbours' keys, so after any number of steps::

    W′ − W = Σ_k A_k h_kᵀ        b′ − b = c        (A: K × V coefficient rows, c: V)

and one step is ``A ← (1 − ηα) A + η g``, ``c ← (1 − ηα) c + η Σ_k g_k`` — so ``c = Σ_k A_k`` at
every step (the bias is a weight on a constant input 1) and needs no state of its own. The logits
the step needs are those of the neighbours under ``θ′``::

    z_k = (W h_k + b) + Σ_j (h_k · h_j + 1) A_j   =   z⁰_k + (G A)_k,   G = H Hᵀ + 1 (K × K),

so a step costs a ``K × K`` by ``K × V`` product and a softmax over ``K × V``, never a ``V × D``
update; the query's logits are ``W h + b + Σ_k (h_k · h + 1) A_k``. Many queries are adapted in one
batched computation (``(q, K, V)`` tensors; ``q·K·V`` bounded by ``max_elements``, small enough on
CPU for the working set to stay in cache). ``mbpa_reference`` is the per-query autograd version;
the tests check both agree to 1e-8 in float64.

Cost: ``K·V·D`` (the neighbours' base logits) ``+ (steps − 1)·K²·V`` multiply-adds and
``steps·K·V`` exponentials per query, against ``V·D`` for the plain softmax: at ``K = 32``, 5 steps,
``D = 128`` that is ~64× the plain softmax's multiply-adds, and measured 73× the plain evaluation's
CPU time (benchmarks/bench_test_time.py) — the arithmetic, not the implementation, bounds it.

Restricted adaptation (``vocab = N > 0``)
-----------------------------------------
Exact MbPA needs every neighbour's full distribution at every step, so no exact implementation can
run within a few times the plain evaluation at these sizes (see Cost above).
``vocab = N`` solves a slightly different, well-defined problem exactly: only the output rows (and
bias entries) of a per-query candidate set ``C`` are adapted — ``C`` = the ``N`` most likely words
under the query's unadapted distribution ∪ the neighbours' next words — and every other row stays
at ``θ``. Its objective is MbPA's with the gradient projected onto ``C``; the normalisers still run
over the whole vocabulary, with the frozen rows' mass taken from the stored log-normaliser of each
key's base logits (one float per memory entry) and of the query: ``Z_k = Z⁰_k − Σ_{c∈C} e^{z⁰_kc} +
Σ_{c∈C} e^{z_kc}``. Cost per query ``steps·K²·|C| + K·|C|·D``. With ``C`` = the whole vocabulary it is
exact MbPA (tested); for ``N < V`` the tests compare it with a per-query autograd version whose
gradient is masked to ``C``.
Its torch statement is :func:`select_neighbours` then
:mod:`lmmem.memories.mbpa_restricted`. On a CPU in fp32 (K ≤ 64) each query instead runs from its
products with the memory to its score as one C++ op where it builds (:func:`score_natively`,
:mod:`lmmem.kernels.mbpa_native`), which must match the torch statement to fp32 rounding.

Training data: with ``train_pairs = P`` every stream's memory starts with the last ``P``
(activation, next word) pairs of the training split (the model read over the split's last ``P + 1``
tokens as one stream), which the evaluation context then pushes out oldest-first.

Defaults (``K = 32``, ``steps = 5``) follow the issue and Rae et al. 2018's use of MbPA on top of
the cache; ``η``, ``α``, ``ε`` are not given in the papers in a form that transfers (they depend on
the scale of the activations). ``η = 0.1``, ``α = 0.1``, ``ε = 3`` come from grids on the validation
splits of ABC news, Gutenberg and WikiText-2 (tiny LSTMs, restricted N = 128): the best for MbPA on
top of the cache on two corpora and within 0.25% on the third, and better than the first guess
(0.1, 0.5, 1e-3) or within 0.04 perplexity of it on every split, alone or combined; ``η = 0.3`` is
better for MbPA *alone* on two corpora. A small ε lets a near-duplicate key take a step of η/ε.
Tune them for another model
(``python -m lmmem.experiments.mbpa_sweep --with-cache``); ``M = 2000`` matches the cache.
Neighbours with no pair behind them (fewer than ``K`` stored) get weight 0; a query with no
neighbour at all is scored by the unadapted model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from lmmem.kernels import mbpa_native
from lmmem.memories import mbpa_restricted as restricted
from lmmem.memories.neural_cache import StreamMemory


@dataclass
class MbPAConfig:
    # K = 32 and 5 steps follow the issue and Rae et al. 2018; η, α and ε were chosen on the validation
    # splits of three corpora for MbPA on top of the neural cache (docs/results/test-time-memory.md)
    k: int = field(default=32, metadata={"help": "neighbours K"})
    steps: int = field(default=5, metadata={"help": "adaptation steps"})
    lr: float = field(default=0.1, metadata={"help": "adaptation learning rate η"})
    alpha: float = field(default=0.1, metadata={"help": "pull α towards the trained softmax"})
    eps: float = field(default=3.0, metadata={"help": "ε of the kernel 1/(ε + d²)"})
    memory: int = field(default=2000, metadata={"help": "memory size (pairs per stream)"})
    lam: float = field(default=0.1, metadata={"flag": "lambda", "help": "MbPA interpolation λ"})
    vocab: int = field(default=128, metadata={
        "help": "N: adapt only the output rows of the query's N likeliest words and of the neighbours' next words "
                "(normalisers over the whole vocabulary); 0: every row (exact MbPA). Speed and accuracy of both: "
                "docs/results/test-time-memory.md"})
    train_pairs: int = field(default=0, metadata={
        "help": "prefill each stream's memory with the last N (activation, next word) pairs of the train split"})
    # bound on q·K·V (q·K·|C| restricted) of one batched adaptation; 0: by device (2M elements on CPU,
    # where a working set that stays in the last-level cache runs fastest; 64M on GPU)
    max_elements: int = field(default=0, metadata={"help": "elements of one batched adaptation (0: chosen by device)"})

    def __post_init__(self):
        if self.k <= 0 or self.steps < 0 or self.memory <= 0:
            raise ValueError(f"MbPA needs K > 0, steps >= 0 and a positive memory size (got {self.k}, {self.steps}, {self.memory})")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"the MbPA λ must be in [0, 1], got {self.lam}")
        if self.vocab < 0:
            raise ValueError(f"the MbPA candidate vocabulary must be >= 0, got {self.vocab}")
        if self.max_elements < 0:
            raise ValueError(f"max_elements must be >= 0 (0: chosen by device), got {self.max_elements}")
        if not 0 <= self.train_pairs <= self.memory:
            raise ValueError(f"the MbPA training pairs must be in [0, memory size {self.memory}], got {self.train_pairs}")


def adapted_log_probs(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, weights: torch.Tensor,
    weight: torch.Tensor, bias: torch.Tensor | None, *, steps: int, lr: float, alpha: float,
    base_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-distribution ``(q, V)`` of ``q`` queries ``(q, D)`` under their own adapted softmax.

    ``keys`` ``(q, K, D)``, ``values`` ``(q, K)`` (any valid class where the weight is 0),
    ``weights`` ``(q, K)``; ``weight`` ``(V, D)``, ``bias`` ``(V,)`` or None (then the bias is not
    adapted either). ``base_logits`` ``(q, V)`` may be passed to save recomputing ``W h + b``.
    """
    dt = torch.promote_types(query.dtype, torch.float32)
    query, keys, weights = query.to(dt), keys.to(dt), weights.to(dt)
    W = weight.to(dt)
    b = bias.to(dt) if bias is not None else None
    zq = base_logits.to(dt) if base_logits is not None else torch.nn.functional.linear(query, W, b)
    if steps == 0:
        return torch.log_softmax(zq, -1)
    z0 = torch.nn.functional.linear(keys, W, b)  # (q, K, V)
    # The bias is a weight on a constant input 1, and c = Σ_k A_k at every step (same start, same
    # update), so its change folds into the Gram matrix: z = z⁰ + (G + 1) A, z_q = z⁰_q + (h_q·h_k + 1) A.
    one = 1.0 if b is not None else 0.0
    G = torch.bmm(keys, keys.transpose(1, 2)).add_(one)  # (q, K, K)
    A = None
    keep = 1.0 - lr * alpha
    lw = (-lr * weights)[..., None]  # (q, K, 1)
    for s in range(steps):
        z = z0 if A is None else torch.baddbmm(z0, G, A)
        g = torch.softmax(z, -1).mul_(lw)  # η w_k (onehot(v_k) − p_k): the p part ...
        g.scatter_add_(2, values[..., None], -lw)  # ... and the onehot part
        A = g if A is None else torch.add(g, A, alpha=keep, out=g)  # A ← (1 − ηα) A + η g, one pass
    hq = torch.bmm(keys, query[:, :, None])[..., 0].add_(one)  # (q, K): h_k · h (+ 1 for the bias)
    return torch.log_softmax(torch.baddbmm(zq[:, None, :], hq[:, None, :], A)[:, 0], -1)


def nearest(d: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest entries of each row of ``d`` ``(..., M)``, smallest first: (values,
    indices). Where the k-th value ties with the next, the tied entries of lowest index (memory
    slot: a fixed rule, not an age) are kept. ``torch.topk`` picks among equal values differently
    on different CPUs, and a model's states repeat exactly where its inputs do, so without a rule
    the neighbours (and the perplexity) would depend on the machine."""
    k = min(k, d.shape[-1])
    if k == d.shape[-1]:
        return torch.topk(d, k, dim=-1, largest=False)
    vals, idx = torch.topk(d, k + 1, dim=-1, largest=False)
    tie = (vals[..., k] == vals[..., k - 1]).reshape(-1)
    if tie.any():
        rows = tie.nonzero()[:, 0]
        sub = d.reshape(-1, d.shape[-1])[rows]
        kth = vals.reshape(-1, k + 1)[rows, k - 1, None]
        equal = sub == kth
        take = (sub < kth) | (equal & (equal.cumsum(1) <= k - (sub < kth).sum(1, keepdim=True)))
        pick = take.nonzero()[:, 1].view(-1, k)  # the kept entries, in index order
        order = torch.sort(sub.gather(1, pick), dim=1, stable=True).indices  # smallest first, ties by index
        vals.view(-1, k + 1)[rows, :k] = sub.gather(1, pick.gather(1, order))
        idx.view(-1, k + 1)[rows, :k] = pick.gather(1, order)
    return vals[..., :k], idx[..., :k]


def select_neighbours(prod: torch.Tensor, allowed: torch.Tensor, hn: torch.Tensor, kn: torch.Tensor, cand_k: torch.Tensor,
                      cand_v: torch.Tensor, k: int, eps: float, aux: torch.Tensor | None = None):
    """The ``k`` nearest allowed candidates of every query from the products ``prod`` ``(B, T, C)``
    of the queries with the candidates ``cand_k`` ``(B, C, D)`` (values ``cand_v`` ``(B, C)``,
    log-normalisers ``aux`` ``(B, C)`` or None) and the squared norms ``hn`` ``(B, T)``, ``kn``
    ``(B, C)``: ‖h − k‖² = ‖h‖² + ‖k‖² − 2 h·k, ties broken by :func:`nearest`. Returns keys
    ``(B, T, k, D)``, values, weights ``1 / (eps + d²)`` (0 for missing neighbours) and the aux."""
    d2 = hn[..., None] + kn[:, None, :] - 2 * prod
    d2 = d2.clamp_min_(0).masked_fill_(~allowed, float("inf"))
    dist, idx = nearest(d2, min(k, d2.shape[-1]))  # (B, T, k)
    bi = torch.arange(prod.shape[0], device=prod.device)[:, None, None]
    weights = torch.where(torch.isfinite(dist), 1.0 / (eps + dist), torch.zeros_like(dist))
    return cand_k[bi, idx], cand_v[bi, idx].clamp_min(0), weights, aux[bi, idx] if aux is not None else None


MAX_NATIVE_K = 64  # the native op keeps a candidate's K neighbours in at most 4 vector registers


def score_natively(op, zq: torch.Tensor, rows: torch.Tensor, qpos: torch.Tensor, targets: torch.Tensor,
                   hidden: torch.Tensor, mem_k: torch.Tensor, cand_v: torch.Tensor, allowed: torch.Tensor,
                   prod: torch.Tensor, hn: torch.Tensor, kn: torch.Tensor, cand_aux: torch.Tensor,
                   query_lse: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: MbPAConfig) -> torch.Tensor:
    """Restricted MbPA of the queries at flat positions ``qpos`` of a chunk ``hidden`` ``(B, T, D)``
    by the native op ``op`` (fp32 CPU tensors): :func:`select_neighbours` among the stored keys
    ``mem_k`` ``(B, M, D)`` and the chunk's own, from :meth:`MbPA._products`'
    ``cand_v, allowed, prod, hn, kn`` and ``cand_aux``, then
    :func:`~lmmem.memories.mbpa_restricted.restricted_target_log_probs`. Query ``i``'s base logits
    are row ``rows[i]`` of ``zq`` ``(R, V)``, read in place. Returns ``(q,)`` fp64."""
    V = weight.shape[0]
    n = min(cfg.vocab, V)
    return op(zq, rows.contiguous(), qpos.contiguous(), targets.contiguous(), hidden.contiguous(), mem_k.contiguous(),
              cand_v.contiguous(), cand_aux.double().contiguous(), allowed.contiguous(), prod.contiguous(),
              hn.contiguous(), kn.contiguous(), query_lse.double().contiguous(), weight,
              bias if bias is not None else weight.new_empty(0), min(cfg.k, cand_v.shape[1]), float(cfg.eps), n,
              max(1, V // (4 * n)), cfg.steps, float(cfg.lr), float(cfg.alpha))


def _torch_score(zq, rows, qpos, targets, hidden, mem_k, cand_v, allowed, prod, hn, kn, cand_aux, query_lse, weight, bias,
                 cfg: MbPAConfig) -> torch.Tensor:
    """:func:`score_natively`'s torch statement."""
    cand_k = torch.cat([mem_k, hidden.to(mem_k.dtype)], 1)
    keys, values, weights, key_lse = select_neighbours(prod, allowed, hn, kn, cand_k, cand_v, cfg.k, cfg.eps, cand_aux)
    B, T, k = values.shape
    flat = (lambda t: t.reshape(B * T, *t.shape[2:])[qpos])
    return restricted.restricted_target_log_probs(
        hidden.reshape(B * T, -1)[qpos], targets, flat(keys), flat(values), flat(weights), flat(key_lse), weight, bias,
        vocab=cfg.vocab, steps=cfg.steps, lr=cfg.lr, alpha=cfg.alpha, base_logits=zq[rows], query_lse=query_lse)


def _probe_score(op) -> None:
    g = torch.Generator().manual_seed(0)
    B, T, M, D, V = 2, 4, 6, 8, 300
    cfg = MbPAConfig(k=5, steps=3, lr=0.3, alpha=0.2, eps=0.5, vocab=7)
    W, b = torch.randn(V, D, generator=g), torch.randn(V, generator=g)
    h, mem = torch.randn(B, T, D, generator=g), torch.randn(B, M, D, generator=g)
    mem[:, 1] = mem[:, 0]  # two keys at the same distance
    cand_k = torch.cat([mem, h], 1)
    cand_v = torch.randint(0, V, (B, M + T), generator=g)
    cand_v[:, 2] = cand_v[:, 3]  # two neighbours with the same word
    allowed = torch.rand(B, T, M + T, generator=g) > 0.3
    allowed[0, 0, 1:] = False  # a query with fewer than k candidates
    zq = torch.nn.functional.linear(h, W, b).reshape(B * T, V)
    cand_aux = torch.logsumexp(torch.nn.functional.linear(cand_k, W, b), -1).double()
    hn, kn = (h * h).sum(-1), (cand_k * cand_k).sum(-1)
    y = torch.randint(0, V, (B * T,), generator=g)
    pos = torch.arange(B * T)
    args = (zq, pos, pos, y, h, mem, cand_v, allowed, torch.bmm(h, cand_k.transpose(1, 2)), hn, kn, cand_aux,
            torch.logsumexp(zq, -1).double(), W, b, cfg)
    got, want = score_natively(op, *args), _torch_score(*args)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise RuntimeError(f"its result on a probe problem differs from the torch statement by {(got - want).abs().max():.3g}")


@functools.lru_cache(maxsize=None)  # a fact about this process's machine, as the native scan's verdict
def _native_score():
    """The native op (:mod:`lmmem.kernels.mbpa_native`) where it builds and matches its torch
    statement on a probe problem; else None."""
    return restricted._verified(mbpa_native.restricted_score_op(), _probe_score, "scoring",
                                "adapting with torch instead (the same result, slower)")


def _native_scorer(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, logits: torch.Tensor,
                   k: int, steps: int):
    """The native op where it runs these inputs exactly as they are (fp32 on a CPU, K ≤ 64), else None."""
    f32 = torch.float32
    if (hidden.device.type != "cpu" or hidden.dtype != f32 or weight.dtype != f32 or logits.dtype != f32
            or (bias is not None and bias.dtype != f32) or not weight.is_contiguous() or logits.stride(-1) != 1
            or k > MAX_NATIVE_K or steps < 1):
        return None
    return _native_score()


class MbPA:
    """MbPA over ``rows`` parallel streams: :meth:`target_log_probs` scores a chunk with adapted
    parameters, then stores the chunk's pairs in the (bounded) memory."""

    def __init__(self, rows: int, dim: int, cfg: MbPAConfig = MbPAConfig(), *, device="cpu", dtype=torch.float32):
        self.cfg = cfg
        self.memory = StreamMemory(rows, cfg.memory, dim, device=device, dtype=dtype, aux=cfg.vocab > 0, norms=True)

    @torch.no_grad()
    def prefill(self, keys: torch.Tensor, values: torch.Tensor, lse: torch.Tensor | None = None) -> None:
        """Store the same ``P`` pairs — keys ``(P, D)``, values ``(P,)`` (and their log-normalisers
        ``(P,)`` for the restricted variant) — in every stream's memory, before any evaluation
        context: MbPA's memory "optionally filled from training data"."""
        rows = self.memory.keys.shape[0]
        aux = lse[None].expand(rows, -1) if self.memory.aux is not None else None
        if self.memory.aux is not None and lse is None:
            raise ValueError("the restricted MbPA memory needs the log-normaliser of every prefilled key")
        self.memory.append(keys[None].expand(rows, -1, -1), values[None].expand(rows, -1), aux)

    def _products(self, hidden: torch.Tensor, targets: torch.Tensor, products: torch.Tensor | None = None):
        """What the nearest-neighbour choice of a chunk's queries reads (before the chunk is
        appended): the candidates' values and mask (:meth:`StreamMemory.allowed`: the stored
        pairs, then the chunk's), the products ``h · k`` ``(B, T, C)`` (``products`` where the
        caller has them) and the squared norms of the queries ``(B, T)`` and of the candidates
        ``(B, C)``."""
        mem = self.memory
        cand_v, allowed = torch.cat([mem.values, targets], 1), mem.allowed(targets)
        h = hidden.to(mem.keys.dtype)
        hn = (h * h).sum(-1)
        # the stored keys' norms kept by the memory (the same sums as computing them here, in the
        # same order: exact ties between equal keys break as before)
        kn = torch.cat([mem.norms, hn], 1)
        return cand_v, allowed, mem.products(h) if products is None else products, hn, kn

    @torch.no_grad()
    def neighbours(self, hidden: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor | None = None,
                   products: torch.Tensor | None = None):
        """K nearest stored pairs of every query of a chunk: keys ``(B, T, K, D)``, values
        ``(B, T, K)``, weights ``(B, T, K)`` (0 for missing neighbours) and, given the chunk's
        log-normalisers ``lse``, the neighbours' ``(B, T, K)``. ``products``: as
        :meth:`target_log_probs`."""
        cand_v, allowed, prod, hn, kn = self._products(hidden, targets, products)
        cand_k = torch.cat([self.memory.keys, hidden.to(self.memory.keys.dtype)], 1)
        aux = self.memory.candidates_aux(lse) if lse is not None else None
        got = select_neighbours(prod, allowed, hn, kn, cand_k, cand_v, self.cfg.k, self.cfg.eps, aux)
        return got if lse is not None else got[:3]

    @torch.no_grad()
    def target_log_probs(self, hidden: torch.Tensor, targets: torch.Tensor, output, base_logits: torch.Tensor | None = None,
                         base_log_probs: torch.Tensor | None = None, logit_rows: torch.Tensor | None = None,
                         products: torch.Tensor | None = None) -> torch.Tensor:
        """``log p_θ′(target)`` ``(B, T)`` of a chunk (0 on padding), then appends the chunk.

        ``base_logits`` ``(B·T, V)`` and ``base_log_probs`` ``(B·T,)`` (the plain model's
        log p(target)) may be passed when the caller has them; the log-normaliser of each position
        is then ``logit[target] − log p(target)`` instead of a logsumexp over V. With
        ``logit_rows`` ``(B·T,)``, position ``i``'s logits are row ``logit_rows[i]`` of
        ``base_logits`` ``(R, V)`` (the caller's own order; the native op reads them in place).
        ``products``: the chunk's :meth:`StreamMemory.products` with this memory's keys, where the
        caller has them (another memory that holds the same keys computed them)."""
        cfg = self.cfg
        B, T, D = hidden.shape
        N, V = B * T, output.weight.shape[0]
        y = targets.reshape(N)
        if cfg.vocab > 0:
            if base_logits is None:
                base_logits, logit_rows = output.logits(hidden.reshape(N, D)), None
            base_logits = base_logits.reshape(-1, V)
            rows = logit_rows if logit_rows is not None else torch.arange(N, device=y.device)
            if base_log_probs is not None:
                lse = base_logits[rows, y.clamp_min(0)].double() - base_log_probs.reshape(N).double()
                lse = lse.masked_fill(y < 0, 0.0).view(B, T)
            else:
                lse = torch.logsumexp(base_logits[rows], -1).double().view(B, T)
            native = _native_scorer(hidden, output.weight, output.bias, base_logits, cfg.k, cfg.steps)
            if native is not None:  # neighbours, adaptation and score per query, the logits read in place
                live = (y >= 0).nonzero()[:, 0]
                out = torch.zeros(N, dtype=torch.float32, device=hidden.device)
                h = hidden.to(self.memory.keys.dtype)
                out[live] = score_natively(native, base_logits, rows[live], live, y[live], h, self.memory.keys,
                                           *self._products(h, targets, products), self.memory.candidates_aux(lse),
                                           lse.reshape(N)[live], output.weight, output.bias, cfg).to(out.dtype)
                self.memory.append(hidden, targets, lse)
                return out.view(B, T)
            if logit_rows is not None:  # the torch statement reads them in stream order
                base_logits = base_logits[logit_rows]
            keys, values, weights, key_lse = self.neighbours(hidden, targets, lse, products)
            self.memory.append(hidden, targets, lse)
        else:
            if base_logits is not None and logit_rows is not None:
                base_logits = base_logits.reshape(-1, V)[logit_rows]
            keys, values, weights = self.neighbours(hidden, targets, products=products)
            self.memory.append(hidden, targets)
        k = keys.shape[2]
        q_all, keys, values, weights = hidden.reshape(N, D), keys.reshape(N, k, D), values.reshape(N, k), weights.reshape(N, k)
        out = torch.zeros(N, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        live = (y >= 0).nonzero()[:, 0]
        every = len(live) == N  # no padding: groups are row ranges, and their base logits views, not copies of (rows, V)
        budget = cfg.max_elements or (1 << 26 if hidden.is_cuda else 1 << 21)
        if cfg.vocab > 0:
            key_lse, lse_flat = key_lse.reshape(N, k), lse.reshape(N)
            S = min(cfg.vocab, V) + k
            step = max(1, budget // (S * max(k, D)))
            for lo in range(0, len(live), step):
                sel = slice(lo, lo + step) if every else live[lo: lo + step]
                out[sel] = restricted.restricted_target_log_probs(
                    q_all[sel], y[sel], keys[sel], values[sel], weights[sel], key_lse[sel], output.weight, output.bias,
                    vocab=cfg.vocab, steps=cfg.steps, lr=cfg.lr, alpha=cfg.alpha, base_logits=base_logits[sel],
                    query_lse=lse_flat[sel]).to(out.dtype)
            return out.view(B, T)
        step = max(1, budget // (k * V))
        for lo in range(0, len(live), step):  # groups of queries, each group one batched adaptation
            sel = slice(lo, lo + step) if every else live[lo: lo + step]
            bl = base_logits.reshape(N, V)[sel] if base_logits is not None else None
            logp = adapted_log_probs(q_all[sel], keys[sel], values[sel], weights[sel], output.weight, output.bias,
                                     steps=cfg.steps, lr=cfg.lr, alpha=cfg.alpha, base_logits=bl)
            out[sel] = logp.gather(1, y[sel, None])[:, 0]
        return out.view(B, T)


def mbpa_reference(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: MbPAConfig) -> torch.Tensor:
    """Naive per-query autograd MbPA over ONE stream (``(N, D)``, ``(N,)``): log p_θ′(target) of
    every position. Copies the layer per query, runs ``steps`` explicit gradient-ascent steps. For
    tests."""
    out = torch.empty(len(targets), dtype=torch.float64)
    for t in range(len(targets)):
        h = hidden[t]
        lo = max(0, t - cfg.memory)
        W1 = weight.detach().clone().requires_grad_(True)
        b1 = bias.detach().clone().requires_grad_(True) if bias is not None else None
        if t > lo:
            mem_k, mem_v = hidden[lo:t], targets[lo:t]
            d2 = ((mem_k - h) ** 2).sum(-1)
            k = min(cfg.k, len(d2))
            dist, idx = nearest(d2, k)
            nk, nv, w = mem_k[idx], mem_v[idx], 1.0 / (cfg.eps + dist)
            mask = None
            if cfg.vocab > 0:  # only the candidate rows move
                zq = h @ weight.T + (bias if bias is not None else 0)
                cand = set(torch.topk(zq, min(cfg.vocab, len(zq))).indices.tolist()) | set(nv.tolist())
                mask = torch.zeros(len(zq), dtype=torch.bool)
                mask[list(cand)] = True
            for _ in range(cfg.steps):
                logits = nk @ W1.T + (b1 if b1 is not None else 0)
                obj = (w * torch.log_softmax(logits, -1)[torch.arange(k), nv]).sum()
                obj = obj - cfg.alpha / 2 * ((W1 - weight) ** 2).sum()
                if b1 is not None:
                    obj = obj - cfg.alpha / 2 * ((b1 - bias) ** 2).sum()
                grads = torch.autograd.grad(obj, [W1] + ([b1] if b1 is not None else []))
                if mask is not None:
                    grads = [g * mask.view(-1, *([1] * (g.dim() - 1))) for g in grads]
                with torch.no_grad():
                    W1 += cfg.lr * grads[0]
                    if b1 is not None:
                        b1 += cfg.lr * grads[1]
        with torch.no_grad():
            logits = h @ W1.T + (b1 if b1 is not None else 0)
            out[t] = torch.log_softmax(logits, -1)[targets[t]]
    return out
