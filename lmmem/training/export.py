"""Export a train.py run as portable weights: ``model.safetensors`` + ``vocab.txt`` + ``config.json``.

    python -m lmmem.training.export runs/gut/best.pt --out exports/gut
    python evaluate.py exports/gut --split test          # evaluates the export like a checkpoint

A checkpoint (``best.pt``/``last.pt``) carries everything needed to *continue* training: optimizer
moments, RNG states, the carried LSTM state, the data position. An export keeps only what is needed
to *use* the model: the weights (safetensors, shared tensors such as tied embeddings stored once; the
Hebbian ``counts`` included, as they are part of the layer's state), the vocabulary it was trained
with and the model config. It is written to a temporary folder beside the target and renamed into
place, and an existing target is never overwritten; its files get the permissions of any other file
the user writes (an export is meant to be shared). Reading an export is
:func:`lmmem.checkpoints.load_export` (and :func:`~lmmem.checkpoints.load_checkpoint` takes an
export folder). Needs the ``safetensors`` package (in ``pip install 'lmmem[hf]'``).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from lmmem.checkpoints import (
    CONFIG, EXPORT_FORMAT_VERSION, EXPORT_KIND, VOCAB, WEIGHTS, check_vocab_matches, data_dir_for, load_checkpoint,
    model_from_checkpoint, safetensors_torch,
)
from lmmem.cli import ArgumentParser, run_cli
from lmmem.data.corpus import PreparedCorpus
from lmmem.errors import LmmemError
from lmmem.paths import absolute
from lmmem.safety import create_temp_folder


def export_run(checkpoint: str | Path, out: str | Path, *, data: str | Path | None = None) -> Path:
    """Write the model of ``checkpoint`` (a best.pt/last.pt or a run folder) to the new folder ``out``.
    ``data``: the prepared corpus it was trained on (default: the one recorded in the checkpoint),
    whose ``vocab.txt`` is copied after checking that it is the checkpoint's vocabulary."""
    st = safetensors_torch()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmmemError(f"{out} already exists; choose another --out (an export never overwrites)")
    ckpt = load_checkpoint(checkpoint)
    data_dir = data_dir_for(ckpt, data, checkpoint)
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
        "data": absolute(data_dir),  # absolute: the export is evaluated from other folders
        "source_checkpoint": absolute(checkpoint),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = create_temp_folder(out.parent, prefix=f".{out.name}.")
    try:
        st.save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt", "kind": EXPORT_KIND})
        corpus.vocab.save(tmp / VOCAB)
        # safetensors creates its file 0600: give it the mode the vocabulary got (the user's umask)
        shutil.copymode(tmp / VOCAB, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="best.pt / last.pt written by train.py (or the run folder)")
    p.add_argument("--out", required=True, help="new folder for model.safetensors, vocab.txt and config.json")
    p.add_argument("--data", help="prepared corpus the run was trained on (default: the one recorded in the checkpoint)")
    args = p.parse_args(argv)
    out = export_run(args.checkpoint, args.out, data=args.data)
    print(f"exported {args.checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
