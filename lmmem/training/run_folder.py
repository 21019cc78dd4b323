"""A run folder (``--out``): one run in it, locked for the run's life; what ``--resume`` continues.

A fresh run refuses a folder that holds a run unless ``--overwrite``; ``--resume`` continues in the
folder it reads, with the flags that define the model and the data stream kept; a start removes the
temp files a kill -9 left and cuts ``metrics.jsonl`` back to the checkpoint's step.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from lmmem.checkpoints import RESUME_KEYS, TEMP_PATTERNS, load_checkpoint
from lmmem.data import synthetic
from lmmem.errors import CheckpointError, LmmemError
from lmmem.models.config import ModelConfig
from lmmem.paths import absolute, recorded_path_candidates
from lmmem.safety import FolderLock, check_writable_folder, remove_stale_temp_files, write_text_atomic
from lmmem.training.config import TrainConfig, later_limit_in_effect, validate, write_momentum_in_effect

# Fields that define the model or the data stream: a resumed run must keep them.
# (--data is not among them: the corpus may move; its vocabulary fingerprint is checked instead.)
FIXED_ON_RESUME = (
    "arch", "softmax", "embed_dim", "hidden_dim", "num_layers", "proj_dim", "num_heads", "tie_weights",
    "batch_size", "bptt", "optimizer", "seed", "hebbian_gamma", "hebbian_T", "hebbian_rescale", "hebbian_T_later",
)
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "config.json")  # what --overwrite deletes
# Fields added to TrainConfig after runs existed, with the value that reproduces those runs (not the
# current default, which may differ): a run saved without the field resumes as it was trained.
LEGACY_VALUES = {"hebbian_write_momentum": "keep"}
# Likewise for the centred Hebbian rule's options in a checkpoint's model_config.
LEGACY_SOFTMAX_OPTIONS = {"write_momentum": "keep", "later_limit": None}


def saved_train_config(train_config: dict) -> dict:
    """A checkpoint's ``train_config`` restricted to today's TrainConfig fields, with
    :data:`LEGACY_VALUES` for fields it predates."""
    known = {f.name for f in fields(TrainConfig)}
    return {**{k: v for k, v in LEGACY_VALUES.items() if k not in train_config}, **{k: v for k, v in train_config.items() if k in known}}


def saved_model_config(model_config: dict) -> ModelConfig:
    """A checkpoint's ``model_config`` with :data:`LEGACY_SOFTMAX_OPTIONS` for options it predates,
    so that a run saved before an option existed compares equal to the model it was trained as."""
    cfg = ModelConfig.from_dict(model_config)
    options = cfg.softmax_options
    if cfg.softmax == "hebbian" and options.get("rule", "centred") == "centred":
        cfg.softmax_options = {**LEGACY_SOFTMAX_OPTIONS, **options}
    return cfg


RUN_TEMP_PATTERNS = (*TEMP_PATTERNS, ".metrics.jsonl.*.tmp", ".config.json.*.tmp")


def resume_config(out: str | Path, overrides: dict) -> TrainConfig:
    """The saved config of OUT/last.pt, with the given flags applied where they do not change the
    model or the data stream. The run continues in OUT, whatever folder the checkpoint names."""
    last = Path(out) / "last.pt"
    if not last.is_file():
        raise CheckpointError(no_last_message(Path(out)))
    ckpt = load_checkpoint(last, require=RESUME_KEYS)
    saved = saved_train_config(ckpt["train_config"])
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
        if key in FIXED_ON_RESUME and value != saved.get(key):
            raise CheckpointError(
                f"--{key.replace('_', '-')} {value} differs from the checkpoint's {saved.get(key)!r}; "
                f"drop the flag to resume, or train a new run with another --out"
            )
        saved[key] = value
    if overrides.get("data") is None and isinstance(saved.get("data"), str):
        saved["data"] = recorded_data(saved, Path(out))
    known = {f.name for f in fields(TrainConfig)}
    try:
        cfg = TrainConfig(**{k: v for k, v in saved.items() if k in known})
    except TypeError as e:
        raise CheckpointError(f"{last} has a malformed train_config ({e}); it is damaged: retrain") from None
    cfg.out = str(out)  # the folder resumed is the folder written
    cfg.resume, cfg.overwrite = True, False
    validate(cfg)
    return cfg


def run_state(out: Path, cfg: TrainConfig) -> str:
    """``finished``: OUT holds a run completed with exactly these settings (reused);
    ``resumable``: its last.pt was saved with these settings before ``max_steps`` (an interrupted
    run, continued from there as ``train.py --resume`` would); ``new``: nothing usable (no
    last.pt, or one trained with other settings: trained again from scratch)."""
    last = out / "last.pt"
    if not last.is_file():
        return "new"
    ckpt = load_checkpoint(last)
    ignore = ("resume", "overwrite", "progress", "out")
    # fill options added since the run was made: the value it was trained with, else today's default
    saved = {k: v for k, v in TrainConfig(**saved_train_config(ckpt["train_config"])).to_dict().items() if k not in ignore}
    data = recorded_data(ckpt["train_config"], out)
    saved["data"] = absolute(data) if data else data
    wanted = {k: v for k, v in cfg.to_dict().items() if k not in ignore}
    wanted["data"] = absolute(cfg.data or synthetic.default_dir())  # the corpus train.py would use
    if _effective(saved) != _effective(wanted):
        return "new"
    if ckpt["progress"]["step"] >= cfg.max_steps and (out / "best.pt").is_file():
        return "finished"
    return "resumable"


def _effective(settings: dict) -> dict:
    """Settings as the run uses them: ``hebbian_write_momentum="auto"`` and ``hebbian_T_later=-1``
    resolved to the rule's defaults, and dropped where they have no effect (no Hebbian softmax, or the
    paper's rule)."""
    out = dict(settings)
    out["hebbian_write_momentum"] = write_momentum_in_effect(out.get("softmax"), out.get("hebbian_rule"),
                                                             out.get("hebbian_write_momentum"))
    out["hebbian_T_later"] = later_limit_in_effect(out.get("softmax"), out.get("hebbian_rule"), out.get("hebbian_T_later", -1))
    return out


def recorded_data(train_config: dict, run_dir: Path) -> str:
    """A run's recorded ``data``, as a path that exists here when one of its readings does (an old
    run's relative path: where the run was started, else the current folder; see lmmem.paths)."""
    saved = train_config.get("data")
    if not isinstance(saved, str) or not saved:
        return saved
    tried = recorded_path_candidates(saved, run_dir, train_config.get("out"))
    return str(next((p for p in tried if p.is_dir()), tried[0]))


def no_last_message(out: Path) -> str:
    if (out / "best.pt").is_file():  # killed between its first best.pt and its first last.pt
        return (f"--resume: {out} holds best.pt but no last.pt, so the run cannot continue exactly; start it again with "
                f"--overwrite (deletes best.pt), or keep best.pt and train into another --out")
    return f"--resume: {out} holds no last.pt, so there is no run to continue; drop --resume to start one"


def trim_metrics(path: Path, step: int) -> None:
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


def prepare_run_folder(cfg: TrainConfig, out: Path) -> FolderLock:
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
