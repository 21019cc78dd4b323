"""lmmem.LinearCrossEntropyLoss (Liger-style loss object over the fused linear cross-entropy) against
plain PyTorch in float64: every option as a constructor argument, ignore_index, the three reductions,
gradients of hidden, weight and bias, and return_z_loss's separate z-loss term."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lmmem
from lmmem.kernels.loss import LinearCrossEntropyLoss, LinearCrossEntropyOutput

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(weight, hidden, targets, bias, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
              reduction="mean"):
    """Plain PyTorch: materialised logits, F.cross_entropy, z-loss from torch.logsumexp. Returns (loss, z term)."""
    logits = F.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    t = targets.reshape(-1)
    valid = t != ignore_index
    ce = F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    z = torch.where(valid, z_loss * torch.logsumexp(logits, -1) ** 2, torch.zeros_like(ce))
    per_row = ce + z
    if reduction == "none":
        return per_row, z
    if reduction == "sum":
        return per_row.sum(), z.sum()
    n = valid.sum().clamp_min(1)
    return per_row.sum() / n, z.sum() / n


def inputs(N=37, D=13, V=29, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64).mul_(2).requires_grad_()
    weight = torch.randn(V, D, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(V, generator=g, dtype=torch.float64).requires_grad_() if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = targets[1]  # repeated labels
    targets[3::7] = -100  # ignored positions
    return weight, hidden, targets, b


OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-3},
    {"softcap": 3.0},
    {"label_smoothing": 0.2, "z_loss": 1e-2, "softcap": 2.5},
    {"ignore_index": 7, "label_smoothing": 0.05},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_loss_and_gradients_equal_plain_pytorch(options, reduction, bias):
    weight, hidden, targets, b = inputs(bias=bias, seed=len(options) + (reduction == "sum"))
    if "ignore_index" in options:
        targets[targets == -100] = options["ignore_index"]
    fn = LinearCrossEntropyLoss(reduction=reduction, return_z_loss=True, chunk_size=8, **options)  # several chunks
    out = fn(weight, hidden, targets, b)
    assert isinstance(out, LinearCrossEntropyOutput)
    ref, ref_z = reference(weight, hidden, targets, b, reduction=reduction, **options)
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.z_loss, ref_z.detach(), rtol=1e-10, atol=1e-12)
    assert not out.z_loss.requires_grad  # for logging, as Liger's
    upstream = torch.randn_like(ref) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    params = [x for x in (hidden, weight, b) if x is not None]
    got = torch.autograd.grad(out.loss, params, upstream)
    want = torch.autograd.grad(ref, params, upstream)
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=name)


def test_options_are_constructor_arguments_and_the_plain_call_returns_the_loss():
    weight, hidden, targets, b = inputs()
    fn = LinearCrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    loss = fn(weight, hidden.reshape(1, 37, 13), targets.reshape(1, 37), b)  # leading dims flattened
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    torch.testing.assert_close(loss, lmmem.linear_cross_entropy(hidden, weight, b, targets, label_smoothing=0.1, z_loss=1e-3,
                                                                 softcap=4.0), rtol=0, atol=0)
    assert lmmem.LinearCrossEntropyLoss is LinearCrossEntropyLoss
    assert "z_loss=0.001" in repr(fn) and list(fn.parameters()) == []
    # with no z-loss the separate term is zero, and all-ignored targets give 0, not NaN
    out = LinearCrossEntropyLoss(return_z_loss=True)(weight, hidden, torch.full_like(targets, -100), b)
    assert float(out.loss.detach()) == 0.0 and float(out.z_loss) == 0.0
    for bad in ({"reduction": "avg"}, {"label_smoothing": 1.5}, {"softcap": 0.0}, {"z_loss": -1.0}):
        with pytest.raises(ValueError):
            LinearCrossEntropyLoss(**bad)


def test_triton_step_gives_the_same_loss_and_z_term():
    """The Triton step (the interpreter on CPU, fp32) computes the log-sum-exp the z-loss term is read from."""
    pytest.importorskip("triton", reason="the Triton kernels need the triton package (Linux)")
    weight, hidden, targets, b = (x.float().detach() if x is not None and x.is_floating_point() else x for x in inputs(N=9, D=8, V=16))
    options = dict(label_smoothing=0.1, z_loss=1e-2, softcap=3.0, return_z_loss=True)
    tri = LinearCrossEntropyLoss(use_triton=True, **options)(weight, hidden, targets, b)
    ref, ref_z = reference(weight.double(), hidden.double(), targets, b.double(), label_smoothing=0.1, z_loss=1e-2, softcap=3.0)
    torch.testing.assert_close(tri.loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tri.z_loss.double(), ref_z, rtol=1e-5, atol=1e-7)


def test_the_test_can_fail():
    """The reference comparison is sharp: a z-loss off by 1% is seen in the loss and in the term."""
    weight, hidden, targets, b = inputs()
    out = LinearCrossEntropyLoss(z_loss=1e-2, return_z_loss=True)(weight, hidden, targets, b)
    ref, ref_z = reference(weight, hidden, targets, b, z_loss=1.01e-2)
    assert not torch.allclose(out.loss, ref, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(out.z_loss, ref_z, rtol=1e-10, atol=1e-12)
