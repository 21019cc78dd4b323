"""The training loop: truncated BPTT with carried state, checkpoints that resume exactly, DDP.

``train(cfg)`` is everything ``python train.py`` does; it is importable so that experiments and
tests drive the same code. The loop (:func:`fit`) reads top to bottom: take the next batch, one
optimizer step, the step hooks, then logging, validation and checkpoints when they are due. Each of
those is a short function over the run's state (:class:`lmmem.training.run.Run`).

**Step hooks.** ``train(cfg, hooks=[...])``: each hook is called as ``hook(run, batch)`` after every
optimizer step (and the output layer's post-step rule), before the next batch; ``run.progress.step``
is the number of steps taken. Experiments use it to measure or snapshot during a run that is
otherwise exactly train.py's (``lmmem.experiments.binding`` saves trunk checkpoints and files each
token's loss by how often its word was seen before).

What the loop guarantees:

* **Exact resume** (see :mod:`lmmem.training.run`): ``--resume`` continues bit-for-bit on CPU.
* **Nothing lost.** Checkpoints are written atomically. Ctrl-C (SIGINT) or SIGTERM finishes the
  current step, saves ``last.pt`` and exits with status 130. A diverged loss (non-finite, or far
  above ln V, the loss of a uniform guess) stops the run without saving, so ``last.pt``/``best.pt``
  stay the last good ones. The run folder is locked for the run's life (see
  :mod:`lmmem.training.run_folder`).
* **DDP.** Under torchrun each rank trains its share of the global batch's rows; gradients are
  averaged by DistributedDataParallel and output layers with their own update rule (the Hebbian
  softmax) all-reduce their statistics in ``on_optimizer_step``.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from lmmem.data.batching import Batch, StreamBatcher
from lmmem.evaluation import autocast_context, score_stream
from lmmem.progress import Progress as ProgressDisplay
from lmmem.training import distributed as D
from lmmem.training.config import TrainConfig
from lmmem.training.run import Progress, Run, check_loss, save, start_run, tensorboard_writer_class
from lmmem.training.run_folder import prepare_run_folder

StepHook = Callable[[Run, Batch], None]


@dataclass
class TrainResult:
    out: Path
    progress: Progress
    stopped_by: str  # "max_steps" | "max_epochs" | "time_budget" | "interrupt"
    last_val_loss: float | None
    is_main: bool = True  # the process that prints and writes (rank 0 under torchrun)
    splits: tuple[str, ...] = ("train", "valid", "test")  # the corpus's splits (what evaluate.py --split can score)


def train(cfg: TrainConfig, hooks: Sequence[StepHook] = ()) -> TrainResult:
    """Train (or, with ``cfg.resume``, continue) the run ``cfg`` describes; ``hooks`` run after every step."""
    summary_writer = tensorboard_writer_class() if cfg.tensorboard else None  # refused before the run folder is touched
    with open_run(cfg, summary_writer) as run:
        announce(run)
        with stop_on_signals() as stop:
            stopped_by = fit(run, hooks, stop)
            finish(run, stopped_by)
        return TrainResult(run.out, run.progress, stopped_by, run.last_val, run.ctx.is_main, tuple(run.corpus.splits))


@contextmanager
def open_run(cfg: TrainConfig, summary_writer=None) -> Iterator[Run]:
    """The run ``cfg`` describes, built (or restored) in its locked run folder, for the time of the
    ``with`` block (torch.distributed set up around it)."""
    ctx = D.setup(cfg.device)
    lock = run = None
    try:
        if ctx.is_main:
            lock = prepare_run_folder(cfg, Path(cfg.out))
        run = start_run(cfg, ctx, summary_writer)
        yield run
    finally:
        if run is not None:
            # Free the DDP wrapper while the process group is still registered. Freed after
            # destroy_process_group, its reducer drops the group's last reference on the main
            # thread, holding the GIL, and joins gloo's worker, which may need the GIL to free the
            # last all_gather's tensors: a deadlock at the end of the run.
            run.net = run.model
            gc.collect()
        if lock is not None:
            lock.release()
        D.teardown(ctx)


def fit(run: Run, hooks: Sequence[StepHook] = (), stop: dict | None = None) -> str:
    """The loop: train until --max-steps, --max-epochs, --time-budget or a stop signal; returns which."""
    cfg, p = run.cfg, run.progress
    stop = {"stop": False} if stop is None else stop
    run.t_start = run.t_log = time.monotonic()
    run.tokens_at_log = p.tokens
    # a bar on a terminal; elsewhere plain lines with step/total, elapsed time and time left
    run.bar = ProgressDisplay(cfg.max_steps, "train", unit="step", initial=p.step, enabled=cfg.progress and run.ctx.is_main)
    run.model.train()
    start_pass(run)
    try:
        while p.step < cfg.max_steps:
            batch = next_batch(run)
            if batch is None:
                return "max_epochs"
            step(run, batch)
            for hook in hooks:
                hook(run, batch)
            if p.step % cfg.log_interval == 0 or p.step == cfg.max_steps:
                log(run)
            if cfg.eval_interval and p.step % cfg.eval_interval == 0 and p.step < cfg.max_steps:
                validate_and_keep_best(run)
            if p.step % cfg.checkpoint_interval == 0:
                save(run, run.last_path)
            reason = stop_reason(run, stop)
            if reason is not None:
                return reason
        return "max_steps"
    finally:
        run.bar.close()
        run.bar = None


# ---------------------------------------------------------------------------------------------
# the pieces of the loop


def next_batch(run: Run) -> Batch | None:
    """The batch at the run's position; a new epoch starts the rows' text (and a zero state) again.
    None when --max-epochs is reached."""
    p = run.progress
    if p.position >= len(run.batcher):
        p.epoch += 1
        p.position = 0
        run.state = None
        if run.cfg.max_epochs and p.epoch >= run.cfg.max_epochs:
            return None
        start_pass(run)
    return run.batcher.batch(p.position)


def start_pass(run: Run) -> None:
    """Tell the output layer how many passes over the training data are complete (a Hebbian rule's
    schedule follows them); called at the start of :func:`fit`, so a resumed run is told too."""
    run.model.output.start_pass(run.progress.epoch)


def step(run: Run, batch: Batch) -> torch.Tensor:
    """One optimizer step on ``batch``; the run's progress, carried state and loss window follow."""
    device = run.ctx.device
    x = batch.inputs.to(device, non_blocking=True)
    y = batch.targets.to(device, non_blocking=True)
    if run.state is None:
        run.state = run.model.init_state(run.rows, device)
    loss, run.state = train_step(run.net, run.model, run.optimizer, x, y, run.state, clip=run.cfg.clip, device=device, amp=run.amp)
    run.scheduler.step()
    p = run.progress
    p.step += 1
    p.position += 1
    p.tokens += batch.num_targets * run.ctx.world_size
    run.losses.add(loss)
    if run.bar is not None:
        run.bar.update(1)
    return loss


def train_step(net, model, optimizer, x, y, state, *, clip: float, device: torch.device, amp: torch.dtype | None):
    """One truncated-BPTT step: forward, backward, clip, optimizer step, then the output layer's
    post-step rule (the Hebbian softmax mixes its rows here). Returns the detached loss (no host
    sync) and the detached carried state. ``net`` may be the DDP/compiled wrapper of ``model``."""
    with autocast_context(device, amp):
        loss, state = net(x, y, state)
    state = model.detach_state(state)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    model.output.on_optimizer_step(optimizer)
    return loss.detach(), state


def log(run: Run) -> None:
    """The mean training loss since the last log line: checked for divergence, written to metrics."""
    p = run.progress
    mean = run.losses.take_mean(run.ctx)
    check_loss(run, mean, "training")
    now = time.monotonic()
    tps = (p.tokens - run.tokens_at_log) / max(now - run.t_log, 1e-9)
    record = {"step": p.step, "epoch": p.epoch, "tokens": p.tokens, "train_loss": mean, "train_ppl": math.exp(min(mean, 700)),
              "lr": run.scheduler.get_last_lr()[0], "tokens_per_s": tps, "elapsed_s": now - run.t_start}
    if run.metrics is not None:
        run.metrics.write(record)
    if run.bar is not None:
        run.bar.set_postfix(loss=f"{mean:.3f}", ppl=f"{record['train_ppl']:.1f}", tok_s=f"{tps:,.0f}")
    if not _use_bar(run) and run.ctx.is_main:
        print(f"step {p.step:>7}  loss {mean:.4f}  ppl {record['train_ppl']:9.2f}  lr {record['lr']:.2e}  {tps:,.0f} tok/s", flush=True)
    run.t_log, run.tokens_at_log = now, p.tokens


def validate(run: Run) -> float | None:
    """Mean loss on the valid split (its first --eval-tokens), all ranks; None without a valid split."""
    if run.valid_tokens is None:
        return None
    ctx, cfg = run.ctx, run.cfg
    eval_rows = max(ctx.world_size, cfg.eval_batch_size - cfg.eval_batch_size % ctx.world_size)
    tokens = run.valid_tokens[: cfg.eval_tokens + 1] if cfg.eval_tokens else run.valid_tokens
    batches = len(StreamBatcher(tokens, eval_rows, cfg.bptt, rank=ctx.rank, world_size=ctx.world_size, pad=True))
    with ProgressDisplay(batches, "valid", unit="batch", enabled=cfg.progress and ctx.is_main) as shown:
        nll, cnt = score_stream(
            run.model, tokens, bucket_of=np.zeros(len(run.corpus.vocab), dtype=np.int64), num_buckets=1,
            batch_size=eval_rows, bptt=cfg.bptt, device=ctx.device, amp_dtype=run.amp,
            rank=ctx.rank, world_size=ctx.world_size, on_scores=lambda positions, log_probs: shown.update(1),
        )  # only the total: every vocabulary entry in one bucket
    sums = D.all_reduce_sum(torch.tensor([nll.sum(), cnt.sum()], dtype=torch.float64), ctx)
    return float(sums[0] / sums[1])


def validate_and_keep_best(run: Run) -> float | None:
    """Validate; a new best validation loss saves ``best.pt``."""
    val = validate(run)
    if val is None:
        return None
    p = run.progress
    check_loss(run, val, "validation")
    improved = val < p.best_val_loss
    if improved:
        p.best_val_loss, p.best_step = val, p.step
    if run.metrics is not None:
        run.metrics.write({"step": p.step, "val_loss": val, "val_ppl": math.exp(min(val, 700)), "best": improved})
    if run.ctx.is_main:
        line = f"step {p.step}: valid loss {val:.4f}, ppl {math.exp(min(val, 700)):.2f}{' (best)' if improved else ''}"
        if _use_bar(run):
            tqdm.write(line)  # above the live bar
        else:
            print(line, flush=True)  # no bar to keep clear: no need for tqdm's cross-process lock
    if improved:
        save(run, run.best_path)
    run.last_val = val
    return val


def stop_reason(run: Run, stop: dict) -> str | None:
    """"interrupt" (Ctrl-C / SIGTERM), "time_budget", or None to go on; every rank agrees."""
    cfg = run.cfg
    stop_now = stop["stop"] or (cfg.time_budget and time.monotonic() - run.t_start > 60 * cfg.time_budget)
    if run.ctx.distributed:  # every rank must leave at the same step
        flag = torch.tensor([1.0 if stop_now else 0.0], device=run.ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop_now = bool(flag.item())
    if stop_now:
        return "interrupt" if stop["stop"] else "time_budget"
    return None


# ---------------------------------------------------------------------------------------------
# start and end of a run


def announce(run: Run) -> None:
    if not run.ctx.is_main:
        return
    n_params = sum(p.numel() for p in run.model.parameters())
    print(
        f"training {run.model_cfg.arch} with {run.model_cfg.softmax} softmax: {n_params / 1e6:.2f}M parameters, "
        f"vocabulary {len(run.corpus.vocab):,}, {len(run.batcher.tokens):,} train tokens, "
        f"{run.ctx.world_size} process(es) on {run.ctx.device}"
    )
    if run.valid_tokens is None:
        print(f"warning: {run.cfg.data} has no valid split (it has {', '.join(run.corpus.splits)}): the run is never "
              "validated, so best.pt will be the last model, not the best one; prepare the corpus with a valid split to choose on it")


def finish(run: Run, stopped_by: str) -> None:
    """The last validation (unless interrupted), ``last.pt`` (and ``best.pt`` without a valid split)."""
    if stopped_by != "interrupt":
        validate_and_keep_best(run)
    save(run, run.last_path)
    if run.valid_tokens is None:
        save(run, run.best_path)  # no validation split: the last model is the best we know of
    if run.ctx.is_main:
        step = run.progress.step
        print({"interrupt": f"interrupted at step {step}: saved {run.last_path}; continue with --resume --out {run.out}",
               "time_budget": f"time budget reached at step {step}: saved {run.last_path}"}.get(stopped_by, f"done at step {step}"))
    if run.metrics is not None:
        run.metrics.close()


def _use_bar(run: Run) -> bool:
    """A live bar on a terminal; plain log lines in files and CI logs."""
    return run.cfg.progress and run.ctx.is_main and sys.stderr.isatty()


@contextmanager
def stop_on_signals():
    """First SIGINT/SIGTERM sets a flag the loop checks between steps (so a checkpoint is never
    taken mid-update); a second SIGINT interrupts at once."""
    flag = {"stop": False}
    previous = {}

    def handler(signum, frame):
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True
        # os.write, not tqdm.write or print: a handler must take no lock. The signal can land while
        # this thread holds the stream's lock, and tqdm's lock is shared across fork (a process
        # killed while holding it once left a sibling waiting here forever).
        try:
            os.write(2, b"\nstopping after this step: saving a checkpoint (Ctrl-C again to abort without saving)\n")
        except OSError:
            pass

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        previous.clear()
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
