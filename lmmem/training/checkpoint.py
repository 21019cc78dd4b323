"""Checkpoints: plain state dicts, written atomically, loadable with ``weights_only=True``.

A checkpoint is a dict of tensors and plain Python values (never a pickled model object)::

    format_version, kind           what this file is, so a stranger file is refused clearly
    model_config, train_config     dicts to rebuild the model and continue training
    vocab_fingerprint, vocab_size  the vocabulary the model was trained on (see lmmem.data.vocab)
    model, optimizer, scheduler    state dicts
    progress                       step, epoch, position in the epoch, tokens seen, best validation
    rng                            torch CPU/CUDA generator states of every rank
    carried_state                  the truncated-BPTT state of the global batch (LSTM h, c)

It is written to a temporary file in the same folder, flushed to disk, then renamed over the
target: a crash or Ctrl-C mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from lmmem.errors import CheckpointError

CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_KIND = "lmmem-checkpoint"


def save_checkpoint(payload: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"kind": CHECKPOINT_KIND, "format_version": CHECKPOINT_FORMAT_VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        from lmmem.training.export import export_as_checkpoint, is_export

        if is_export(path):  # an export folder (weights + vocab + config) reads as a checkpoint without optimizer
            return export_as_checkpoint(path, map_location)
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"{path} holds no best.pt or last.pt; train first with `python train.py --out {path}`")
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
    return ckpt


def check_vocab_matches(ckpt: dict, fingerprint: str, data_root: str | Path, ckpt_path: str | Path = "checkpoint") -> None:
    if ckpt.get("vocab_fingerprint") != fingerprint:
        raise CheckpointError(
            f"{ckpt_path} was trained with vocabulary {ckpt.get('vocab_fingerprint')} but {data_root} has vocabulary "
            f"{fingerprint}: evaluate on the data the model was trained on (--data), or retrain"
        )


def model_from_checkpoint(ckpt: dict, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the model a checkpoint describes and load its weights (eval mode)."""
    from lmmem.models import build_model
    from lmmem.models.config import ModelConfig

    model = build_model(ModelConfig.from_dict(ckpt["model_config"]))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint weights do not fit the model it describes ({str(e).splitlines()[0][:160]})") from None
    return model.to(device).eval()
