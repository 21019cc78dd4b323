"""The restricted variant of MbPA (``vocab = N > 0``; :mod:`lmmem.memories.mbpa` states the
rule): the candidate words of each query, the adaptation steps on the candidate rows and the
adapted score of the target. :func:`restricted_target_log_probs` is, after
:func:`lmmem.memories.mbpa.select_neighbours`, the torch statement of the native op that runs all
of it per query on a CPU (:mod:`lmmem.kernels.mbpa_native`, chosen in :mod:`lmmem.memories.mbpa`):
it runs wherever the op does not (fp64, GPUs, K > 64, no C++ compiler), and the op must match it
to fp32 rounding, on a probe before first use and in the tests."""

from __future__ import annotations

import functools

import torch

from lmmem.kernels import ivf_scan, mbpa_native


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
    """:func:`lmmem.kernels.ivf_scan.verified` for MbPA's native ``what``."""
    return ivf_scan.verified(op, probe, f"MbPA's native {what}", instead)


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
    ``(q, K)`` and each key's log-normaliser ``(q, K)``."""
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


def restricted_target_log_probs(
    query: torch.Tensor, targets: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, weights: torch.Tensor,
    key_lse: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, vocab: int, steps: int, lr: float,
    alpha: float, base_logits: torch.Tensor | None = None, query_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p_θ′(target) ``(q,)`` with only the candidate rows adapted (see the module docstring).

    ``key_lse`` ``(q, K)``: logsumexp of each key's base logits; ``base_logits`` ``(q, V)`` and
    ``query_lse`` ``(q,)``: the queries' base logits and their logsumexp (computed if not given).
    The ``(q, K, |C|)`` work runs in the activations' dtype (≥ fp32), the per-key normalisers in fp64.
    After :func:`lmmem.memories.mbpa.select_neighbours`, the torch statement of its native op."""
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
