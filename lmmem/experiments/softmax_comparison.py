"""Full vs Hebbian softmax on one corpus, same seed, model and budget, each plain, +cache, +MbPA and
+both, evaluated by frequency bucket: the paper's comparison (Rae et al. 2018, Table 1) as one command.

    python -m lmmem.experiments.softmax_comparison gutenberg --source ../shared/data/gutenberg \\
        --work runs/cmp-gutenberg --preset small --max-steps 3000 --seeds 1 2 --test-time \\
        --page docs/results/reproduction-gutenberg.md

``python -m lmmem.experiments.softmax_comparison render PAGE...`` rewrites pages and charts from
the results.json beside them, without training or evaluating.

One command: prepares the corpus (``python -m data_prep``, skipped when WORK/data is already
prepared), trains one model per (softmax, seed) with identical settings — the same seed gives both
softmaxes the same initial weights and dropout noise — evaluates each ``best.pt`` on the valid and
test splits and, with ``--test-time``, with the neural cache, MbPA and both, their θ and λs chosen
on the valid split (:func:`lmmem.evaluation.evaluate_methods` with ``tune=True``). It writes
``WORK/results.json``, ``WORK/results.md`` (the paper-layout table and the per-bucket tables with
the mean and spread over seeds, the commands, machine and versions) and ``WORK/results.png``;
``--page`` also writes the page, its JSON and chart to a docs folder. The validation split picks
the checkpoint and the test-time values; nothing is tuned on test. Finished runs and evaluations
are reused (a run is retrained only if its settings changed) and an interrupted training run is
continued from its ``last.pt`` (``train.py --resume`` semantics), so an interrupted command is
simply repeated.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from lmmem.cli import ArgumentParser, run_cli
from lmmem.errors import LmmemError
from lmmem.evaluation import (
    FrequencyBuckets, PerplexityReport, evaluate_checkpoint, evaluate_methods, write_json,
)
from lmmem.evaluation.report import format_count, format_perplexity, plot_bucket_panels
from lmmem.evaluation.perplexity import BucketResult
from lmmem.memories import CacheConfig, MbPAConfig
from lmmem.training import config_from_args, load_checkpoint, train
from lmmem.validation import check_flags

METHODS = ("plain", "+cache", "+mbpa", "+cache+mbpa")
# config fields added after evaluations were cached, with the value that reproduces the old behaviour
_ADDED_DEFAULTS = {"mbpa": {"train_pairs": 0}}
_PERFORMANCE_ONLY = {"max_elements"}
METHOD_LABELS = {"plain": "", "+cache": " + cache", "+mbpa": " + MbPA", "+cache+mbpa": " + cache + MbPA"}
# Rae et al. 2018, Table 1 / Figure 4 (WikiText-103, LSTM, valid/test perplexity) — for orientation only:
# a different corpus, model size and budget.
PAPER_WT103 = {
    "LSTM": (36.0, 36.4), "+ Hebbian softmax": (34.1, 34.3), "+ cache": (29.9, 29.7), "+ MbPA": (29.0, 29.2),
}
PAPER_WT103_BUCKETS = {">10K": 12.1, "1K–10K": 219, "100–1K": 1197, "<100": 9725}


def prepare(corpus: str, source: str, data_dir: Path, extra: list[str]) -> list[str]:
    args = ["-m", "data_prep", corpus, "--source", source, "--out", str(data_dir), *extra]
    if not (data_dir / "meta.json").is_file():
        subprocess.run([sys.executable, *args], check=True)
    return ["python", *args]


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


def report_from_dict(d: dict) -> PerplexityReport:
    return PerplexityReport(**{**d, "buckets": [BucketResult(**b) for b in d["buckets"]]})


def spread(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return format_perplexity(vals[0])
    return f"{format_perplexity(statistics.mean(vals))} ± {format_perplexity(statistics.stdev(vals))}"


def markdown(results: dict) -> str:
    lines = [f"# Full vs Hebbian softmax on {results.get('name') or results['corpus']}", ""]
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
    vseeds = results.get("variant_seeds", {})
    rules = results.get("hebbian_rules", {})
    lines += ["", "Models: " + "; ".join(f"`{k}` = " + ", ".join(f"{a}={b}" for a, b in v.items())
                                         + (f" (Hebbian rule: {rules[k]})" if k in rules and "hebbian_rule" not in v else "")
                                         + (f" (seeds {', '.join(map(str, vseeds[k]))})" if vseeds.get(k, results["seeds"]) != results["seeds"] else "")
                                         for k, v in results["variants"].items()),
              f"preset `{results['preset']}`, {format_count(results['max_steps'])} steps each."]
    for label, src in results.get("reused", {}).items():
        lines += ["", f"`{label}`: runs and evaluations reused from `{src['from']}` (same settings, checked by `--reuse`; "
                      f"not trained again in this command). They were made by `{src['command']}` on "
                      + (", ".join(f"{k} {v}" for k, v in src["machine"].items()) if isinstance(src.get("machine"), dict) else str(src.get("machine")))
                      + "."]
    lines += ["", "Per seed (test perplexity; training minutes of wall time, – where the run did not record it):", "",
              "| model | seed | steps | train min | test ppl | " + " | ".join(names) + " |",
              "|---|---|---|---|---|" + "---|" * len(names)]
    for sm, runs in results["runs"].items():
        for r in runs:
            cells = [format_perplexity(b["perplexity"]) for b in r["test"]["buckets"]]
            minutes = f"{r['train_minutes']:.1f}" if r.get("train_minutes") else "–"
            lines.append(f"| {sm} | {r['seed']} | {format_count(r['steps'])} | {minutes} | {format_perplexity(r['test']['perplexity'])} | "
                         + " | ".join(cells) + " |")
    if results.get("test_time"):
        lines += ["", *test_time_markdown(results)]
    lines += ["", "## Commands", "", "```", results["command"], *results["steps"], "```", "",
              "## Machine", "", "```", json.dumps(results["machine"], indent=1), "```", ""]
    return "\n".join(lines)


def _method_values(runs: list[dict], method: str, split: str, bucket: int | None = None) -> list[float | None]:
    out = []
    for r in runs:
        tt = r.get("test_time")
        if not tt or method not in tt["test"]:
            continue
        if split == "valid":
            out.append(r["valid"]["perplexity"] if method == "plain" else tt["valid"].get(method))
        elif bucket is None:
            out.append(tt["test"][method]["perplexity"])
        else:
            out.append(tt["test"][method]["buckets"][bucket]["perplexity"])
    return out


def _choice_text(c: dict) -> str:
    parts = []
    if c.get("cache_lambda"):
        parts += [f"θ = {c['theta']}", f"cache λ = {c['cache_lambda']}"]
    if c.get("mbpa_lambda"):
        parts.append(f"MbPA λ = {c['mbpa_lambda']}")
    return ", ".join(parts)


def test_time_markdown(results: dict) -> list[str]:
    """The paper's layout (one row per model and test-time method, valid/test) and the per-bucket
    test perplexities of every row, mean ± std over seeds."""
    names = results["bucket_names"]
    tt = results["test_time"]
    lines = ["## Test-time memories (the paper's layout)", "",
             f"Perplexity, mean ± standard deviation over seeds {', '.join(map(str, results['seeds']))}. "
             "θ and the λs are chosen per model and seed on the valid split; the valid column of a "
             "test-time row is therefore the tuned (optimistic) valid perplexity, the test column is not.", "",
             "| model | valid ppl | test ppl |", "|---|---|---|"]
    rows = []
    for sm, runs in results["runs"].items():
        for m in METHODS:
            if not _method_values(runs, m, "test"):
                continue
            label = f"{sm}{METHOD_LABELS[m]}"
            rows.append((label, runs, m))
            lines.append(f"| {label} | {spread(_method_values(runs, m, 'valid'))} | {spread(_method_values(runs, m, 'test'))} |")
    lines += ["", "Test perplexity by the target word's training frequency:", "",
              "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, runs, m in rows:
        lines.append(f"| {label} | " + " | ".join(spread(_method_values(runs, m, "test", i)) for i in range(len(names))) + " |")
    lines += ["", "Chosen on valid, per model and seed:", ""]
    for sm, runs in results["runs"].items():
        for r in runs:
            if r.get("test_time"):
                lines.append(f"- {sm}, seed {r['seed']}: " + "; ".join(
                    f"{m}: {_choice_text(c)}" for m, c in r["test_time"]["choice"].items()))
    lines += ["", f"Cache: window {format_count(tt['cache']['window'])}, θ ∈ {tt['thetas']}, λ ∈ {tt['lambdas']}. MbPA: K = {tt['mbpa']['k']}, "
              f"{tt['mbpa']['steps']} steps, η = {tt['mbpa']['lr']}, α = {tt['mbpa']['alpha']}, ε = {tt['mbpa']['eps']}, memory "
              f"{format_count(tt['mbpa']['memory'])} pairs per stream, " + (f"adapting the rows of the query's top-{tt['mbpa']['vocab']} words and the "
              "neighbours' words (restricted MbPA)" if tt["mbpa"]["vocab"] else "adapting every row (exact MbPA)")
              + f"; {tt['streams']} evaluation streams.", "",
              "For orientation only, the paper's WikiText-103 numbers (valid/test; a much larger corpus, model and budget): "
              + ", ".join(f"{k} {v[0]}/{v[1]}" for k, v in PAPER_WT103.items())
              + "; the LSTM's test perplexity by bucket (as the paper prints them): "
              + ", ".join(f"{k} {v:,}" for k, v in PAPER_WT103_BUCKETS.items()) + "."]
    return lines


def _comparable_key(key: dict) -> dict:
    """An evaluation's settings as compared for reuse: options added to the configs since it was
    made count with their old behaviour, and performance-only options (max_elements: how many
    queries are adapted at once) do not count."""
    key = dict(key)
    for name, added in _ADDED_DEFAULTS.items():
        if isinstance(key.get(name), dict):
            key[name] = {**added, **key[name]}
    if isinstance(key.get("mbpa"), dict):
        key["mbpa"] = {f: v for f, v in key["mbpa"].items() if f not in _PERFORMANCE_ONLY}
    return key


def evaluate_test_time(best: Path, out: Path, *, cache: CacheConfig, mbpa: MbPAConfig, batch_size: int, streams: int,
                       buckets: FrequencyBuckets, thetas, lambdas) -> dict:
    """Tune on valid, score test with plain/+cache/+mbpa/+both; cached in OUT/test-time.json (keyed by
    the checkpoint's step and the settings, so a retrained model or other settings are redone)."""
    from dataclasses import asdict

    key = _comparable_key({"step": load_checkpoint(best)["progress"]["step"], "cache": asdict(cache), "mbpa": asdict(mbpa),
                           "batch_size": batch_size, "streams": streams, "thetas": list(thetas), "lambdas": list(lambdas),
                           "bucket_edges": list(buckets.edges)})
    path = out / "test-time.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if _comparable_key(saved.get("key", {})) == key:
            return saved["result"]
    reports, meta = evaluate_methods(best, split="test", batch_size=batch_size, streams=streams, buckets=buckets,
                                     cache=cache, mbpa=mbpa, tune=True, thetas=thetas, lambdas=lambdas)
    tuned = meta["tuned"]
    result = {"test": {m: r.to_dict() for m, r in reports.items()},
              "valid": dict(tuned["valid_perplexity"]), "choice": tuned["choice"],
              "seconds": meta.get("memory_seconds")}
    write_json({"key": key, "result": result}, path)
    return result


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["render"]:
        return render_main(argv[1:])
    p = build_parser()
    args = p.parse_args(argv)
    check_flags(vars(args))
    return run(args, argv, p)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("corpus", choices=["wikitext-103", "gutenberg", "gigaword", "synthetic"])
    p.add_argument("--source", help="corpus source for data_prep (folder or 'hub')")
    p.add_argument("--work", required=True, help="folder for data, runs and results")
    p.add_argument("--prep-args", default="", help="extra data_prep flags, one string")
    p.add_argument("--preset", default="small")
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--variants", nargs="+", default=["full", "hebbian"],
                   help="models to compare: a softmax name, or LABEL:key=value,... e.g. hebbian-T100:softmax=hebbian,hebbian_T=100; "
                        "'hebbian' is the default (centred) rule, hebbian-paper:softmax=hebbian,hebbian_rule=paper the paper's exact rule")
    p.add_argument("--train-args", default="", help="extra train.py flags as KEY=VALUE pairs, e.g. 'lr=1e-3 hebbian_T=100'")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--name", help="corpus name on the page (default: the source folder's name)")
    t = p.add_argument_group("test-time memories (--test-time)")
    t.add_argument("--test-time", action="store_true", help="also evaluate +cache, +MbPA and +both, tuned on valid")
    t.add_argument("--cache-window", type=int, default=CacheConfig.window)
    t.add_argument("--mbpa-k", type=int, default=MbPAConfig.k)
    t.add_argument("--mbpa-steps", type=int, default=MbPAConfig.steps)
    t.add_argument("--mbpa-lr", type=float, default=MbPAConfig.lr)
    t.add_argument("--mbpa-alpha", type=float, default=MbPAConfig.alpha)
    t.add_argument("--mbpa-eps", type=float, default=MbPAConfig.eps)
    t.add_argument("--mbpa-vocab", type=int, default=MbPAConfig.vocab,
                   help="restricted MbPA over this many candidate rows (0: exact MbPA, ~20× slower on CPU)")
    t.add_argument("--thetas", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    t.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3])
    p.add_argument("--page", help="also write the results page here (e.g. docs/results/reproduction-gutenberg.md), "
                                  "with its chart and JSON in a folder of the same name")
    p.add_argument("--reuse", nargs="+", default=[], metavar="LABEL=RESULTS_JSON",
                   help="take LABEL's runs from a results.json this command wrote earlier with the same settings (corpus, "
                        "preset, steps, data_prep and train flags, the variant, evaluation and test-time settings) "
                        "instead of training them again; the page names the file and the command that made it")
    return p


def load_reused(spec: str, args, parser: argparse.ArgumentParser, overrides: dict, seeds: list[int],
                test_time: dict | None) -> tuple[dict[int, dict], dict]:
    """``LABEL=RESULTS_JSON`` → ({seed: run record}, provenance). Refuses (one line) a file whose
    settings differ from this command's in anything that changes what is measured."""
    label, _, path = spec.partition("=")
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise LmmemError(f"--reuse {spec}: cannot read {path} ({e})") from None
    prefix = "python -m lmmem.experiments.softmax_comparison "
    if not earlier.get("command", "").startswith(prefix):
        raise LmmemError(f"--reuse {spec}: {path} was not written by softmax_comparison (no command recorded)")
    then = parser.parse_args(shlex.split(earlier["command"][len(prefix):]))
    same = {
        "corpus": (then.corpus, args.corpus),
        "source folder": (Path(then.source or "").name, Path(args.source or "").name),
        "--prep-args": (shlex.split(then.prep_args), shlex.split(args.prep_args)),
        "--preset": (then.preset, args.preset),
        "--max-steps": (then.max_steps, args.max_steps),
        "--train-args": (sorted(then.train_args.split()), sorted(args.train_args.split())),
        "--eval-batch-size": (then.eval_batch_size, args.eval_batch_size),
        f"variant {label}": (earlier.get("variants", {}).get(label), overrides),
        "bucket edges": (earlier.get("bucket_names"), FrequencyBuckets().names),
    }
    if test_time is not None:
        same["test-time settings"] = (_comparable_key(earlier.get("test_time") or {}), _comparable_key(test_time))
    differ = [name for name, (a, b) in same.items() if a != b]
    if differ:
        raise LmmemError(f"--reuse {spec}: {path} was measured with other settings ({', '.join(differ)}); train {label} here instead")
    records = {r["seed"]: r for r in earlier["runs"].get(label, [])}
    missing = [s for s in seeds if s not in records or (test_time is not None and not records[s].get("test_time"))]
    if missing:
        raise LmmemError(f"--reuse {spec}: {path} has no {label} run for seed(s) {', '.join(map(str, missing))}")
    return {s: records[s] for s in seeds}, {"from": path, "command": earlier["command"], "machine": earlier.get("machine")}


def run(args, argv: list[str], parser: argparse.ArgumentParser) -> int:
    work = Path(args.work)
    data_dir = work / "data"
    name = args.name or (f"{Path(args.source).name} (prepared as {args.corpus})" if args.source and Path(args.source).name != args.corpus
                         else args.corpus)
    steps_run: list[str] = []
    if args.corpus == "synthetic":
        from lmmem.data.synthetic import write_synthetic_corpus

        if not (data_dir / "meta.json").is_file():
            write_synthetic_corpus(data_dir)
        steps_run.append(f"# synthetic corpus written to {data_dir}")
    else:
        if not args.source:
            p.error("--source is required for real corpora")
        steps_run.append(shlex.join(prepare(args.corpus, args.source, data_dir, shlex.split(args.prep_args))))
    extra = dict(kv.split("=", 1) for kv in args.train_args.split())
    buckets = FrequencyBuckets()
    cache_cfg = CacheConfig(window=args.cache_window)
    mbpa_cfg = MbPAConfig(k=args.mbpa_k, steps=args.mbpa_steps, lr=args.mbpa_lr, alpha=args.mbpa_alpha, eps=args.mbpa_eps,
                          vocab=args.mbpa_vocab)
    variants = dict(parse_variant(v) for v in args.variants)
    variant_seeds = {label: _variant_seeds(overrides, args.seeds) for label, overrides in variants.items()}
    test_time_settings = None
    if args.test_time:
        from dataclasses import asdict

        test_time_settings = {"cache": asdict(cache_cfg), "mbpa": asdict(mbpa_cfg), "thetas": args.thetas,
                              "lambdas": args.lambdas, "streams": args.eval_batch_size}
    reused: dict[str, dict[int, dict]] = {}
    provenance: dict[str, dict] = {}
    for spec in args.reuse:
        label = spec.partition("=")[0]
        if label not in variants or "=" not in spec:
            parser.error(f"--reuse {spec}: expected LABEL=RESULTS_JSON with LABEL one of --variants ({', '.join(variants)})")
        reused[label], provenance[label] = load_reused(spec, args, parser, variants[label], variant_seeds[label], test_time_settings)
    runs: dict[str, list[dict]] = {label: [] for label in variants}
    hebbian_rules: dict[str, str] = {}
    for seed in args.seeds:
        for sm, overrides in variants.items():
            if seed not in variant_seeds[sm]:
                continue
            if sm in reused:
                runs[sm].append(reused[sm][seed])
                continue
            out = work / f"{sm}-seed{seed}"
            flags = {"data": str(data_dir), "out": str(out), "preset": args.preset, "softmax": sm, "seed": seed,
                     "max_steps": args.max_steps, **extra, **overrides}
            cfg = config_from_args({k: _coerce(k, v) for k, v in flags.items()})
            if cfg.softmax == "hebbian":  # the page names the rule: "hebbian" meant the paper's rule before issue 12
                hebbian_rules[sm] = cfg.hebbian_rule
            steps_run.append("python train.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in flags.items()))
            state = run_state(out, cfg)
            if state != "finished":
                # an interrupted run with these settings is continued from its last.pt (train.py --resume);
                # anything else in OUT (another setting, no last.pt) is replaced by a fresh run
                cfg.resume, cfg.overwrite = state == "resumable", state == "new"
                if train(cfg).stopped_by == "interrupt":
                    print(f"interrupted: {out} is incomplete; run the same command again to continue it")
                    return 130
            record = {"seed": seed, "steps": cfg.max_steps, "train_minutes": train_minutes(out)}
            for split in ("valid", "test"):
                res = evaluate_checkpoint(out / "best.pt", split=split, batch_size=args.eval_batch_size, buckets=buckets)
                record[split] = res.report.to_dict()
                steps_run.append(f"python evaluate.py {out / 'best.pt'} --split {split} --batch-size {args.eval_batch_size}")
            if args.test_time:
                record["test_time"] = evaluate_test_time(
                    out / "best.pt", out, cache=cache_cfg, mbpa=mbpa_cfg, batch_size=args.eval_batch_size,
                    streams=args.eval_batch_size, buckets=buckets, thetas=args.thetas, lambdas=args.lambdas)
                steps_run.append(f"python evaluate.py {out / 'best.pt'} --split test --batch-size {args.eval_batch_size} --tune "
                                 f"--cache --cache-window {args.cache_window} --mbpa --mbpa-k {args.mbpa_k} --mbpa-steps "
                                 f"{args.mbpa_steps} --mbpa-lr {args.mbpa_lr} --mbpa-alpha {args.mbpa_alpha} --mbpa-eps {args.mbpa_eps} "
                                 f"--mbpa-vocab {args.mbpa_vocab}")
            runs[sm].append(record)
            print(f"{sm} seed {seed}: valid ppl {record['valid']['perplexity']:.2f}, test ppl {record['test']['perplexity']:.2f}"
                  + ("" if not args.test_time else ", with test-time memories " + ", ".join(
                      f"{m} {r['perplexity']:.2f}" for m, r in record["test_time"]["test"].items())))
    results = {
        "corpus": args.corpus, "name": name, "source": args.source, "preset": args.preset, "seeds": args.seeds,
        "bucket_names": buckets.names, "runs": runs, "variants": variants, "variant_seeds": variant_seeds, "max_steps": args.max_steps, "command": "python -m lmmem.experiments.softmax_comparison " + shlex.join(argv or sys.argv[1:]),
        "steps": steps_run,
        "machine": {"platform": platform.platform(), "cpu_count": __import__("os").cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
    }
    if args.test_time:
        results["test_time"] = test_time_settings
    if provenance:
        results["reused"] = provenance
    if hebbian_rules:
        results["hebbian_rules"] = hebbian_rules
    targets = [(work / "results.md", work / "results.json", work / "results.png")]
    if args.page:
        targets.append(page_targets(Path(args.page)))
    write_outputs(results, targets)
    print((work / "results.md").read_text())
    return 0


def page_targets(page: Path) -> tuple[Path, Path, Path]:
    """(page, its results.json, its chart): the JSON and chart in a folder named after the page."""
    folder = page.with_suffix("")
    return page, folder / "results.json", folder / "results.png"


def chart_panels(results: dict) -> dict[str, dict[str, PerplexityReport]]:
    """{model (seeds): {method: test report of the mean loss over seeds}}: one chart panel per model."""
    panels = {}
    for sm, rs in results["runs"].items():
        seeds = [r["seed"] for r in rs]
        label = f"{sm} ({len(seeds)} seeds)" if len(seeds) > 1 else f"{sm} (seed {seeds[0]})"
        if sm in results.get("hebbian_rules", {}) and "hebbian_rule" not in results["variants"][sm]:
            label = f"{sm}, {results['hebbian_rules'][sm]} rule" + label[len(sm):]
        if results.get("test_time"):
            panels[label] = {METHOD_LABELS[m].strip() or "plain": mean_report([report_from_dict(r["test_time"]["test"][m]) for r in rs])
                             for m in METHODS if all(m in r["test_time"]["test"] for r in rs)}
        else:
            panels[label] = {"plain": mean_report([report_from_dict(r["test"]) for r in rs])}
    if not results.get("test_time"):  # one method per model: the models side by side in one panel
        panels = {"": {k.split(" (")[0]: v["plain"] for k, v in panels.items()}}
    return panels


def write_outputs(results: dict, targets: list[tuple[Path, Path, Path]]) -> None:
    """Write results.json, the chart and the page for each (page, json, chart) target."""
    title = (f"{results.get('name') or results['corpus']}: test perplexity by the target word's training frequency"
             + (" (exp of the mean loss over seeds)" if any(len(rs) > 1 for rs in results["runs"].values()) else ""))
    for md, js, png in targets:
        write_json(results, js)
        chart = plot_bucket_panels(chart_panels(results), png, title=title)
        text = markdown(results)
        if chart is not None:
            text = text.replace("\n## Commands", f"\n![test perplexity by bucket]({png.relative_to(md.parent).as_posix()})\n\n## Commands", 1)
        md.parent.mkdir(parents=True, exist_ok=True)
        md.write_text(text, encoding="utf-8")


def render_main(argv: list[str]) -> int:
    """``render PAGE...``: rewrite each page and its chart from the results.json beside it (no
    training, no evaluation), e.g. after a change to the page layout or the chart."""
    p = ArgumentParser(prog="python -m lmmem.experiments.softmax_comparison render",
                                description=render_main.__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("pages", nargs="+", help="results pages written with --page, e.g. docs/results/reproduction-gutenberg.md")
    args = p.parse_args(argv)
    for page in map(Path, args.pages):
        md, js, png = page_targets(page)
        if not js.is_file():
            raise SystemExit(f"error: {js} does not exist; render needs the results.json that --page wrote beside {page}")
        write_outputs(json.loads(js.read_text(encoding="utf-8")), [(md, js, png)])
        print(f"wrote {md} and {png}")
    return 0


def run_state(out: Path, cfg) -> str:
    """``finished``: OUT holds a run completed with exactly these settings (reused);
    ``resumable``: its last.pt was saved with these settings before ``max_steps`` (an interrupted
    run, continued from there as ``train.py --resume`` would); ``new``: nothing usable (no
    last.pt, or one trained with other settings: trained again from scratch)."""
    last = out / "last.pt"
    if not last.is_file():
        return "new"
    from dataclasses import fields

    from lmmem.training import TrainConfig

    ckpt = load_checkpoint(last)
    known = {f.name for f in fields(TrainConfig)}
    ignore = ("resume", "overwrite", "progress", "out")
    # fill options added since the run was made with their defaults
    saved = {k: v for k, v in TrainConfig(**{k: v for k, v in ckpt["train_config"].items() if k in known}).to_dict().items() if k not in ignore}
    wanted = {k: v for k, v in cfg.to_dict().items() if k not in ignore}
    if saved != wanted:
        return "new"
    if ckpt["progress"]["step"] >= cfg.max_steps and (out / "best.pt").is_file():
        return "finished"
    return "resumable"


def train_minutes(out: Path) -> float | None:
    """Training wall time of OUT's run in minutes, summed over resumes, from its last.pt (None for
    checkpoints written before the trainer recorded it)."""
    seconds = load_checkpoint(out / "last.pt").get("train_seconds")
    return round(seconds / 60, 2) if seconds else None


def _variant_seeds(overrides: dict, seeds: list[int]) -> list[int]:
    """A variant's ``seeds=1+2`` (a subset of --seeds) limits it to those seeds: a side experiment
    can run on fewer seeds than the main comparison."""
    if "seeds" not in overrides:
        return list(seeds)
    chosen = [int(x) for x in overrides.pop("seeds").split("+") if x]
    missing = [x for x in chosen if x not in seeds]
    if missing:
        raise SystemExit(f"variant seeds {missing} are not among --seeds {seeds}")
    return chosen


def parse_variant(spec: str) -> tuple[str, dict]:
    """'hebbian' → ('hebbian', {'softmax': 'hebbian'}); 'h-T100:softmax=hebbian,hebbian_T=100' →
    ('h-T100', {'softmax': 'hebbian', 'hebbian_T': '100'}); a ``seeds=1+2`` entry limits the variant
    to those seeds."""
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
    sys.exit(run_cli(main))
