"""The training loop: truncated BPTT with carried state, checkpoints that resume exactly, DDP.

``train(cfg)`` is everything ``python train.py`` does; it is importable so that experiments and
tests drive the same code. What it guarantees:

* **Exact resume.** A checkpoint holds the model, optimizer and scheduler state, every rank's RNG
  state, the carried LSTM state of the whole global batch, and the data position (epoch, step in
  epoch). Batches are a pure function of the position (see lmmem.data.batching), so
  ``--resume`` continues bit-for-bit on CPU as if the run had never stopped.
* **Nothing lost.** Checkpoints are written atomically. Ctrl-C (SIGINT) or SIGTERM finishes the
  current step, saves ``last.pt`` and exits with status 130. A diverged loss (non-finite, or far
  above ln V, the loss of a uniform guess) stops the run without saving, so ``last.pt``/``best.pt``
  stay the last good ones. The run folder is locked for the run's life (a second train.py on it
  exits 2 naming the holder); a fresh run refuses a folder that holds a run unless ``--overwrite``;
  ``--resume`` continues in the folder it reads; a start removes the temp files a kill -9 left and
  cuts ``metrics.jsonl`` back to the checkpoint's step.
* **DDP.** Under torchrun each rank trains its share of the global batch's rows; gradients are
  averaged by DistributedDataParallel and output layers with their own update rule (the Hebbian
  softmax) all-reduce their statistics in ``on_optimizer_step``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from lmmem.data.batching import StreamBatcher
from lmmem.data.corpus import PreparedCorpus
from lmmem.errors import CheckpointError, LmmemError, TrainingDiverged
from lmmem.evaluation.perplexity import autocast_context, score_stream
from lmmem.jsonio import dumps
from lmmem.models import build_model
from lmmem.models.config import ModelConfig
from lmmem.safety import FolderLock, check_writable_folder, remove_stale_temp_files, write_text_atomic
from lmmem.training import distributed as D
from lmmem.checkpoints import RESUME_KEYS, TEMP_PATTERNS, check_vocab_matches, load_checkpoint, save_checkpoint
from lmmem.training.config import TrainConfig, validate

# Fields that define the model or the data stream: a resumed run must keep them.
# (--data is not among them: the corpus may move; its vocabulary fingerprint is checked instead.)
_FIXED_ON_RESUME = (
    "arch", "softmax", "embed_dim", "hidden_dim", "num_layers", "proj_dim", "num_heads", "tie_weights",
    "batch_size", "bptt", "optimizer", "seed", "hebbian_gamma", "hebbian_T", "hebbian_rescale",
)


# A loss this many times ln V (the loss of a uniform guess over V words) means divergence: a model
# starts near ln V and only goes down while it learns; 3 ln V is e^(2 ln V) = V² times less likely
# than guessing. (--lr 1e6 reaches 1e15 without ever becoming NaN.)
DIVERGENCE_FACTOR = 3.0
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "config.json")  # what --overwrite deletes
RUN_TEMP_PATTERNS = (*TEMP_PATTERNS, ".metrics.jsonl.*.tmp", ".config.json.*.tmp")


@dataclass
class Progress:
    step: int = 0  # optimizer steps taken
    epoch: int = 0
    position: int = 0  # next batch index within the epoch
    tokens: int = 0  # training targets seen, all ranks
    best_val_loss: float = math.inf
    best_step: int = -1


@dataclass
class TrainResult:
    out: Path
    progress: Progress
    stopped_by: str  # "max_steps" | "max_epochs" | "time_budget" | "interrupt"
    last_val_loss: float | None
    is_main: bool = True  # the process that prints and writes (rank 0 under torchrun)


# ---------------------------------------------------------------------------------------------
# data


def default_data_dir() -> Path:
    cache = Path(os.environ.get("LMMEM_CACHE", Path.home() / ".cache" / "lmmem"))
    return cache / "synthetic-default"


def ensure_data(cfg: TrainConfig, ctx: D.DistContext) -> Path:
    """The prepared corpus folder; with no --data, the embedded synthetic corpus (made once)."""
    if cfg.data is not None:
        return Path(cfg.data)
    path = default_data_dir()
    if ctx.is_main and not (path / "meta.json").is_file():
        from lmmem.data.corpus_folder import corpus_lock
        from lmmem.data.synthetic import write_synthetic_corpus

        # Two first-ever runs: the second waits for the first to finish writing, then uses it.
        with corpus_lock(path, wait=True):
            if not (path / "meta.json").is_file():
                print(f"no --data given: writing the embedded synthetic corpus to {path} (offline, deterministic)")
                write_synthetic_corpus(path, locked=True)
    D.barrier(ctx)
    return path


# ---------------------------------------------------------------------------------------------
# optimisation


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


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.amp == "none":
        return None
    if cfg.amp == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else None


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
    model.output.on_optimizer_step()
    return loss.detach(), state


# ---------------------------------------------------------------------------------------------
# stop signals


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
        tqdm.write("stopping after this step: saving a checkpoint (Ctrl-C again to abort without saving)")

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


# ---------------------------------------------------------------------------------------------
# checkpoint state of all ranks


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


def _restore_rank_states(ckpt: dict, ctx: D.DistContext, rows_per_rank: int):
    rngs = ckpt.get("rng") or []
    if len(rngs) == ctx.world_size:
        rng = rngs[ctx.rank]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and ctx.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], ctx.device)
    elif ctx.is_main:
        print(f"warning: checkpoint has RNG states for {len(rngs)} processes, this run has {ctx.world_size}: dropout noise will differ")
    carried = ckpt.get("carried_state")
    if carried is None:
        return None
    lo = ctx.rank * rows_per_rank
    return tuple(s[:, lo : lo + rows_per_rank].to(ctx.device) for s in carried)


# ---------------------------------------------------------------------------------------------
# the loop


def resume_config(out: str | Path, overrides: dict) -> TrainConfig:
    """The saved config of OUT/last.pt, with the given flags applied where they do not change the
    model or the data stream. The run continues in OUT, whatever folder the checkpoint names."""
    last = Path(out) / "last.pt"
    if not last.is_file():
        raise CheckpointError(_no_last_message(Path(out)))
    ckpt = load_checkpoint(last, require=RESUME_KEYS)
    saved = dict(ckpt["train_config"])
    if overrides.get("overwrite"):
        raise LmmemError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    preset = overrides.get("preset")
    if preset is not None and preset != saved.get("preset"):
        raise CheckpointError(
            f"--preset {preset} differs from the run's {saved.get('preset')!r} and a preset sets the model: "
            "drop --preset to resume (set single flags such as --lr instead), or train a new run with another --out"
        )
    for key, value in overrides.items():
        if value is None or key in ("resume", "preset", "out", "overwrite"):
            continue
        if key in _FIXED_ON_RESUME and value != saved.get(key):
            raise CheckpointError(
                f"--{key.replace('_', '-')} {value} differs from the checkpoint's {saved.get(key)!r}; "
                f"drop the flag to resume, or train a new run with another --out"
            )
        saved[key] = value
    known = {f.name for f in fields(TrainConfig)}
    try:
        cfg = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    except TypeError as e:
        raise CheckpointError(f"{last} has a malformed train_config ({e}); it is damaged: retrain") from None
    cfg.out = str(out)  # the folder resumed is the folder written
    cfg.resume, cfg.overwrite = True, False
    validate(cfg)
    return cfg


def _no_last_message(out: Path) -> str:
    if (out / "best.pt").is_file():  # killed between its first best.pt and its first last.pt
        return (f"--resume: {out} holds best.pt but no last.pt, so the run cannot continue exactly; start it again with "
                f"--overwrite (deletes best.pt), or keep best.pt and train into another --out")
    return f"--resume: {out} holds no last.pt, so there is no run to continue; drop --resume to start one"


def _trim_metrics(path: Path, step: int) -> None:
    """Keep only the metrics records up to ``step`` (the checkpoint's): a run killed after its last
    checkpoint logged steps that the resumed run logs again. A torn last line goes too."""
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    kept, changed = [], bool(text) and not text.endswith("\n")  # an unterminated line would join the next record
    for line in text.splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and int(record.get("step", 0)) <= step
        except (json.JSONDecodeError, TypeError, ValueError):
            keep = False
        if keep:
            kept.append(line)
        else:
            changed = True
    if changed:
        write_text_atomic(path, "".join(l + "\n" for l in kept))


def _prepare_run_folder(cfg: TrainConfig, out: Path) -> FolderLock:
    """Lock OUT for this run's life, refuse to start over a run it holds (unless --overwrite), and
    remove what a killed run left. Main process only."""
    check_writable_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(out / ".lock", f"run folder {out}")
    try:
        remove_stale_temp_files(out, RUN_TEMP_PATTERNS)
        held = [n for n in ("last.pt", "best.pt") if (out / n).is_file()]
        if not cfg.resume and held:
            if not cfg.overwrite:
                raise LmmemError(
                    f"{out} already holds a run ({', '.join(held)}); continue it with --resume --out {out}, "
                    f"start a new run with another --out, or pass --overwrite to delete it and start over"
                )
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
            print(f"--overwrite: deleted the previous run's {', '.join(RUN_FILES)} in {out}")
            others = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
            if others:  # e.g. evaluate.py's JSON: the user's files, kept, but about the old model
                print(f"warning: {out} still holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''} "
                      "from before --overwrite; they describe the previous run")
        elif not cfg.resume:
            (out / "metrics.jsonl").unlink(missing_ok=True)  # a run killed before its first checkpoint
    except BaseException:
        lock.release()
        raise
    return lock


def train(cfg: TrainConfig) -> TrainResult:
    if cfg.tensorboard:
        tensorboard_writer_class()  # a missing package is refused before the run folder is touched
    ctx = D.setup(cfg.device)
    lock = None
    try:
        if ctx.is_main:
            lock = _prepare_run_folder(cfg, Path(cfg.out))
        return _train(cfg, ctx)
    finally:
        if lock is not None:
            lock.release()
        D.teardown(ctx)


def tensorboard_writer_class():
    """torch's TensorBoard SummaryWriter; a one-line error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LmmemError("--tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or pip install 'lmmem[tensorboard]'), or drop --tensorboard") from None
    return SummaryWriter


def _train(cfg: TrainConfig, ctx: D.DistContext) -> TrainResult:
    out = Path(cfg.out)
    summary_writer = tensorboard_writer_class() if cfg.tensorboard else None  # fail before any work
    data_dir = ensure_data(cfg, ctx)
    corpus = PreparedCorpus.open(data_dir)
    train_tokens = corpus.tokens("train")
    valid_tokens = corpus.tokens("valid") if "valid" in corpus.splits else None
    if cfg.data is None:
        cfg.data = str(data_dir)

    torch.manual_seed(cfg.seed)
    model_cfg = cfg.model_config(len(corpus.vocab))
    model = build_model(model_cfg).to(ctx.device)
    model.output.backend = cfg.softmax_backend  # a run-time choice, not saved with the model
    optimizer = make_optimizer(cfg, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(cfg, s))
    batcher = StreamBatcher(train_tokens, cfg.batch_size, cfg.bptt, rank=ctx.rank, world_size=ctx.world_size)
    rows = len(batcher.rows)
    progress = Progress()
    state = None

    last_path, best_path = out / "last.pt", out / "best.pt"
    if cfg.resume:
        if not last_path.is_file():
            raise CheckpointError(_no_last_message(out))
        ckpt = load_checkpoint(last_path, map_location=ctx.device, require=RESUME_KEYS)
        check_vocab_matches(ckpt, corpus.fingerprint, data_dir, last_path)
        if ModelConfig.from_dict(ckpt["model_config"]) != model_cfg:
            raise CheckpointError(f"{last_path} holds a different model than these flags build; resume with the run's own settings")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        # A resumed run may change the peak --lr (e.g. lower it after a divergence): the restored
        # scheduler would otherwise keep the old one.
        scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["initial_lr"] = cfg.lr
            group["lr"] = cfg.lr * lr_multiplier(cfg, scheduler.last_epoch)
        progress = Progress(**ckpt["progress"])
        state = _restore_rank_states(ckpt, ctx, rows)
        if ctx.is_main:
            _trim_metrics(out / "metrics.jsonl", progress.step)
            print(f"resumed {last_path} at step {progress.step} (epoch {progress.epoch}, batch {progress.position}) on --data {data_dir}")

    if ctx.is_main:
        write_text_atomic(out / "config.json", dumps({"train": cfg.to_dict(), "model": model_cfg.to_dict()}, what="the run config", indent=2) + "\n")

    net: torch.nn.Module = model
    if ctx.distributed:
        net = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    autocast_dtype = amp_dtype(cfg, ctx.device)
    n_params = sum(p.numel() for p in model.parameters())

    # TensorBoard (optional) gets the same numbers as metrics.jsonl, under the same names.
    tb = summary_writer(log_dir=str(out / "tensorboard")) if summary_writer and ctx.is_main else None

    def log(record: dict) -> None:
        if ctx.is_main:
            path = out / "metrics.jsonl"
            try:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(dumps(record, what="the metrics record") + "\n")
            except OSError as e:  # a failed write (a full disk) names no file: name it
                raise OSError(e.errno, e.strerror, str(path)) from None
            if tb is not None:
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                        tb.add_scalar(key, value, record["step"])
                tb.flush()

    # Divergence: a non-finite loss, or one far above a uniform guess's ln V (see DIVERGENCE_FACTOR).
    loss_limit = DIVERGENCE_FACTOR * math.log(len(corpus.vocab))

    def kept() -> str:
        if last_path.is_file() or best_path.is_file():
            return f"the last good checkpoint is kept in {out}"
        return f"no checkpoint had been written yet, so {out} holds none"

    def check_loss(value: float, where: str) -> None:
        if not math.isfinite(value) or value > loss_limit:
            raise TrainingDiverged(
                f"loss became {value:.4g} by step {progress.step} ({where}; a uniform guess scores ln V = "
                f"{loss_limit / DIVERGENCE_FACTOR:.2f}): the run diverged and stopped without saving; {kept()}. "
                f"Lower --lr or set --clip", step=progress.step, loss=value,
            )

    # Validation needs only the total loss: every vocabulary entry goes to one bucket.
    single_bucket = np.zeros(len(corpus.vocab), dtype=np.int64)

    def validate_now() -> float | None:
        if valid_tokens is None:
            return None
        eval_rows = max(ctx.world_size, cfg.eval_batch_size - cfg.eval_batch_size % ctx.world_size)
        nll, cnt = score_stream(
            model, valid_tokens, bucket_of=single_bucket, num_buckets=1, batch_size=eval_rows,
            bptt=cfg.bptt, device=ctx.device, amp_dtype=autocast_dtype, max_tokens=cfg.eval_tokens,
            rank=ctx.rank, world_size=ctx.world_size,
        )
        sums = D.all_reduce_sum(torch.tensor([nll.sum(), cnt.sum()], dtype=torch.float64), ctx)
        return float(sums[0] / sums[1])

    def checkpoint(path: Path) -> None:
        carried, rngs = _gather_rank_states(state, ctx)
        if loss_steps:  # the steps since the last log line must not have diverged either
            pending = D.all_reduce_sum(loss_sum.clone(), ctx)
            check_loss(float(pending) / (ctx.world_size * loss_steps), "training")
        if not ctx.is_main:
            return
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise TrainingDiverged(f"parameters became NaN/inf by step {progress.step}; stopped without saving; {kept()}. Lower --lr or set --clip",
                                   step=progress.step)
        save_checkpoint(
            {
                "model_config": model_cfg.to_dict(),
                "train_config": cfg.to_dict(),
                "vocab_fingerprint": corpus.fingerprint,
                "vocab_size": len(corpus.vocab),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "progress": vars(progress).copy(),
                # wall time in the training loop, summed over resumes; kept out of Progress, which
                # is identical for a resumed and an uninterrupted run
                "train_seconds": seconds_before + (time.monotonic() - t_start),
                "rng": rngs,
                "carried_state": carried,
            },
            path,
        )

    if ctx.is_main:
        print(
            f"training {model_cfg.arch} with {model_cfg.softmax} softmax: {n_params / 1e6:.2f}M parameters, "
            f"vocabulary {len(corpus.vocab):,}, {len(train_tokens):,} train tokens, {ctx.world_size} process(es) on {ctx.device}"
        )

    t_start = time.monotonic()
    seconds_before = float(ckpt.get("train_seconds", 0.0)) if cfg.resume else 0.0
    t_log, tokens_at_log = t_start, progress.tokens
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    loss_steps = 0
    stopped_by = "max_steps"
    last_val: float | None = None
    # A live bar on a terminal; plain log lines in files and CI logs.
    use_bar = cfg.progress and ctx.is_main and sys.stderr.isatty()
    bar = tqdm(total=cfg.max_steps, initial=progress.step, disable=not use_bar, dynamic_ncols=True, unit="step")


    with stop_on_signals() as stop:
        model.train()
        while progress.step < cfg.max_steps:
            if progress.position >= len(batcher):
                progress.epoch += 1
                progress.position = 0
                state = None  # a new epoch starts the rows' text again: start from a zero state
                if cfg.max_epochs and progress.epoch >= cfg.max_epochs:
                    stopped_by = "max_epochs"
                    break
            batch = batcher.batch(progress.position)
            x = batch.inputs.to(ctx.device, non_blocking=True)
            y = batch.targets.to(ctx.device, non_blocking=True)
            if state is None:
                state = model.init_state(rows, ctx.device)
            loss, state = train_step(net, model, optimizer, x, y, state, clip=cfg.clip, device=ctx.device, amp=autocast_dtype)
            scheduler.step()
            progress.step += 1
            progress.position += 1
            progress.tokens += batch.num_targets * ctx.world_size
            loss_sum += loss.double()
            loss_steps += 1
            bar.update(1)

            if progress.step % cfg.log_interval == 0 or progress.step == cfg.max_steps:
                D.all_reduce_sum(loss_sum, ctx)
                loss_sum /= ctx.world_size
                mean = float(loss_sum) / loss_steps
                check_loss(mean, "training")
                now = time.monotonic()
                tps = (progress.tokens - tokens_at_log) / max(now - t_log, 1e-9)
                record = {"step": progress.step, "epoch": progress.epoch, "tokens": progress.tokens, "train_loss": mean,
                          "train_ppl": math.exp(min(mean, 700)), "lr": scheduler.get_last_lr()[0], "tokens_per_s": tps,
                          "elapsed_s": now - t_start}
                log(record)
                bar.set_postfix(loss=f"{mean:.3f}", ppl=f"{record['train_ppl']:.1f}", tok_s=f"{tps:,.0f}")
                if not use_bar and ctx.is_main:
                    print(f"step {progress.step:>7}  loss {mean:.4f}  ppl {record['train_ppl']:9.2f}  lr {record['lr']:.2e}  {tps:,.0f} tok/s", flush=True)
                loss_sum.zero_()
                loss_steps, t_log, tokens_at_log = 0, now, progress.tokens

            if cfg.eval_interval and progress.step % cfg.eval_interval == 0 and progress.step < cfg.max_steps:
                last_val = _validate_and_keep_best(validate_now, progress, checkpoint, best_path, log, ctx, check_loss)
            if progress.step % cfg.checkpoint_interval == 0:
                checkpoint(last_path)

            stop_now = stop["stop"] or (cfg.time_budget and time.monotonic() - t_start > 60 * cfg.time_budget)
            if ctx.distributed:  # every rank must leave at the same step
                flag = torch.tensor([1.0 if stop_now else 0.0], device=ctx.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stop_now = bool(flag.item())
            if stop_now:
                stopped_by = "interrupt" if stop["stop"] else "time_budget"
                break

        bar.close()
        if stopped_by != "interrupt":
            last_val = _validate_and_keep_best(validate_now, progress, checkpoint, best_path, log, ctx, check_loss)
        checkpoint(last_path)
        if valid_tokens is None:
            checkpoint(best_path)  # no validation split: the last model is the best we know of
    if ctx.is_main:
        msg = {"interrupt": f"interrupted at step {progress.step}: saved {last_path}; continue with --resume --out {out}",
               "time_budget": f"time budget reached at step {progress.step}: saved {last_path}"}.get(stopped_by, f"done at step {progress.step}")
        print(msg)
    if tb is not None:
        tb.close()
    return TrainResult(out, progress, stopped_by, last_val, ctx.is_main)


def _validate_and_keep_best(validate_now, progress: Progress, checkpoint, best_path: Path, log, ctx, check_loss) -> float | None:
    val = validate_now()
    if val is None:
        return None
    check_loss(val, "validation")
    improved = val < progress.best_val_loss
    if improved:
        progress.best_val_loss, progress.best_step = val, progress.step
    log({"step": progress.step, "val_loss": val, "val_ppl": math.exp(min(val, 700)), "best": improved})
    if ctx.is_main:
        tqdm.write(f"step {progress.step}: valid loss {val:.4f}, ppl {math.exp(min(val, 700)):.2f}{' (best)' if improved else ''}")
    if improved:
        checkpoint(best_path)
    return val
