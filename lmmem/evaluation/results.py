"""An evaluation's results: one report per method (token level, and per word / per byte where the
text allows), the settings behind each, and the one way they are printed, written as JSON and
charted (``evaluate.py`` and the Python API alike)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmmem.evaluation.buckets import PerplexityReport
from lmmem.evaluation.report import format_count, format_table, plot_bucketed_perplexity
from lmmem.jsonio import write_json

SYMBOLS = {"theta": "θ", "cache_lambda": "λ_cache", "mbpa_lambda": "λ_mbpa", "knn_lambda": "λ_knn", "lr": "lr"}


def row_name(memories: tuple[str, ...], dynamic: bool = False) -> str:
    """``+cache``, ``+cache+mbpa``, ``+dynamic+cache+knn``: what a row of the table mixes in."""
    return "+" + "+".join((("dynamic",) if dynamic else ()) + tuple(memories))


@dataclass
class Row:
    name: str
    dynamic: bool
    point: dict = field(default_factory=dict)  # grid values: theta, cache_lambda, mbpa_lambda, knn, knn_lambda


@dataclass
class MethodReport:
    report: PerplexityReport  # per token of the model's vocabulary
    words: PerplexityReport | None = None  # per whitespace word (SentencePiece corpora, tokenizers with offsets)
    lm_eval: dict | None = None  # lm-evaluation-harness's word_perplexity, byte_perplexity, bits_per_byte
    bytes: dict | None = None  # bits per byte of the text
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = self.report.to_dict()
        for key in ("words", "lm_eval", "bytes"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value.to_dict() if isinstance(value, PerplexityReport) else value
        out["params"] = self.params
        return out


def format_value(x) -> str:
    """A setting for people: ``9e-05``, ``0.1``, ``k 1024, T 3.2`` (never 8.999999999999999e-05)."""
    if isinstance(x, tuple):
        return f"k {x[0]}, T {format_value(x[1])}"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def format_choice(choice: dict) -> str:
    """``+cache: θ 0.1, λ_cache 0.2; +dynamic: lr 9e-05``."""
    parts = []
    for method, values in choice.items():
        inner = ", ".join(f"{SYMBOLS.get(k, '')} {format_value(v)}".strip() for k, v in values.items())
        parts.append(f"{method}: {inner}")
    return "; ".join(parts)


@dataclass
class EvaluationResult:
    reports: dict[str, MethodReport]
    meta: dict
    name: str = "model"

    @property
    def plain(self) -> PerplexityReport:
        return self.reports["plain"].report

    def to_dict(self) -> dict:
        plain = {k: v for k, v in self.reports["plain"].to_dict().items() if k != "params"}
        return {**self.meta, **plain, "methods": {m: r.to_dict() for m, r in self.reports.items()}}

    def named(self, base: str | None = None, attr: str = "report") -> dict[str, PerplexityReport]:
        base = base or self.name
        return {(base if m == "plain" else f"{base} {m}"): getattr(r, attr) for m, r in self.reports.items()}

    def lines(self, base: str | None = None) -> list[str]:
        """The printed result: tuned values, the token-level table, then per word / lm-eval / bytes."""
        out = []
        tuned = self.meta.get("tuned")
        if tuned and tuned.get("choice"):
            out.append("tuned on valid: " + format_choice(tuned["choice"]))
        out.append(format_table(self.named(base)))
        words = self.named(base, "words")
        if all(w is not None for w in words.values()):
            plain = self.reports["plain"]
            out.append(f"\nper word (the sum of its tokens' log-probabilities; buckets by the whole word's training count), "
                       f"{plain.words.tokens:,} words, {plain.report.tokens / max(plain.words.tokens, 1):.2f} tokens a word:")
            out.append(format_table(words))
        for m, r in self.reports.items():
            if r.lm_eval is not None:
                e = r.lm_eval
                out.append(f"lm-eval {m}: word_perplexity {e['word_perplexity']:,.4f}, byte_perplexity "
                           f"{e['byte_perplexity']:.4f}, bits_per_byte {e['bits_per_byte']:.4f} ({format_count(e['words'])} "
                           f"words, {format_count(e['bytes'])} bytes, {e['documents']:,} documents)")
            elif r.bytes is not None:
                out.append(f"{m}: {r.bytes['bits_per_byte']:.4f} bits per byte ({format_count(r.bytes['bytes'])} bytes of text)")
        return out  # (notes were said as they came: lmmem.evaluation.run's ``log``)

    def chart_title(self, base: str | None = None) -> str:
        """The model (checkpoint or folder), the split and the number of tokens scored."""
        return f"{self.meta.get('model_name', base or self.name)} — {self.meta.get('split')}, {self.plain.tokens:,} tokens"

    def write(self, json_path=None, plot=None, base: str | None = None) -> list[str]:
        """Write the JSON and/or the chart; returns the lines saying so."""
        lines = []
        if json_path:
            write_json(self.to_dict(), json_path)
            lines.append(f"wrote {json_path}")
        plot = plot or (str(Path(json_path).with_suffix(".png")) if json_path else None)
        if plot:
            written = plot_bucketed_perplexity(self.named(base), plot, title=self.chart_title(base))
            lines.append(f"wrote {written}" if written else "matplotlib is not installed: no chart (pip install lmmem[plot])")
        return lines


def assemble(ev, reports: dict[str, MethodReport], columns: dict[str, np.ndarray], word_probs) -> dict:
    """Fill the per-word, lm-eval and byte numbers from the per-token columns, write ``word_probs``;
    returns the metadata of the evaluation."""
    from lmmem.evaluation.data import byte_numbers, lm_eval_numbers
    from lmmem.evaluation.sinks import write_word_probs

    data = ev.data
    for m, r in reports.items():
        col = columns.get(m)
        if col is None:
            continue
        if data.words is not None:
            r.words = data.words(-col)
        if data.stream is not None:
            if ev.window == "lm-eval":
                r.lm_eval = lm_eval_numbers(data.stream, col)
            else:
                r.bytes = byte_numbers(data.stream, col)
    meta = {"model_name": ev.loaded.name, **ev.loaded.info, **ev.source.describe(), **data.info, "split": ev.config.split,
            "window": ev.windows(data).describe(), "bucket_edges": list(ev.buckets.edges), "device": str(ev.adapter.device)}
    if word_probs is not None:
        rows = write_word_probs(word_probs, {m: columns[m] for m in reports}, data.labels)
        meta["word_probs"] = {"path": str(word_probs), "rows": rows, "columns": list(reports)}
    return meta
