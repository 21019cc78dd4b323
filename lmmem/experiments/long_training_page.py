"""The page of :mod:`lmmem.experiments.long_training`: its tables, charts and JSON, written from the
results dictionary alone, so ``long_training render`` rewrites a page without training anything.

Besides the pass-end snapshots (the issue's measure) a run validated during training (``--eval-every``)
gets two views of its valid curve: the mean over each pass's last quarter, and the paired difference
to the reference by position within the pass. The second asks whether a pass-end snapshot lands where
the comparison is typical for the pass, or in a stretch of the training stream that favours one head.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from lmmem.evaluation.report import PALETTE, format_count, format_perplexity
from lmmem.jsonio import dumps
from lmmem.safety import write_text_atomic

RARE_BUCKETS = ("<100", "100–1K")
PHASES = 5  # the position-within-pass table's columns: fifths of a pass


def window_loss(curve: list[list[float]], k: int, spp: int) -> float | None:
    """Mean valid loss over the validations in the last quarter of pass ``k`` (steps in
    (k − ¼)·spp … k·spp]): a pass-end number that one snapshot's luck moves less."""
    vals = [loss for step, loss in curve if (k - 0.25) * spp < step <= k * spp]
    return statistics.mean(vals) if vals else None


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
    lines += _phase_lines(results, deltas)
    if results.get("curves_chart"):
        lines += ["", f"![valid perplexity every {results['eval_every']} steps]({results['curves_chart']})"]
    return lines


def phase_deltas(records: list[dict], ref_records: list[dict], k: int, spp: int) -> list[float | None]:
    """A variant against its reference in each fifth of pass ``k`` and over the whole pass (the last
    entry): per seed, the mean over the stretch's validations of the variant's valid loss minus the
    reference's at the same step (the same batches came before both), then exp of the mean over
    seeds, minus 1. None where no seed has a validation in the stretch."""
    ref_curves = {r["seed"]: dict(map(tuple, r["curve"])) for r in ref_records if r.get("curve")}
    stretches = [((k - 1 + i / PHASES) * spp, (k - 1 + (i + 1) / PHASES) * spp) for i in range(PHASES)] + [((k - 1) * spp, k * spp)]
    out = []
    for lo, hi in stretches:
        per_seed = []
        for r in records:
            ref = ref_curves.get(r["seed"])
            gaps = [loss - ref[step] for step, loss in r.get("curve") or [] if lo < step <= hi and ref and step in ref]
            if gaps:
                per_seed.append(statistics.mean(gaps))
        out.append(math.exp(statistics.mean(per_seed)) - 1 if per_seed else None)
    return out


def _phase_lines(results: dict, deltas: list) -> list[str]:
    """The table of :func:`phase_deltas`, one per Δ column."""
    runs, spp = results["runs"], results["steps_per_pass"]
    lines = []
    for v, ref, header in deltas:
        if not any(r.get("curve") for r in runs[v]):
            continue
        lines += ["", f"{header}, by position within the pass: the paired valid-loss difference at the same steps, averaged over "
                      f"the validations in each fifth of the pass (and over the whole pass), then over seeds, as a perplexity "
                      f"ratio minus 1. A pass-end snapshot lies in the last fifth.", "",
                  "| pass | " + " | ".join(f"{100 * i // PHASES}–{100 * (i + 1) // PHASES}% of the pass" for i in range(PHASES)) + " | whole pass |",
                  "|---|" + "---|" * (PHASES + 1)]
        for k in range(1, results["passes"] + 1):
            lines.append(f"| {k} | " + " | ".join(map(_pct, phase_deltas(runs[v], runs[ref], k, spp))) + " |")
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


