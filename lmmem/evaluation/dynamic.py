"""Dynamic evaluation (Krause, Kahembwe, Murray, Renals, "Dynamic Evaluation of Neural Sequence
Models", ICML 2018).

The split is read in BPTT segments (``segment`` positions of every row); each segment is first
scored with the current weights, then the weights take one gradient step on that segment's mean
loss, with a decay towards the original weights θ₀:

* ``sgd``: ``θ ← θ − η ∇ + λ (θ₀ − θ)``
* ``rms`` (Krause et al.'s "RMS" variant): ``θ ← θ − η ∇ / (√MS + ε) + λ·r ⊙ (θ₀ − θ)`` where
  ``MS`` is the mean squared gradient of the *training* data (``stat_batches`` BPTT batches of the
  train split, taken with the original weights) and ``r = √MS / mean(√MS)`` (per tensor), clipped
  so ``λ·r ≤ 1``.

The scored model is a deep copy: the caller's model (and so the checkpoint) is never modified.
The copy runs in eval mode (no dropout, no Hebbian statistics). Defaults: ``η = 1e-4`` (SGD) and
``λ = 0.002`` are on the scale Krause et al. report for SGD dynamic evaluation of LSTMs; tune them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from lmmem.data.batching import StreamBatcher
from lmmem.output_layers.base import IGNORE_INDEX


@dataclass
class DynamicConfig:
    method: str = "sgd"  # sgd | rms
    lr: float = 1e-4
    decay: float = 0.002
    segment: int | None = None  # default: the evaluation bptt
    eps: float = 1e-8
    stat_batches: int = 20

    def __post_init__(self):
        if self.method not in ("sgd", "rms"):
            raise ValueError(f"dynamic evaluation method must be sgd or rms, not {self.method!r}")


def gradient_statistics(model, tokens: np.ndarray, *, batch_size: int, bptt: int, batches: int, device) -> dict:
    """Mean squared gradient of each parameter over ``batches`` BPTT batches of ``tokens``."""
    model = copy.deepcopy(model).eval()
    batcher = StreamBatcher(tokens, batch_size, bptt, pad=True)
    ms = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    state = model.init_state(batch_size, device)
    n = min(batches, len(batcher))
    for step in range(n):
        b = batcher.batch(step)
        model.zero_grad(set_to_none=True)
        loss, state = model(b.inputs.to(device), b.targets.to(device), state)
        state = model.detach_state(state)
        loss.backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                ms[name] += p.grad.detach() ** 2 / n
    return ms


def score_dynamic(
    model: torch.nn.Module,
    tokens: np.ndarray,
    *,
    bucket_of: np.ndarray,
    num_buckets: int,
    cfg: DynamicConfig = DynamicConfig(),
    batch_size: int = 16,
    bptt: int = 128,
    device="cpu",
    train_tokens: np.ndarray | None = None,
    max_tokens: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-bucket (NLL sum, count) under dynamic evaluation. ``model`` is not modified."""
    device = torch.device(device)
    if max_tokens:
        tokens = tokens[: max_tokens + 1]
    seg = cfg.segment or bptt
    dyn = copy.deepcopy(model).eval()
    params = {n: p for n, p in dyn.named_parameters()}
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    scale = None
    if cfg.method == "rms":
        if train_tokens is None:
            raise ValueError("the rms variant needs training data for its gradient statistics")
        ms = gradient_statistics(model, train_tokens, batch_size=batch_size, bptt=seg, batches=cfg.stat_batches, device=device)
        scale = {}
        for n, m in ms.items():
            rms = m.sqrt()
            scale[n] = (rms + cfg.eps, (rms / rms.mean().clamp_min(cfg.eps) * cfg.decay).clamp_max(1.0))
    batcher = StreamBatcher(tokens, batch_size, seg, pad=True)
    bucket_t = torch.as_tensor(bucket_of, dtype=torch.long, device=device)
    nll_sum = torch.zeros(num_buckets, dtype=torch.float64, device=device)
    count = torch.zeros(num_buckets, dtype=torch.float64, device=device)
    state = dyn.init_state(batch_size, device)
    for step in range(len(batcher)):
        b = batcher.batch(step)
        x, y = b.inputs.to(device), b.targets.to(device)
        dyn.zero_grad(set_to_none=True)
        h, state = dyn.hidden_states(x, state)
        state = dyn.detach_state(state)
        yf = y.reshape(-1)
        lp = dyn.output.target_log_probs(h.reshape(-1, h.shape[-1]), yf)
        valid = yf != IGNORE_INDEX
        with torch.no_grad():
            bucket = bucket_t[yf.clamp_min(0)][valid]
            nll_sum.index_add_(0, bucket, -lp.double()[valid])
            count.index_add_(0, bucket, torch.ones_like(nll_sum[:1]).expand(int(valid.sum())))
        loss = -lp[valid].sum() / valid.sum().clamp_min(1)
        loss.backward()
        with torch.no_grad():
            for n, p in params.items():
                if p.grad is None:
                    continue
                if scale is None:
                    p.add_(p.grad, alpha=-cfg.lr).add_(theta0[n] - p, alpha=cfg.decay)
                else:
                    denom, decay = scale[n]
                    p.add_(-cfg.lr * p.grad / denom).add_(decay * (theta0[n] - p))
    return nll_sum.cpu().numpy(), count.cpu().numpy()
