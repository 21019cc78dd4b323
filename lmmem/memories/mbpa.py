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
On a CPU in fp32 its steps run as one fused C++ op per query where it builds
(:mod:`lmmem.kernels.mbpa_native`; :func:`restricted_steps` is its torch statement, which it must
match to fp32 rounding and which runs everywhere else).

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
import warnings
from dataclasses import dataclass, field

import torch

from lmmem.kernels import mbpa_native
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


TOP_N_CLASSES = 16  # interleaved column classes of _top_n


def _top_n(z: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` largest entries of every row (unordered): the set ``torch.topk`` gives,
    found in a fraction of its time on wide rows. The columns are dealt into ``b`` interleaved
    classes (column j to class j mod V/b); each of a row's top n lies in a class whose maximum is
    among the n largest class maxima (at most n classes reach the n-th value), so the top n of
    those classes' columns are the row's top n. The classes' maxima cost one pass over the row."""
    q, V = z.shape
    native = _native_top_n() if z.dtype == torch.float32 and z.device.type == "cpu" else None
    if native is not None:  # the same set, 2-3x faster on 30,000-50,000 columns (its comment says how)
        return native(z.contiguous(), n, max(1, V // (4 * n)))
    b = TOP_N_CLASSES
    nb = V // b
    if nb <= 4 * n:  # narrow rows: the plain selection is as fast
        return torch.topk(z, n, dim=-1, sorted=False).indices
    classes = torch.topk(z[:, : nb * b].view(q, b, nb).amax(1), n, dim=-1, sorted=False).indices  # (q, n)
    cols = (classes[:, :, None] + nb * torch.arange(b, device=z.device)).reshape(q, -1)
    if nb * b < V:  # the columns past the last whole class are always candidates
        cols = torch.cat([cols, torch.arange(nb * b, V, device=z.device).expand(q, -1)], 1)
    pick = torch.topk(z.gather(1, cols), n, dim=-1, sorted=False).indices
    return cols.gather(1, pick)


def _verified(op, probe, what: str, instead: str):
    """``op`` where ``probe(op)`` returns without raising, else None, with one warning naming the
    cause and what runs ``instead``; None where the op did not build (its build warned already)."""
    if op is None:
        return None
    try:
        probe(op)
        return op
    except Exception as e:  # noqa: BLE001 - any failure means: the torch statement runs
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        warnings.warn(f"MbPA's native {what} is not used here ({type(e).__name__}: {cause}); {instead}",
                      RuntimeWarning, stacklevel=4)
        return None


def _probe_top_n(op) -> None:
    z = torch.randn(5, 3001, generator=torch.Generator().manual_seed(0))
    z[0, -2:] = 9.0  # the largest values past the last whole slice
    got, want = op(z, 7, 3001 // 28), torch.topk(z, 7, dim=1).indices
    if any(set(a.tolist()) != set(b.tolist()) for a, b in zip(got, want)):
        raise RuntimeError("its result on a probe problem differs from torch.topk's")


@functools.lru_cache(maxsize=None)  # a fact about this process's machine, as the native scan's verdict
def _native_top_n():
    """The native top-n (:mod:`lmmem.kernels.mbpa_native`) where it builds and returns torch.topk's
    set on a probe problem; else None."""
    return _verified(mbpa_native.top_n_op(), _probe_top_n, "top-n", "selecting with torch instead (the same set, slower)")


def _candidates(zq: torch.Tensor, values: torch.Tensor, weights: torch.Tensor, n: int):
    """Candidate words ``(q, n + m)``: the top-n of ``zq``, then the neighbours' values that bring a
    word of their own (not among the top-n, not repeating an earlier neighbour's, of a neighbour that
    exists), packed first, ``m`` slots for the most any query of the group needs. Returns the
    candidates, which slots are active (a query with fewer extras than ``m`` leaves the rest
    inactive) and ``slot`` ``(q, K)``: where each neighbour's own value sits among the candidates."""
    n = min(n, zq.shape[-1])
    top = _top_n(zq, n)
    q, K = values.shape
    eq_top = values[:, :, None] == top[:, None, :]  # (q, K, n)
    in_top = eq_top.any(-1)
    same = values[:, :, None] == values[:, None, :]  # (q, K, K)
    dup = (same & torch.ones(K, K, dtype=torch.bool, device=values.device).tril(-1)).any(-1)
    extra = ~(in_top | dup) & (weights > 0)
    order = torch.argsort((~extra).to(torch.int8), dim=1, stable=True)  # the extras first, in neighbour order
    m = int(extra.sum(1).max()) if q else 0
    C = torch.cat([top, values.gather(1, order[:, :m])], dim=1)
    active = torch.cat([torch.ones_like(top, dtype=torch.bool), extra.gather(1, order[:, :m])], dim=1)
    rank = torch.argsort(order, dim=1)  # position of each neighbour in `order`
    first = same.to(torch.int8).argmax(-1)  # the first neighbour with the same value
    slot = torch.where(in_top, eq_top.to(torch.int8).argmax(-1), n + rank.gather(1, first))
    return C, active, slot.clamp_max_(n + m - 1)  # (clamped: a missing neighbour's slot, of weight 0)


def restricted_steps(z0: torch.Tensor, G: torch.Tensor, weights: torch.Tensor, slot: torch.Tensor,
                     key_lse: torch.Tensor, *, steps: int, lr: float, alpha: float) -> torch.Tensor:
    """The restricted adaptation's coefficients ``A`` ``(q, K, S)`` after ``steps`` steps, from the
    candidates' base logits ``z0`` ``(q, K, S)`` (-inf on inactive slots), the Gram matrix ``G``
    ``(q, K, K)``, the neighbours' weights ``(q, K)``, the slot of each neighbour's own word
    ``(q, K)`` and each key's log-normaliser ``(q, K)``. The torch statement of
    ``lmmem/kernels/mbpa_adapt.cpp``, which runs instead on CPU in fp32 where it builds."""
    key_lse = key_lse.double()
    onehot_w = (lr * weights)[..., None]  # η w_k, added at each neighbour's own slot
    slot = slot[..., None]
    dt = z0.dtype
    A = None
    keep = 1.0 - lr * alpha
    log_rest = None
    for s in range(steps):
        z = z0 if A is None else torch.baddbmm(z0, G, A)
        # p over the candidates = softmax over C × σ, σ = Σ_C e^z / Z the candidates' share of the
        # full normaliser Z = Σ_C e^z + (frozen rows' mass); log Σ_C e^z = max z − log max softmax
        p = torch.softmax(z, -1)
        lse_c = z.amax(-1).double() - torch.log(p.amax(-1).double())  # (q, K)
        if log_rest is None:  # frozen rows' mass Z⁰ − Σ_C e^{z⁰}, from the stored log Z⁰ of each key
            frac = torch.exp(lse_c - key_lse)
            log_rest = key_lse + torch.log((1 - frac).clamp_min(0))  # -inf when C holds everything
        sigma = torch.sigmoid(lse_c - log_rest).to(dt)  # 1 / (1 + e^{log_rest − lse_c})
        g = p.mul_((-lr * weights * sigma)[..., None]).scatter_add_(2, slot, onehot_w)  # η w_k (onehot − p_k) on C
        A = g if A is None else torch.add(g, A, alpha=keep, out=g)  # A ← (1 − ηα) A + η g, one pass
    return A


def _probe_adapt(op) -> None:
    g = torch.Generator().manual_seed(0)
    q, K, S = 3, 5, 11
    z0 = torch.randn(q, K, S, generator=g) * 3
    z0[:, :, -2:] = float("-inf")  # inactive slots
    keys = torch.randn(q, K, 4, generator=g)
    G = torch.bmm(keys, keys.transpose(1, 2)).add_(1.0)
    weights = torch.rand(q, K, generator=g)
    slot = torch.randint(0, S - 2, (q, K), generator=g)
    key_lse = torch.logsumexp(z0, -1).double() + 1.0
    got = op(z0, G, weights, slot, key_lse, 0.1, 0.1, 4)
    want = restricted_steps(z0, G, weights, slot, key_lse, steps=4, lr=0.1, alpha=0.1)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-6):
        raise RuntimeError(f"its result on a probe problem differs from the torch statement by {(got - want).abs().max():.3g}")


@functools.lru_cache(maxsize=None)  # a fact about this process's machine, as the native scan's verdict
def _native_adapt():
    """The fused op (:mod:`lmmem.kernels.mbpa_native`) where it builds and matches
    :func:`restricted_steps` on a probe problem; else None."""
    return _verified(mbpa_native.restricted_adapt_op(), _probe_adapt, "adaptation",
                     "adapting with torch instead (the same result, slower)")


def restricted_target_log_probs(
    query: torch.Tensor, targets: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, weights: torch.Tensor,
    key_lse: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, vocab: int, steps: int, lr: float,
    alpha: float, base_logits: torch.Tensor | None = None, query_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p_θ′(target) ``(q,)`` with only the candidate rows adapted (see the module docstring).

    ``key_lse`` ``(q, K)``: logsumexp of each key's base logits; ``base_logits`` ``(q, V)`` and
    ``query_lse`` ``(q,)``: the queries' base logits and their logsumexp (computed if not given).
    The ``(q, K, |C|)`` work runs in the activations' dtype (≥ fp32), the per-key normalisers in fp64."""
    dt = torch.promote_types(query.dtype, torch.float32)
    query, keys, weights = query.to(dt), keys.to(dt), weights.to(dt)
    W = weight.to(dt)
    b = bias.to(dt) if bias is not None else None
    zq = base_logits.to(dt) if base_logits is not None else torch.nn.functional.linear(query, W, b)
    lse_q = query_lse.double() if query_lse is not None else torch.logsumexp(zq, -1).double()
    zy = zq.gather(1, targets[:, None])[:, 0].double()
    if steps == 0:
        return zy - lse_q
    C, active, slot = _candidates(zq, values, weights, vocab)  # (q, S), (q, S), (q, K)
    # z⁰ of the candidate rows, with -inf on inactive slots (they then stay -inf: p = 0, g = 0)
    Wc = torch.nn.functional.embedding(C, W)  # (q, S, D)
    z0 = torch.bmm(keys, Wc.transpose(1, 2))  # (q, K, S)
    if b is not None:
        z0 += b[C][:, None, :]
    z0.masked_fill_(~active[:, None, :], float("-inf"))
    one = 1.0 if b is not None else 0.0  # the bias change folds into the Gram matrix, as in adapted_log_probs
    G = torch.bmm(keys, keys.transpose(1, 2)).add_(one)
    native = _native_adapt() if z0.dtype == torch.float32 and z0.device.type == "cpu" else None
    if native is not None:
        A = native(z0.contiguous(), G, weights.contiguous(), slot.contiguous(), key_lse.double().contiguous(),
                   float(lr), float(alpha), steps)
    else:
        A = restricted_steps(z0, G, weights, slot, key_lse, steps=steps, lr=lr, alpha=alpha)
    hq = torch.bmm(keys, query[:, :, None])[..., 0].add_(one)  # (q, K): h_k · h (+ 1 for the bias)
    delta = torch.bmm(hq[:, None, :], A)[:, 0]  # (q, S)
    delta.masked_fill_(~active, 0)
    zc = zq.gather(1, C)
    inactive = torch.zeros_like(zc).masked_fill_(~active, float("-inf"))
    frac_q = torch.exp(zc + inactive - lse_q.to(dt)[:, None]).sum(-1).double()
    log_rest_q = lse_q + torch.log((1 - frac_q).clamp_min(0))
    logZq = torch.logaddexp(log_rest_q, torch.logsumexp(zc + delta + inactive, -1).double())
    zy = zy + (delta * ((C == targets[:, None]) & active)).sum(-1).double()
    return zy - logZq


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

    @torch.no_grad()
    def neighbours(self, hidden: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor | None = None):
        """K nearest stored pairs of every query of a chunk: keys ``(B, T, K, D)``, values
        ``(B, T, K)``, weights ``(B, T, K)`` (0 for missing neighbours)."""
        cfg = self.cfg
        cand_k, cand_v, allowed = self.memory.candidates(hidden, targets)
        h = hidden.to(cand_k.dtype)
        hn = (h * h).sum(-1)
        # ‖h − k‖² = ‖h‖² + ‖k‖² − 2 h·k, the stored keys' norms kept by the memory (the same sums as
        # computing them here, in the same order: exact ties between equal keys break as before)
        kn = torch.cat([self.memory.norms, hn], 1)
        d2 = hn[..., None] + kn[:, None, :] - 2 * torch.bmm(h, cand_k.transpose(1, 2))
        d2 = d2.clamp_min_(0).masked_fill_(~allowed, float("inf"))
        k = min(cfg.k, d2.shape[-1])
        dist, idx = nearest(d2, k)  # (B, T, k)
        B, T = targets.shape
        bi = torch.arange(B, device=h.device)[:, None, None]
        keys = cand_k[bi, idx]  # (B, T, k, D)
        values = cand_v[bi, idx].clamp_min(0)
        weights = torch.where(torch.isfinite(dist), 1.0 / (cfg.eps + dist), torch.zeros_like(dist))
        if lse is not None:
            return keys, values, weights, self.memory.candidates_aux(lse)[bi, idx]
        return keys, values, weights

    @torch.no_grad()
    def target_log_probs(self, hidden: torch.Tensor, targets: torch.Tensor, output, base_logits: torch.Tensor | None = None,
                         base_log_probs: torch.Tensor | None = None) -> torch.Tensor:
        """``log p_θ′(target)`` ``(B, T)`` of a chunk (0 on padding), then appends the chunk.

        ``base_logits`` ``(B·T, V)`` and ``base_log_probs`` ``(B·T,)`` (the plain model's
        log p(target)) may be passed when the caller has them; the log-normaliser of each position
        is then ``logit[target] − log p(target)`` instead of a logsumexp over V."""
        cfg = self.cfg
        B, T, D = hidden.shape
        N, V = B * T, output.weight.shape[0]
        y = targets.reshape(N)
        if cfg.vocab > 0:
            if base_logits is None:
                base_logits = output.logits(hidden.reshape(N, D))
            base_logits = base_logits.reshape(N, V)
            if base_log_probs is not None:
                lse = base_logits.gather(1, y.clamp_min(0)[:, None])[:, 0].double() - base_log_probs.reshape(N).double()
                lse = lse.masked_fill(y < 0, 0.0).view(B, T)
            else:
                lse = torch.logsumexp(base_logits, -1).double().view(B, T)
            keys, values, weights, key_lse = self.neighbours(hidden, targets, lse)
            self.memory.append(hidden, targets, lse)
        else:
            keys, values, weights = self.neighbours(hidden, targets)
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
                out[sel] = restricted_target_log_probs(
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
