"""The decoder-only Transformer LM: same interface as the LSTM, causal, tieable, any softmax."""

from __future__ import annotations

import pytest
import torch

from lmmem.errors import LmmemError
from lmmem.models import ARCHITECTURES, ModelConfig, TransformerLanguageModel, build_model
from lmmem.output_layers import FullSoftmax, HebbianSoftmax
from lmmem.output_layers.base import IGNORE_INDEX


def cfg(**kw) -> ModelConfig:
    base = dict(arch="transformer", vocab_size=29, embed_dim=12, hidden_dim=20, num_layers=2, num_heads=3, context=11, dropout=0.1, output_dropout=0.1)
    base.update(kw)
    return ModelConfig(**base)


def test_registered_and_shapes():
    assert ARCHITECTURES["transformer"] is TransformerLanguageModel
    model = build_model(cfg())
    assert model.init_state(5) is None and model.detach_state(None) is None
    x = torch.randint(0, 29, (5, 7))
    h, state = model.hidden_states(x, model.init_state(5))
    assert h.shape == (5, 7, 12) and state is None
    loss, state = model(x, torch.randint(0, 29, (5, 7)), None)
    assert loss.shape == () and torch.isfinite(loss) and state is None
    per_tok, _ = model(x, torch.randint(0, 29, (5, 7)), reduction="none")
    assert per_tok.shape == (35,)


def test_causal_masking():
    model = build_model(cfg(dropout=0.0, output_dropout=0.0)).double().eval()
    x = torch.randint(0, 29, (3, 11))
    cut = int(torch.randint(1, 10, ()))
    y = x.clone()
    y[:, cut:] = torch.randint(0, 29, (3, 11 - cut))
    y[:, cut] = (x[:, cut] + 1) % 29  # at least one future token really differs
    with torch.no_grad():
        hx, _ = model.hidden_states(x)
        hy, _ = model.hidden_states(y)
    torch.testing.assert_close(hx[:, :cut], hy[:, :cut], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(hx[:, cut], hy[:, cut])


def test_longer_than_context_is_a_clear_error():
    model = build_model(cfg())
    with pytest.raises(LmmemError, match="context"):
        model.hidden_states(torch.randint(0, 29, (2, 12)))


def test_bad_heads_is_a_clear_error():
    with pytest.raises(LmmemError, match="num-heads"):
        build_model(cfg(num_heads=5))


@pytest.mark.parametrize("softmax", ["full", "hebbian"])
def test_tied_weights_share_storage(softmax):
    model = build_model(cfg(tie_weights=True, softmax=softmax))
    assert model.output.weight is model.embedding.weight
    assert model.output.weight.data_ptr() == model.embedding.weight.data_ptr()
    assert sum(p is model.embedding.weight for p in model.parameters()) == 1
    untied = build_model(cfg(tie_weights=False, softmax=softmax))
    assert untied.output.weight is not untied.embedding.weight


@pytest.mark.parametrize("softmax,cls", [("full", FullSoftmax), ("hebbian", HebbianSoftmax)])
def test_training_reduces_loss_on_a_repeated_sequence(softmax, cls):
    model = build_model(cfg(softmax=softmax, tie_weights=True, dropout=0.0, output_dropout=0.0))
    assert isinstance(model.output, cls)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.output.attach_to_optimizer(opt)
    pattern = torch.randint(0, 29, (5,))
    seq = pattern.repeat(3)[:12]
    x, y = seq[:-1].unsqueeze(0).repeat(4, 1), seq[1:].unsqueeze(0).repeat(4, 1)
    y[0, 0] = IGNORE_INDEX
    losses = []
    for _ in range(30):
        loss, _ = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses  # observed worst: 0.15 full (15 draws), 0.46 hebbian (60)
    if softmax == "hebbian":
        assert int(model.output.counts.sum()) == 30 * (y != IGNORE_INDEX).sum().item()


def test_hebbian_under_bf16_autocast_keeps_fp32_statistics_and_weights():
    model = build_model(cfg(softmax="hebbian", tie_weights=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randint(0, 29, (3, 9)), torch.randint(0, 29, (3, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # (the final LayerNorm gives fp32 activations; the logits matmul runs in bf16. A bf16 ``hidden``
        # is covered in test_hebbian_softmax.py.)
        assert model.output.logits(model.hidden_states(x)[0]).dtype == torch.bfloat16
        loss, _ = model(x, y)
    loss.backward()
    ids, n, sums = model.output.pending_statistics()
    assert sums.dtype == torch.float32 and int(n.sum()) == y.numel()
    opt.step()
    model.output.on_optimizer_step()
    assert model.embedding.weight.dtype == torch.float32
    assert torch.equal(model.output.counts, torch.bincount(y.reshape(-1), minlength=29))
