import numpy as np
import torch

from lmmem.experiments.name_recall import occurrence_index, predictions
from lmmem.models import ModelConfig, build_model


def test_occurrence_index_counts_each_name_separately():
    is_name = np.array([False, True, True, False])
    targets = np.array([0, 1, 3, 2, 1, 1, 2, 0])
    assert occurrence_index(targets, is_name).tolist() == [0, 1, 0, 1, 2, 3, 2, 0]


def test_cache_predictions_match_a_direct_computation():
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=30, embed_dim=8, hidden_dim=12, proj_dim=0, tie_weights=False)).eval()
    tokens = np.random.default_rng().integers(0, 30, size=41).astype("<u4")
    pred0, logp0 = predictions(model, tokens, bptt=7)
    with torch.no_grad():
        h, _ = model.hidden_states(torch.as_tensor(tokens[:-1].astype(np.int64))[None])
        p = model.output.log_probs(h[0]).exp()
    y = torch.as_tensor(tokens[1:].astype(np.int64))
    np.testing.assert_allclose(logp0, p[torch.arange(40), y].log().numpy(), rtol=1e-5, atol=1e-6)
    assert (pred0 == p.argmax(-1).numpy()).all()
    # with the cache: position t mixes in the softmax over theta*h_t.h_i of the previous (<= W) pairs
    _, logp = predictions(model, tokens, bptt=7, cache_window=5, theta=0.5, lam=0.3)
    hh = h[0]
    for t in (1, 4, 20, 39):
        lo = max(0, t - 5)
        w = torch.softmax(0.5 * hh[lo:t] @ hh[t], 0)
        pc = float(w[y[lo:t] == y[t]].sum())
        expect = np.log(0.7 * float(p[t, y[t]]) + 0.3 * pc)
        assert abs(logp[t] - expect) < 1e-5
