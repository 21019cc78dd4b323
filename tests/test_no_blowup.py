"""The no-blow-up runner (python -m lmmem.experiments.no_blowup): each variant trained from scratch
beside the full softmax; its largest training-loss excess per window, read back from the runs."""

import json

import pytest

from conftest import write_prepared_corpus

from lmmem.errors import LmmemError, TrainingDiverged
from lmmem.experiments import no_blowup


def test_excess_is_the_largest_windowed_difference_and_runs_are_reused(tmp_path, one_thread):
    data = tmp_path / "data"
    write_prepared_corpus(data, vocab_size=120, tokens={"train": 3000, "valid": 400, "test": 400})
    work, page = tmp_path / "work", tmp_path / "docs" / "nb.md"
    argv = ["--work", str(work), "--corpora", f"toy={data}", "--archs", "lstm", "--seeds", "1", "2", "--max-steps", "12",
            "--log-interval", "3", "--eval-tokens", "200", "--train-args", "batch_size=4 bptt=8 hebbian_start_step=0",
            "--variants", "full", "hebbian-paper:softmax=hebbian,hebbian_rule=paper", "--page", str(page)]
    assert no_blowup.main(argv) == 0
    results = json.loads(page.with_suffix(".json").read_text())
    full, paper = results["rows"]
    assert full["variant"] == "full" and full["max_excess"] is None and full["passes"] is None
    for seed in (1, 2):  # recomputed here from the runs' own metrics
        mine, _ = no_blowup.read_metrics(work / f"toy-lstm-hebbian-paper-seed{seed}")
        ref, _ = no_blowup.read_metrics(work / f"toy-lstm-full-seed{seed}")
        assert sorted(mine) == [3, 6, 9, 12]
        assert paper["excess_by_seed"][str(seed)] == pytest.approx(max(mine[s] - ref[s] for s in mine))
    assert paper["max_excess"] == max(paper["excess_by_seed"].values())
    assert paper["passes"] == (paper["max_excess"] <= 0.5)
    assert len(paper["valid_ppl"]) == 2 and all(v > 1 for v in paper["valid_ppl"])
    assert "| toy | lstm | hebbian-paper |" in page.read_text()
    # finished runs are reused: a second invocation trains nothing
    stamps = {p: p.stat().st_mtime_ns for p in work.glob("*/last.pt")}
    assert len(stamps) == 4
    assert no_blowup.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in work.glob("*/last.pt")} == stamps


def test_refuses_a_reference_other_than_full_and_an_unprepared_corpus(tmp_path):
    with pytest.raises(LmmemError, match="must be 'full'"):
        no_blowup.main(["--work", str(tmp_path / "w"), "--variants", "hebbian", "full"])
    with pytest.raises(LmmemError, match="not a prepared corpus"):
        no_blowup.main(["--work", str(tmp_path / "w"), "--corpora", f"x={tmp_path}"])


def test_a_diverged_run_is_a_failed_result_and_is_not_trained_again(tmp_path, one_thread, monkeypatch):
    data = tmp_path / "data"
    write_prepared_corpus(data, vocab_size=100, tokens={"train": 2000, "valid": 300, "test": 300})
    real = no_blowup.train

    def blows_up(cfg):  # what train.py raises when the loss passes 3·ln V
        if cfg.softmax == "hebbian":
            raise TrainingDiverged("loss became 99 by step 4", step=4, loss=99.0)
        return real(cfg)

    monkeypatch.setattr(no_blowup, "train", blows_up)
    argv = ["--work", str(tmp_path / "w"), "--corpora", f"toy={data}", "--archs", "lstm", "--max-steps", "8", "--log-interval", "2",
            "--eval-tokens", "100", "--train-args", "batch_size=4 bptt=8", "--variants", "full", "hebbian"]
    assert no_blowup.main(argv) == 0
    row = json.loads((tmp_path / "w" / "no_blowup.json").read_text())["rows"][1]
    assert row["max_excess"] == "inf" and row["passes"] is False and row["diverged"] == {"1": 4}
    assert row["final_train_loss"] == [99.0] and row["valid_ppl"] == [None]
    assert "| toy | lstm | hebbian | diverged | 4 (1) | **no** |" in (tmp_path / "w" / "no_blowup.md").read_text()
    calls = []
    monkeypatch.setattr(no_blowup, "train", lambda cfg: calls.append(cfg) or real(cfg))
    assert no_blowup.main(argv) == 0 and calls == []  # the divergence is a result: kept, not re-run
