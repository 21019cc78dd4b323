"""The one loader and writer of what train.py leaves behind: checkpoints, run folders, exports.

A checkpoint is a dict of tensors and plain Python values (never a pickled model object), loadable
with ``torch.load(..., weights_only=True)``::

    format_version, kind           what this file is, so a stranger file is refused clearly
    model_config, train_config     dicts to rebuild the model and continue training
    vocab_fingerprint, vocab_size  the vocabulary the model was trained on (see lmmem.data.vocab)
    model, optimizer, scheduler    state dicts
    progress                       step, epoch, position in the epoch, tokens seen, best validation
    rng                            torch CPU/CUDA generator states of every rank
    carried_state                  the truncated-BPTT state of the global batch (LSTM h, c)

:func:`save_checkpoint` writes it to a temporary file in the same folder, flushes it to disk and
renames it over the target: a crash, Ctrl-C or a full disk mid-write leaves the previous checkpoint
intact (the next start of train.py removes the temporary file a kill -9 left behind).

:func:`load_checkpoint` takes any of the three things a user may name: a checkpoint file, a run
folder (its ``best.pt``, else ``last.pt``), or an export folder (``model.safetensors`` +
``vocab.txt`` + ``config.json``, written by ``python -m lmmem.training.export``), which reads as a
checkpoint without optimizer state. Evaluation, the experiments and ``data_prep --vocab-from``
all load through it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lmmem.data.vocab import Vocabulary
from lmmem.device import resolve_device
from lmmem.errors import CheckpointError, LmmemError
from lmmem.models import build_model
from lmmem.models.config import ModelConfig
from lmmem.paths import recorded_path_candidates
from lmmem.safety import create_temp_file

__all__ = [
    "CHECKPOINT_FORMAT_VERSION", "CHECKPOINT_KIND", "DEFAULT_RUN", "EVAL_KEYS", "EXPORT_KIND", "RESUME_KEYS",
    "TEMP_PATTERNS", "check_vocab_matches", "checkpoint_in", "data_dir_for", "export_as_checkpoint", "is_export",
    "load_checkpoint", "load_export", "model_from_checkpoint", "resolve_device", "save_checkpoint",
]

# where train.py writes without --out, and so where evaluate.py looks without a checkpoint
DEFAULT_RUN = "runs/default"
CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_KIND = "lmmem-checkpoint"
# What evaluating (and, with the optimizer's state, resuming) needs; a loadable file without one of
# these is refused with one line instead of a KeyError later.
EVAL_KEYS = ("model_config", "train_config", "vocab_fingerprint", "model", "progress")
RESUME_KEYS = (*EVAL_KEYS, "vocab_size", "optimizer", "scheduler")
# A vocabulary beyond this is a corrupt or crafted checkpoint, not a model (it would try to allocate
# the embedding before anything else failed).
MAX_VOCAB_SIZE = 1 << 26
TEMP_PATTERNS = (".*.pt.*.tmp",)  # save_checkpoint's temporary files

EXPORT_KIND = "lmmem-export"
EXPORT_FORMAT_VERSION = 1
WEIGHTS, VOCAB, CONFIG = "model.safetensors", "vocab.txt", "config.json"


# ---------------------------------------------------------------------------------------------
# checkpoint files


class _RecordingWriter:
    """torch.save reports a failed write (a full disk) as RuntimeError("unexpected pos ...");
    this keeps the OSError underneath so that the caller can say what happened."""

    def __init__(self, f):
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(payload: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"kind": CHECKPOINT_KIND, "format_version": CHECKPOINT_FORMAT_VERSION, **payload}
    # the permissions of any file the user writes (umask), not mkstemp's 0600: a checkpoint is shared too
    fd, tmp = create_temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _RecordingWriter(f)
            try:
                torch.save(payload, writer)
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file: name the target
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def checkpoint_in(folder: Path) -> Path | None:
    """A run folder's checkpoint to read: ``best.pt``, else ``last.pt``; None when it has neither."""
    return next((folder / n for n in ("best.pt", "last.pt") if (folder / n).is_file()), None)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", *, require: tuple[str, ...] = EVAL_KEYS) -> dict:
    """The checkpoint at ``path``: a file, a run folder (best.pt, else last.pt) or an export folder."""
    path = Path(path)
    if path.is_dir():
        if is_export(path):  # weights + vocab + config: a checkpoint without optimizer state
            return export_as_checkpoint(path, map_location)
        found = checkpoint_in(path)
        if found is None:
            raise CheckpointError(f"{path} holds no best.pt or last.pt; train first with `python train.py --out {path}`")
        path = found
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; give the path of a best.pt/last.pt written by train.py")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, wrong file type, unpickling refused...
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "it is truncated or not an lmmem checkpoint: use the run's other checkpoint (best.pt/last.pt) or retrain"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is not an lmmem checkpoint (no kind={CHECKPOINT_KIND!r}); give a file written by train.py")
    if ckpt.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {ckpt.get('format_version')}, this lmmem reads {CHECKPOINT_FORMAT_VERSION}; "
            "use the lmmem version that wrote it"
        )
    _check_contents(ckpt, path, require)
    return ckpt


def _check_contents(ckpt: dict, path: Path, require: tuple[str, ...]) -> None:
    """Refuse a loadable file that lacks what the caller needs, or describes an absurd model."""
    missing = [k for k in require if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}: it is damaged or not written by train.py; use the run's other checkpoint or retrain")
    if any(not isinstance(ckpt.get(k, {}), dict) for k in ("model_config", "train_config", "progress", "model")):
        raise CheckpointError(f"{path} has a malformed model_config/train_config/progress/model; use the run's other checkpoint or retrain")
    if "model_config" not in ckpt:
        return
    v = ckpt["model_config"].get("vocab_size")
    if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= MAX_VOCAB_SIZE or v != ckpt.get("vocab_size", v):
        raise CheckpointError(
            f"{path} describes a vocabulary of {v!r} entries (its vocab_size says {ckpt.get('vocab_size')!r}); "
            f"a checkpoint needs 1..{MAX_VOCAB_SIZE:,}: it is damaged or crafted, use another checkpoint"
        )


def _run_dir(ckpt_path: str | Path) -> Path:
    p = Path(ckpt_path)
    return p if p.is_dir() else p.parent


def data_dir_for(ckpt: dict, data: str | Path | None, ckpt_path: str | Path = "checkpoint") -> Path:
    """``--data`` if given, else the corpus the checkpoint was trained on. The checkpoint's path is
    only a default to read from (a copied or crafted file may name anything): it is checked here and
    never written to. A relative path (runs made before paths were stored absolute) is looked for
    where the run was started, then in the current folder (see :mod:`lmmem.paths`)."""
    if data is not None:
        return Path(data)
    train_config = ckpt.get("train_config", {})
    saved = train_config.get("data")
    if isinstance(saved, str) and saved:
        tried = recorded_path_candidates(saved, _run_dir(ckpt_path), train_config.get("out"))
        for candidate in tried:
            if candidate.is_dir():
                return candidate
        where = f" (looked in {', '.join(map(str, tried))})" if len(tried) > 1 else ""
    else:
        where = ""
    raise CheckpointError(
        f"{ckpt_path} was trained on the corpus {saved!r}, which is not a folder on this machine{where}; "
        "pass --data DIR (the prepared corpus the model was trained on)"
    )


def check_vocab_matches(ckpt: dict, fingerprint: str, data_root: str | Path, ckpt_path: str | Path = "checkpoint") -> None:
    if ckpt.get("vocab_fingerprint") != fingerprint:
        raise CheckpointError(
            f"{ckpt_path} was trained with vocabulary {ckpt.get('vocab_fingerprint')} but {data_root} has vocabulary "
            f"{fingerprint}: evaluate on the data the model was trained on (--data), or encode the other text with the "
            f"model's vocabulary (python -m data_prep CORPUS --source TEXT --vocab-from {ckpt_path} --out DIR) and pass --data DIR"
        )


def model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (eval mode)."""
    try:
        config = ModelConfig.from_dict(ckpt["model_config"])
        # Build on the meta device first: shapes are compared with the saved weights before any
        # memory is allocated, so an absurd config cannot exhaust memory.
        with torch.device("meta"):
            shapes = {k: tuple(t.shape) for k, t in build_model(config).state_dict().items() if isinstance(t, torch.Tensor)}
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint has an unusable model_config ({str(e).splitlines()[0][:160]}); use another checkpoint") from None
    saved = {k: tuple(t.shape) for k, t in ckpt["model"].items() if isinstance(t, torch.Tensor)}
    # A key the model has and the file lacks is left to load_state_dict: a layer fills state that
    # checkpoints written before it existed do not hold (the Hebbian layer's pass), and anything else
    # missing is refused there.
    wrong = {k for k in saved if shapes.get(k) != saved[k]}
    if wrong:
        bad = sorted((k, saved[k], shapes.get(k)) for k in wrong)[:2]
        raise CheckpointError(f"checkpoint weights do not fit the model it describes (e.g. {bad}); use another checkpoint")
    model = build_model(config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit the model it describes ({str(e).splitlines()[0][:160]})") from None
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# export folders (written by lmmem.training.export)


def safetensors_torch():
    """``safetensors.torch``; a one-line error when the package is missing (an optional extra)."""
    try:
        import safetensors.torch
    except ImportError:  # pragma: no cover - depends on the environment
        raise LmmemError("exports need the safetensors package: pip install 'lmmem[hf]' (or pip install safetensors)") from None
    return safetensors.torch


def is_export(path: str | Path) -> bool:
    path = Path(path)
    if not (path.is_dir() and (path / CONFIG).is_file()):
        return False
    try:
        return json.loads((path / CONFIG).read_text(encoding="utf-8")).get("kind") == EXPORT_KIND
    except (ValueError, OSError):
        return False


def load_export(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Vocabulary, dict]:
    """``(model in eval mode, vocabulary, config)`` of an export folder."""
    st = safetensors_torch()
    path = Path(path)
    if not is_export(path):
        raise CheckpointError(f"{path} is not an lmmem export (no {CONFIG} with kind={EXPORT_KIND!r}); "
                              "write one with `python -m lmmem.training.export RUN/best.pt --out DIR`")
    config = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    if config.get("format_version") != EXPORT_FORMAT_VERSION:
        raise CheckpointError(f"{path} has export format {config.get('format_version')}, this lmmem reads "
                              f"{EXPORT_FORMAT_VERSION}; use the lmmem version that wrote it")
    vocab = Vocabulary.load(path / VOCAB)
    if vocab.fingerprint != config["vocab_fingerprint"]:
        raise CheckpointError(f"{path}/{VOCAB} is not the vocabulary of {path}/{WEIGHTS}; export the run again")
    model = build_model(ModelConfig.from_dict(config["model_config"]))
    try:
        st.load_model(model, str(path / WEIGHTS), strict=True)
    except Exception as e:  # truncated file, other model
        raise CheckpointError(f"cannot load {path}/{WEIGHTS} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                              "export the run again") from None
    return model.to(device).eval(), vocab, config


def export_as_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """An export seen as a checkpoint dict (model weights, configs, step; no optimizer), so that
    evaluation takes an export folder wherever it takes a checkpoint."""
    model, _, config = load_export(path, map_location)
    return {
        "kind": CHECKPOINT_KIND,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "model_config": config["model_config"],
        "train_config": {"data": config["data"], "bptt": config["bptt"]},
        "vocab_fingerprint": config["vocab_fingerprint"],
        "vocab_size": config["vocab_size"],
        "model": model.state_dict(),
        "progress": {"step": config["step"]},
    }
