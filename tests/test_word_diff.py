"""word_diff: the per-word split of the NLL gap between two --word-probs files (written here by the
writer evaluate.py uses) adds up to the gap computed directly from the log-probabilities."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmmem.errors import LmmemError
from lmmem.evaluation.buckets import FrequencyBuckets
from lmmem.evaluation.sinks import VocabLabels, write_word_probs
from lmmem.evaluation.word_diff import main, read_word_probs, word_diff

VOCAB = ["<eos>", "the", '"', "cat", "zyx", "of"]
COUNTS = np.array([500, 900, 40, 30, 2, 700])


def _write(path, tokens, columns):
    labels = VocabLabels(tokens, VOCAB, COUNTS, FrequencyBuckets((100, 10)))
    return write_word_probs(path, columns, labels)


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl"])
def test_parts_add_up_to_the_gap(tmp_path, suffix):
    rng = np.random.default_rng(7)
    n = 301
    tokens = rng.integers(0, len(VOCAB), n)  # repeated words, a lone quote character among them
    a = np.full(n, np.nan)
    b = np.full(n, np.nan)
    a[1:] = -rng.exponential(3.0, n - 1)
    b[1:] = -rng.exponential(3.0, n - 1)
    b[7] = np.nan  # scored by A only
    _write(tmp_path / f"a{suffix}", tokens, {"plain": a, "cache": a - 0.1})
    _write(tmp_path / f"b{suffix}", tokens, {"plain": np.where(np.isnan(b), a, b)})
    ra, rb = read_word_probs(tmp_path / f"a{suffix}", "plain"), read_word_probs(tmp_path / f"b{suffix}", "plain")
    rb.pop(7)
    r = word_diff(ra, rb, top=len(VOCAB))
    both = [i for i in range(1, n) if i != 7]
    gap = float(sum(a[i] - b[i] for i in both))
    assert r["tokens"] == len(both) and r["only_in_a"] == 1 and r["only_in_b"] == 0
    assert r["sum"] == pytest.approx(gap, rel=1e-12) and r["mean"] == pytest.approx(gap / len(both), rel=1e-12)
    assert sum(x["sum"] for x in r["buckets"]) == pytest.approx(gap, rel=1e-12)
    assert [x["bucket"] for x in r["buckets"]] == [">100", "10–100", "<10"]
    for w, t in (("cat", 3), ('"', 2)):
        want = float(sum(a[i] - b[i] for i in both if tokens[i] == t))
        got = next(x for x in r["worse_in_b"] if x["word"] == w)
        assert got["sum"] == pytest.approx(want, rel=1e-12) and got["train_count"] == COUNTS[t]
    assert sum(x["sum"] for x in r["worse_in_b"]) == pytest.approx(gap, rel=1e-12)  # every word listed
    worse = [x["sum"] for x in r["worse_in_b"]]
    assert worse == sorted(worse, reverse=True)


def test_cli_table_json_and_one_line_errors(tmp_path, capsys):
    tokens = np.array([0, 1, 3, 1, 4, 0])
    lp = np.array([np.nan, -1.0, -5.0, -1.0, -9.0, -2.0])
    _write(tmp_path / "a.tsv", tokens, {"plain": lp, "cache": lp + 0.5})
    _write(tmp_path / "b.tsv", tokens, {"plain": lp - np.array([0, 0, 1.0, 0, 2.0, 0])})
    assert main([str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv"), "--top", "2", "--json", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    assert "mean +0.6000 per token" in out and "| zyx | 1 | 2 | +2.0 | +2.000 |" in out
    assert json.loads((tmp_path / "d.json").read_text())["sum"] == pytest.approx(3.0)
    # B's cache column against A's plain one
    main([str(tmp_path / "a.tsv"), str(tmp_path / "a.tsv"), "--column-b", "cache"])
    assert "mean -0.5000 per token" in capsys.readouterr().out
    with pytest.raises(LmmemError, match="no method column 'knn'"):
        main([str(tmp_path / "a.tsv"), str(tmp_path / "b.tsv"), "--column", "knn"])
    _write(tmp_path / "other.tsv", np.array([0, 1, 3, 5, 4, 0]), {"plain": lp})
    with pytest.raises(LmmemError, match="position 3 is 'the' in one file and 'of'"):
        main([str(tmp_path / "a.tsv"), str(tmp_path / "other.tsv")])
    with pytest.raises(LmmemError, match="does not exist"):
        main([str(tmp_path / "missing.tsv"), str(tmp_path / "b.tsv")])
