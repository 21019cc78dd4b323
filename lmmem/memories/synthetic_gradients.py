"""A memory controller trained by synthetic gradients: fast controller, slow network.

What follows the paper and what is ours
---------------------------------------
Fernando, Denman, Sridharan, Fookes, "Learning Fast and Slow: Towards Learning from Rare Events with
Neural Memory Networks" (2020). **From its abstract only** (the full text was not available to us):

* a neural memory network's *controller* is decoupled from the rest of the network by synthetic
  gradients, so that the controller can adapt *fast* to rare new information while the rest of the
  network learns *slowly*;
* the gradient-predicting feedback path can be *shared* among several memory networks.

**Our design** (the established synthetic-gradient recipe of Jaderberg et al., "Decoupled Neural
Interfaces using Synthetic Gradients", ICML 2017, attached to :class:`KeyValueMemory`):

* the *controller* is the memory's query projection (``memory.controller``, an ``nn.Linear``); its
  output ``y`` is the pre-normalisation query;
* :class:`SyntheticGradient` (the feedback path) predicts ``ĝ ≈ ∂L/∂y`` from ``y`` and an optional
  context (here the one-hot label: DNI's "conditional" variant, cDNI). It is a linear map or a
  one-hidden-layer MLP whose output layer starts at zero (so the first predictions are 0, as in DNI).
  It predicts the gradient of the *summed* (per-sample) loss, so its target does not depend on the
  batch size;
* the controller and the layers below it are updated from ``ĝ`` alone (``y.backward(ĝ / B)``) —
  DNI's decoupled update: they do not wait for, or use, the memory loss's true gradient;
* the true gradient ``∂L/∂y`` (the memory loss backpropagated to a detached copy of ``y``) is the
  regression target of the feedback path (mean squared error), trained by its own optimizer;
* two learning rates: the controller steps at ``fast_lr``, the rest of the network (the encoder below
  the controller) at ``slow_lr`` (SGD with momentum, or Adam: ``optimizer``); the feedback path uses
  Adam at ``sg_lr``;
* sharing: several :class:`FastSlowMemoryLearner` objects accept one :class:`SyntheticGradient`
  object (and, to keep a single optimizer state for it, one ``sg_optimizer``); each then trains it
  on its own true gradients.

The ratio of the learning rates, the conditioning on the label, the MLP size and which layers receive
the synthetic gradient are our choices, not the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmmem.errors import LmmemError
from lmmem.memories.kv_memory import KeyValueMemory, MemoryOutput


class SyntheticGradient(nn.Module):
    """Predicts ``∂L/∂y`` (B, features) from ``y`` (B, features) and ``context`` (B, context_features)."""

    def __init__(self, features: int, context_features: int = 0, hidden: int = 0):
        super().__init__()
        if features <= 0 or context_features < 0 or hidden < 0:
            raise LmmemError(f"SyntheticGradient needs features > 0, context_features >= 0, hidden >= 0; got {features}, {context_features}, {hidden}")
        self.features, self.context_features = features, context_features
        inp = features + context_features
        self.hidden = nn.Linear(inp, hidden) if hidden else None
        self.out = nn.Linear(hidden or inp, features)
        # Zero output layer: the controller's first updates are no-ops rather than random pushes (DNI).
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, y: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if y.dim() != 2 or y.shape[1] != self.features:
            raise LmmemError(f"SyntheticGradient expects y of shape (batch, {self.features}), got {tuple(y.shape)}")
        if self.context_features:
            if context is None or context.shape != (y.shape[0], self.context_features):
                raise LmmemError(f"SyntheticGradient needs a context of shape ({y.shape[0]}, {self.context_features}), got "
                                 f"{None if context is None else tuple(context.shape)}")
            y = torch.cat([y, context.to(y.dtype)], dim=1)
        h = torch.relu(self.hidden(y)) if self.hidden is not None else y
        return self.out(h)

    def regression_loss(self, y: torch.Tensor, true_grad: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error of the prediction against the true gradient (summed over features)."""
        return (self(y.detach(), context) - true_grad.detach()).pow(2).sum(1).mean()


@dataclass(frozen=True)
class FastSlowConfig:
    fast_lr: float = 0.1  # controller (query projection)
    slow_lr: float = 0.01  # everything below the controller
    sg_lr: float = 1e-3  # the feedback path (Adam)
    momentum: float = 0.9  # SGD only
    optimizer: str = "sgd"  # "sgd" or "adam", for the controller and the encoder
    condition_on_label: bool = True  # cDNI: the one-hot label is the feedback path's context

    def make(self, params, lr: float) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=self.momentum)
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr)
        raise LmmemError(f"FastSlowConfig.optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")


class FastSlowMemoryLearner(nn.Module):
    """``encoder`` (slow) → ``memory.controller`` (fast, trained on synthetic gradients) → memory.

    :meth:`step` does one decoupled training step on a labelled batch and returns the memory's output
    (the prediction is made *before* the memory is updated)."""

    def __init__(self, encoder: nn.Module, memory: KeyValueMemory, sg: SyntheticGradient, config: FastSlowConfig = FastSlowConfig(),
                 sg_optimizer: torch.optim.Optimizer | None = None):
        super().__init__()
        want_ctx = memory.config.num_classes if config.condition_on_label else 0
        if sg.features != memory.config.key_size or sg.context_features != want_ctx:
            raise LmmemError(f"the SyntheticGradient must have features={memory.config.key_size} (the memory's key size) and "
                             f"context_features={want_ctx}; got {sg.features}, {sg.context_features}")
        self.encoder, self.memory, self.config = encoder, memory, config
        self.sg = sg  # possibly shared with other learners
        self.fast = config.make(memory.controller.parameters(), config.fast_lr)
        enc_params = list(encoder.parameters())
        self.slow = config.make(enc_params, config.slow_lr) if enc_params else None
        self.sg_optimizer = sg_optimizer or torch.optim.Adam(sg.parameters(), lr=config.sg_lr)

    def _context(self, labels: torch.Tensor) -> torch.Tensor | None:
        return F.one_hot(labels, self.memory.config.num_classes).float() if self.config.condition_on_label else None

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.memory(self.encoder(x), update=False).prediction

    def step(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[MemoryOutput, dict]:
        mem = self.memory
        labels = mem._check_labels(labels, x.shape[0])
        y = mem.controller(self.encoder(x))  # controller output (pre-normalisation query)
        ctx = self._context(labels)
        # 1. Decoupled update: controller and encoder step on the *predicted* gradient.
        g_hat = self.sg(y.detach(), ctx).detach()
        self.fast.zero_grad(set_to_none=True)
        if self.slow is not None:
            self.slow.zero_grad(set_to_none=True)
        y.backward(g_hat / y.shape[0])
        self.fast.step()
        if self.slow is not None:
            self.slow.step()
        # 2. The memory's loss on a detached copy of y gives the true gradient ∂L/∂y (summed loss).
        y_d = y.detach().requires_grad_(True)
        q = F.normalize(y_d, dim=-1)
        out, nearest = mem.lookup(q, labels)
        true_grad = torch.autograd.grad(out.per_query_loss.sum(), y_d)[0] if out.per_query_loss.requires_grad else torch.zeros_like(y_d)
        # 3. The feedback path regresses onto the true gradient.
        self.sg_optimizer.zero_grad(set_to_none=True)
        sg_loss = self.sg.regression_loss(y_d, true_grad, ctx)
        sg_loss.backward()
        self.sg_optimizer.step()
        # 4. Write the memory (life-long; the written query is the pre-update one).
        mem.update_(q.detach(), labels, nearest)
        stats = {"sg_loss": sg_loss.detach().item(), "sg_rel_error": ((g_hat - true_grad).norm() / true_grad.norm().clamp_min(1e-12)).item()}
        return out, stats
