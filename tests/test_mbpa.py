import numpy as np
import pytest
import torch

from lmmem.evaluation import FrequencyBuckets, score_stream
from engine_helpers import score
from lmmem.memories import MbPA, MbPAConfig, mbpa_reference
from lmmem.output_layers import build_output_layer


def _layer(V=7, D=5, bias=True):
    torch.manual_seed(0)
    layer = build_output_layer("full", D, V, bias=bias) if bias is False else build_output_layer("full", D, V)
    with torch.no_grad():
        layer.weight.normal_()
        if layer.bias is not None:
            layer.bias.normal_()
    return layer.double()


def _run_fast(layer, h, y, cfg, chunk):
    mb = MbPA(h.shape[0], h.shape[2], cfg, dtype=torch.float64)
    sizes = mb.memory.nbytes()
    out = []
    for lo in range(0, h.shape[1], chunk):
        out.append(mb.target_log_probs(h[:, lo:lo + chunk], y[:, lo:lo + chunk], layer))
        assert mb.memory.nbytes() == sizes  # bounded memory
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("k,steps,memory,chunk", [(4, 3, 10, 6), (3, 5, 100, 7), (8, 1, 5, 4)])
def test_fast_mbpa_equals_naive_autograd(k, steps, memory, chunk):
    layer = _layer()
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 30, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (2, 30), generator=g)
    cfg = MbPAConfig(k=k, steps=steps, lr=0.5, alpha=0.3, eps=0.1, memory=memory, vocab=0, max_elements=5 * k * 7)
    fast = _run_fast(layer, h, y, cfg, chunk)
    for r in range(2):
        ref = mbpa_reference(h[r], y[r], layer.weight, layer.bias, cfg)
        torch.testing.assert_close(fast[r], ref, rtol=1e-8, atol=1e-8)
    plain = torch.log_softmax(layer.logits(h), -1).gather(2, y[..., None])[..., 0]
    assert (fast[:, 1:] - plain[:, 1:]).abs().max() > 1e-3  # adaptation really moves the prediction
    torch.testing.assert_close(fast[:, 0], plain[:, 0])  # nothing in memory yet: the plain model


def test_fast_mbpa_equals_naive_without_bias():
    layer = _layer(bias=False)
    assert layer.bias is None
    g = torch.Generator().manual_seed(2)
    h, y = torch.randn(1, 20, 5, generator=g, dtype=torch.float64), torch.randint(0, 7, (1, 20), generator=g)
    cfg = MbPAConfig(k=4, steps=4, lr=0.3, alpha=0.1, eps=0.1, memory=12, vocab=0)
    torch.testing.assert_close(_run_fast(layer, h, y, cfg, 6)[0], mbpa_reference(h[0], y[0], layer.weight, None, cfg),
                               rtol=1e-8, atol=1e-8)


def test_zero_steps_is_the_plain_model():
    layer = _layer()
    g = torch.Generator().manual_seed(3)
    h, y = torch.randn(3, 16, 5, generator=g, dtype=torch.float64), torch.randint(0, 7, (3, 16), generator=g)
    fast = _run_fast(layer, h, y, MbPAConfig(k=4, steps=0, memory=8, vocab=0), 5)
    torch.testing.assert_close(fast, layer.target_log_probs(h.reshape(-1, 5), y.reshape(-1)).view(3, 16), rtol=0, atol=1e-12)


def test_mbpa_memory_does_not_grow():
    layer = _layer().float()
    mb = MbPA(2, 5, MbPAConfig(k=4, steps=2, memory=9, vocab=0))
    before = (mb.memory.keys.shape, mb.memory.nbytes())
    for _ in range(40):
        mb.target_log_probs(torch.randn(2, 6, 5), torch.randint(0, 7, (2, 6)), layer)
    assert (mb.memory.keys.shape, mb.memory.nbytes()) == before


def test_mbpa_steps_zero_in_the_scoring_loop_equals_plain():
    from lmmem.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=30, embed_dim=8, hidden_dim=12, tie_weights=False)).double().eval()
    tokens = np.random.default_rng(0).integers(0, 30, size=150).astype("<u4")
    bucket_of = FrequencyBuckets((1000, 100)).assign(np.random.default_rng(1).integers(0, 3000, size=30))
    plain, _ = score_stream(model, tokens, bucket_of=bucket_of, num_buckets=3, batch_size=2, bptt=11)
    s = score(model, tokens, bucket_of=bucket_of, num_buckets=3, batch_size=2, bptt=11,
              mbpa=MbPAConfig(k=4, steps=0, memory=20, lam=0.5, vocab=0), mbpa_lambdas=[0.0, 0.5])
    np.testing.assert_allclose(s.at(mbpa_lambda=0.5), plain, rtol=1e-12)
    np.testing.assert_array_equal(s.at(mbpa_lambda=0.0), plain)  # λ = 0: bit for bit


@pytest.mark.parametrize("vocab,k,steps,memory,bias", [(7, 4, 3, 10, True), (100, 3, 5, 100, False), (2, 4, 3, 10, True),
                                                       (1, 8, 2, 5, True), (3, 5, 4, 12, False)])
def test_restricted_mbpa_equals_naive_masked_autograd(vocab, k, steps, memory, bias):
    """vocab >= V is exact MbPA; vocab < V equals autograd MbPA with the gradient masked to the
    candidate rows (top-vocab words of the query ∪ neighbours' next words)."""
    layer = _layer(bias=bias)
    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 25, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (2, 25), generator=g)
    cfg = MbPAConfig(k=k, steps=steps, lr=0.5, alpha=0.3, eps=0.1, memory=memory, vocab=vocab, max_elements=3 * (vocab + k) * 5)
    fast = _run_fast(layer, h, y, cfg, 6)
    for r in range(2):
        ref = mbpa_reference(h[r], y[r], layer.weight, layer.bias, cfg)
        torch.testing.assert_close(fast[r], ref, rtol=1e-8, atol=1e-8)
    if vocab >= 7:
        exact = _run_fast(layer, h, y, MbPAConfig(k=k, steps=steps, lr=0.5, alpha=0.3, eps=0.1, memory=memory, vocab=0), 6)
        torch.testing.assert_close(fast, exact, rtol=1e-8, atol=1e-8)


def test_restricted_mbpa_in_the_scoring_loop_is_close_to_exact():
    from lmmem.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=60, embed_dim=8, hidden_dim=12, tie_weights=False)).double().eval()
    tokens = np.random.default_rng(0).integers(0, 60, size=120).astype("<u4")
    kw = dict(bucket_of=np.zeros(60, dtype=np.int64), num_buckets=1, batch_size=2, bptt=11)
    kw["mbpa_lambdas"] = [0.0, 0.5]
    exact = score(model, tokens, mbpa=MbPAConfig(k=4, steps=3, lr=1.0, memory=30, lam=0.5, vocab=0), **kw)
    full = score(model, tokens, mbpa=MbPAConfig(k=4, steps=3, lr=1.0, memory=30, lam=0.5, vocab=60), **kw)
    part = score(model, tokens, mbpa=MbPAConfig(k=4, steps=3, lr=1.0, memory=30, lam=0.5, vocab=20), **kw)
    np.testing.assert_allclose(full.nll, exact.nll, rtol=1e-10)
    assert not np.allclose(exact.at(mbpa_lambda=0.5), exact.at(mbpa_lambda=0.0))
    np.testing.assert_allclose(part.nll, exact.nll, rtol=1e-2)


@pytest.mark.parametrize("bad,match", [(dict(k=0), "K > 0"), (dict(lam=1.5), "λ"), (dict(vocab=-1), "vocabulary"),
                                       (dict(memory=10, train_pairs=11), "training pairs"), (dict(max_elements=-1), "max_elements")])
def test_config_names_the_bad_value(bad, match):
    with pytest.raises(ValueError, match=match):
        MbPAConfig(**bad)


@pytest.mark.parametrize("shape, k", [((3, 7, 50), 4), ((11, 9), 9), ((5, 40), 1), ((2, 6), 8)])
def test_nearest_breaks_ties_at_the_kth_by_lowest_index(shape, k):
    """MbPA's neighbour search: the k smallest with ties at the k-th value taken by lowest index
    (machine-independent, unlike torch.topk's order among equal values), against a stable sort;
    the rows are mostly ties (integer distances), so the rule is exercised."""
    from lmmem.memories.mbpa import nearest

    g = torch.Generator().manual_seed(sum(shape) + k)
    d = torch.randint(0, 4, shape, generator=g).double()
    d[..., -1] = float("inf")  # a disallowed slot
    vals, idx = nearest(d, k)
    ref_vals, ref_idx = torch.sort(d, dim=-1, stable=True)
    kk = min(k, shape[-1])
    assert torch.equal(vals, ref_vals[..., :kk])
    assert torch.equal(idx.sort(-1).values, ref_idx[..., :kk].sort(-1).values)  # the same entries
    assert torch.equal(d.gather(-1, idx), vals)


def _native_score_or_skip():
    from conftest import native_toolchain_missing
    from lmmem.memories import mbpa

    if native_toolchain_missing():
        pytest.skip(f"the native op cannot be built here: {native_toolchain_missing()}")
    op = mbpa._native_score()
    assert op is not None, "a C++ toolchain is present, so MbPA's native scoring must build and pass its probe"
    return op


def _memory_problem(B, T, M, K, D, V, seed, bias):
    """A chunk of B streams × T queries and, per stream, M stored pairs followed by the chunk's own:
    queries near stored keys (adaptation moves their scores by nats), K + 3 stored keys equal and a
    query equal to them (K + 3 candidates at distance 0 and different words: the K of lowest index
    are its neighbours), words shared by several candidates and words among the queries' top
    logits, candidates the queries may not use, and a query with fewer allowed candidates than K."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, D, generator=g) * 2
    b = torch.randn(V, generator=g) if bias else None
    mem = torch.randn(B, M, D, generator=g) / D ** 0.5
    mem[:, 1:K + 3] = mem[:, :1]
    h = mem[:, torch.randint(0, M, (T,), generator=g)] + 0.3 * torch.randn(B, T, D, generator=g) / D ** 0.5
    h[:, -1] = mem[:, 0]
    cand_k = torch.cat([mem, h], 1)
    zq = torch.nn.functional.linear(h, W, b).reshape(B * T, V)
    cand_v = torch.randint(0, V, (B, M + T), generator=g)
    cand_v[:, ::3] = torch.topk(zq, 1).indices[0, 0]
    cand_v[:, 0] = cand_v[:, 1]
    allowed = torch.rand(B, T, M + T, generator=g) > 0.3
    allowed[:, -1, :M] = True
    allowed[0, 0, 3:] = False
    cand_aux = torch.logsumexp(torch.nn.functional.linear(cand_k, W, b), -1).double()
    y = cand_v[:, torch.randint(0, M + T, (T,), generator=g)].reshape(B * T)
    y[::4] = torch.randint(0, V, (len(y[::4]),), generator=g)
    return W, b, h, cand_k, cand_v, allowed, cand_aux, zq, y


@pytest.mark.parametrize("B,T,M,K,D,V,n,steps,bias", [(2, 35, 200, 32, 128, 30000, 128, 5, True),
                                                      (1, 5, 3, 8, 16, 500, 7, 2, False),
                                                      (3, 9, 40, 17, 20, 3001, 64, 4, True),
                                                      (2, 6, 80, 64, 33, 900, 40, 1, True),
                                                      (2, 4, 30, 33, 128, 1000, 128, 6, False),
                                                      (1, 7, 20, 16, 5, 200, 200, 3, True),
                                                      (2, 35, 2000, 32, 128, 30000, 128, 5, True),
                                                      (2, 9, 300, 1, 16, 500, 7, 3, False),
                                                      (1, 11, 150, 5, 8, 300, 9, 2, True)])
def test_native_restricted_score_equals_the_torch_statement(B, T, M, K, D, V, n, steps, bias):
    """The C++ op (lmmem/kernels/mbpa_adapt.cpp: per query its neighbours, candidates, their logits,
    the steps and the score) against its torch statement (select_neighbours, then
    restricted_target_log_probs) in fp32 and in fp64: K of 1 to 64 (one to four vector registers,
    padded columns), fewer allowed candidates than K, with and without bias, every word a
    candidate (n = V), some positions not scored (padding), and the queries' logits read as rows of
    a wider, permuted table. The last three have at least 8K candidates, where the op selects the
    neighbours among those at or below a threshold (K + 3 of them tied at it)."""
    from lmmem.memories import mbpa

    op = _native_score_or_skip()
    W, b, h, cand_k, cand_v, allowed, cand_aux, zq, y = _memory_problem(B, T, M, K, D, V, B * T + K, bias)
    cfg = MbPAConfig(k=K, steps=steps, lr=0.3, alpha=0.2, eps=0.5, vocab=n, memory=M)
    qpos = torch.arange(B * T)[torch.arange(B * T) % 5 != 2]  # padding: positions not scored
    table = torch.randn(B * T + 3, V + 5)  # rows of stride V + 5, in another order
    rows = torch.randperm(B * T + 3, generator=torch.Generator().manual_seed(1))[:len(qpos)]
    table[rows, :V] = zq[qpos]
    lse = torch.logsumexp(zq[qpos], -1).double()

    def inputs(dt):
        f = (lambda t: t.to(dt))
        hh, kk = f(h), f(cand_k)
        return (f(table[:, :V]), rows, qpos, y[qpos], hh, kk[:, :M], cand_v, allowed, torch.bmm(hh, kk.transpose(1, 2)),
                (hh * hh).sum(-1), (kk * kk).sum(-1), cand_aux, lse, f(W), f(b) if b is not None else None, cfg)
    got = mbpa.score_natively(op, *inputs(torch.float32))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(mbpa.score_natively(op, *inputs(torch.float32)), got)  # queries split between threads
    finally:
        torch.set_num_threads(threads)
    want = mbpa._torch_score(*inputs(torch.float32))
    want64 = mbpa._torch_score(*inputs(torch.float64))
    base = zq[qpos].gather(1, y[qpos, None])[:, 0].double() - lse
    assert (want64 - base).abs().max() > 0.05  # the adaptation moves the scores (by far more than the tolerance)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)  # fp32 rounding of scores up to ~10 nats
    torch.testing.assert_close(got, want64, rtol=1e-5, atol=2e-5)


def test_mbpa_scores_natively_as_by_torch_in_the_scoring_loop(monkeypatch):
    """MbPA.target_log_probs in fp32 with the native op and with the torch statement, chunk by chunk
    over streams with padding (ignored targets: the live queries' rows of the logits) and repeated
    states (equal keys: ties in distance)."""
    from lmmem.memories import mbpa

    _native_score_or_skip()
    layer = build_output_layer("full", 12, 500)
    g = torch.Generator().manual_seed(5)
    h, y = torch.randn(3, 40, 12, generator=g), torch.randint(0, 500, (3, 40), generator=g)
    h[:, 20:30] = h[:, 5:15]  # the same states again
    y[1, 30:] = -100  # padding
    y[2, ::7] = -100
    cfg = MbPAConfig(k=8, steps=4, memory=25, vocab=32, lr=0.5)

    def run():
        mb = MbPA(3, 12, cfg)
        with torch.no_grad():
            return torch.cat([mb.target_log_probs(h[:, lo:lo + 9], y[:, lo:lo + 9], layer) for lo in range(0, 40, 9)], 1)
    native = run()
    monkeypatch.setattr(mbpa, "_native_score", lambda: None)
    torch_ = run()
    torch.testing.assert_close(native, torch_, rtol=0, atol=2e-5)
    assert (native[y < 0] == 0).all() and (native[y >= 0] != 0).all()


@pytest.mark.parametrize("V,n", [(30000, 128), (4099, 64), (3001, 7), (300, 128)])
@pytest.mark.parametrize("path", ["native", "torch"])
def test_top_n_is_the_set_topk_gives(V, n, path, monkeypatch):
    """mbpa_restricted._top_n, native and torch: the interleaved-class selection (rows wider than 4 · n ·
    classes; V not a multiple of the classes: the columns past the last whole class) and the narrow
    rows, against torch.topk's set, on distinct values and on rows whose top values repeat."""
    from conftest import native_toolchain_missing
    from lmmem.memories import mbpa_restricted as mbpa

    if path == "torch":
        monkeypatch.setattr(mbpa, "_native_top_n", lambda: None)
    elif native_toolchain_missing():
        pytest.skip(f"the native op cannot be built here: {native_toolchain_missing()}")
    else:
        assert mbpa._native_top_n() is not None, "a C++ toolchain is present: the native top-n must pass its probe"
    g = torch.Generator().manual_seed(V + n)
    z = torch.randn(9, V, generator=g)
    z[0, -3:] = 10.0 + torch.arange(3.0)  # the largest values past the last whole class
    z[1, ::97] = 5.0  # a value repeated across classes, tied beyond the n-th place or not
    got, want = mbpa._top_n(z, n), torch.topk(z, n, dim=1).indices
    for r in range(9):
        assert len(set(got[r].tolist())) == n
        torch.testing.assert_close(z[r, got[r]].sort().values, z[r, want[r]].sort().values, rtol=0, atol=0)


@pytest.mark.parametrize("name, probe, what", [("_native_score", "_probe_score", "scoring"),
                                               ("_native_top_n", "_probe_top_n", "top-n")])
def test_a_native_mbpa_op_that_fails_its_probe_warns_once_and_torch_runs(monkeypatch, name, probe, what):
    """A wrong result on the probe: one RuntimeWarning naming the op and the cause, then None (the
    torch statement runs) without asking again."""
    import warnings

    from lmmem.kernels import mbpa_native
    from lmmem.memories import mbpa as mbpa_module
    from lmmem.memories import mbpa_restricted

    mbpa = mbpa_module if name == "_native_score" else mbpa_restricted
    monkeypatch.setattr(mbpa_native, "restricted_score_op", lambda: (lambda *a: None))  # an op that is "built"
    monkeypatch.setattr(mbpa_native, "top_n_op", lambda: (lambda *a: None))

    def wrong(op):
        raise RuntimeError("its result on a probe problem differs")
    monkeypatch.setattr(mbpa, probe, wrong)
    getattr(mbpa, name).cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=f"MbPA's native {what} is not used here .*differs"):
            assert getattr(mbpa, name)() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert getattr(mbpa, name)() is None  # the verdict is kept: no second warning
    finally:
        getattr(mbpa, name).cache_clear()


@pytest.mark.parametrize("vocab", [32])
def test_mbpa_reads_the_logits_of_sliding_windows_in_batch_order(vocab, monkeypatch):
    """With sliding windows the memories see the batch in stream order; MbPA reads each position's
    logits from the batch's own rows (no copy; restricted MbPA by the native op, exact MbPA by
    torch): the same sums as the torch statement reading a copy in stream order (fp32)."""
    import numpy as np

    from lmmem.evaluation.adapters import LmmemAdapter
    from lmmem.evaluation.engine import run_pass
    from lmmem.evaluation.methods import MbPAMemory, MemorySet
    from lmmem.evaluation.sinks import GridSums
    from lmmem.evaluation.windows import SlidingWindows
    from lmmem.memories import mbpa
    from lmmem.models import ModelConfig, build_model

    if vocab:
        _native_score_or_skip()
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="transformer", vocab_size=200, embed_dim=16, hidden_dim=16, num_layers=1,
                                    num_heads=2, context=32, tie_weights=False)).eval()
    tokens = np.random.default_rng(0).integers(0, 200, size=301).astype("<u4")

    def run():
        memset = MemorySet([MbPAMemory(MbPAConfig(k=6, steps=3, memory=40, vocab=vocab, lr=0.5), [0.5])])
        sums = GridSums(memset.grid.size, 1, device="cpu", bucket_of_vocab=np.zeros(200, dtype=np.int64))
        groups = SlidingWindows(tokens, window=24, context=8, batch_size=4, streams=2).groups()
        run_pass(LmmemAdapter(model), groups, memset, sums)
        return sums.nll.clone()
    got = run()

    def copied(self, h, y, view):  # the reference: the logits copied into stream order, the torch statement
        logits = view.base_logits[view.logit_rows] if view.logit_rows is not None else view.base_logits
        lq = self.mbpa.target_log_probs(h, y, view.head, base_logits=logits, base_log_probs=view.base_lp)
        return view.to_flat(lq.double()[None])[0]
    monkeypatch.setattr(MbPAMemory, "score", copied)
    monkeypatch.setattr(mbpa, "_native_score", lambda: None)
    torch.testing.assert_close(got, run(), rtol=1e-5, atol=1e-4)
    assert got[1].sum() != got[0].sum()  # MbPA moved the scores


@pytest.mark.parametrize("vocab", [0, 5])
def test_mbpa_logit_rows_equal_logits_in_stream_order(vocab):
    """MbPA.target_log_probs given the logits in another order with logit_rows equals it given them
    in stream order (exact and restricted MbPA; fp64, the torch statements)."""
    layer = _layer()
    g = torch.Generator().manual_seed(6)
    h, y = torch.randn(2, 9, 5, generator=g, dtype=torch.float64), torch.randint(0, 7, (2, 9), generator=g)
    cfg = MbPAConfig(k=3, steps=2, lr=0.5, memory=12, vocab=vocab)
    logits = layer.logits(h.reshape(18, 5))
    lp = torch.log_softmax(logits, -1).gather(1, y.reshape(18, 1))[:, 0]
    perm = torch.randperm(18, generator=g)
    shuffled = torch.empty_like(logits)
    shuffled[perm] = logits  # stream position i's logits in row perm[i]
    a = MbPA(2, 5, cfg, dtype=torch.float64).target_log_probs(h, y, layer, base_logits=logits, base_log_probs=lp)
    b = MbPA(2, 5, cfg, dtype=torch.float64).target_log_probs(h, y, layer, base_logits=shuffled, base_log_probs=lp, logit_rows=perm)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("vocab", [0, 32])
def test_the_cache_and_mbpa_share_the_products_of_the_same_keys(vocab, monkeypatch):
    """The cache and MbPA over the same window hold the same keys: one product of each chunk with
    them serves both (computed before either appends it), with the same scores, bit for bit, as
    each computing its own. With another window or MbPA's training pairs the keys differ and
    nothing is shared."""
    import numpy as np

    from lmmem.evaluation.adapters import LmmemAdapter
    from lmmem.evaluation.engine import run_pass
    from lmmem.evaluation.methods import CacheMemory, MbPAMemory, MemorySet
    from lmmem.evaluation.sinks import GridSums
    from lmmem.evaluation.windows import BpttWindows
    from lmmem.memories.neural_cache import CacheConfig, StreamMemory
    from lmmem.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="lstm", vocab_size=200, embed_dim=16, hidden_dim=16, num_layers=1)).eval()
    tokens = np.random.default_rng(0).integers(0, 200, size=301).astype("<u4")
    calls = []
    products = StreamMemory.products
    monkeypatch.setattr(StreamMemory, "products", lambda self, h: calls.append(1) or products(self, h))

    def memset(window=30, prefill=None):
        mbpa = MbPAMemory(MbPAConfig(k=6, steps=3, memory=30, vocab=vocab, lr=0.5), [0.5], prefill=prefill)
        return MemorySet([CacheMemory(CacheConfig(window=window), [0.3], [0.2]), mbpa])

    def run(memories):
        calls.clear()
        sums = GridSums(memories.grid.size, 1, device="cpu", bucket_of_vocab=np.zeros(200, dtype=np.int64))
        run_pass(LmmemAdapter(model), BpttWindows(tokens, batch_size=3, bptt=7).groups(), memories, sums)
        return sums.nll.clone(), len(calls)
    batches = sum(g.steps for g in BpttWindows(tokens, batch_size=3, bptt=7).groups())
    shared, n_shared = run(memset())
    assert n_shared == batches  # one product a chunk for both memories
    assert memset(window=31)._same_keys() is None
    assert memset(prefill=(torch.zeros(2, 16), torch.zeros(2, dtype=torch.long), torch.zeros(2)))._same_keys() is None
    monkeypatch.setattr(MemorySet, "_same_keys", lambda self: None)
    alone, n_alone = run(memset())
    assert n_alone == 2 * batches
    assert torch.equal(shared, alone)
    assert shared[-1].sum() != shared[0].sum()  # the memories moved the scores
