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
    from lmmem.memories import mbpa_restricted

    if native_toolchain_missing():
        pytest.skip(f"the native op cannot be built here: {native_toolchain_missing()}")
    op = mbpa_restricted._native_score()
    assert op is not None, "a C++ toolchain is present, so MbPA's native scoring must build and pass its probe"
    return op


def _restricted_problem(q, K, D, V, seed, bias=True):
    """Queries near their neighbours (adaptation moves their scores by nats, not hundreds), some
    neighbours' words among the query's top logits and some not, two neighbours sharing a word,
    missing neighbours (weight 0) at the end of query 0's list, and targets that are a neighbour's
    word, the top word, or any word."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, D, generator=g) * 2
    b = torch.randn(V, generator=g) if bias else None
    h = torch.randn(q, D, generator=g) / D ** 0.5
    keys = h[:, None, :] + 0.3 * torch.randn(q, K, D, generator=g) / D ** 0.5
    zq = torch.nn.functional.linear(h, W, b)
    values = torch.randint(0, V, (q, K), generator=g)
    values[:, K // 2:] = torch.topk(zq, 3).indices[:, :1]
    if K > 2:
        values[:, 2] = values[:, 1]
    weights = torch.rand(q, K, generator=g) * 2
    weights[0, K - K // 3:] = 0.0
    y = torch.randint(0, V, (q,), generator=g)
    y[: q // 2] = values[: q // 2, 0]
    y[-1] = torch.topk(zq[-1], 1).indices[0]
    lse = torch.logsumexp(zq, -1).double()
    key_lse = torch.logsumexp(torch.nn.functional.linear(keys, W, b), -1).double()
    return W, b, h, keys, zq, values, weights, y, lse, key_lse


@pytest.mark.parametrize("q,K,D,V,n,steps,bias", [(40, 32, 128, 30000, 128, 5, True), (9, 1, 16, 500, 7, 2, False),
                                                  (13, 17, 20, 3001, 64, 4, True), (7, 64, 33, 900, 40, 1, True),
                                                  (5, 33, 128, 1000, 128, 6, False), (4, 16, 5, 200, 200, 3, True)])
def test_native_restricted_score_equals_the_torch_statement(q, K, D, V, n, steps, bias):
    """The C++ op (lmmem/kernels/mbpa_adapt.cpp: candidates, their logits, the steps and the score,
    per query) against restricted_target_log_probs in fp32 and in fp64: K of 1 to 64 (one to
    four vector registers, padded columns), with and without bias, every word a candidate (n = V),
    the queries' logits read as rows of a wider, permuted table, and one key whose candidates hold
    all of its mass (its frozen rows' mass is 0)."""
    from lmmem.memories import mbpa_restricted as mbpa

    op = _native_score_or_skip()
    W, b, h, keys, zq, values, weights, y, lse, key_lse = _restricted_problem(q, K, D, V, q + K, bias)
    if n >= V:  # every word a candidate: the keys' normalisers are the candidates' own
        key_lse[-1, 0] = torch.logsumexp(torch.nn.functional.linear(keys[-1, 0], W, b), -1).double()
    table = torch.randn(q + 3, V + 5)  # rows of stride V + 5, in another order
    rows = torch.randperm(q + 3, generator=torch.Generator().manual_seed(1))[:q]
    table[rows, :V] = zq
    args = dict(vocab=n, steps=steps, lr=0.3, alpha=0.2)
    got = mbpa.score_natively(op, table[:, :V], rows, y, h, keys, values, weights, key_lse, lse, W, b, **args)
    want = mbpa.restricted_target_log_probs(h, y, keys, values, weights, key_lse, W, b, base_logits=zq, query_lse=lse, **args)
    d = torch.float64
    want64 = mbpa.restricted_target_log_probs(h.to(d), y, keys.to(d), values, weights.to(d), key_lse, W.to(d),
                                              b.to(d) if b is not None else None, base_logits=zq.to(d), query_lse=lse, **args)
    base = zq.gather(1, y[:, None])[:, 0].double() - lse
    assert (want64 - base).abs().max() > 1.0  # the adaptation moves the scores
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    torch.testing.assert_close(got, want64, rtol=0, atol=2e-5)


def test_mbpa_scores_natively_as_by_torch_in_the_scoring_loop(monkeypatch):
    """MbPA.target_log_probs in fp32 with the native op and with the torch statement, chunk by chunk
    over streams with padding (ignored targets: the live queries' rows of the logits)."""
    from lmmem.memories import mbpa_restricted as mbpa

    _native_score_or_skip()
    layer = build_output_layer("full", 12, 500)
    g = torch.Generator().manual_seed(5)
    h, y = torch.randn(3, 40, 12, generator=g), torch.randint(0, 500, (3, 40), generator=g)
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
    from lmmem.memories import mbpa_restricted as mbpa

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
