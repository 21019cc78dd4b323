"""Synthetic-gradient controller: convergence to the true gradient, decoupled steps, sharing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmmem.errors import LmmemError
from lmmem.memories.kv_memory import KeyValueMemory, KVMemoryConfig
from lmmem.memories.synthetic_gradients import FastSlowConfig, FastSlowMemoryLearner, SyntheticGradient


pytestmark = pytest.mark.usefixtures("one_thread")


def test_synthetic_gradient_converges_to_true_gradient_on_linear_regression():
    """y = W x, L = ½‖y − t‖²: the true ∂L/∂y = y − t is linear in (y, t), so a linear feedback path
    conditioned on t can match it exactly. The controller W learns *only* from the predicted gradient.
    The targets carry noise so that the true gradient never vanishes (the relative error stays defined)."""
    torch.manual_seed(0)
    d_in, d = 6, 4
    A = torch.randn(d, d_in)
    controller = nn.Linear(d_in, d, bias=False)
    sg = SyntheticGradient(d, context_features=d, hidden=0)
    opt_c = torch.optim.SGD(controller.parameters(), lr=0.05)
    opt_sg = torch.optim.Adam(sg.parameters(), lr=0.02)
    errors, task = [], []
    for step in range(400):
        x = torch.randn(32, d_in)
        t = x @ A.T + torch.randn(32, d)
        y = controller(x)
        g_hat = sg(y.detach(), t).detach()
        opt_c.zero_grad()
        y.backward(g_hat / len(x))  # decoupled update: the predicted gradient only
        opt_c.step()
        true = y.detach() - t  # ∂(½‖y − t‖²)/∂y per sample
        opt_sg.zero_grad()
        sg.regression_loss(y, true, t).backward()
        opt_sg.step()
        errors.append(((g_hat - true).norm() / true.norm()).item())
        task.append(0.5 * (y.detach() - x @ A.T).pow(2).sum(1).mean().item())  # distance to the noiseless map
    assert errors[0] == pytest.approx(1.0)  # zero-initialised output: the first prediction is 0
    assert sum(errors[-20:]) / 20 < 0.1
    assert task[-1] < 0.05 * task[0]  # and the controller trained on it solves the task


def _learner(sg, opt=None, seed=0):
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(10, 12), nn.ReLU())
    mem = KeyValueMemory(KVMemoryConfig(12, 5, key_size=8, memory_size=32, k=8, seed=seed))
    with torch.no_grad():  # a filled memory, so that the loss has a gradient from the first step
        mem.keys.copy_(torch.nn.functional.normalize(torch.randn(32, 8), dim=1))
        mem.values.copy_(torch.arange(32) % 5)
    return FastSlowMemoryLearner(encoder, mem, sg, FastSlowConfig(fast_lr=0.1, slow_lr=0.01), sg_optimizer=opt)


def test_step_trains_feedback_path_controller_encoder_and_memory():
    sg = SyntheticGradient(8, context_features=5, hidden=16)
    learner = _learner(sg)
    x, y = torch.randn(8, 10), torch.randint(0, 5, (8,))
    ctrl0 = learner.memory.controller.weight.detach().clone()
    enc0 = learner.encoder[0].weight.detach().clone()
    sg0 = sg.out.weight.detach().clone()
    ages0 = learner.memory.ages.clone()
    out, stats = learner.step(x, y)
    assert ((out.prediction >= 0) & (out.prediction < 5)).all()
    assert not torch.equal(learner.memory.ages, ages0)  # the memory was written
    assert not torch.equal(sg.out.weight, sg0)  # regressed onto the true gradient
    # First step: the zero-initialised feedback path predicted 0, so nothing below moved yet ...
    assert torch.equal(learner.memory.controller.weight, ctrl0)
    for _ in range(3):
        _, stats = learner.step(torch.randn(8, 10), torch.randint(0, 5, (8,)))
    # ... later steps move both, on the predicted gradient.
    assert not torch.equal(learner.memory.controller.weight, ctrl0)
    assert not torch.equal(learner.encoder[0].weight, enc0)
    assert set(stats) == {"sg_loss", "sg_rel_error"}


def test_feedback_path_is_shared_between_two_memories():
    sg = SyntheticGradient(8, context_features=5, hidden=16)
    opt = torch.optim.Adam(sg.parameters(), lr=1e-3)
    a, b = _learner(sg, opt, seed=0), _learner(sg, opt, seed=1)
    assert a.sg is b.sg and a.sg_optimizer is b.sg_optimizer
    assert a.memory is not b.memory
    before = sg.out.weight.detach().clone()
    a.step(torch.randn(4, 10), torch.randint(0, 5, (4,)))
    after_a = sg.out.weight.detach().clone()
    b.step(torch.randn(4, 10), torch.randint(0, 5, (4,)))
    assert not torch.equal(after_a, before) and not torch.equal(sg.out.weight, after_a)  # both train it
    assert a.state_dict()["sg.out.weight"].data_ptr() == b.state_dict()["sg.out.weight"].data_ptr()


def test_bad_configuration_raises():
    with pytest.raises(LmmemError, match="features"):
        _learner(SyntheticGradient(7, context_features=5))
    with pytest.raises(LmmemError, match="context"):
        SyntheticGradient(4, context_features=3)(torch.randn(2, 4))
    with pytest.raises(LmmemError):
        SyntheticGradient(0)
