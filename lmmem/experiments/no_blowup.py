"""No blow-up, measured: trained from scratch beside a full softmax (same seed, so the same initial
weights, batches and dropout noise), does a softmax variant's training loss ever rise above the
full softmax's by more than a margin at the same step?

    python -m lmmem.experiments.no_blowup --work runs/no-blowup \\
        --corpora embedded gutenberg=/tmp/data/gutenberg --archs lstm transformer \\
        --max-steps 300 --seeds 1 2 --page docs/results/no-blowup.md

This is the check behind the Hebbian softmax's default (issue 12): the paper's exact rule copies the
activation's scale and mean direction into a written row, and on a freshly initialised model that
sends the training loss far above the full softmax's (on the embedded corpus, ``python train.py
--softmax hebbian --hebbian-rule paper`` logs a loss above ln V at step 50). ``tests/test_hebbian_rules.py``
guards the same property on a model small enough for the test suite; this command measures it on
real corpora and both architectures.

Each (corpus, architecture, variant, seed) is one ``train.py`` run in ``WORK`` (a finished run is
reused, an interrupted one continued, as in :mod:`lmmem.experiments.softmax_comparison`). The
training loss is the mean over each ``--log-interval`` window, read from the runs' ``metrics.jsonl``;
the excess of a variant is its loss minus the full softmax's in the same window, same seed. A
variant passes when its largest excess, over every window and seed, is at most ``--margin`` nats.
The valid perplexity at the end of each run is reported beside it (validation only; no test split
is read).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
from pathlib import Path

import torch

from lmmem.cli import ArgumentParser
from lmmem.errors import LmmemError, TrainingDiverged
from lmmem.experiments.softmax_comparison import _coerce, parse_variant, run_state
from lmmem.jsonio import dumps
from lmmem.safety import write_text_atomic
from lmmem.training import config_from_args, train
from lmmem.validation import check_flags

DEFAULT_VARIANTS = ["full", "hebbian", "hebbian-paper:softmax=hebbian,hebbian_rule=paper"]


def read_metrics(out: Path) -> tuple[dict[int, float], float | None]:
    """(step → mean training loss of the window ending there, last valid perplexity) of one run."""
    losses, valid = {}, None
    path = out / "metrics.jsonl"
    for line in (path.read_text().splitlines() if path.is_file() else []):  # none: diverged before the first log line
        row = json.loads(line)
        if "train_loss" in row:
            losses[row["step"]] = row["train_loss"]
        if "val_ppl" in row:
            valid = row["val_ppl"]
    return losses, valid


def train_or_reuse(cfg, out: Path, log=print) -> tuple[dict[int, float], float | None, dict | None]:
    """Train OUT (or reuse it: finished with these settings, or diverged with them) and return its
    (step → windowed training loss, last valid perplexity, divergence or None). A run whose loss
    blows up past train.py's divergence limit is a result here, not an error: the step and loss at
    which it stopped are kept in OUT/diverged.json and count as its last window."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("resume", "overwrite", "progress")}
    marker = out / "diverged.json"
    diverged = json.loads(marker.read_text()) if marker.is_file() else None
    if diverged is not None and diverged["settings"] != settings:
        diverged = None  # a run with other settings: train again
    if diverged is None:
        state = run_state(out, cfg)
        if state != "finished":
            log(f"training {out.name}")
            cfg.resume, cfg.overwrite = state == "resumable", state == "new"
            try:
                if train(cfg).stopped_by == "interrupt":
                    raise KeyboardInterrupt
            except TrainingDiverged as e:
                log(f"{out.name} diverged: {e}")
                diverged = {"step": e.step, "loss": e.loss if e.loss is None or math.isfinite(e.loss) else str(e.loss),
                            "message": str(e), "settings": settings}
                out.mkdir(parents=True, exist_ok=True)
                write_text_atomic(marker, json.dumps(diverged, indent=1) + "\n")
    losses, valid = read_metrics(out)
    if diverged is not None:
        loss = diverged["loss"]
        losses[diverged["step"]] = math.inf if loss is None else float(loss)  # "nan"/"inf" strings parse too
        valid = None
    return losses, valid, diverged


def _number(x: float) -> float | str:
    """JSON has no infinity: a diverged run's loss and excess are written as "inf"."""
    return x if math.isfinite(x) else "inf"


def excess(variant: dict[int, float], reference: dict[int, float]) -> tuple[float, int]:
    """Largest (variant − reference) over the steps both logged, and the step where it occurs."""
    steps = sorted(set(variant) & set(reference))
    if not steps:
        raise LmmemError("the runs logged no common steps; were they trained with the same --log-interval?")
    worst = max(steps, key=lambda s: variant[s] - reference[s])
    return variant[worst] - reference[worst], worst


def parse_corpus(spec: str) -> tuple[str, str | None]:
    """'embedded' → ('embedded', None), the synthetic corpus train.py uses without --data;
    'NAME=PATH' → (NAME, PATH), a prepared corpus folder; a bare PATH is named after its folder."""
    if spec == "embedded":
        return "embedded", None
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = Path(spec).name, spec
    if not (Path(path) / "meta.json").is_file():
        raise LmmemError(f"{path} is not a prepared corpus (no meta.json); prepare it with python -m data_prep")
    return name, path


def run(work: Path, corpora: list[str], archs: list[str], variants: list[str], seeds: list[int], *, preset: str,
        max_steps: int, log_interval: int, eval_tokens: int, margin: float, extra: dict, log=print) -> dict:
    parsed = [parse_variant(v) for v in variants]
    if parsed[0][0] != "full":
        raise LmmemError("the first of --variants must be 'full': it is the reference every excess is measured against")
    rows, commands = [], []
    for corpus, data in map(parse_corpus, corpora):
        for arch in archs:
            curves: dict[str, dict[int, tuple[dict[int, float], float | None]]] = {}
            for label, overrides in parsed:
                for seed in seeds:
                    out = work / f"{corpus}-{arch}-{label}-seed{seed}"
                    flags = {"out": str(out), "preset": preset, "arch": arch, "softmax": label, "seed": seed,
                             "max_steps": max_steps, "log_interval": log_interval, "eval_interval": 0,
                             "eval_tokens": eval_tokens, **({"data": data} if data else {}), **extra, **overrides}
                    cfg = config_from_args({k: _coerce(k, v) for k, v in flags.items()})
                    commands.append("python train.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in flags.items()))
                    curves.setdefault(label, {})[seed] = train_or_reuse(cfg, out, log)
            reference = curves["full"]
            if any(reference[s][2] for s in seeds):
                raise LmmemError(f"the full softmax itself diverged on {corpus} ({arch}); lower the learning rate (--train-args lr=...)")
            for label, _ in parsed:
                per_seed = {}
                for s in (seeds if label != "full" else []):
                    losses, _, diverged = curves[label][s]
                    # a diverged run's excess is unbounded: its loss left the scale train.py accepts
                    per_seed[s] = (math.inf, diverged["step"]) if diverged else excess(losses, reference[s][0])
                worst_seed = max(per_seed, key=lambda s: per_seed[s][0]) if per_seed else None
                rows.append({
                    "corpus": corpus, "arch": arch, "variant": label,
                    "max_excess": _number(per_seed[worst_seed][0]) if per_seed else None,
                    "max_excess_step": per_seed[worst_seed][1] if per_seed else None,
                    "max_excess_seed": worst_seed,
                    "excess_by_seed": {str(s): _number(v[0]) for s, v in per_seed.items()},
                    "final_train_loss": [_number(curves[label][s][0][max(curves[label][s][0])]) for s in seeds],
                    "valid_ppl": [curves[label][s][1] for s in seeds],
                    "diverged": {str(s): curves[label][s][2]["step"] for s in seeds if curves[label][s][2]},
                    "passes": None if not per_seed else per_seed[worst_seed][0] <= margin,
                })
    return {"rows": rows, "variants": variants, "seeds": seeds, "preset": preset, "max_steps": max_steps,
            "log_interval": log_interval, "eval_tokens": eval_tokens, "margin": margin, "train_commands": commands,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"}


def _mean_spread(values: list[float | None], fmt: str) -> str:
    values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def render_page(results: dict, command: str) -> str:
    seeds = results["seeds"]
    lines = [
        "# No blow-up: training loss beside the full softmax, from scratch",
        "",
        f"`{command}`",
        "",
        f"Preset `{results['preset']}`, {results['max_steps']:,} steps, seed{'s' if len(seeds) > 1 else ''} "
        f"{', '.join(map(str, seeds))}; training loss = mean over each {results['log_interval']}-step window; "
        f"excess = variant − full softmax in the same window and seed (largest over windows and seeds); "
        f"passes when ≤ {results['margin']} nats. A run whose loss passed train.py's divergence limit (3·ln V) stopped there "
        f"(its excess: \"diverged\"). Final train loss (last window) and valid perplexity at the end "
        + (f"(first {results['eval_tokens']:,} valid tokens)" if results["eval_tokens"] else "(whole valid split)")
        + f": mean ± sd over the seeds that finished. {results['machine']}.",
        "",
        "| corpus | model | variant | largest excess (nats) | at step (seed) | passes | final train loss | valid ppl |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        ex = "–" if r["max_excess"] is None else ("diverged" if r["max_excess"] == "inf" else f"{r['max_excess']:+.3f}")
        where = "–" if r["max_excess"] is None else f"{r['max_excess_step']} ({r['max_excess_seed']})"
        ok = "–" if r["passes"] is None else ("yes" if r["passes"] else "**no**")
        stopped = "; ".join(f"seed {s} diverged at step {step}" for s, step in r.get("diverged", {}).items())
        finished = [v for seed, v in zip(seeds, r["final_train_loss"]) if str(seed) not in r.get("diverged", {})]
        lines.append(f"| {r['corpus']} | {r['arch']} | {r['variant']} | {ex} | {where} | {ok} | "
                     f"{_mean_spread(finished, '.3f')}{f' ({stopped})' if stopped else ''} | "
                     f"{_mean_spread(r['valid_ppl'], ',.1f')} |")
    lines += ["", "Variants: " + ", ".join(f"`{v}`" for v in results["variants"]) + " (`hebbian` is the default, centred rule).",
              "", "<details><summary>train.py commands</summary>", "", "```bash", *results["train_commands"], "```", "", "</details>", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="folder for the runs (resumable)")
    p.add_argument("--corpora", nargs="+", default=["embedded"],
                   help="'embedded' (train.py's synthetic corpus) or NAME=PATH of a prepared corpus")
    p.add_argument("--archs", nargs="+", default=["lstm", "transformer"], choices=["lstm", "transformer"])
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                   help="LABEL[:key=value,...] (TrainConfig fields); the first must be 'full', the reference")
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "wt103-paper"])
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--log-interval", type=int, default=10, help="steps per training-loss window")
    p.add_argument("--eval-tokens", type=int, default=10_000, help="valid tokens scored at the end (0: all)")
    p.add_argument("--margin", type=float, default=0.5, help="nats a variant may rise above the full softmax")
    p.add_argument("--train-args", default="", help="extra TrainConfig fields as KEY=VALUE pairs for every run")
    p.add_argument("--page", help="write the results page here (markdown; its JSON beside it)")
    args = p.parse_args(argv)
    check_flags(vars(args))
    extra = dict(kv.split("=", 1) for kv in args.train_args.split())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = run(work, args.corpora, args.archs, args.variants, args.seeds, preset=args.preset, max_steps=args.max_steps,
                  log_interval=args.log_interval, eval_tokens=args.eval_tokens, margin=args.margin, extra=extra)
    command = "python -m lmmem.experiments.no_blowup " + shlex.join(argv if argv is not None else sys.argv[1:])
    results["command"] = command
    page = render_page(results, command)
    targets = [work / "no_blowup.md"] + ([Path(args.page)] if args.page else [])
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target.with_suffix(".json"), dumps(results, indent=1) + "\n")
        write_text_atomic(target, page)
    if args.page:
        print(f"wrote {args.page}")
    print(page.split("<details>")[0])
    return 0


if __name__ == "__main__":
    from lmmem.cli import run_cli

    sys.exit(run_cli(main))
