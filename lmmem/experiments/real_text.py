"""Test-time memories on real text (issue 20, acceptance "Real text"): tiny GPT-2 and Llama models
trained with the Hugging Face Trainer and lmmem's tiny LSTM, on the three shared corpora, 3 seeds.

    python -m lmmem.experiments.real_text train --work /work/exp/NAME [--seeds 1 2 3]

``train`` prepares the corpora with the data_prep commands of the reproduction runs
(docs/results/reproduction-*.md, so the LSTM numbers compare with those pages) into WORK/data and
trains the grid into WORK/runs/CORPUS/{lstm,gpt2,llama}-seedS, one run at a time, each in its own
process with its log in WORK/logs. Finished runs are skipped and interrupted ones continued, so
the command is simply repeated after an interruption. It writes WORK/training.json: per run the
steps, tokens, words, wall time and best validation loss and perplexity (per token and per word).

The HF models read the prepared corpus as text (:meth:`PreparedCorpus.text_units`), so every model
of a corpus is scored on the same words: see :mod:`lmmem.experiments.train_hf`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from lmmem.cli import ArgumentParser, run_cli
from lmmem.errors import LmmemError
from lmmem.jsonio import write_json

REPO = Path(__file__).resolve().parents[2]
# data_prep arguments (after the corpus's source folder) and training steps, as in the reproduction
# runs (lmmem.experiments.softmax_comparison, docs/results/reproduction-*.md). The HF models take
# 0.6× the LSTM's steps at 4 × 256 = 1,024 BPE tokens a step (the LSTM: 32 × 35 = 1,120 words), so
# that one run costs about 10 minutes of one core: about half the LSTM's words.
CORPORA = {
    "gutenberg": {"prep": ["gutenberg", "--encoding-errors", "fallback"], "source": "gutenberg", "lstm_steps": 2000, "hf_steps": 1200},
    "news-abc": {"prep": ["gigaword", "--encoding-errors", "fallback"], "source": "news-abc", "lstm_steps": 2000, "hf_steps": 1200},
    "wikitext-2": {"prep": ["wikitext-103", "--train-from", "valid"], "source": "wikitext-2", "lstm_steps": 1500, "hf_steps": 900},
}
MODELS = ("gpt2", "llama", "lstm")
LSTM_TOKENS_PER_STEP = 32 * 35  # the tiny preset's batch × bptt


def prepare_command(corpus: str, shared: Path, data: Path) -> list[str]:
    spec = CORPORA[corpus]
    return [sys.executable, "-m", "data_prep", spec["prep"][0], "--source", str(shared / spec["source"]),
            "--out", str(data / corpus), *spec["prep"][1:]]


def train_command(model: str, corpus: str, seed: int, data: Path, out: Path) -> list[str]:
    """The command that trains (or continues) one run of the grid."""
    spec = CORPORA[corpus]
    if model == "lstm":
        return [sys.executable, "train.py", "--data", str(data / corpus), "--preset", "tiny", "--softmax", "full",
                "--seed", str(seed), "--out", str(out), "--max-steps", str(spec["lstm_steps"]), "--no-progress"]
    return [sys.executable, "-m", "lmmem.experiments.train_hf", "--data", str(data / corpus), "--arch", model,
            "--seed", str(seed), "--out", str(out), "--steps", str(spec["hf_steps"])]


def lstm_state(cmd: list[str]) -> str:
    """finished / resumable / new for the LSTM run of ``cmd`` (softmax_comparison's rule)."""
    from lmmem.experiments.softmax_comparison import run_state
    from lmmem.training import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(cmd[2:]))
    return run_state(Path(cfg.out), cfg)


def run_one(cmd: list[str], log: Path, extra: list[str]) -> None:
    """Run ``cmd`` (+ ``extra`` flags) to completion with its output in ``log`` (appended: a
    resumed run's log keeps its first part). One torch thread, one tokenizers thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"\n$ {shlex.join(cmd + extra)}\n")
        f.flush()
        rc = subprocess.run(cmd + extra, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise LmmemError(f"{shlex.join(cmd + extra)} exited with {rc}; see {log}")


def lstm_record(out: Path) -> dict:
    from lmmem.training import load_checkpoint

    last = load_checkpoint(out / "last.pt")
    progress = last["progress"]
    loss = progress["best_val_loss"]
    unique = {t.data_ptr(): t for t in last["model"].values()}  # tied weights counted once
    embedding = next(t.numel() for k, t in last["model"].items() if "embed" in k or "encoder.weight" in k)
    total = sum(t.numel() for t in unique.values())
    return {"parameters": {"total": total, "embedding": embedding, "non_embedding": total - embedding},
            "steps": progress["step"], "best_step": progress["best_step"], "train_tokens": progress["tokens"],
            "train_words": progress["tokens"], "train_seconds": round(last.get("train_seconds") or 0.0, 1),
            "valid_word_loss": loss, "valid_word_perplexity": math.exp(loss),
            "valid_token_loss": loss, "valid_token_perplexity": math.exp(loss)}


def hf_record(out: Path) -> dict:
    run = json.loads((out / "run.json").read_text())
    v = run["valid"]
    ratio = run["split_tokens"]["train"] / run["split_words"]["train"]
    return {"steps": run["steps"], "best_step": run["best_step"], "train_tokens": run["train_tokens"],
            "train_words": round(run["train_tokens"] / ratio), "tokens_per_word": {s: run["split_tokens"][s] / run["split_words"][s] for s in run["split_words"]},
            "train_seconds": run["train_seconds"], "parameters": run["model"]["parameters"],
            "valid_block_loss": v["block_loss"], "valid_token_loss": v["token_loss"], "valid_token_perplexity": v["token_perplexity"],
            "valid_word_loss": v["word_loss"], "valid_word_perplexity": v["word_perplexity"]}


def train_grid(work: Path, shared: Path, corpora: list[str], seeds: list[int], models: list[str]) -> dict:
    """Prepare the corpora and train every (seed, corpus, model) not finished yet, seed by seed (so
    that an early stop leaves whole seeds); returns the records of the finished runs."""
    data, runs, logs = work / "data", work / "runs", work / "logs"
    commands = []
    for corpus in corpora:
        cmd = prepare_command(corpus, shared, data)
        commands.append(cmd)
        if not (data / corpus / "meta.json").is_file():
            run_one(cmd, logs / f"prepare-{corpus}.log", [])
    records: dict = {}
    for seed in seeds:
        for corpus in corpora:
            for model in models:
                out = runs / corpus / f"{model}-seed{seed}"
                cmd = train_command(model, corpus, seed, data, out)
                commands.append(cmd)
                log = logs / f"{corpus}-{model}-seed{seed}.log"
                if model == "lstm":
                    state = lstm_state(cmd)
                    if state != "finished":
                        t0 = time.monotonic()
                        print(f"training {out} ({state})", flush=True)
                        run_one(cmd, log, ["--resume"] if state == "resumable" else ["--overwrite"] if out.exists() else [])
                        print(f"  done in {(time.monotonic() - t0) / 60:.1f} min", flush=True)
                    record = lstm_record(out)
                else:
                    if not (out / "run.json").is_file():
                        t0 = time.monotonic()
                        print(f"training {out}", flush=True)
                        run_one(cmd, log, [])
                        print(f"  done in {(time.monotonic() - t0) / 60:.1f} min", flush=True)
                    record = hf_record(out)
                records.setdefault(corpus, {}).setdefault(model, []).append({"seed": seed, "out": _rel(out, work), **record})
                write_json(_summary(commands, records, work, shared), work / "training.json")  # after every run
    return _summary(commands, records, work, shared)


def _summary(commands, records, work: Path, shared: Path) -> dict:
    import platform

    import torch

    return {"commands": [shlex.join(_portable(c, work, shared)) for c in commands], "runs": records,
            "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                        "python": platform.python_version(), "threads": 1}}


def _rel(path: Path, work: Path) -> str:
    return path.relative_to(work).as_posix()


def _portable(cmd: list[str], work: Path, shared: Path) -> list[str]:
    """A command as the page shows it: ``python``, WORK and the shared data folder by name."""
    out = ["python" if c == sys.executable else c for c in cmd]
    return [c.replace(str(work), "WORK").replace(str(shared), "../shared/data") for c in out]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m lmmem.experiments.real_text", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="prepare the corpora and train the grid (skips finished runs)")
    t.add_argument("--work", required=True, help="folder for data/, runs/, logs/ and training.json")
    t.add_argument("--shared", default=str(REPO.parent / "shared" / "data"), help="the shared corpora folder")
    t.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    t.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    t.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        work = Path(args.work).resolve()
        train_grid(work, Path(args.shared).resolve(), args.corpora, args.seeds, args.models)
        print(f"wrote {work / 'training.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
