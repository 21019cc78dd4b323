"""Dynamic evaluation (Krause, Kahembwe, Murray, Renals, "Dynamic Evaluation of Neural Sequence
Models", ICML 2018).

The split is read in BPTT segments (``segment`` positions of every row); each segment is first
scored with the current weights, then the weights take one gradient step on that segment's mean
loss, with a decay towards the original weights θ₀. Both terms of a step are computed from the
weights *before* the step, as in Krause et al.'s code:

* ``sgd``: ``θ ← θ − η ∇ + λ (θ₀ − θ)``
* ``rms`` (Krause et al.'s "RMS" rule): ``θ ← θ − η ∇ / (RMS + ε) + λ · min(r, 1/λ) ⊙ (θ₀ − θ)``
  where ``RMS = √(mean of ∇²)`` over ``stat_batches`` BPTT batches of the *training* data (taken
  with the original weights) and ``r = RMS / ḡ``, ``ḡ`` the mean over parameter tensors of each
  tensor's mean RMS (one global normaliser, not one per tensor).

ε matters: it is an *absolute* floor on the RMS. Rare words' embedding rows get RMS values
around 1e-8 from the training statistics, so with ε = 1e-8 (the value this module used before)
the first time such a word is read its row moves by η·∇/2e-8 — thousands of times its size — and
the perplexity becomes inf. Krause et al. use ε = 2e-5 with RMS values of ~1e-4 on average.

The scored model is a deep copy: the caller's model (and so the checkpoint) is never modified.
The copy runs in eval mode (no dropout, no Hebbian statistics). A step that makes the loss
non-finite ends the pass (``diverged``); the sums are then +inf. The pass itself is the engine's
(lmmem.evaluation.engine.run_pass with ``dynamic=``), so dynamic evaluation combines with every
window convention, sink and memory. Defaults (rms, η = 3e-4, λ = 0.002): chosen on the valid splits
of three corpora (docs/results/dynamic-evaluation.md); ``--tune`` picks η on the valid split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from lmmem.data.batching import StreamBatcher

# --tune's grid: multiples of the configured learning rate. Mostly downwards: on the three valid
# splits tried, the rms rule's best η sat just below the point where it diverges (≈3× the default).
DEFAULT_LR_FACTORS = (0.1, 0.3, 1.0, 2.0, 3.0)


DYNAMIC_METHODS = ("rms", "sgd")


@dataclass
class DynamicConfig:
    # Defaults chosen on the valid splits of three corpora (docs/results/dynamic-evaluation.md).
    method: str = field(default="rms", metadata={
        "help": "update rule: rms (Krause et al.'s RMS rule, gradient statistics from the train split) or sgd",
        "choices": DYNAMIC_METHODS})
    lr: float = field(default=3e-4, metadata={"help": "learning rate η (per token-mean loss of a batch)"})
    decay: float = field(default=0.002, metadata={"help": "decay λ towards the trained weights"})
    segment: int | None = field(default=None, metadata={"help": "segment length (default: --bptt)"})
    eps: float = field(default=2e-5, metadata={"help": "rms: absolute floor ε on the training-gradient RMS (Krause et al.'s value)"})
    stat_batches: int = field(default=20, metadata={"help": "rms: training batches the gradient statistics are taken from"})

    def __post_init__(self):
        if self.method not in DYNAMIC_METHODS:
            raise ValueError(f"dynamic evaluation method must be sgd or rms, not {self.method!r}")
        # local checks of the numbers (simple on purpose: the CLIs' shared flag validation covers the flags)
        for name in ("lr", "decay", "eps"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"dynamic evaluation {name} must be a finite number ≥ 0, not {value}")
        if self.segment is not None and self.segment < 1:
            raise ValueError(f"dynamic evaluation segment must be ≥ 1, not {self.segment}")
        if self.stat_batches < 1:
            raise ValueError(f"dynamic evaluation stat_batches must be ≥ 1, not {self.stat_batches}")


def gradient_statistics(adapter, tokens: np.ndarray, *, batch_size: int, bptt: int, batches: int) -> dict:
    """Mean squared gradient of each parameter over ``batches`` BPTT batches of ``tokens`` (the
    training split), taken with a copy of the model (``adapter``: lmmem.evaluation.adapters)."""
    copy_ = adapter.copy()
    model = copy_.model.eval()
    device = copy_.device
    batcher = StreamBatcher(tokens, batch_size, bptt, pad=True)
    ms = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    state = copy_.init_state(batch_size)
    n = min(batches, len(batcher))
    for step in range(n):
        b = batcher.batch(step)
        model.zero_grad(set_to_none=True)
        loss, state = copy_.loss(b.inputs.to(device), b.targets.to(device), state)
        state = copy_.detach_state(state)
        loss.backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                ms[name] += p.grad.detach() ** 2 / n
    return ms


def rms_scales(ms: dict, *, decay: float, eps: float) -> dict:
    """Per parameter ``(RMS + ε, λ·min(r, 1/λ))`` of the rms rule from mean squared gradients."""
    rms = {n: m.sqrt() for n, m in ms.items()}
    g = torch.stack([r.mean() for r in rms.values()]).mean()
    scales = {}
    for n, r in rms.items():
        rate = r / g if g > 0 else torch.ones_like(r)
        if decay > 0:
            rate = rate.clamp_max(1.0 / decay)  # λ·r ≤ 1: the decay never overshoots θ₀
        scales[n] = (r + eps, decay * rate)
    return scales


@torch.no_grad()
def dynamic_step(params: dict, theta0: dict, cfg: DynamicConfig, scales: dict | None) -> None:
    """One update of every parameter with a gradient; both terms use the pre-step weights."""
    for n, p in params.items():
        if p.grad is None:
            continue
        pull = theta0[n] - p
        if scales is None:
            step = p.grad * -cfg.lr + pull * cfg.decay
        else:
            denom, rate = scales[n]
            step = p.grad / denom * -cfg.lr + pull * rate
        p.add_(step)
