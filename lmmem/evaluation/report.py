"""Rendering perplexity reports: a fixed-width table, JSON, and a bar chart (matplotlib optional)."""

from __future__ import annotations

from pathlib import Path

from lmmem.evaluation.perplexity import PerplexityReport
from lmmem.jsonio import write_json  # noqa: F401  (re-exported: JSON here refuses inf/NaN)


def _fmt(x: float | None) -> str:
    if x is None:
        return "–"
    if x >= 1e4:
        return f"{x:,.0f}"
    return f"{x:.2f}"


def format_table(reports: dict[str, PerplexityReport]) -> str:
    """One row per method: overall perplexity, then each bucket's perplexity and token share."""
    first = next(iter(reports.values()))
    names = [b.name for b in first.buckets]
    head = ["method", "ppl"] + [f"{n} ppl" for n in names]
    rows = [head]
    for method, r in reports.items():
        rows.append([method, _fmt(r.perplexity)] + [_fmt(b.perplexity) for b in r.buckets])
    share = ["token share", "100%"] + [f"{100 * b.share:.1f}%" for b in first.buckets]
    rows.append(share)
    count = ["tokens", f"{first.tokens:,}"] + [f"{b.tokens:,}" for b in first.buckets]
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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    first = next(iter(reports.values()))
    groups = ["overall"] + [b.name for b in first.buckets]
    n = len(reports)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(groups), 4))
    for k, (method, r) in enumerate(reports.items()):
        values = [r.perplexity] + [b.perplexity or 0.0 for b in r.buckets]
        xs = [g + (k - (n - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, values, width, label=method)
        ax.bar_label(bars, labels=[_fmt(v) if v else "" for v in values], fontsize=7, rotation=90, padding=2)
    labels = [groups[0]] + [f"{b.name}\n{100 * b.share:.1f}% of tokens" for b in first.buckets]
    ax.set_xticks(range(len(groups)), labels, fontsize=8)
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 4)  # head-room for the rotated value labels
    ax.set_ylabel("perplexity (log scale)")
    ax.set_xlabel("target word's training frequency")
    ax.set_title(title or "Perplexity by training frequency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
