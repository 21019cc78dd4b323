"""The state of one training run (:class:`Run`) and the pieces that build, restore and save it.

A :class:`Run` holds everything the loop in :mod:`lmmem.training.trainer` reads and changes: the
model (and the DDP/compiled wrapper the forward goes through), optimizer, scheduler, batcher,
progress, the truncated-BPTT state carried from step to step, the training losses since the last
log line, and where the metrics go. :func:`start_run` builds it (and, with ``--resume``, restores
it from ``last.pt``); :func:`save` writes it as a checkpoint (:mod:`lmmem.checkpoints`).

Exact resume: a checkpoint holds the model, optimizer and scheduler state, every rank's RNG state,
the carried state of the whole global batch and the data position (epoch, step in epoch). Batches
are a pure function of the position (see lmmem.data.batching), so ``--resume`` continues
bit-for-bit on CPU as if the run had never stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lmmem.checkpoints import RESUME_KEYS, check_vocab_matches, load_checkpoint, save_checkpoint
from lmmem.data import synthetic
from lmmem.data.batching import StreamBatcher
from lmmem.data.corpus import PreparedCorpus
from lmmem.data.corpus_folder import corpus_lock
from lmmem.errors import CheckpointError, LmmemError, TrainingDiverged
from lmmem.jsonio import dumps
from lmmem.models import build_model
from lmmem.models.config import ModelConfig
from lmmem.paths import absolute
from lmmem.safety import write_text_atomic
from lmmem.training import distributed as D
from lmmem.training.config import TrainConfig
from lmmem.training.optim import amp_dtype, lr_multiplier, make_optimizer, make_scheduler, schedule_change
from lmmem.training.run_folder import no_last_message, saved_model_config, trim_metrics

# A loss this many times ln V (the loss of a uniform guess over V words) means divergence: a model
# starts near ln V and only goes down while it learns; 3 ln V is e^(2 ln V) = V² times less likely
# than guessing. (--lr 1e6 reaches 1e15 without ever becoming NaN.)
DIVERGENCE_FACTOR = 3.0


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    position: int = 0  # next batch index within the epoch
    tokens: int = 0  # training targets seen, all ranks
    best_val_loss: float = math.inf
    best_step: int = -1


class LossWindow:
    """The training losses since the last log line, summed on the device (no host sync a step)."""

    def __init__(self, device: torch.device):
        self.sum = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = 0

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss.double()
        self.steps += 1

    def take_mean(self, ctx: D.DistContext) -> float:
        """The mean over the window and every rank; the next window starts empty."""
        D.all_reduce_sum(self.sum, ctx)
        self.sum /= ctx.world_size
        mean = float(self.sum) / self.steps
        self.sum.zero_()
        self.steps = 0
        return mean

    def peek_mean(self, ctx: D.DistContext) -> float | None:
        """The same mean, leaving the window as it is (None when it is empty)."""
        if not self.steps:
            return None
        return float(D.all_reduce_sum(self.sum.clone(), ctx)) / (ctx.world_size * self.steps)


class Metrics:
    """``OUT/metrics.jsonl`` and, with ``--tensorboard``, the same numbers under the same names."""

    def __init__(self, path: Path, summary_writer=None):
        self.path = path
        self.tb = summary_writer(log_dir=str(path.parent / "tensorboard")) if summary_writer else None

    def write(self, record: dict) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(dumps(record, what="the metrics record") + "\n")
        except OSError as e:  # a failed write (a full disk) names no file: name it
            raise OSError(e.errno, e.strerror, str(self.path)) from None
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(key, value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@dataclass
class Run:
    cfg: TrainConfig
    ctx: D.DistContext
    corpus: PreparedCorpus
    model_cfg: ModelConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    batcher: StreamBatcher
    valid_tokens: np.ndarray | None
    net: torch.nn.Module  # what the forward runs through: the model, or its DDP / compiled wrapper
    amp: torch.dtype | None
    losses: LossWindow
    metrics: Metrics | None  # main process only
    progress: Progress = field(default_factory=Progress)
    state: Any = None  # the truncated-BPTT state carried from step to step (None: start from zeros)
    seconds_before: float = 0.0  # training time of the runs this one resumed
    t_start: float = field(default_factory=time.monotonic)  # when the loop started (this process)
    t_log: float = 0.0  # when the last log line was written, and the tokens seen then
    tokens_at_log: int = 0
    last_val: float | None = None
    bar: Any = None  # the lmmem.progress.Progress of the loop while it runs (fit), else None

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def last_path(self) -> Path:
        return self.out / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out / "best.pt"

    @property
    def rows(self) -> int:
        return len(self.batcher.rows)


# ---------------------------------------------------------------------------------------------
# building a run


def ensure_data(cfg: TrainConfig, ctx: D.DistContext) -> Path:
    """The prepared corpus folder; with no --data, the embedded synthetic corpus (made once)."""
    if cfg.data is not None:
        return Path(cfg.data)
    path = synthetic.default_dir()
    if ctx.is_main and not (path / "meta.json").is_file():
        # Two first-ever runs: the second waits for the first to finish writing, then uses it.
        with corpus_lock(path, wait=True):
            if not (path / "meta.json").is_file():
                print(f"no --data given: writing the embedded synthetic corpus to {path} (offline, deterministic)")
                synthetic.write_synthetic_corpus(path, locked=True)
    D.barrier(ctx)
    return path


def start_run(cfg: TrainConfig, ctx: D.DistContext, summary_writer=None) -> Run:
    """A run built from ``cfg``: from scratch, or (``cfg.resume``) from ``OUT/last.pt``, exactly
    where it stopped. Writes ``OUT/config.json``. ``cfg`` itself is not changed."""
    data_dir = ensure_data(cfg, ctx)
    corpus = PreparedCorpus.open(data_dir)
    cfg = replace(cfg, data=absolute(data_dir))  # absolute: the run is evaluated and trained again from other folders
    torch.manual_seed(cfg.seed)
    model_cfg = cfg.model_config(len(corpus.vocab))
    model = build_model(model_cfg).to(ctx.device)
    model.output.backend = cfg.softmax_backend  # a run-time choice, not saved with the model
    optimizer = make_optimizer(cfg, model)
    run = Run(
        cfg=cfg, ctx=ctx, corpus=corpus, model_cfg=model_cfg, model=model, optimizer=optimizer,
        scheduler=make_scheduler(cfg, optimizer),
        batcher=StreamBatcher(corpus.tokens("train"), cfg.batch_size, cfg.bptt, rank=ctx.rank, world_size=ctx.world_size),
        valid_tokens=corpus.tokens("valid") if "valid" in corpus.splits else None,
        net=model, amp=amp_dtype(cfg, ctx.device), losses=LossWindow(ctx.device), metrics=None,
    )
    if cfg.resume:
        _resume(run, data_dir)
    if ctx.is_main:
        write_text_atomic(run.out / "config.json",
                          dumps({"train": recorded_config(cfg), "model": model_cfg.to_dict()}, what="the run config", indent=2) + "\n")
        run.metrics = Metrics(run.out / "metrics.jsonl", summary_writer)
    if ctx.distributed:
        run.net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if cfg.compile:
        run.net = torch.compile(run.net)
    return run


def _resume(run: Run, data_dir: Path) -> None:
    if not run.last_path.is_file():
        raise CheckpointError(no_last_message(run.out))
    ckpt = load_checkpoint(run.last_path, map_location=run.ctx.device, require=RESUME_KEYS)
    check_vocab_matches(ckpt, run.corpus.fingerprint, data_dir, run.last_path)
    if saved_model_config(ckpt["model_config"]) != run.model_cfg:
        raise CheckpointError(f"{run.last_path} holds a different model than these flags build; resume with the run's own settings")
    restore(run, ckpt)
    if run.ctx.is_main:
        trim_metrics(run.out / "metrics.jsonl", run.progress.step)
        p = run.progress
        print(f"resumed {run.last_path} at step {p.step} (epoch {p.epoch}, batch {p.position}) on --data {data_dir}")
        note = schedule_change(ckpt["train_config"], run.cfg, p.step)
        if note:
            print(note)


def restore(run: Run, ckpt: dict, *, rng: bool = True, missing_ok: Collection[str] = ()) -> None:
    """Continue ``run`` from the checkpoint ``ckpt``: weights, optimizer, schedule, progress, the
    carried state and (``rng``) every rank's RNG state. ``missing_ok``: model state the checkpoint
    may lack (an experiment starting a different output layer from a run's checkpoint)."""
    missing, unexpected = run.model.load_state_dict(ckpt["model"], strict=False)
    if unexpected or not set(missing) <= set(missing_ok):
        raise CheckpointError(f"the checkpoint's weights do not fit this model (missing {sorted(missing)}, "
                              f"unexpected {sorted(unexpected)}); resume with the run's own settings")
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    # A resumed run may change the peak --lr (e.g. lower it after a divergence): the restored
    # scheduler would otherwise keep the old one.
    lr = run.cfg.lr
    run.scheduler.base_lrs = [lr for _ in run.optimizer.param_groups]
    for group in run.optimizer.param_groups:
        group["initial_lr"] = lr
        group["lr"] = lr * lr_multiplier(run.cfg, run.scheduler.last_epoch)
    run.progress = Progress(**ckpt["progress"])
    run.state = _restore_rank_states(ckpt, run.ctx, run.rows, rng)
    run.seconds_before = float(ckpt.get("train_seconds", 0.0))


# ---------------------------------------------------------------------------------------------
# divergence and checkpoints


def recorded_config(cfg: TrainConfig) -> dict:
    """The config a checkpoint and config.json record: its paths absolute (see lmmem.paths)."""
    return {**cfg.to_dict(), "data": absolute(cfg.data) if cfg.data else cfg.data, "out": absolute(cfg.out)}


def loss_limit(run: Run) -> float:
    """Divergence: a loss above this (see DIVERGENCE_FACTOR) or a non-finite one."""
    return DIVERGENCE_FACTOR * math.log(len(run.corpus.vocab))


def _kept(run: Run) -> str:
    if run.last_path.is_file() or run.best_path.is_file():
        return f"the last good checkpoint is kept in {run.out}"
    return f"no checkpoint had been written yet, so {run.out} holds none"


def check_loss(run: Run, value: float, where: str) -> None:
    limit = loss_limit(run)
    if not math.isfinite(value) or value > limit:
        raise TrainingDiverged(
            f"loss became {value:.4g} by step {run.progress.step} ({where}; a uniform guess scores ln V = "
            f"{limit / DIVERGENCE_FACTOR:.2f}): the run diverged and stopped without saving; {_kept(run)}. "
            f"Lower --lr or set --clip", step=run.progress.step, loss=value,
        )


def train_seconds(run: Run) -> float:
    """Wall time in the training loop, summed over resumes (kept out of Progress, which is
    identical for a resumed and an uninterrupted run)."""
    return run.seconds_before + (time.monotonic() - run.t_start)


def save(run: Run, path: Path) -> None:
    """Write ``run`` to the checkpoint ``path`` (atomically), unless it has diverged: then raise
    :class:`TrainingDiverged` and leave the last good checkpoint as it is."""
    carried, rngs = _gather_rank_states(run.state, run.ctx)
    pending = run.losses.peek_mean(run.ctx)  # the steps since the last log line must not have diverged either
    if pending is not None:
        check_loss(run, pending, "training")
    if not run.ctx.is_main:
        return
    if not all(torch.isfinite(p).all() for p in run.model.parameters()):
        raise TrainingDiverged(f"parameters became NaN/inf by step {run.progress.step}; stopped without saving; {_kept(run)}. "
                               "Lower --lr or set --clip", step=run.progress.step)
    save_checkpoint(
        {
            "model_config": run.model_cfg.to_dict(),
            "train_config": recorded_config(run.cfg),
            "vocab_fingerprint": run.corpus.fingerprint,
            "vocab_size": len(run.corpus.vocab),
            "model": run.model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "progress": vars(run.progress).copy(),
            "train_seconds": train_seconds(run),
            "rng": rngs,
            "carried_state": carried,
        },
        path,
    )


def _gather_rank_states(state, ctx: D.DistContext):
    """(global carried state, list of every rank's RNG state) for the checkpoint."""
    rng = {"cpu": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(ctx.device)
    if not ctx.distributed:
        return (None if state is None else [s.detach().cpu() for s in state]), [rng]
    rngs: list = [None] * ctx.world_size
    dist.all_gather_object(rngs, rng)
    if state is None:
        return None, rngs
    full = []
    for s in state:
        parts = [torch.empty_like(s) for _ in range(ctx.world_size)]
        dist.all_gather(parts, s.detach().contiguous())
        full.append(torch.cat(parts, dim=1).cpu())  # LSTM state is (layers, rows, dim)
    return full, rngs


def _restore_rank_states(ckpt: dict, ctx: D.DistContext, rows_per_rank: int, rng: bool = True):
    """This rank's rows of the carried state, and (``rng``) this rank's RNG state, set."""
    rngs = ckpt.get("rng") or []
    if rng and len(rngs) == ctx.world_size:
        mine = rngs[ctx.rank]
        torch.set_rng_state(mine["cpu"])
        if "cuda" in mine and ctx.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], ctx.device)
    elif rng and ctx.is_main:
        print(f"warning: checkpoint has RNG states for {len(rngs)} processes, this run has {ctx.world_size}: dropout noise will differ")
    carried = ckpt.get("carried_state")
    if carried is None:
        return None
    lo = ctx.rank * rows_per_rank
    return tuple(s[:, lo : lo + rows_per_rank].to(ctx.device) for s in carried)


def tensorboard_writer_class():
    """torch's TensorBoard SummaryWriter; a one-line error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LmmemError("--tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or pip install 'lmmem[tensorboard]'), or drop --tensorboard") from None
    return SummaryWriter
