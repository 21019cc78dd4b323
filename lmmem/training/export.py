"""Export a train.py run as portable weights: ``model.safetensors`` + ``vocab.txt`` + ``config.json``.

    python -m lmmem.training.export runs/gut/best.pt --out exports/gut
    python evaluate.py exports/gut --split test          # evaluates the export like a checkpoint

A checkpoint (``best.pt``/``last.pt``) carries everything needed to *continue* training: optimizer
moments, RNG states, the carried LSTM state, the data position. An export keeps only what is needed
to *use* the model: the weights (safetensors, shared tensors such as tied embeddings stored once; the
Hebbian ``counts`` included, as they are part of the layer's state), the vocabulary it was trained
with and the model config. It is written to a temporary folder beside the target and renamed into
place, and an existing target is never overwritten. Needs the ``safetensors`` package (in
``pip install 'lmmem[hf]'``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from lmmem.cli import ArgumentParser
from lmmem.data.corpus import PreparedCorpus
from lmmem.data.vocab import Vocabulary
from lmmem.errors import CheckpointError, LmmemError
from lmmem.training.checkpoint import CHECKPOINT_FORMAT_VERSION, CHECKPOINT_KIND, check_vocab_matches, load_checkpoint

EXPORT_KIND = "lmmem-export"
EXPORT_FORMAT_VERSION = 1
WEIGHTS, VOCAB, CONFIG = "model.safetensors", "vocab.txt", "config.json"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:  # pragma: no cover - depends on the environment
        raise LmmemError("exporting needs the safetensors package: pip install 'lmmem[hf]' (or pip install safetensors)") from None
    return safetensors.torch


def is_export(path: str | Path) -> bool:
    path = Path(path)
    if not (path.is_dir() and (path / CONFIG).is_file()):
        return False
    try:
        return json.loads((path / CONFIG).read_text(encoding="utf-8")).get("kind") == EXPORT_KIND
    except (ValueError, OSError):
        return False


def export_run(checkpoint: str | Path, out: str | Path, *, data: str | Path | None = None) -> Path:
    """Write the model of ``checkpoint`` (a best.pt/last.pt or a run folder) to the new folder ``out``.
    ``data``: the prepared corpus it was trained on (default: the one recorded in the checkpoint),
    whose ``vocab.txt`` is copied after checking that it is the checkpoint's vocabulary."""
    from lmmem.training.checkpoint import model_from_checkpoint

    st = _safetensors()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmmemError(f"{out} already exists; choose another --out (an export never overwrites)")
    ckpt = load_checkpoint(checkpoint)
    data_dir = Path(data) if data is not None else Path(ckpt["train_config"]["data"])
    corpus = PreparedCorpus.open(data_dir)
    check_vocab_matches(ckpt, corpus.fingerprint, data_dir, checkpoint)
    model = model_from_checkpoint(ckpt)
    config = {
        "kind": EXPORT_KIND,
        "format_version": EXPORT_FORMAT_VERSION,
        "model_config": ckpt["model_config"],
        "vocab_fingerprint": corpus.fingerprint,
        "vocab_size": len(corpus.vocab),
        "step": int(ckpt["progress"]["step"]),
        "bptt": int(ckpt["train_config"]["bptt"]),
        "data": str(data_dir),
        "source_checkpoint": str(checkpoint),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        st.save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt", "kind": EXPORT_KIND})
        corpus.vocab.save(tmp / VOCAB)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_export(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Vocabulary, dict]:
    """``(model in eval mode, vocabulary, config)`` of an export folder."""
    from lmmem.models import build_model
    from lmmem.models.config import ModelConfig

    st = _safetensors()
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
    :func:`lmmem.evaluation.evaluate_checkpoint` and evaluate.py take an export folder."""
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


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="best.pt / last.pt written by train.py (or the run folder)")
    p.add_argument("--out", required=True, help="new folder for model.safetensors, vocab.txt and config.json")
    p.add_argument("--data", help="prepared corpus the run was trained on (default: the one recorded in the checkpoint)")
    args = p.parse_args(argv)
    out = export_run(args.checkpoint, args.out, data=args.data)
    print(f"exported {args.checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    import sys

    from lmmem.cli import run_cli

    sys.exit(run_cli(main))
