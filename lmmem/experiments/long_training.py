"""Long training, pass by pass: each softmax variant trained for several passes over the training
split, with its valid perplexity (overall and by the target word's training frequency) at the end
of every pass, and its test perplexity at the end of the last.

    python -m lmmem.experiments.long_training wikitext-103 --source ../shared/data/wikitext-2 \\
        --prep-args '--train-from valid' --work runs/long-wt2 --passes 6 --seeds 1 2 3 \\
        --variants full hebbian --page docs/results/long-training-wikitext-2.md

Why pass by pass: a rule that helps while words are new may hurt once every word has been seen
(the Hebbian softmax on a second pass over WikiText-2, docs/results/binding-wikitext-2-second-pass.md);
users train small corpora for many passes, so every pass end is a result.

How. One ``train.py`` run per (variant, seed) with ``--max-steps`` = passes × steps per pass (so
the learning-rate schedule is the one of the whole run) is trained one pass at a time: ``--max-epochs
1``, then ``--resume --max-epochs 2``, …; each stop lands exactly at a pass end and saves ``last.pt``
(a resumed run continues bit for bit: checked by tests/test_long_training.py), which is copied to
``pass-K.pt`` and evaluated on the valid split (``evaluate.py pass-K.pt --split valid``). The last
pass's snapshot is also evaluated on test; nothing is chosen on test. Same seed: same initial
weights, batches and dropout noise for every variant. A finished pass is never trained again and
an interrupted one is continued from its ``last.pt``, so an interrupted command is simply repeated;
a run folder made with other settings is refused (use another ``--work``).

``python -m lmmem.experiments.long_training render PAGE...`` rewrites pages and charts from the
JSON beside them (PAGE with ``.json``), without training or evaluating.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
from pathlib import Path

import torch

from lmmem.data.batching import StreamBatcher
from lmmem.data.corpus import PreparedCorpus
from lmmem.errors import LmmemError
from lmmem.evaluation import FrequencyBuckets, evaluate
from lmmem.evaluation.report import PALETTE, format_count, format_perplexity
from lmmem.experiments.softmax_comparison import prepare
from lmmem.experiments.variants import parse_train_args, parse_variant
from lmmem.jsonio import dumps
from lmmem.safety import write_text_atomic
from lmmem.training import config_from_args, load_checkpoint, train
from lmmem.training.config import config_value
from lmmem.validation import check_flags

# flags the runner sets itself (a --train-args entry for one of them would break the pass bookkeeping)
_RUNNER_FLAGS = ("data", "out", "seed", "max_steps", "max_epochs", "resume", "overwrite", "time_budget")
# settings that may differ between a run's passes (the rest must match the run folder's last.pt);
# validating during training changes nothing in the model (tests/test_long_training.py)
_PER_CALL = ("resume", "overwrite", "progress", "out", "max_epochs", "data", "eval_interval")
RARE_BUCKETS = ("<100", "100–1K")


def steps_per_pass(data: Path, batch_size: int, bptt: int) -> int:
    return len(StreamBatcher(PreparedCorpus.open(data).tokens("train"), batch_size, bptt))


def _check_same_settings(last: Path, cfg) -> None:
    saved = dict(load_checkpoint(last)["train_config"])
    wanted = cfg.to_dict()
    differ = sorted(k for k in wanted if k not in _PER_CALL and saved.get(k, wanted[k]) != wanted[k])
    if differ:
        raise LmmemError(f"{last.parent} holds a run made with other settings ({', '.join(differ)}); "
                         "give another --work (or delete that run folder) to train these settings")


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def train_by_pass(flags: dict, out: Path, passes: int, spp: int, log=print) -> bool:
    """Train ``out`` pass by pass up to ``passes``, leaving ``pass-K.pt`` at every pass end.
    Returns False if interrupted (Ctrl-C), True when every pass is done."""
    for k in range(1, passes + 1):
        snap = out / f"pass-{k}.pt"
        if snap.is_file():
            continue
        last = out / "last.pt"
        if not last.is_file() and k > 1:  # pass-(k-1).pt is last.pt as it was saved at that pass end
            _copy_atomic(out / f"pass-{k - 1}.pt", last)
        resume = last.is_file()
        cfg = config_from_args({**flags, "out": str(out), "max_epochs": k, "resume": resume, "overwrite": not resume})
        if resume:
            _check_same_settings(last, cfg)
        log(f"{out.name}: pass {k} of {passes}")
        result = train(cfg)
        if result.stopped_by == "interrupt":
            return False
        if result.progress.step != k * spp:
            raise LmmemError(f"{out}: pass {k} ended at step {result.progress.step}, expected {k * spp}")
        _copy_atomic(last, snap)
    return True


def valid_curve(metrics: Path, last_step: int) -> list[list[float]]:
    """[step, valid loss] of every validation the trainer logged (``--eval-every``), by step; a step
    validated twice (a pass end, again when the next pass resumed) counts once."""
    by_step = {}
    for line in metrics.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if "val_loss" in r and r["step"] <= last_step:
            by_step[r["step"]] = r["val_loss"]
    return [[s, by_step[s]] for s in sorted(by_step)]


def window_loss(curve: list[list[float]], k: int, spp: int) -> float | None:
    """Mean valid loss over the validations in the last quarter of pass ``k`` (steps in
    (k − ¼)·spp … k·spp]): a pass-end number that one snapshot's luck moves less."""
    vals = [loss for step, loss in curve if (k - 0.25) * spp < step <= k * spp]
    return statistics.mean(vals) if vals else None


def evaluate_pass(snap: Path, split: str, batch_size: int, buckets: FrequencyBuckets) -> dict:
    """Bucketed perplexity of one pass snapshot, cached beside it (keyed by its step)."""
    path = snap.with_name(f"{snap.stem}-{split}.json")
    step = load_checkpoint(snap)["progress"]["step"]
    key = {"step": step, "batch_size": batch_size, "bucket_edges": list(buckets.edges)}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["report"]
    report = evaluate(snap, split=split, batch_size=batch_size, buckets=",".join(map(str, buckets.edges)),
                      progress=False).plain.to_dict()
    write_text_atomic(path, dumps({"key": key, "report": report}, what="the evaluation") + "\n")
    return report


def _flags_text(flags: dict) -> str:
    return " ".join(f"--{'' if v else 'no-'}{k.replace('_', '-')}" if isinstance(v, bool) else f"--{k.replace('_', '-')} {v}"
                    for k, v in flags.items())


def _shown(text: str, work: Path, page: str | None, notes: str | None = None) -> str:
    """Commands as the page shows them, without paths of this machine: the work folder is WORK, and
    a page (or --notes file) outside the current folder is PAGE (NOTES: its text is on the page)."""
    text = re.sub(re.escape(str(work)) + r"(?=[/\s']|$)", "WORK", text)
    for path, name in ((page, "PAGE"), (notes, "NOTES")):
        if path and Path(path).is_absolute():
            try:
                shown = Path(path).relative_to(Path.cwd()).as_posix()
            except ValueError:
                shown = name
            text = text.replace(path, shown)
    return text


def _rule_name(cfg) -> str | None:
    return cfg.hebbian_rule if cfg.softmax == "hebbian" else None


def run(args, argv: list[str]) -> int:
    work = Path(args.work)
    data = work / "data"
    commands = [shlex.join(prepare(args.corpus, args.source, data, shlex.split(args.prep_args)))]
    extra = parse_train_args(args.train_args)
    clash = sorted(set(extra) & set(_RUNNER_FLAGS))
    if clash:
        raise LmmemError(f"--train-args must not set {', '.join(clash)}: the runner sets them (use --passes and --seeds)")
    variants = dict(parse_variant(v) for v in args.variants)
    if "full" not in variants:
        raise LmmemError("--variants must include 'full' (the reference)")
    references = parse_references(args.reference, variants)
    notes = Path(args.notes).read_text(encoding="utf-8").strip() if args.notes else ""
    probe = config_from_args({k: config_value(k, v) for k, v in {"data": str(data), **extra}.items()})
    spp = steps_per_pass(data, probe.batch_size, probe.bptt)
    buckets = FrequencyBuckets()
    runs: dict[str, list[dict]] = {label: [] for label in variants}
    rules: dict[str, str] = {}
    for seed in args.seeds:
        for label, overrides in variants.items():
            out = work / f"{label}-seed{seed}"
            flags = {k: config_value(k, v) for k, v in {"data": str(data), "seed": seed, "max_steps": args.passes * spp,
                                                   "eval_interval": args.eval_every, "progress": False, **extra, **overrides}.items()}
            rule = _rule_name(config_from_args(flags))
            if rule:
                rules[label] = rule
            commands.append(f"python train.py {_flags_text({**flags, 'out': out})} --max-epochs K [--resume]   # K = 1 … {args.passes}")
            if not train_by_pass(flags, out, args.passes, spp):
                print(f"interrupted: {out} is incomplete; run the same command again to continue it")
                return 130
            record = {"seed": seed, "passes": [], "train_minutes": round(load_checkpoint(out / f"pass-{args.passes}.pt").get("train_seconds", 0) / 60, 2)}
            for k in range(1, args.passes + 1):
                record["passes"].append({"pass": k, "step": k * spp,
                                         "valid": evaluate_pass(out / f"pass-{k}.pt", "valid", args.eval_batch_size, buckets)})
            record["test"] = evaluate_pass(out / f"pass-{args.passes}.pt", "test", args.eval_batch_size, buckets)
            if args.eval_every:
                record["curve"] = valid_curve(out / "metrics.jsonl", args.passes * spp)
            runs[label].append(record)
            print(f"{label} seed {seed}: valid ppl by pass " + ", ".join(f"{p['valid']['perplexity']:.2f}" for p in record["passes"])
                  + f"; test ppl {record['test']['perplexity']:.2f}")
    commands.append(f"python evaluate.py RUN/pass-K.pt --split valid --batch-size {args.eval_batch_size}   # every run, K = 1 … {args.passes}")
    commands.append(f"python evaluate.py RUN/pass-{args.passes}.pt --split test --batch-size {args.eval_batch_size}")
    results = {
        "name": args.name or args.corpus, "corpus": args.corpus, "source": Path(args.source).name, "prep_args": args.prep_args,
        "passes": args.passes, "steps_per_pass": spp, "eval_every": args.eval_every, "seeds": args.seeds, "train_args": extra, "variants": variants,
        "hebbian_rules": rules, "bucket_names": buckets.names, "runs": runs, "references": references, "notes": notes,
        "command": _shown("python -m lmmem.experiments.long_training " + shlex.join(argv), work, args.page, args.notes),
        "steps": [_shown(c, work, args.page) for c in commands],
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
    }
    targets = [work / "results.md"] + ([Path(args.page)] if args.page else [])
    for page in targets:
        write_outputs(results, page)
    print((work / "results.md").read_text())
    return 0


# ---------------------------------------------------------------------------------------------
# the page


def _values(records: list[dict], k: int, what: str, bucket: str | None = None) -> list[float]:
    out = []
    for r in records:
        rep = r["passes"][k - 1]["valid"] if what == "valid" else r["test"]
        if bucket is None:
            out.append(rep["perplexity"])
        else:
            out += [b["perplexity"] for b in rep["buckets"] if b["name"] == bucket and b["perplexity"] is not None]
    return out


def _mean_sd(vals: list[float]) -> str:
    if not vals:
        return "–"
    if len(vals) == 1:
        return format_perplexity(vals[0])
    return f"{format_perplexity(statistics.mean(vals))} ± {format_perplexity(statistics.stdev(vals))}"


def parse_references(pairs: list[str], variants: dict) -> dict[str, str]:
    """``--reference VARIANT=REF`` pairs: VARIANT's Δ columns against REF instead of ``full`` (e.g.
    an untied variant against the untied full softmax: equal parameters)."""
    refs = {}
    for pair in pairs:
        v, sep, ref = pair.partition("=")
        if not sep or v not in variants or ref not in variants or v == ref:
            raise LmmemError(f"--reference {pair!r} must be VARIANT=REF, two different labels of --variants ({', '.join(variants)})")
        refs[v] = ref
    return refs


def _delta_columns(results: dict) -> list[tuple[str, str, str]]:
    """(variant, its reference, column header) of every Δ column: each variant but ``full``
    against its reference (``full`` unless --reference named another)."""
    refs = results.get("references", {})
    cols = []
    for v in results["runs"]:
        if v != "full":
            ref = refs.get(v, "full")
            cols.append((v, ref, f"Δ {v}" if ref == "full" else f"Δ {v} vs {ref}"))
    return cols


def relative(vals: list[float], ref: list[float]) -> float | None:
    """Mean over seeds of a variant's perplexity relative to its reference's mean, minus 1."""
    return statistics.mean(vals) / statistics.mean(ref) - 1 if vals and ref else None


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f}%"


def markdown(results: dict, chart: str | None) -> str:
    runs, passes = results["runs"], results["passes"]
    deltas = _delta_columns(results)
    seeds = ", ".join(map(str, results["seeds"]))
    lines = [f"# Long training on {results['name']}: {passes} passes", ""]
    if results.get("notes"):
        lines += [results["notes"], ""]
    lines += [f"Valid perplexity at the end of every pass over the training split ({format_count(results['steps_per_pass'])} steps "
              f"a pass, {format_count(passes * results['steps_per_pass'])} in all, one learning-rate schedule over the whole run); "
              f"mean ± standard deviation over seeds {seeds}; Δ = the variant's mean relative to the full softmax's "
              "(or to the variant named after \"vs\").", "",
              "| pass | step | " + " | ".join(runs) + " | " + " | ".join(h for _, _, h in deltas) + " |",
              "|---|---|" + "---|" * (len(runs) + len(deltas))]
    for k in range(1, passes + 1):
        lines.append(f"| {k} | {format_count(k * results['steps_per_pass'])} | "
                     + " | ".join(_mean_sd(_values(rs, k, "valid")) for rs in runs.values()) + " | "
                     + " | ".join(_pct(relative(_values(runs[v], k, "valid"), _values(runs[ref], k, "valid"))) for v, ref, _ in deltas) + " |")
    for bucket in RARE_BUCKETS:
        lines += ["", f"Valid perplexity of the {bucket} bucket (target words seen {bucket.replace('<', 'fewer than ')} times in training):", "",
                  "| pass | " + " | ".join(runs) + " | " + " | ".join(h for _, _, h in deltas) + " |",
                  "|---|" + "---|" * (len(runs) + len(deltas))]
        for k in range(1, passes + 1):
            lines.append(f"| {k} | " + " | ".join(_mean_sd(_values(rs, k, "valid", bucket)) for rs in runs.values()) + " | "
                         + " | ".join(_pct(relative(_values(runs[v], k, "valid", bucket), _values(runs[ref], k, "valid", bucket)))
                                      for v, ref, _ in deltas) + " |")
    lines += _window_lines(results, deltas)
    if chart:
        lines += ["", f"![valid perplexity by pass]({chart})"]
    names = results["bucket_names"]
    lines += ["", f"Test perplexity at the end of pass {passes} (the last), mean ± standard deviation over seeds {seeds}:", "",
              "| model | test ppl | Δ | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    refs = {v: ref for v, ref, _ in deltas}
    for v, rs in runs.items():
        delta = "" if v == "full" else _pct(relative(_values(rs, 0, "test"), _values(runs[refs[v]], 0, "test"))) + (
            "" if refs[v] == "full" else f" vs {refs[v]}")
        lines.append(f"| {v} | {_mean_sd(_values(rs, 0, 'test'))} | {delta} | " + " | ".join(_mean_sd(_values(rs, 0, "test", n)) for n in names) + " |")
    rules = results.get("hebbian_rules", {})
    lines += ["", "Models: " + "; ".join(f"`{k}` = " + ", ".join(f"{a}={b}" for a, b in v.items())
                                         + (f" (Hebbian rule: {rules[k]})" if k in rules and "hebbian_rule" not in v else "")
                                         for k, v in results["variants"].items())
              + (f"; every run with {', '.join(f'{a}={b}' for a, b in results['train_args'].items())}" if results["train_args"] else "") + ".",
              "", "Per seed (valid perplexity at each pass end; test at the last; training minutes of wall time):", "",
              "| model | seed | " + " | ".join(f"pass {k}" for k in range(1, passes + 1)) + " | test | train min |",
              "|---|---|" + "---|" * (passes + 2)]
    for v, rs in runs.items():
        for r in rs:
            lines.append(f"| {v} | {r['seed']} | " + " | ".join(format_perplexity(p["valid"]["perplexity"]) for p in r["passes"])
                         + f" | {format_perplexity(r['test']['perplexity'])} | {r['train_minutes']:.1f} |")
    lines += ["", "## Commands", "", "```", results["command"], *results["steps"], "```", "",
              "## Machine", "", "```", json.dumps(results["machine"], indent=1), "```", ""]
    return "\n".join(lines)


def _window_values(records: list[dict], k: int, spp: int) -> list[float]:
    losses = [window_loss(r["curve"], k, spp) for r in records if r.get("curve")]
    return [math.exp(x) for x in losses if x is not None]


def _window_lines(results: dict, deltas: list) -> list[str]:
    """The table of :func:`window_loss` (runs made with ``--eval-every``), and the curves' chart."""
    runs, spp = results["runs"], results["steps_per_pass"]
    if not any(r.get("curve") for rs in runs.values() for r in rs):
        return []
    lines = ["", f"Valid perplexity averaged over the last quarter of each pass: exp of the mean valid loss of the validations "
                 f"every {results['eval_every']} steps in steps (K − ¼)·{format_count(spp)} … K·{format_count(spp)} of pass K (the pass end "
                 "included), then mean ± standard deviation over seeds. Not the issue's measure (one snapshot at the pass end), which "
                 "the tables above report: the same comparison with less of one snapshot's luck in it.", "",
             "| pass | " + " | ".join(runs) + " | " + " | ".join(h for _, _, h in deltas) + " |",
             "|---|" + "---|" * (len(runs) + len(deltas))]
    for k in range(1, results["passes"] + 1):
        lines.append(f"| {k} | " + " | ".join(_mean_sd(_window_values(rs, k, spp)) for rs in runs.values()) + " | "
                     + " | ".join(_pct(relative(_window_values(runs[v], k, spp), _window_values(runs[ref], k, spp))) for v, ref, _ in deltas)
                     + " |")
    if results.get("curves_chart"):
        lines += ["", f"![valid perplexity every {results['eval_every']} steps]({results['curves_chart']})"]
    return lines


def _pyplot():
    """matplotlib's pyplot on the file-only backend, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_curves(results: dict, path: Path) -> Path | None:
    """Valid perplexity at every validation, one panel per seed, one line per variant; dotted lines
    at the pass ends. None without matplotlib or without curves."""
    plt = _pyplot()
    if plt is None:
        return None
    seeds = [r["seed"] for r in next(iter(results["runs"].values())) if r.get("curve")]
    if not seeds:
        return None
    fig, axes = plt.subplots(1, len(seeds), figsize=(4.6 * len(seeds), 3.4), layout="constrained", sharey=True, squeeze=False)
    for ax, seed in zip(axes[0], seeds):
        for colour, (v, rs) in zip(PALETTE, results["runs"].items()):
            for r in rs:
                if r["seed"] == seed and r.get("curve"):
                    ax.plot([s for s, _ in r["curve"]], [math.exp(x) for _, x in r["curve"]], color=colour, lw=1, label=v)
        for k in range(1, results["passes"] + 1):
            ax.axvline(k * results["steps_per_pass"], color="grey", ls=":", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"seed {seed}", fontsize=10)
        ax.set_xlabel("step (dotted: pass ends)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("valid perplexity")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{results['name']}: valid perplexity every {results['eval_every']} steps", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(results: dict, path: Path) -> Path | None:
    """Valid perplexity (overall and the two rare buckets) against the pass, one line per variant
    (mean over seeds, bars: standard deviation). None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    panels = [("all words", None), *((f"{b} bucket", b) for b in RARE_BUCKETS)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), layout="constrained")
    ks = list(range(1, results["passes"] + 1))
    for ax, (title, bucket) in zip(axes, panels):
        for colour, (v, rs) in zip(PALETTE, results["runs"].items()):
            vals = [_values(rs, k, "valid", bucket) for k in ks]
            means = [statistics.mean(x) for x in vals]
            sds = [statistics.stdev(x) if len(x) > 1 else 0.0 for x in vals]
            ax.errorbar(ks, means, yerr=sds, color=colour, marker="o", markersize=3, capsize=2, label=v)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("pass")
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("valid perplexity")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{results['name']}: valid perplexity at each pass end (mean ± sd over seeds)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(results: dict, page: Path) -> None:
    """PAGE (markdown), PAGE with .json, and its chart PAGE with .png."""
    page.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(page.with_suffix(".json"), dumps(results, what="the results", indent=1) + "\n")
    chart = plot(results, page.with_suffix(".png"))
    curves = plot_curves(results, page.with_name(f"{page.stem}-curves.png"))
    write_text_atomic(page, markdown({**results, "curves_chart": curves.name if curves else None}, chart.name if chart else None))


def render_main(argv: list[str]) -> int:
    """``render PAGE...``: rewrite each page and chart from the JSON beside it."""
    p = argparse.ArgumentParser(prog="python -m lmmem.experiments.long_training render")
    p.add_argument("pages", nargs="+")
    for page in map(Path, p.parse_args(argv).pages):
        js = page.with_suffix(".json")
        if not js.is_file():
            raise LmmemError(f"{js} does not exist; render needs the JSON that --page wrote beside {page}")
        write_outputs(json.loads(js.read_text(encoding="utf-8")), page)
        print(f"wrote {page}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("corpus", choices=["wikitext-103", "gutenberg", "gigaword"])
    p.add_argument("--source", required=True, help="corpus source folder for data_prep")
    p.add_argument("--prep-args", default="", help="extra data_prep flags, one string")
    p.add_argument("--work", required=True, help="folder for the data, runs and results (resumable)")
    p.add_argument("--passes", type=int, default=4, help="passes over the training split")
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--variants", nargs="+", default=["full", "hebbian"],
                   help="a softmax name, or LABEL:key=value,... (TrainConfig fields); 'full' is the reference")
    p.add_argument("--train-args", default="preset=tiny", help="TrainConfig fields as KEY=VALUE pairs for every run")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="also validate every N steps while training (the trainer's --eval-interval; the model is unchanged): the page "
                        "adds the valid perplexity averaged over each pass's last quarter, and a chart of the curves")
    p.add_argument("--reference", nargs="*", default=[], metavar="VARIANT=REF",
                   help="compare VARIANT with REF instead of full (e.g. an untied variant with the untied full softmax)")
    p.add_argument("--notes", help="a markdown file whose text the page shows under its title (what the numbers say)")
    p.add_argument("--name", help="corpus name on the page")
    p.add_argument("--page", help="also write the page here (with its .json and .png beside it)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["render"]:
        return render_main(argv[1:])
    args = build_parser().parse_args(argv)
    check_flags(vars(args))
    return run(args, argv)


if __name__ == "__main__":
    from lmmem.cli import run_cli

    sys.exit(run_cli(main))
