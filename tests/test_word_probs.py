"""--word-probs: one row per scored token, recorded by the scoring loops themselves, so summing a
method's column gives back exactly the perplexity reported for it (issue 15 item 5)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import run_script
from lmmem.data.corpus import PreparedCorpus
from lmmem.evaluation import DynamicConfig, FrequencyBuckets, Methods, TuneGrid, evaluate
from lmmem.memories import CacheConfig, MbPAConfig
from test_evaluate_methods import _checkpoint


def read_tsv(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    head = lines[0].split("\t")
    rows = [line.split("\t") for line in lines[1:]]
    return head, rows


def assert_columns_reproduce(head, rows, reports, corpus, split, buckets):
    assert head[:4] == ["position", "word", "train_count", "bucket"]
    assert head[4:] == list(reports)
    reports = {m: r.report for m, r in reports.items()}
    tokens = corpus.tokens(split)
    counts = corpus.train_counts()
    names = buckets.names
    bucket_of = buckets.assign(counts)
    positions = [int(r[0]) for r in rows]
    assert positions == sorted(set(positions)) and len(positions) == reports["plain"].tokens
    for r in rows[:50]:  # the word, count and bucket columns describe the target at that position
        t = int(tokens[int(r[0])])
        assert (r[1], int(r[2]), r[3]) == (corpus.vocab.tokens[t], int(counts[t]), names[bucket_of[t]])
    for j, method in enumerate(head[4:], start=4):
        lp = np.array([float(r[j]) for r in rows])
        ppl = math.exp(-lp.sum() / len(lp))
        assert ppl == pytest.approx(reports[method].perplexity, rel=1e-9), method
        # and bucket by bucket
        for b, rep in enumerate(reports[method].buckets):
            sel = np.array([r[3] == rep.name for r in rows])
            if rep.tokens:
                assert math.exp(-lp[sel].mean()) == pytest.approx(rep.perplexity, rel=1e-9)


@pytest.mark.parametrize("streams", [None, 8])
def test_every_method_column_sums_to_its_reported_perplexity(small_corpus, tmp_path, streams):
    ckpt = _checkpoint(small_corpus, tmp_path / "m.pt")
    buckets = FrequencyBuckets((100, 10))
    out = tmp_path / "wp.tsv"
    res = evaluate(ckpt, batch_size=4, streams=streams, device="cpu", buckets="100,10", progress=False,
                   methods=Methods(cache=CacheConfig(window=50, theta=0.3, lam=0.1), mbpa=MbPAConfig(k=4, steps=2, memory=50, lam=0.2),
                                   dynamic=DynamicConfig(lr=1e-3) if streams is None else None),
                   max_tokens=301, word_probs=out)
    head, rows = read_tsv(out)
    assert res.meta["word_probs"] == {"path": str(out), "rows": 301, "columns": head[4:]}
    assert_columns_reproduce(head, rows, res.reports, PreparedCorpus.open(small_corpus), "test", buckets)
    # the methods do differ token by token (a column copied from another could not pass the sums)
    assert len({tuple(r[4:]) for r in rows[100:]} - {tuple([r[4]] * (len(r) - 4)) for r in rows[100:]}) > 0


def test_tuned_methods_and_plain_evaluation_and_jsonl(small_corpus, tmp_path):
    ckpt = _checkpoint(small_corpus, tmp_path / "m.pt")
    corpus = PreparedCorpus.open(small_corpus)
    res = evaluate(ckpt, batch_size=4, device="cpu", methods=Methods(cache=CacheConfig(window=50)), progress=False,
                   tune=TuneGrid(thetas=(0.1, 1.0), lambdas=(0.0, 0.1, 0.3)), max_tokens=200, split="valid",
                   word_probs=tmp_path / "t.tsv")
    assert_columns_reproduce(*read_tsv(tmp_path / "t.tsv"), res.reports, corpus, "valid", FrequencyBuckets())
    result = evaluate(ckpt, batch_size=4, device="cpu", max_tokens=200, word_probs=tmp_path / "p.jsonl", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"position", "word", "train_count", "bucket", "log_probs"}
    lp = np.array([r["log_probs"]["plain"] for r in rows])
    assert math.exp(-lp.sum() / len(lp)) == pytest.approx(result.plain.perplexity, rel=1e-9)


@pytest.mark.slow
def test_word_probs_through_the_cli(small_corpus, tmp_path):
    ckpt = _checkpoint(small_corpus, tmp_path / "m.pt")
    out = tmp_path / "w.tsv"
    proc = run_script("evaluate.py", str(ckpt), "--cache", "--max-tokens", "150", "--word-probs", str(out),
                      "--json", str(tmp_path / "e.json"), check=True)
    assert f"wrote 150 rows to {out}" in proc.stdout
    result = json.loads((tmp_path / "e.json").read_text())
    head, rows = read_tsv(out)
    for j, method in enumerate(head[4:], start=4):
        lp = np.array([float(r[j]) for r in rows])
        assert math.exp(-lp.sum() / len(lp)) == pytest.approx(result["methods"][method]["perplexity"], rel=1e-9)
