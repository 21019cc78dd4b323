"""Rendering perplexity reports: a fixed-width table, JSON, and a bar chart (matplotlib optional)."""

from __future__ import annotations

from pathlib import Path

from lmmem.evaluation.buckets import PerplexityReport
from lmmem.jsonio import write_json  # noqa: F401  (re-exported: JSON here refuses inf/NaN)


def format_perplexity(x: float | None) -> str:
    """The one format for perplexities in tables, pages and charts: thousands separators, two
    decimals (``11,376.36``, ``10.76``); ``–`` for a bucket with no tokens."""
    if x is None:
        return "–"
    return f"{x:,.2f}"


def format_count(n: int) -> str:
    """The one format for counts (tokens, steps, pairs): thousands separators, ``14,549``."""
    return f"{int(n):,}"


def format_table(reports: dict[str, PerplexityReport]) -> str:
    """One row per method: overall perplexity, then each bucket's perplexity and token share."""
    first = next(iter(reports.values()))
    names = [b.name for b in first.buckets]
    head = ["method", "ppl"] + [f"{n} ppl" for n in names]
    rows = [head]
    for method, r in reports.items():
        rows.append([method, format_perplexity(r.perplexity)] + [format_perplexity(b.perplexity) for b in r.buckets])
    share = ["token share", "100%"] + [f"{100 * b.share:.1f}%" for b in first.buckets]
    rows.append(share)
    count = ["tokens", format_count(first.tokens)] + [format_count(b.tokens) for b in first.buckets]
    rows.append(count)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0 or i == len(reports):
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_bucketed_perplexity(reports: dict[str, PerplexityReport], path: str | Path, title: str = "") -> Path | None:
    """Grouped bars: one group per frequency bucket (plus overall), one bar per method, log scale.
    Returns the path, or None when matplotlib is not installed (it is an optional extra)."""
    return plot_bucket_panels({"": reports}, path, title=title)


# Distinct colours in a fixed order (the Okabe-Ito colour-blind-safe palette), so that a method has
# the same colour in every panel; matplotlib's default cycle repeats after ten series.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")


def plot_bucket_panels(panels: dict[str, dict[str, PerplexityReport]], path: str | Path, title: str = "",
                       columns: int = 2) -> Path | None:
    """One panel per model (``{panel title: {method: report}}``), each with one group of bars per
    frequency bucket (plus overall) and one bar per method; every panel shares the log-scale y
    axis (ticks at 1 and 3 × 10^k), a method keeps its colour across panels, and one legend sits
    below the panels, clear of the bars. Returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return None
    methods: list[str] = []
    for reports in panels.values():
        methods += [m for m in reports if m not in methods]
    if len(methods) > len(PALETTE):
        raise ValueError(f"{len(methods)} methods in one chart: at most {len(PALETTE)} stay distinguishable; "
                         "split them into panels")
    colour = dict(zip(methods, PALETTE))
    first = next(iter(next(iter(panels.values())).values()))
    groups = ["overall"] + [b.name for b in first.buckets]
    labels = [groups[0]] + [f"{b.name}\n{100 * b.share:.1f}% of tokens" for b in first.buckets]
    cols = min(columns, len(panels))
    rows = -(-len(panels) // cols)
    width_per_panel = 1.2 + 1.25 * len(groups) * max(1.0, len(methods) / 4)
    fig, axes = plt.subplots(rows, cols, figsize=(width_per_panel * cols, 3.4 * rows + 0.9), sharey=True,
                             squeeze=False, layout="constrained")
    values_all = [v for reports in panels.values() for r in reports.values()
                  for v in [r.perplexity] + [b.perplexity for b in r.buckets] if v]
    lo, hi = min(values_all), max(values_all)
    for ax, (panel, reports) in zip(axes.flat, panels.items()):
        n = len(reports)
        width = 0.8 / max(n, 1)
        for k, (method, r) in enumerate(reports.items()):
            values = [r.perplexity] + [b.perplexity or 0.0 for b in r.buckets]
            xs = [g + (k - (n - 1) / 2) * width for g in range(len(groups))]
            bars = ax.bar(xs, values, width * 0.92, color=colour[method], label=method)
            ax.bar_label(bars, labels=[format_perplexity(v) if v else "" for v in values], fontsize=6.5, rotation=90,
                         padding=2)
        ax.set_xticks(range(len(groups)), labels, fontsize=8)
        if panel:
            ax.set_title(panel, fontsize=10)
        ax.grid(axis="y", which="major", alpha=0.3)
        ax.set_axisbelow(True)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    ax0 = axes.flat[0]
    ax0.set_yscale("log")
    # head-room above the tallest bar for its rotated label (about one decade on a log axis)
    ax0.set_ylim(lo / 1.5, hi * 12)
    ax0.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 3.0)))
    ax0.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    ax0.yaxis.set_minor_formatter(NullFormatter())
    for ax in axes[:, 0]:
        ax.set_ylabel("perplexity (log scale)")
    for ax in axes[-1, :]:
        ax.set_xlabel("target word's training frequency", fontsize=9)
    handles, names = [], []
    for ax in axes.flat:
        for h, m in zip(*ax.get_legend_handles_labels()):
            if m not in names:
                handles.append(h)
                names.append(m)
    # as many legend columns as fit the figure's width (about 11 characters an inch at 9 pt)
    fit = int(fig.get_figwidth() * 11 / (max(map(len, names)) + 5))
    fig.legend(handles, names, loc="outside lower center", ncol=max(1, min(len(names), 4, fit)), fontsize=9, frameon=False)
    fig.suptitle(title or "Perplexity by training frequency", fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
