"""Test-time memories on real text (issue 20, acceptance "Real text"): tiny GPT-2 and Llama models
trained with the Hugging Face Trainer and lmmem's tiny LSTM, on the three shared corpora, 3 seeds.

    python -m lmmem.experiments.real_text train --work /work/exp/NAME [--seeds 1 2 3]

``train`` prepares the corpora with the data_prep commands of the reproduction runs
(docs/results/reproduction-*.md, so the LSTM numbers compare with those pages) into WORK/data and
trains the grid into WORK/runs/CORPUS/{lstm,gpt2,llama}-seedS, one run at a time, each in its own
process with its log in WORK/logs. Finished runs are skipped and interrupted ones continued, so
the command is simply repeated after an interruption. It writes WORK/training.json: per run the
steps, tokens, words, wall time and best validation loss and perplexity (per token and per word).
Two calls for different corpora or seeds may run at once: the summary files are merged under a
lock, re-read at every write.

    python -m lmmem.experiments.real_text evaluate --work /work/exp/NAME [--out DIR] [--max-tokens N]

``evaluate`` takes every trained run of WORK/runs, builds its kNN-LM datastore over the train split
(WORK/ds/CORPUS/MODEL-seedS, ``lmmem datastore``) and scores the test split with every test-time
memory tuned on the valid split in one ``evaluate.py`` call (base, +cache, +knn, +cache+knn,
+dynamic, +dynamic+cache+knn) into WORK/eval/CORPUS/MODEL-seedS.json. Finished datastores and
evaluations are skipped (a datastore build interrupted is continued by ``lmmem datastore`` itself).
It writes OUT/real-text-evaluation.json (portable: no path of this machine) and the tables of the
results page (``.md``). The HF models read windows of their context (256) advancing by half of it
(``--window sliding --context 128``), for the datastore as for the evaluation, so every token is
predicted from at least 128 tokens; the LSTM reads lmmem's bptt rows and carries its state. With
``--max-tokens`` the LSTM scores as many words as the HF evaluation of its seed on disk did (it is
skipped, with a line saying so, until there is one).

The HF models read the prepared corpus as text (:meth:`PreparedCorpus.text_units`), so every model
of a corpus is scored on the same words (per-word numbers: the sum of a word's BPE tokens'
log-probabilities): see :mod:`lmmem.experiments.train_hf`.
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
from lmmem.experiments.paths import portable_command
from lmmem.jsonio import write_json
from lmmem.safety import FolderLock

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
HF_CONTEXT = 128  # sliding windows: half the HF models' 256-token context, Hugging Face's usual stride
# evaluate.py's method names → the page's columns ("+all": every memory on the adapting model)
METHODS = {"plain": "base", "+cache": "+cache", "+knn": "+kNN", "+cache+knn": "+cache+kNN",
           "+dynamic": "+dynamic", "+dynamic+cache+knn": "+all"}
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


def trained(model: str, corpus: str, run: Path) -> bool:
    """Whether ``run`` finished training: an HF run writes run.json at its end; an LSTM run has a
    best.pt from its first validation on, so its last.pt must have reached the grid's step count
    (an interrupted run is not evaluated as if it were finished)."""
    if model != "lstm":
        return (run / "run.json").is_file()
    return (run / "best.pt").is_file() and (run / "last.pt").is_file() and steps_done(run / "last.pt") >= CORPORA[corpus]["lstm_steps"]


def steps_done(last: Path) -> int:
    from lmmem.training import load_checkpoint

    return load_checkpoint(last)["progress"]["step"]


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
                update_summary(work / "training.json", _summary(commands, records, work, shared))  # after every run
    return update_summary(work / "training.json", _summary(commands, records, work, shared))


def _summary(commands, records, work: Path, shared: Path) -> dict:
    return {"commands": [shlex.join(_portable(c, work, shared)) for c in commands], "runs": records,
            "machine": _machine()}


def _read_summary(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def update_summary(path: Path, new: dict) -> dict:
    """Merge ``new`` into the summary file at ``path`` and write it; returns the merged summary.

    The file is re-read under an exclusive lock at every write, not once at the start: two grid
    processes (say ``--corpora gutenberg`` and ``--corpora wikitext-2``) each finish runs while the
    other trains, and a merge into a copy read at start-up dropped the other's newer records."""
    with FolderLock(path.with_name(path.name + ".lock"), str(path), wait=True):
        merged = merge_summaries(_read_summary(path), new)
        write_json(merged, path)
    return merged


def merge_summaries(old: dict, new: dict) -> dict:
    """``new`` with the runs and commands of ``old`` that it does not hold, so that a call for some
    corpora or seeds keeps the records an earlier call wrote for others (the file is the grid's
    whole record, not the last call's). A (corpus, model, seed) in both takes ``new``'s record."""
    runs = {c: {m: list(rs) for m, rs in ms.items()} for c, ms in old.get("runs", {}).items()}
    for corpus, models in new["runs"].items():
        for model, recs in models.items():
            fresh = {r["seed"] for r in recs}
            kept = [r for r in runs.get(corpus, {}).get(model, []) if r["seed"] not in fresh]
            runs.setdefault(corpus, {})[model] = sorted(kept + recs, key=lambda r: r["seed"])
    commands = list(dict.fromkeys([*old.get("commands", []), *new["commands"]]))
    return {**old, **new, "commands": commands, "runs": runs}


def _machine() -> dict:
    import platform

    import torch

    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "threads": 1}


def _rel(path: Path, work: Path) -> str:
    return path.relative_to(work).as_posix()


def _portable(cmd: list[str], work: Path, shared: Path) -> list[str]:
    """A command as the page shows it: ``python``, WORK and the shared data folder by name."""
    out = ["python" if c == sys.executable else c for c in cmd]
    return [c.replace(str(work), "WORK").replace(str(shared), "../shared/data") for c in out]


def _window(model: str, context: int) -> list[str]:
    return ["--window", "sliding", "--context", str(context)] if model != "lstm" and context else []


def datastore_command(model: str, run: Path, data: Path, ds: Path, context: int = HF_CONTEXT) -> list[str]:
    """``lmmem datastore`` over the train split, read with the evaluation's windows."""
    return [sys.executable, "-m", "lmmem", "datastore", str(run), "--data", str(data), "--split", "train",
            "--out", str(ds), *_window(model, context)]


def evaluate_command(model: str, run: Path, data: Path, ds: Path, out: Path, *, name: str,
                     context: int = HF_CONTEXT, max_tokens: int = 0, extra: tuple = ()) -> list[str]:
    """``evaluate.py`` on the test split with every memory, all tuned on valid, in one call."""
    return [sys.executable, "evaluate.py", str(run), "--data", str(data), "--split", "test", "--name", name,
            "--cache", "--knn", str(ds), "--dynamic", "--tune", "--json", str(out), *_window(model, context),
            *(["--max-tokens", str(max_tokens)] if max_tokens else []), *extra]


def eval_record(result: dict) -> dict:
    """The numbers of one evaluate.py JSON the page shows, per *word* (for the HF models the sum of a
    word's tokens' log-probabilities; the LSTM's tokens are the words), and the tuned values."""
    def words(report: dict) -> dict:
        return report.get("words") or report  # a word-level model has no separate per-word table

    methods = {}
    for name, report in result["methods"].items():
        w = words(report)
        methods[name] = {"word_perplexity": w["perplexity"], "token_perplexity": report["perplexity"],
                         "buckets": {b["name"]: b["perplexity"] for b in w["buckets"]}}
    plain = words(result["methods"]["plain"])
    tuned = result.get("tuned") or {}
    return {"tokens": result["tokens"], "words": plain["tokens"],
            "bucket_share": {b["name"]: b["share"] for b in plain["buckets"]},
            "window": result["window"], "datastore": {k: result["datastore"][k] for k in ("count", "index")},
            "seconds": result["seconds"], "pass_seconds": result.get("pass_seconds"),
            "tuned": tuned.get("choice"), "valid_token_perplexity": tuned.get("valid_perplexity"),
            "dynamic_lr_grid": tuned.get("dynamic_lr_grid"), "diverged": result.get("diverged"), "methods": methods}


def evaluate_grid(work: Path, corpora: list[str], seeds: list[int], models: list[str], *, context: int = HF_CONTEXT,
                  max_tokens: int = 0, extra: tuple = ()) -> dict:
    """Datastore and evaluation of every trained run of WORK/runs not done yet, one at a time;
    returns the summary (portable)."""
    anchors = {work: "WORK"}
    commands, records = [], {}
    for seed in seeds:
        for corpus in corpora:
            for model in models:
                name = f"{model}-seed{seed}"
                run, data = work / "runs" / corpus / name, work / "data" / corpus
                if not trained(model, corpus, run):
                    if run.exists():
                        print(f"skipping {name} ({corpus}): its training has not finished", flush=True)
                    continue
                ds, out = work / "ds" / corpus / name, work / "eval" / corpus / f"{name}.json"
                # the word-level LSTM scores as many words as the HF models did (their --max-tokens
                # counts BPE tokens), so that all three are scored on the same text; read from the HF
                # evaluation on disk, so that a call with --models lstm alone counts the same words
                limit = max_tokens
                if model == "lstm" and max_tokens:
                    limit = _hf_words(work / "eval" / corpus, seed)
                    if limit is None:
                        print(f"skipping {name} ({corpus}): evaluate gpt2 or llama of seed {seed} first "
                              "(with --max-tokens the LSTM scores as many words as they did)", flush=True)
                        continue
                steps = [(datastore_command(model, run, data, ds, context), ds / "manifest.json"),
                         (evaluate_command(model, run, data, ds, out, name=name, context=context,
                                           max_tokens=limit, extra=extra), out)]
                for cmd, done in steps:
                    commands.append(portable_command(cmd[1:], "python", anchors))
                    if not done.is_file():
                        t0 = time.monotonic()
                        print(f"{shlex.join(cmd[1:3])} {name} ({corpus})", flush=True)
                        run_one(cmd, work / "logs" / f"{corpus}-{name}-{'datastore' if done.name == 'manifest.json' else 'eval'}.log", [])
                        print(f"  done in {(time.monotonic() - t0) / 60:.1f} min", flush=True)
                record = eval_record(json.loads(out.read_text()))
                records.setdefault(corpus, {}).setdefault(model, []).append({"seed": seed, **record})
    settings = {"split": "test", "tuned_on": "valid", "max_tokens": max_tokens,
                "hf_window": f"sliding, context {context}" if context else "bptt", "lstm_window": "bptt", "methods": METHODS}
    return {"commands": commands, "runs": records, "machine": _machine(), "settings": settings}


def _hf_words(folder: Path, seed: int) -> int | None:
    """Words scored by the first HF model evaluated for ``seed`` in ``folder``, or None."""
    for model in MODELS:
        path = folder / f"{model}-seed{seed}.json"
        if model != "lstm" and path.is_file():
            return eval_record(json.loads(path.read_text()))["words"]
    return None


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 1000 else f"{x:.1f}"


def render_tables(summary: dict) -> str:
    """Markdown: per corpus and model, test word perplexity overall and by bucket for every method
    (geometric mean over the seeds; a memory's cell gives its change from the base in %), with more
    than one seed each seed's own word perplexity (base) or change (a memory) beside it, and the
    tuned values."""
    lines = []
    for corpus, by_model in summary["runs"].items():
        for model, runs in by_model.items():
            seeds = [r["seed"] for r in runs]
            first = runs[0]
            buckets = list(first["bucket_share"])
            lines += [f"**{corpus}, {model}** (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; "
                      f"{first['words']:,} test words, {first['tokens']:,} tokens)", "",
                      "| method | word ppl | " + " | ".join(f"{b} ppl" for b in buckets) + " |" + (" per seed |" if len(seeds) > 1 else ""),
                      "|---|" + "---:|" * (len(buckets) + 1) + ("---:|" if len(seeds) > 1 else "")]

            def mean(method, key=None, among=None):
                """Geometric mean over the runs that have ``among`` (default: ``method``)."""
                vals = [r["methods"][method]["word_perplexity"] if key is None else r["methods"][method]["buckets"][key]
                        for r in runs if (among or method) in r["methods"]]
                if any(v is None for v in vals):  # a bucket without words
                    return None
                return math.exp(sum(math.log(v) for v in vals) / len(vals))

            for method, label in summary["settings"]["methods"].items():
                lost = [r["seed"] for r in runs if method in ((r.get("diverged") or {}).get("methods") or ())]
                if len(lost) == len(runs):  # dynamic evaluation diverged on test at the lr chosen on valid
                    lines.append(f"| {label} | diverged on test (seed{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))}) |"
                                 + " |" * (len(buckets) + (len(seeds) > 1)))
                    continue
                if not any(method in r["methods"] for r in runs):
                    continue
                if lost:
                    label += f" (diverged in seed {', '.join(map(str, lost))}; mean of the others, change from their base)"
                cells = []
                for key in [None, *buckets]:
                    v, base = mean(method, key), mean("plain", key, among=method)  # the same seeds' base
                    cells.append("–" if v is None else _fmt(v) if method == "plain"
                                 else f"{_fmt(v)} ({100 * (v / base - 1):+.1f}%)")
                if len(seeds) > 1:
                    cells.append(" / ".join(_seed_cell(r, method) for r in runs))
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
            shares = " | ".join(f"{100 * first['bucket_share'][b]:.1f}%" for b in buckets)
            lines += [f"| word share | 100% | {shares} |" + (" |" if len(seeds) > 1 else ""), ""]
            for r in runs:
                lines.append(f"tuned on valid (seed {r['seed']}): " + _tuned_text(r["tuned"] or {}))
            lines.append("")
    return "\n".join(lines)


def _seed_cell(run: dict, method: str) -> str:
    """One seed's word perplexity (the base) or change from its own base (a memory); – where missing."""
    m, base = run["methods"].get(method), run["methods"]["plain"]
    if m is None:
        return "–"
    if method == "plain":
        return _fmt(m["word_perplexity"])
    return f"{100 * (m['word_perplexity'] / base['word_perplexity'] - 1):+.1f}%"


def _tuned_text(choice: dict) -> str:
    def one(c: dict) -> str:
        parts = []
        if "lr" in c:
            parts.append(f"lr {c['lr']:g}")
        if "theta" in c:
            parts.append(f"θ {c['theta']:g}, λ_cache {c['cache_lambda']:g}")
        if "knn" in c:
            k, t = c["knn"]
            parts.append(f"k {k}, T {t:.3g}, λ_kNN {c['knn_lambda']:g}")
        return ", ".join(parts)

    return "; ".join(f"{METHODS.get(m, m)}: {one(c)}" for m, c in choice.items())


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m lmmem.experiments.real_text", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="prepare the corpora and train the grid (skips finished runs)")
    t.add_argument("--work", required=True, help="folder for data/, runs/, logs/ and training.json")
    t.add_argument("--shared", default=str(REPO.parent / "shared" / "data"), help="the shared corpora folder")
    t.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    t.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    t.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    e = sub.add_parser("evaluate", help="datastores and test-time-memory evaluations of the trained runs (skips finished ones)")
    e.add_argument("--work", required=True, help="the folder `train` wrote (data/, runs/); ds/ and eval/ go there")
    e.add_argument("--out", default=None, help="folder for real-text-evaluation.json/.md (default: WORK)")
    e.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    e.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    e.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    e.add_argument("--context", type=int, default=HF_CONTEXT,
                   help="HF models: sliding windows with at least this many tokens of context (0: bptt windows)")
    e.add_argument("--max-tokens", type=int, default=0,
                   help="score only the first N test (and valid) tokens, 0 for all; the LSTM then scores as many "
                        "words as the HF models of its corpus and seed did")
    e.add_argument("--extra", default="", help="more evaluate.py flags, one quoted string")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        work = Path(args.work).resolve()
        train_grid(work, Path(args.shared).resolve(), args.corpora, args.seeds, args.models)
        print(f"wrote {work / 'training.json'}")
    elif args.command == "evaluate":
        work = Path(args.work).resolve()
        if not (work / "runs").is_dir():
            raise LmmemError(f"{work} has no runs/: train first with python -m lmmem.experiments.real_text train --work {args.work}")
        summary = evaluate_grid(work, args.corpora, args.seeds, args.models, context=args.context,
                                max_tokens=args.max_tokens, extra=tuple(shlex.split(args.extra)))
        out = Path(args.out or work)
        summary = update_summary(out / "real-text-evaluation.json", summary)
        (out / "real-text-evaluation.md").write_text(render_tables(summary) + "\n", encoding="utf-8")
        print(render_tables(summary))
        print(f"wrote {out / 'real-text-evaluation.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
