import numpy as np
import pytest
import torch

from lmmem.evaluation import FrequencyBuckets, score_stream
from engine_helpers import score
from lmmem.evaluation.methods import log_mix as _log_mix
from lmmem.memories import CacheConfig, NeuralCache, cache_reference
from lmmem.models import ModelConfig, build_model


def _streams(B=3, N=45, D=6, V=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, N, D, generator=g, dtype=torch.float64), torch.randint(0, V, (B, N), generator=g)


@pytest.mark.parametrize("window,chunk", [(7, 8), (20, 5), (1, 3), (100, 16)])
def test_vectorised_cache_equals_a_per_token_loop(window, chunk):
    h, y = _streams()
    thetas = [0.3, 1.0]
    cache = NeuralCache(3, 6, window, dtype=torch.float64)
    sizes = {k: v.shape for k, v in vars(cache.memory).items() if torch.is_tensor(v)}
    parts, nonempty = [], []
    for lo in range(0, h.shape[1], chunk):
        lp, ne = cache.target_log_probs(h[:, lo:lo + chunk], y[:, lo:lo + chunk], thetas)
        parts.append(lp)
        nonempty.append(ne)
        assert {k: v.shape for k, v in vars(cache.memory).items() if torch.is_tensor(v)} == sizes  # bounded
    fast, nonempty = torch.cat(parts, dim=2), torch.cat(nonempty, dim=1)
    for i, theta in enumerate(thetas):
        for r in range(3):
            ref = cache_reference(h[r], y[r], window, theta)
            assert torch.equal(torch.isnan(ref), ~nonempty[r])
            ok = ~torch.isnan(ref)
            torch.testing.assert_close(fast[i, r][ok], ref[ok], rtol=1e-10, atol=1e-10)


def test_cache_memory_does_not_grow_with_the_stream():
    cache = NeuralCache(2, 4, 10)
    nbytes = cache.memory.nbytes()
    for _ in range(50):
        cache.target_log_probs(torch.randn(2, 7, 4), torch.randint(0, 9, (2, 7)), [0.3])
    assert cache.memory.nbytes() == nbytes and cache.memory.keys.shape == (2, 10, 4)
    assert bool(cache.memory.valid.all())


def test_log_mix_with_lambda_zero_is_exact():
    lp = torch.randn(1000, dtype=torch.float64) - 5
    lq = torch.where(torch.rand(1000) < 0.3, torch.full_like(lp, float("-inf")), torch.randn(1000, dtype=torch.float64))
    assert torch.equal(_log_mix(lp, torch.zeros((), dtype=torch.float64), lq), lp)
    lam = torch.tensor(0.25, dtype=torch.float64)
    torch.testing.assert_close(_log_mix(lp, lam, lq), torch.log(0.75 * lp.exp() + 0.25 * lq.exp()))


def _model(arch="lstm", softmax="full"):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, vocab_size=30, embed_dim=8, hidden_dim=12, proj_dim=0, tie_weights=False, context=16,
                      num_heads=2, softmax=softmax)
    return build_model(cfg).double().eval()


@pytest.mark.parametrize("arch,softmax", [("lstm", "full"), ("transformer", "full"), ("lstm", "hebbian")])
def test_lambda_zero_reproduces_the_plain_model(arch, softmax):
    model = _model(arch, softmax)
    tokens = np.random.default_rng(0).integers(0, 30, size=211).astype("<u4")
    bucket_of = FrequencyBuckets((1000, 100)).assign(np.random.default_rng(1).integers(0, 3000, size=30))
    plain, cnt = score_stream(model, tokens, bucket_of=bucket_of, num_buckets=3, batch_size=4, bptt=9)
    s = score(model, tokens, bucket_of=bucket_of, num_buckets=3, batch_size=4, bptt=9,
              cache=CacheConfig(window=20, theta=0.3, lam=0.2), cache_lambdas=[0.0, 0.2])
    np.testing.assert_array_equal(s.count, cnt)
    np.testing.assert_array_equal(s.at(theta=0.3, cache_lambda=0.0), plain)  # bit for bit
    assert not np.allclose(s.at(theta=0.3, cache_lambda=0.2), plain)


def test_cache_helps_on_repeated_text():
    model = _model()
    rng = np.random.default_rng(0)
    tokens = np.tile(rng.integers(0, 30, size=40), 8).astype("<u4")
    bucket_of = np.zeros(30, dtype=np.int64)
    s = score(model, tokens, bucket_of=bucket_of, num_buckets=1, batch_size=1, bptt=16,
              cache=CacheConfig(window=100, theta=1.0, lam=0.5), thetas=[1.0, 5.0], cache_lambdas=[0.0, 0.5])
    assert s.at(theta=5.0, cache_lambda=0.5)[0] < s.at(theta=5.0, cache_lambda=0.0)[0]
