"""evaluate.py as a user meets it (issue 23): progress that can be read when the output goes to a
file, the header before the long work, tuned values and chart titles for people, a hint when
dynamic evaluation makes the model worse, and no measured numbers in --help."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from test_evaluate_methods import _checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_output_to_a_file_shows_progress_with_time_left(small_corpus, tmp_path):
    """``python evaluate.py --mbpa --tune > out 2>&1`` is not silent: the header comes first (flushed
    before the work), then for every pass lines with position/total, elapsed and time left."""
    ckpt = _checkpoint(small_corpus, tmp_path / "m.pt")
    out = tmp_path / "out"
    with open(out, "w") as f:
        proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), str(ckpt), "--mbpa", "--mbpa-k", "4", "--mbpa-memory", "50",
                               "--tune", "--batch-size", "2", "--max-tokens", "600"], cwd=tmp_path, stdout=f,
                              stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "0"}, timeout=600)
    text = out.read_text()
    assert proc.returncode == 0, text
    lines = text.splitlines()
    assert lines[0].startswith(f"{ckpt} on ") and "600 tokens; window: bptt 16, 2 streams" in lines[0]
    progress = [line for line in lines if re.match(r"(tune valid: \d+ mixtures|test): \d+/\d+ batches \(\d+%\), ", line)]
    assert any(line.startswith("tune valid") and "left" in line for line in progress), text
    assert any(line.startswith("test: ") and "left" in line for line in progress), text
    assert lines.index(progress[0]) > 0 and "tuned on valid: +mbpa: λ_mbpa " in text


def test_tuned_values_and_chart_title_are_for_people():
    from lmmem.evaluation.results import format_choice

    text = format_choice({"+cache": {"theta": 0.1, "cache_lambda": 0.2}, "+dynamic": {"lr": 3e-4 * 0.3},
                          "+knn": {"knn": (1024, 3.2000000000000006), "knn_lambda": 0.25}})
    assert text == "+cache: θ 0.1, λ_cache 0.2; +dynamic: lr 9e-05; +knn: k 1024, T 3.2, λ_knn 0.25"


def test_chart_title_names_model_split_and_tokens(small_corpus, tmp_path):
    from lmmem.evaluation import evaluate

    ckpt = _checkpoint(small_corpus, tmp_path / "m.pt")
    res = evaluate(ckpt, max_tokens=120, batch_size=2, progress=False)
    assert res.chart_title() == f"{ckpt} — test, 120 tokens"


def test_dynamic_evaluation_worse_than_plain_says_so(small_corpus, tmp_path, monkeypatch):
    """An untrained model and a large rate: one line, at once, suggesting --tune; the pass then
    diverges (its loss grows past e^709 a token, so its perplexity overflows): an error naming
    --dynamic-lr, not inf in the results. Where such a pass ends worse without diverging, the
    line said at once is the only one (no second line at the end)."""
    import lmmem.evaluation.run as run_module
    from lmmem.errors import LmmemError
    from lmmem.evaluation import DynamicConfig, Methods, evaluate

    ckpt = _checkpoint(small_corpus, tmp_path / "m.pt")
    said = []
    kw = dict(max_tokens=400, batch_size=2, progress=False, log=said.append)
    with pytest.raises(LmmemError, match="diverged on test at --dynamic-lr 30"):
        evaluate(ckpt, **kw, methods=Methods(dynamic=DynamicConfig(method="sgd", lr=30.0, decay=0.0)))
    assert len(said) == 1 and "worse than the plain model" in said[0] and "--tune" in said[0] and "--dynamic-lr 30" in said[0]
    said.clear()
    monkeypatch.setattr(run_module, "_finite", lambda report: True)  # as if it ended worse without diverging
    res = evaluate(ckpt, **kw, methods=Methods(dynamic=DynamicConfig(method="sgd", lr=30.0, decay=0.0)))
    assert res.reports["+dynamic"].report.perplexity > res.plain.perplexity
    assert len(said) == 1 and "worse than the plain model" in said[0] and res.meta["notes"] == said
    said.clear()
    evaluate(ckpt, **kw, methods=Methods(dynamic=DynamicConfig(method="sgd", lr=1e-9, decay=0.0)))
    assert not said  # no better or worse to speak of: nothing said


def test_help_carries_no_measured_numbers():
    from lmmem.evaluation.cli import build_parser

    for action in build_parser()._actions:
        text = action.help or ""
        assert not re.search(r"\d\s*×|\d\s*%|\bx\d|~\d", text), (action.dest, text)
