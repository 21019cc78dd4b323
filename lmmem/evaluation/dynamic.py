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
The copy runs in eval mode (no dropout, no Hebbian statistics). A step that makes the loss or the
weights non-finite ends the pass (``diverged``); the sums are then +inf. Defaults (rms, η = 3e-4,
λ = 0.002): chosen on the valid splits of three corpora (docs/results/dynamic-evaluation.md);
``--tune`` picks η on the valid split.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch

from lmmem.data.batching import StreamBatcher
from lmmem.output_layers.base import IGNORE_INDEX

# --tune's grid: multiples of the configured learning rate. Mostly downwards: on the three valid
# splits tried, the rms rule's best η sat just below the point where it diverges (≈3× the default).
DEFAULT_LR_FACTORS = (0.1, 0.3, 1.0, 2.0, 3.0)


@dataclass
class DynamicConfig:
    # Defaults chosen on the valid splits of three corpora (docs/results/dynamic-evaluation.md):
    # the rms rule at η = 3e-4 gained 11–27% where SGD's old η = 1e-4 gained 0.0–0.1%.
    method: str = "rms"  # rms | sgd
    lr: float = 3e-4
    decay: float = 0.002
    segment: int | None = None  # default: the evaluation bptt
    eps: float = 2e-5  # rms: absolute floor on the training-gradient RMS (Krause et al.'s value)
    stat_batches: int = 20

    def __post_init__(self):
        if self.method not in ("sgd", "rms"):
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
    statistics: dict | None = None,
    on_scores=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-bucket (NLL sum, count) under dynamic evaluation. ``model`` is not modified.

    ``statistics``: the rms rule's mean squared gradients, when already computed (``--tune``
    reuses them across its grid). ``on_scores(positions, log_probs)``: each segment's scored
    targets (see perplexity.TokenLogProbs). A diverged pass returns +inf sums."""
    device = torch.device(device)
    if max_tokens:
        tokens = tokens[: max_tokens + 1]
    seg = cfg.segment or bptt
    dyn = copy.deepcopy(model).eval()
    params = {n: p for n, p in dyn.named_parameters()}
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    scales = None
    if cfg.method == "rms":
        if statistics is None:
            if train_tokens is None:
                raise ValueError("the rms variant needs training data for its gradient statistics")
            statistics = gradient_statistics(model, train_tokens, batch_size=batch_size, bptt=seg,
                                             batches=cfg.stat_batches, device=device)
        scales = rms_scales(statistics, decay=cfg.decay, eps=cfg.eps)
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
            if on_scores is not None:
                on_scores(b.target_positions.reshape(-1)[valid.cpu().numpy()], lp.detach().double()[valid])
        loss = -lp[valid].sum() / valid.sum().clamp_min(1)
        if not torch.isfinite(loss):
            # diverged: the rest of the pass would be NaN; report +inf rather than a partial score
            nll_sum.fill_(math.inf)
            break
        loss.backward()
        dynamic_step(params, theta0, cfg, scales)
    return nll_sum.cpu().numpy(), count.cpu().numpy()


def tune_dynamic(
    model: torch.nn.Module,
    tokens: np.ndarray,
    cfg: DynamicConfig,
    *,
    factors=DEFAULT_LR_FACTORS,
    batch_size: int,
    bptt: int,
    device,
    train_tokens: np.ndarray | None = None,
    max_tokens: int = 0,
) -> tuple[DynamicConfig, dict]:
    """The learning rate of lowest perplexity on ``tokens`` (the valid split) among
    ``cfg.lr × factors``: ``(cfg with that lr, {"lr": ..., "valid_perplexity": {lr: ppl or None if it diverged}})``.
    The rms rule's training statistics are computed once for the whole grid."""
    from dataclasses import replace

    from lmmem.errors import LmmemError

    seg = cfg.segment or bptt
    stats = None
    if cfg.method == "rms":
        if train_tokens is None:
            raise ValueError("the rms variant needs training data for its gradient statistics")
        stats = gradient_statistics(model, train_tokens, batch_size=batch_size, bptt=seg, batches=cfg.stat_batches, device=device)
    one_bucket = np.zeros(model.output.weight.shape[0], dtype=np.int64)  # the total is all tuning needs
    ppl: dict[float, float | None] = {}
    for f in factors:
        c = replace(cfg, lr=cfg.lr * f)
        nll, cnt = score_dynamic(model, tokens, bucket_of=one_bucket, num_buckets=1, cfg=c, batch_size=batch_size, bptt=bptt,
                                 device=device, max_tokens=max_tokens, statistics=stats)
        loss = float(nll.sum() / max(cnt.sum(), 1))
        ppl[c.lr] = math.exp(loss) if loss < 700 else None  # None: diverged (JSON holds no inf)
    finite = {lr: p for lr, p in ppl.items() if p is not None}
    if not finite:
        raise LmmemError(f"dynamic evaluation diverged on the valid split at every learning rate tried ({', '.join(map(str, ppl))}); "
                         f"give a smaller --dynamic-lr")
    best = min(finite, key=finite.get)
    return replace(cfg, lr=best), {"lr": best, "valid_perplexity": {str(lr): p for lr, p in ppl.items()}}
