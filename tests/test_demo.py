"""`make demo` (python -m lmmem.experiments.demo): both softmaxes trained on the embedded corpus, one
table of bucketed test perplexity (plain and + cache + MbPA each), a chart and a JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_prints_one_table_and_writes_the_chart(tmp_path, capsys, one_thread, monkeypatch):
    from lmmem.experiments import demo

    monkeypatch.setenv("LMMEM_CACHE", str(tmp_path / "cache"))  # the embedded corpus, written once here
    assert demo.main(["--out", str(tmp_path / "demo"), "--steps", "3", "--eval-tokens", "300", "--no-progress"]) == 0
    out = capsys.readouterr().out
    table = out.split("by training frequency of the word:", 1)[1]
    for row in ("full", "full + cache + MbPA", "hebbian", "hebbian + cache + MbPA"):
        assert re.search(rf"^{re.escape(row)}\s+[\d,.]+\s", table, re.M), row
    assert "<100 ppl" in table and "token share" in table
    result = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert list(result["rows"]) == ["full", "full + cache + MbPA", "hebbian", "hebbian + cache + MbPA"]
    assert all(r["tokens"] == 300 for r in result["rows"].values())
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 10_000


def test_make_demo_runs_the_demo_module():
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert "-m lmmem.experiments.demo" in recipe
