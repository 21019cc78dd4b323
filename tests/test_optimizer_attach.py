"""Attaching an output layer's update to an optimizer that may be wrapped, and the one-time warning
when statistics were recorded but the optimizer stepped without the update (no transformers needed;
tests/test_hf.py covers Accelerate and the HF Trainer)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lmmem.errors import LmmemError
from lmmem.output_layers import HebbianSoftmax
from lmmem.output_layers.base import unwrap_optimizer
from lmmem.output_layers.hebbian_softmax import MissingHebbianUpdateWarning

D, V = 8, 23


class Wrapper:
    """An optimizer wrapper that keeps the real one as .optimizer (as Accelerate and others do)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self):
        self.optimizer.step()

    def zero_grad(self):
        self.optimizer.zero_grad()


def step_data(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(12, D, generator=g), torch.randint(0, V, (12,), generator=g)


def test_unwrap_finds_the_innermost_optimizer():
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    assert unwrap_optimizer(opt) is opt
    assert unwrap_optimizer(Wrapper(Wrapper(opt))) is opt
    assert unwrap_optimizer(sched) is opt
    with pytest.raises(LmmemError, match="on_optimizer_step"):
        unwrap_optimizer(Wrapper(object()))


def test_attach_through_a_wrapper_runs_the_update():
    torch.manual_seed(0)
    layer = HebbianSoftmax(D, V)
    opt = Wrapper(Wrapper(torch.optim.SGD(layer.parameters(), lr=0.1)))
    layer.attach_to_optimizer(opt)
    h, t = step_data(0)
    layer.loss(h, t).backward()
    opt.step()
    assert torch.equal(layer.counts, torch.bincount(t, minlength=V)) and layer.pending_statistics() is None


@pytest.mark.parametrize("fused", [False, True])
def test_forgotten_update_warns_once_and_accumulation_does_not(fused):
    torch.manual_seed(0)
    layer = HebbianSoftmax(D, V)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2, fused=fused)  # fused: the weight's version counter stays put
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for micro in range(3):  # three micro-batches, one step: accumulation, not a forgotten update
            h, t = step_data(micro)
            layer.loss(h, t).backward()
        assert not caught
        opt.step()
        opt.zero_grad()
        for s in range(3):
            h, t = step_data(10 + s)
            layer.loss(h, t).backward()
            opt.step()
            opt.zero_grad()
    assert [w.category for w in caught] == [MissingHebbianUpdateWarning]


def test_no_warning_when_attached_or_silenced():
    torch.manual_seed(0)
    for attach in (True, False):
        layer = HebbianSoftmax(D, V)
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        if attach:
            layer.attach_to_optimizer(opt)
        else:
            layer.check_forgotten_update = False
        with warnings.catch_warnings():
            warnings.simplefilter("error", MissingHebbianUpdateWarning)
            for s in range(3):
                h, t = step_data(s)
                layer.loss(h, t).backward()
                opt.step()
                opt.zero_grad()
        assert int(layer.counts.sum()) == (36 if attach else 0)


def test_a_forward_without_backward_then_a_step_is_not_a_false_alarm():
    """Statistics from an eval-free forward whose weight got no gradient are not flagged by (b)."""
    torch.manual_seed(0)
    layer = HebbianSoftmax(D, V)
    h, t = step_data(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingHebbianUpdateWarning)
        layer.loss(h, t)  # recorded, never backpropagated
        layer.loss(h, t).backward()
    layer.on_optimizer_step()
    assert torch.equal(layer.counts, 2 * torch.bincount(t, minlength=V))
