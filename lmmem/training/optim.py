"""Optimiser, learning-rate schedule and mixed precision of a training run."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from lmmem.training.config import TrainConfig


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)


def lr_multiplier(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then constant / cosine / linear decay to min_lr_ratio at max_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    frac = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.lr_schedule == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * frac))
    else:
        shape = 1 - frac
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


SCHEDULE_FIELDS = ("lr", "lr_schedule", "warmup_steps", "min_lr_ratio", "max_steps")


def schedule_change(saved: dict, cfg: TrainConfig, step: int) -> str | None:
    """One line saying how a resumed run's flags change its learning-rate schedule from step
    ``step`` on (``saved``: the run's recorded train_config), or None when the rate at every step
    left is what it was (e.g. a new --max-steps with a constant schedule)."""
    changed = [k for k in SCHEDULE_FIELDS if k in saved and saved[k] != getattr(cfg, k)]
    if not changed:
        return None
    before = replace(cfg, **{k: saved[k] for k in changed})
    end = max(before.max_steps, cfg.max_steps)
    if all(before.lr * lr_multiplier(before, s) == cfg.lr * lr_multiplier(cfg, s) for s in range(step, end + 1)):
        return None
    now = " ".join(f"--{k.replace('_', '-')} {getattr(cfg, k)}" for k in changed)
    was = " ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in changed)
    return (f"note: {now} changes this run's learning-rate schedule (it was made with {was}): the rate at step {step} is "
            f"{cfg.lr * lr_multiplier(cfg, step):.3g} (was {before.lr * lr_multiplier(before, step):.3g}) and reaches "
            f"{cfg.lr * lr_multiplier(cfg, cfg.max_steps):.3g} at step {cfg.max_steps} (was "
            f"{before.lr * lr_multiplier(before, before.max_steps):.3g} at step {before.max_steps}); "
            f"resume with the run's own values to continue it exactly")


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(cfg, s))


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.amp == "none":
        return None
    if cfg.amp == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else None
