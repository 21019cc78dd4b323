import numpy as np
import pytest
import torch

from lmmem.evaluation import DynamicConfig, score_dynamic, score_stream
from lmmem.models import ModelConfig, build_model


def _model(arch="lstm", softmax="full"):
    torch.manual_seed(0)
    return build_model(ModelConfig(arch=arch, vocab_size=30, embed_dim=8, hidden_dim=12, proj_dim=8 if arch == "lstm" else 0, tie_weights=True, context=16,
                                   num_heads=2, softmax=softmax)).double().eval()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch,softmax", [("lstm", "full"), ("transformer", "hebbian")])
def test_zero_learning_rate_is_the_plain_model_and_the_model_is_untouched(arch, softmax):
    model = _model(arch, softmax)
    tokens = np.random.default_rng(0).integers(0, 30, size=200).astype("<u4")
    bucket_of = np.arange(30) % 3
    plain, cnt = score_stream(model, tokens, bucket_of=bucket_of, num_buckets=3, batch_size=4, bptt=10)
    before = _snapshot(model)
    nll, cnt2 = score_dynamic(model, tokens, bucket_of=bucket_of, num_buckets=3, cfg=DynamicConfig(lr=0.0, decay=0.0),
                              batch_size=4, bptt=10)
    np.testing.assert_array_equal(cnt, cnt2)
    np.testing.assert_allclose(nll, plain, rtol=1e-12)
    nll3, _ = score_dynamic(model, tokens, bucket_of=bucket_of, num_buckets=3, cfg=DynamicConfig(lr=0.5, decay=0.01),
                            batch_size=4, bptt=10)
    assert not np.allclose(nll3, plain)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical


def test_dynamic_evaluation_adapts_to_repeated_text():
    model = _model()
    tokens = np.tile(np.random.default_rng(0).integers(0, 30, size=25), 12).astype("<u4")
    bucket_of = np.zeros(30, dtype=np.int64)
    plain, _ = score_stream(model, tokens, bucket_of=bucket_of, num_buckets=1, batch_size=1, bptt=10)
    dyn, _ = score_dynamic(model, tokens, bucket_of=bucket_of, num_buckets=1, cfg=DynamicConfig(lr=0.5, decay=0.0),
                           batch_size=1, bptt=10)
    assert dyn[0] < plain[0]


def test_rms_variant_uses_training_statistics():
    model = _model()
    rng = np.random.default_rng(1)
    tokens, train = rng.integers(0, 30, size=120).astype("<u4"), rng.integers(0, 30, size=400).astype("<u4")
    before = _snapshot(model)
    nll, cnt = score_dynamic(model, tokens, bucket_of=np.zeros(30, dtype=np.int64), num_buckets=1,
                             cfg=DynamicConfig(method="rms", lr=1e-3, decay=0.01, stat_batches=3), batch_size=2, bptt=8,
                             train_tokens=train)
    assert np.isfinite(nll).all() and cnt[0] == 119
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError):
        score_dynamic(model, tokens, bucket_of=np.zeros(30, dtype=np.int64), num_buckets=1, cfg=DynamicConfig(method="rms"))
