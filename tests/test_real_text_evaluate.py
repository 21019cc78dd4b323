"""python -m lmmem.experiments.real_text evaluate: on a tiny trained HF model it builds the datastore,
runs the one evaluate.py call with every memory tuned on valid, and summarises it per word without a
path of this machine; finished steps are skipped on a second call."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("transformers", reason="lmmem[hf] extra not installed")

from conftest import write_prepared_corpus  # noqa: E402

from lmmem.experiments import real_text  # noqa: E402
from lmmem.experiments.train_hf import HFTrainConfig, train_hf  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_evaluate_grid_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    data = write_prepared_corpus(work / "data" / "news-abc", tokens={"train": 3000, "valid": 600, "test": 600})
    run = work / "runs" / "news-abc" / "gpt2-seed1"
    train_hf(HFTrainConfig(data=str(data), out=str(run), arch="gpt2", vocab_size=320, d_model=16, layers=1, heads=2,
                           context=32, batch_size=2, steps=4, eval_interval=2, eval_batch_size=8, warmup_steps=1,
                           progress=False))
    argv = ["evaluate", "--work", str(work), "--out", str(tmp_path / "out"), "--corpora", "news-abc", "--models",
            "gpt2", "lstm", "--seeds", "1", "--context", "16", "--max-tokens", "256",
            "--extra", "--dynamic-stat-batches 2 --batch-size 4"]
    assert real_text.main(argv) == 0  # lstm-seed1 is not trained: skipped
    raw = json.loads((work / "eval" / "news-abc" / "gpt2-seed1.json").read_text())
    assert raw["window"]["convention"] == "sliding" and raw["window"]["context"] == 16
    text = (tmp_path / "out" / "real-text-evaluation.json").read_text()
    assert str(tmp_path) not in text and "/tmp" not in text  # portable
    summary = json.loads(text)
    (record,) = summary["runs"]["news-abc"]["gpt2"]
    assert set(record["methods"]) == set(real_text.METHODS)
    for name, method in record["methods"].items():  # per word: the sum of a word's tokens' log-probabilities
        words = raw["methods"][name]["words"]
        assert method["word_perplexity"] == pytest.approx(math.exp(words["loss"]), rel=1e-12)
        assert method["buckets"] == {b["name"]: b["perplexity"] for b in words["buckets"]}
    assert record["words"] == raw["words"]["tokens"] < record["tokens"]
    assert real_text._hf_words(work / "eval" / "news-abc", 1) == record["words"]  # what the LSTM would score
    assert real_text._hf_words(work / "eval" / "news-abc", 2) is None
    assert set(record["tuned"]) == {"+cache", "+knn", "+cache+knn", "+dynamic", "+dynamic+cache+knn"}
    assert any(c.startswith("python -m lmmem datastore WORK/runs/news-abc/gpt2-seed1") for c in summary["commands"])
    page = (tmp_path / "out" / "real-text-evaluation.md").read_text()
    assert "| +all |" in page and "tuned on valid (seed 1)" in page
    # a second call finds everything done and runs nothing
    monkeypatch.setattr(real_text, "run_one", lambda *a: pytest.fail("a finished step was run again"))
    assert real_text.main(argv) == 0


def test_evaluate_without_runs_is_one_line(tmp_path, capsys):
    from lmmem.cli import run_cli

    assert run_cli(real_text.main, ["evaluate", "--work", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "train first" in err and "Traceback" not in err


def test_tables_over_seeds_are_geometric_means_with_each_seed_beside_them():
    def run(seed, base, knn):
        share = {">10K": 0.5, "<100": 0.5}
        return {"seed": seed, "words": 100, "tokens": 120, "bucket_share": share, "tuned": {},
                "methods": {"plain": {"word_perplexity": base, "buckets": {">10K": base / 2, "<100": base * 2}},
                            "+knn": {"word_perplexity": knn, "buckets": {">10K": knn / 2, "<100": knn * 2}}}}
    summary = {"settings": {"methods": {"plain": "base", "+knn": "+kNN"}},
               "runs": {"news-abc": {"gpt2": [run(1, 100.0, 80.0), run(2, 400.0, 360.0)]}}}
    text = real_text.render_tables(summary)
    assert "(seeds 1, 2;" in text and "| method | word ppl | >10K ppl | <100 ppl | per seed |" in text
    base, knn = math.sqrt(100 * 400), math.sqrt(80 * 360)
    assert f"| base | {base:.1f} | {base / 2:.1f} | {base * 2:.1f} | 100.0 / 400.0 |" in text
    assert f"| +kNN | {knn:.1f} ({100 * (knn / base - 1):+.1f}%) |" in text and "| -20.0% / -10.0% |" in text
    one = real_text.render_tables({**summary, "runs": {"news-abc": {"gpt2": [run(1, 100.0, 80.0)]}}})
    assert "per seed" not in one and "| +kNN | 80.0 (-20.0%) | 40.0 (-20.0%) | 160.0 (-20.0%) |" in one


def test_lstm_alone_with_max_tokens_waits_for_an_hf_evaluation(tmp_path, monkeypatch, capsys):
    """With --max-tokens the LSTM scores as many words as the HF models of its seed did; a call with
    --models lstm before any HF evaluation says so instead of scoring a different amount of text."""
    work = tmp_path / "work"
    run = work / "runs" / "news-abc" / "lstm-seed1"
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes(b"")
    (run / "last.pt").write_bytes(b"")
    monkeypatch.setattr(real_text, "run_one", lambda *a: pytest.fail("the LSTM was evaluated"))
    monkeypatch.setattr(real_text, "steps_done", lambda last: real_text.CORPORA["news-abc"]["lstm_steps"])
    summary = real_text.evaluate_grid(work, ["news-abc"], [1], ["lstm"], max_tokens=1000)
    assert summary["runs"] == {} and "evaluate gpt2 or llama of seed 1 first" in capsys.readouterr().out


def test_an_interrupted_lstm_run_is_not_evaluated(tmp_path, monkeypatch, capsys):
    """An LSTM run has a best.pt from its first validation on: a run stopped at step 200 of 2,000
    must not be scored as if it were trained (it once would have been)."""
    import torch

    work = tmp_path / "work"
    run = work / "runs" / "news-abc" / "lstm-seed1"
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes(b"")
    monkeypatch.setattr(real_text, "run_one", lambda *a: pytest.fail("an unfinished run was evaluated"))
    monkeypatch.setattr(real_text, "steps_done", lambda last: torch.load(last)["progress"]["step"])
    steps = real_text.CORPORA["news-abc"]["lstm_steps"]
    for step in (None, 200, steps - 1):
        if step is not None:
            torch.save({"progress": {"step": step}}, run / "last.pt")
        assert real_text.evaluate_grid(work, ["news-abc"], [1], ["lstm"])["runs"] == {}
        assert "its training has not finished" in capsys.readouterr().out
    torch.save({"progress": {"step": steps}}, run / "last.pt")
    assert real_text.trained("lstm", "news-abc", run) and not real_text.trained("gpt2", "news-abc", run)
