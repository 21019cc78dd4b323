import pytest
import torch

from lmmem.errors import LmmemError
from lmmem.models import ModelConfig, build_model
from lmmem.output_layers import FullSoftmax


def _cfg(**kw):
    base = dict(vocab_size=53, embed_dim=12, hidden_dim=20, proj_dim=12, num_layers=2, dropout=0.0, output_dropout=0.0, tie_weights=True)
    return ModelConfig(**{**base, **kw})


def test_shapes_and_state():
    model = build_model(_cfg())
    x = torch.randint(0, 53, (3, 7))
    h, (hn, cn) = model.hidden_states(x)
    assert h.shape == (3, 7, 12)
    assert hn.shape == (2, 3, 12) and cn.shape == (2, 3, 20)
    loss, _ = model(x, torch.randint(0, 53, (3, 7)))
    assert loss.ndim == 0 and torch.isfinite(loss)
    logp = model.output.log_probs(h)
    assert logp.shape == (3, 7, 53)
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(3, 7))


def test_carried_state_continues_the_sequence():
    model = build_model(_cfg()).eval()
    x = torch.randint(0, 53, (2, 10))
    h_full, _ = model.hidden_states(x)
    h1, s = model.hidden_states(x[:, :4])
    h2, _ = model.hidden_states(x[:, 4:], s)
    torch.testing.assert_close(torch.cat([h1, h2], 1), h_full)


def test_tied_weights_share_one_parameter():
    model = build_model(_cfg())
    assert model.output.weight is model.embedding.weight
    names = [n for n, _ in model.named_parameters()]
    assert "output.weight" not in names  # counted once
    untied = build_model(_cfg(tie_weights=False))
    assert untied.output.weight.data_ptr() != untied.embedding.weight.data_ptr()


def test_tying_needs_matching_sizes():
    with pytest.raises(LmmemError, match="--proj-dim"):
        build_model(_cfg(proj_dim=0, hidden_dim=20, embed_dim=12))
    with pytest.raises(LmmemError, match="unknown --arch"):
        build_model(_cfg(arch="gru"))
    with pytest.raises(LmmemError, match="unknown softmax"):
        build_model(_cfg(softmax="nope"))


def test_full_softmax_matches_float64_reference():
    layer = FullSoftmax(9, 31).double()
    h = torch.randn(17, 9, dtype=torch.float64)
    t = torch.randint(0, 31, (17,))
    t[::4] = -100
    ref = -(h @ layer.weight.T + layer.bias).log_softmax(-1)[torch.arange(17), t.clamp_min(0)]
    keep = t != -100
    torch.testing.assert_close(layer.loss(h, t, reduction="sum").double(), ref[keep].sum(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.loss(h, t).double(), ref[keep].mean(), rtol=1e-6, atol=1e-6)
    tlp = layer.target_log_probs(h, t)
    assert torch.all(tlp[~keep] == 0)
    torch.testing.assert_close(tlp[keep].double(), -ref[keep], rtol=1e-6, atol=1e-6)


def test_all_ignored_mean_is_zero_not_nan():
    layer = FullSoftmax(4, 7)
    loss = layer.loss(torch.randn(5, 4), torch.full((5,), -100))
    assert loss.item() == 0.0
