"""Full vs Hebbian softmax on one corpus, same seed, model and budget, evaluated by frequency bucket.

    python -m lmmem.experiments.softmax_comparison gutenberg --source ../shared/data/gutenberg \\
        --work runs/cmp-gutenberg --preset small --max-steps 3000 --seeds 1 2

One command: prepares the corpus (``python -m data_prep``, skipped when WORK/data is already
prepared), trains one model per (softmax, seed) with identical settings — the same seed gives both
softmaxes the same initial weights and dropout noise — evaluates each ``best.pt`` on the test
split, and writes ``WORK/results.json``, ``WORK/results.md`` (tables with the mean and spread over
seeds, the commands, machine and versions) and ``WORK/results.png``. The validation split picks
the checkpoint; nothing is tuned on test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmmem.evaluation import FrequencyBuckets, PerplexityReport, evaluate_checkpoint, plot_bucketed_perplexity, write_json
from lmmem.evaluation.perplexity import BucketResult
from lmmem.training import config_from_args, load_checkpoint, train


def prepare(corpus: str, source: str, data_dir: Path, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "data_prep", corpus, "--source", source, "--out", str(data_dir), *extra]
    if not (data_dir / "meta.json").is_file():
        subprocess.run(cmd, check=True)
    return cmd


def mean_report(reports: list[PerplexityReport]) -> PerplexityReport:
    """Bucket-wise mean of the *losses* over seeds (perplexity of the mean loss)."""
    import math

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    first = reports[0]
    buckets = []
    for i, b in enumerate(first.buckets):
        loss = mean([r.buckets[i].loss for r in reports])
        buckets.append(BucketResult(b.name, b.min_count, b.max_count, b.tokens, b.share, loss,
                                    math.exp(loss) if loss is not None else None))
    loss = mean([r.loss for r in reports])
    return PerplexityReport(first.tokens, loss, math.exp(loss), buckets)


def spread(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def markdown(results: dict) -> str:
    lines = [f"# Full vs Hebbian softmax on {results['corpus']}", ""]
    lines += ["Test perplexity, mean ± standard deviation over seeds "
              f"{', '.join(map(str, results['seeds']))}; best checkpoint by validation loss.", ""]
    names = results["bucket_names"]
    lines.append("| model | valid ppl | test ppl | " + " | ".join(f"{n}" for n in names) + " |")
    lines.append("|---|---|---|" + "---|" * len(names))
    for sm, runs in results["runs"].items():
        row = [sm, spread([r["valid"]["perplexity"] for r in runs]), spread([r["test"]["perplexity"] for r in runs])]
        row += [spread([r["test"]["buckets"][i]["perplexity"] for r in runs]) for i in range(len(names))]
        lines.append("| " + " | ".join(row) + " |")
    first = next(iter(results["runs"].values()))[0]["test"]
    lines.append("| token share | | | " + " | ".join(f"{100 * b['share']:.1f}%" for b in first["buckets"]) + " |")
    lines += ["", "Models: " + "; ".join(f"`{k}` = " + ", ".join(f"{a}={b}" for a, b in v.items()) for k, v in results["variants"].items()),
              f"preset `{results['preset']}`, {results['max_steps']} steps each."]
    lines += ["", "Per seed (test perplexity):", "", "| model | seed | steps | test ppl | " + " | ".join(names) + " |",
              "|---|---|---|---|" + "---|" * len(names)]
    for sm, runs in results["runs"].items():
        for r in runs:
            cells = [f"{b['perplexity']:.2f}" if b["perplexity"] else "–" for b in r["test"]["buckets"]]
            lines.append(f"| {sm} | {r['seed']} | {r['steps']} | {r['test']['perplexity']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "## Commands", "", "```", results["command"], *results["steps"], "```", "",
              "## Machine", "", "```", json.dumps(results["machine"], indent=1), "```", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("corpus", choices=["wikitext-103", "gutenberg", "gigaword", "synthetic"])
    p.add_argument("--source", help="corpus source for data_prep (folder or 'hub')")
    p.add_argument("--work", required=True, help="folder for data, runs and results")
    p.add_argument("--prep-args", default="", help="extra data_prep flags, one string")
    p.add_argument("--preset", default="small")
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--variants", nargs="+", default=["full", "hebbian"],
                   help="models to compare: a softmax name, or LABEL:key=value,... e.g. hebbian-T100:softmax=hebbian,hebbian_T=100")
    p.add_argument("--train-args", default="", help="extra train.py flags as KEY=VALUE pairs, e.g. 'lr=1e-3 hebbian_T=100'")
    p.add_argument("--eval-batch-size", type=int, default=16)
    args = p.parse_args(argv)

    work = Path(args.work)
    data_dir = work / "data"
    steps_run: list[str] = []
    if args.corpus == "synthetic":
        from lmmem.data.synthetic import write_synthetic_corpus

        if not (data_dir / "meta.json").is_file():
            write_synthetic_corpus(data_dir)
        steps_run.append(f"# synthetic corpus written to {data_dir}")
    else:
        if not args.source:
            p.error("--source is required for real corpora")
        steps_run.append(" ".join(prepare(args.corpus, args.source, data_dir, args.prep_args.split())))
    extra = dict(kv.split("=", 1) for kv in args.train_args.split())
    buckets = FrequencyBuckets()
    variants = dict(parse_variant(v) for v in args.variants)
    runs: dict[str, list[dict]] = {label: [] for label in variants}
    for seed in args.seeds:
        for sm, overrides in variants.items():
            out = work / f"{sm}-seed{seed}"
            flags = {"data": str(data_dir), "out": str(out), "preset": args.preset, "softmax": sm, "seed": seed,
                     "max_steps": args.max_steps, **extra, **overrides}
            cfg = config_from_args({k: _coerce(k, v) for k, v in flags.items()})
            steps_run.append("python train.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in flags.items()))
            t0 = time.monotonic()
            if not finished(out, cfg):
                if train(cfg).stopped_by == "interrupt":
                    print(f"interrupted: {out} is incomplete; run the same command again to redo it")
                    return 130
            minutes = (time.monotonic() - t0) / 60
            record = {"seed": seed, "steps": cfg.max_steps, "train_minutes": round(minutes, 2)}
            for split in ("valid", "test"):
                res = evaluate_checkpoint(out / "best.pt", split=split, batch_size=args.eval_batch_size, buckets=buckets)
                record[split] = res.report.to_dict()
                steps_run.append(f"python evaluate.py {out / 'best.pt'} --split {split} --batch-size {args.eval_batch_size}")
            runs[sm].append(record)
            print(f"{sm} seed {seed}: valid ppl {record['valid']['perplexity']:.2f}, test ppl {record['test']['perplexity']:.2f}")
    results = {
        "corpus": args.corpus, "source": args.source, "preset": args.preset, "seeds": args.seeds,
        "bucket_names": buckets.names, "runs": runs, "variants": variants, "max_steps": args.max_steps, "command": "python -m lmmem.experiments.softmax_comparison " + " ".join(argv or sys.argv[1:]),
        "steps": steps_run,
        "machine": {"platform": platform.platform(), "cpu_count": __import__("os").cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
    }
    write_json(results, work / "results.json")
    (work / "results.md").write_text(markdown(results), encoding="utf-8")
    means = {sm: mean_report([PerplexityReport(**{**r["test"], "buckets": [BucketResult(**b) for b in r["test"]["buckets"]]})
                              for r in rs]) for sm, rs in runs.items()}
    plot_bucketed_perplexity(means, work / "results.png", title=f"{args.corpus}: test perplexity by training frequency")
    print((work / "results.md").read_text())
    return 0


def finished(out: Path, cfg) -> bool:
    """A run is reused only when it completed with exactly these settings (a run that was
    interrupted, or trained with other flags, is trained again from scratch)."""
    last = out / "last.pt"
    if not last.is_file() or not (out / "best.pt").is_file():
        return False
    from dataclasses import fields

    from lmmem.training import TrainConfig

    ckpt = load_checkpoint(last)
    known = {f.name for f in fields(TrainConfig)}
    ignore = ("resume", "progress", "out")
    # fill options added since the run was made with their defaults
    saved = {k: v for k, v in TrainConfig(**{k: v for k, v in ckpt["train_config"].items() if k in known}).to_dict().items() if k not in ignore}
    wanted = {k: v for k, v in cfg.to_dict().items() if k not in ignore}
    return saved == wanted and ckpt["progress"]["step"] >= cfg.max_steps


def parse_variant(spec: str) -> tuple[str, dict]:
    """'hebbian' → ('hebbian', {'softmax': 'hebbian'}); 'h-T100:softmax=hebbian,hebbian_T=100' →
    ('h-T100', {'softmax': 'hebbian', 'hebbian_T': '100'})."""
    label, _, rest = spec.partition(":")
    overrides = dict(kv.split("=", 1) for kv in rest.split(",") if kv) if rest else {}
    overrides.setdefault("softmax", label)
    return label, overrides


def _coerce(key: str, value):
    """KEY=VALUE strings from --train-args to the TrainConfig field's type."""
    from dataclasses import fields

    from lmmem.training import TrainConfig

    if not isinstance(value, str):
        return value
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    kind = str(kinds.get(key, "str"))
    if "bool" in kind:
        return value.lower() in ("1", "true", "yes")
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    return value


if __name__ == "__main__":
    sys.exit(main())
