"""The reproduction runner (python -m lmmem.experiments.softmax_comparison): trains both softmaxes,
evaluates plain/+cache/+MbPA/+both tuned on valid, writes the page, and reuses finished work."""

import json
import shutil

import pytest

from conftest import write_prepared_corpus

from lmmem.errors import LmmemError
from lmmem.experiments import softmax_comparison


def test_runner_writes_paper_layout_page_and_reuses_runs(tmp_path, one_thread):
    work = tmp_path / "work"
    write_prepared_corpus(work / "data", vocab_size=150, tokens={"train": 4000, "valid": 700, "test": 700})
    page = tmp_path / "docs" / "repro.md"
    argv = ["synthetic", "--work", str(work), "--preset", "tiny", "--max-steps", "6", "--seeds", "1", "2",
            "--train-args", "batch_size=4 bptt=12 eval_interval=0", "--eval-batch-size", "2", "--test-time",
            "--cache-window", "40", "--mbpa-k", "4", "--mbpa-steps", "2", "--mbpa-vocab", "16",
            "--thetas", "0.3", "--lambdas", "0.0", "0.1", "--page", str(page),
            "--variants", "full", "hebbian", "hebbian-T2:softmax=hebbian,hebbian_T=2,seeds=2"]
    assert softmax_comparison.main(argv) == 0
    results = json.loads((work / "results.json").read_text())
    assert set(results["runs"]) == {"full", "hebbian", "hebbian-T2"}
    assert [r["seed"] for r in results["runs"].pop("hebbian-T2")] == [2]  # a variant limited to one seed
    for runs in results["runs"].values():
        assert [r["seed"] for r in runs] == [1, 2]
        for r in runs:
            tt = r["test_time"]
            assert set(tt["test"]) == {"plain", "+cache", "+mbpa", "+cache+mbpa"}
            # the test-time pass's plain score is the plain evaluation's (same streams = batch size)
            assert abs(tt["test"]["plain"]["perplexity"] - r["test"]["perplexity"]) < 1e-6 * r["test"]["perplexity"]
            assert tt["choice"]["+cache"]["cache_lambda"] == 0.1 and tt["choice"]["+mbpa"]["mbpa_lambda"] == 0.1
    text = page.read_text()
    assert "| full + cache + MbPA |" in text and "| hebbian + MbPA |" in text
    assert " ± " in text  # two seeds: mean ± std
    assert "(seeds 2)" in text
    assert "`hebbian` = softmax=hebbian (Hebbian rule: centred)" in text  # "hebbian" meant the paper's rule before
    assert (page.parent / "repro" / "results.json").is_file()
    # committed results hold no path of the machine that ran them: the work folder is WORK
    assert str(tmp_path) not in (page.parent / "repro" / "results.json").read_text() and str(tmp_path) not in text
    assert "--work WORK" in results["command"] and "python train.py --data WORK/data --out WORK/full-seed1" in "\n".join(results["steps"])
    # a second invocation trains and evaluates nothing again
    stamp = {p: p.stat().st_mtime_ns for p in work.glob("*-seed*/test-time.json")}
    assert len(stamp) == 5
    assert softmax_comparison.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in work.glob("*-seed*/test-time.json")} == stamp
    # an evaluation cached before an MbPA option existed is still reused (the option's old behaviour)
    one = work / "full-seed1" / "test-time.json"
    saved = json.loads(one.read_text())
    del saved["key"]["mbpa"]["train_pairs"]
    saved["key"]["mbpa"]["max_elements"] = 1 << 24  # a performance knob, not a setting of the method
    one.write_text(json.dumps(saved))
    before = one.stat().st_mtime_ns
    assert softmax_comparison.main(argv) == 0
    assert one.stat().st_mtime_ns == before
    # ... but one made with another MbPA setting is redone
    saved["key"]["mbpa"]["eps"] = 123.0
    one.write_text(json.dumps(saved))
    assert softmax_comparison.main(argv) == 0
    assert json.loads(one.read_text())["key"]["mbpa"]["eps"] != 123.0

    # --reuse: a variant's runs come from an earlier results.json with the same settings; nothing is trained
    other = tmp_path / "other"
    shutil.copytree(work / "data", other / "data")
    base = [str(other) if a == str(work) else a for a in argv[:argv.index("--page")] + argv[argv.index("--page") + 2:]]
    earlier = work / "results.json"
    reuse = ["--reuse"] + [f"{label}={earlier}" for label in ("full", "hebbian", "hebbian-T2")]
    assert softmax_comparison.main(base + reuse) == 0
    assert not list(other.glob("*-seed*"))
    again = json.loads((other / "results.json").read_text())
    assert again["runs"] == json.loads(earlier.read_text())["runs"]
    assert again["reused"]["full"]["from"] == "REUSE"  # no path of this machine in results (the command names it)
    assert "reused from `REUSE`" in (other / "results.md").read_text()
    # ... and refused, in one line naming the difference, when the earlier runs were measured otherwise
    steps = base.index("--max-steps") + 1
    with pytest.raises(LmmemError, match="--max-steps"):
        softmax_comparison.main(base[:steps] + ["7"] + base[steps + 1:] + reuse)
    with pytest.raises(LmmemError, match="variant hebbian"):
        softmax_comparison.main([a.replace("hebbian-T2:softmax=hebbian,hebbian_T=2", "hebbian-T2:softmax=hebbian,hebbian_T=3")
                                 for a in base] + ["--reuse", f"hebbian-T2={earlier}"])
    with pytest.raises(LmmemError, match="test-time settings"):
        softmax_comparison.main(base + ["--mbpa-k", "3"] + reuse)
    with pytest.raises(LmmemError, match=r"seed\(s\) 3"):
        softmax_comparison.main([*base, "--seeds", "1", "2", "3", "--reuse", f"full={earlier}"])


def test_mbpa_sweep_runs_on_valid(tmp_path, one_thread):
    from lmmem.data.corpus import PreparedCorpus
    from lmmem.experiments import mbpa_sweep
    from lmmem.models import ModelConfig, build_model
    from lmmem.checkpoints import save_checkpoint

    data = write_prepared_corpus(tmp_path / "d", vocab_size=60, tokens={"train": 500, "valid": 200, "test": 100})
    cfg = ModelConfig(vocab_size=60, embed_dim=8, hidden_dim=12, proj_dim=8, tie_weights=True)
    save_checkpoint({"model_config": cfg.to_dict(), "model": build_model(cfg).state_dict(), "progress": {"step": 0},
                     "train_config": {"data": str(data), "bptt": 10}, "vocab_fingerprint": PreparedCorpus.open(data).fingerprint},
                    tmp_path / "m.pt")
    out = tmp_path / "s.json"
    assert mbpa_sweep.main([str(tmp_path / "m.pt"), "--lrs", "0.1", "0.3", "--alphas", "0.5", "--lambdas", "0.1", "0.3",
                            "--mbpa-k", "3", "--mbpa-steps", "1", "--mbpa-vocab", "0", "5", "--eps", "0.01", "--batch-size", "2",
                            "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["vocab"], r["lr"], r["alpha"], r["eps"]) for r in rows] == [(0, 0.1, 0.5, 0.01), (0, 0.3, 0.5, 0.01),
                                                                           (5, 0.1, 0.5, 0.01), (5, 0.3, 0.5, 0.01)]
    assert all(r["best_lambda"] in (0.1, 0.3) and r["valid_ppl"] == min(r["ppl_by_lambda"].values()) for r in rows)
    # the restricted candidate set (5 of 60 rows + neighbours' words) changes the adapted model
    assert rows[0]["ppl_by_lambda"] != rows[2]["ppl_by_lambda"]
    # on top of the cache: MbPA alone is the same numbers, the combination is chosen over θ and both λs
    assert mbpa_sweep.main([str(tmp_path / "m.pt"), "--lrs", "0.1", "--alphas", "0.5", "--lambdas", "0.1", "0.3",
                            "--mbpa-k", "3", "--mbpa-steps", "1", "--mbpa-vocab", "0", "--eps", "0.01", "--batch-size", "2",
                            "--with-cache", "--thetas", "0.3", "1.0", "--json", str(out)]) == 0
    (both,) = json.loads(out.read_text())["rows"]
    assert both["ppl_by_lambda"] == pytest.approx(rows[0]["ppl_by_lambda"], rel=1e-12)
    assert both["cache_mbpa_choice"]["theta"] in (0.3, 1.0) and both["cache_mbpa_choice"]["cache_lambda"] > 0
    assert both["cache_mbpa_choice"]["mbpa_lambda"] > 0 and both["cache_choice"]["mbpa_lambda"] == 0
    assert both["cache_mbpa_valid_ppl"] > 0 and both["cache_ppl"] > 0


def test_runner_continues_an_interrupted_run_from_last_pt(tmp_path, one_thread, monkeypatch, capsys):
    """An interrupted training run is continued from its last.pt (train.py --resume semantics), not
    redone, and ends with exactly the weights of an uninterrupted run; train_minutes is recorded."""
    import contextlib

    import torch

    from lmmem.training import trainer
    from lmmem.checkpoints import load_checkpoint

    def argv(work):
        return ["synthetic", "--work", str(work), "--preset", "tiny", "--max-steps", "8", "--seeds", "1", "--variants", "full",
                "--train-args", "batch_size=4 bptt=12 eval_interval=4 checkpoint_interval=100", "--eval-batch-size", "2"]

    for work in (tmp_path / "straight", tmp_path / "interrupted"):
        write_prepared_corpus(work / "data", vocab_size=120, tokens={"train": 3000, "valid": 500, "test": 500})
    assert softmax_comparison.main(argv(tmp_path / "straight")) == 0

    class StopAfter(dict):
        """The trainer's stop flag, raised (as by Ctrl-C) when it is read for the 5th time: after step 5."""

        def __init__(self):
            super().__init__(stop=False)
            self.reads = 0

        def __getitem__(self, key):
            self.reads += 1
            return self.reads >= 5

    real = trainer.stop_on_signals
    monkeypatch.setattr(trainer, "stop_on_signals", contextlib.contextmanager(lambda: (yield StopAfter())))
    work = tmp_path / "interrupted"
    assert softmax_comparison.main(argv(work)) == 130
    run = work / "full-seed1"
    assert load_checkpoint(run / "last.pt")["progress"]["step"] == 5
    assert "run the same command again to continue it" in capsys.readouterr().out
    monkeypatch.setattr(trainer, "stop_on_signals", real)
    assert softmax_comparison.main(argv(work)) == 0
    assert f"resumed {run / 'last.pt'} at step 5" in capsys.readouterr().out
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if "train_loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # steps 1-5 were not trained again
    a = load_checkpoint(tmp_path / "straight" / "full-seed1" / "last.pt")
    b = load_checkpoint(run / "last.pt")
    assert a["progress"]["step"] == b["progress"]["step"] == 8
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    results = json.loads((work / "results.json").read_text())
    (record,) = results["runs"]["full"]
    assert record["train_minutes"] is not None and record["train_minutes"] >= 0
    assert b["train_seconds"] > 0 and record["train_minutes"] == round(b["train_seconds"] / 60, 2)


def test_render_redraws_a_committed_page_from_its_json(tmp_path):
    """`render PAGE` rewrites the page and its faceted chart from the results.json beside it, with
    one number format for perplexities (11,376.36) and counts (2,000)."""
    import shutil
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs" / "results"
    page = tmp_path / "reproduction-gutenberg.md"
    (tmp_path / "reproduction-gutenberg").mkdir()
    shutil.copy(docs / "reproduction-gutenberg" / "results.json", tmp_path / "reproduction-gutenberg" / "results.json")
    assert softmax_comparison.main(["render", str(page)]) == 0
    text = page.read_text()
    assert text == (docs / "reproduction-gutenberg.md").read_text()  # the committed page is up to date
    assert "| full | 118.65 ± 7.32 | 116.84 ± 4.18 | 10.76 ± 0.16 | 54.41 ± 2.92 | 575.92 ± 36.07 | 11,376.36 ± 848.39 |" in text
    assert "| full | 1 | 2,000 | – | 121.49 |" in text  # train_minutes not recorded for these runs
    assert (tmp_path / "reproduction-gutenberg" / "results.png").stat().st_size > 10_000
    panels = softmax_comparison.chart_panels(json.loads((tmp_path / "reproduction-gutenberg" / "results.json").read_text()))
    assert list(panels) == ["full (3 seeds)", "hebbian (3 seeds)", "hebbian-rescale (seed 1)", "hebbian-T100 (seed 1)"]
    assert all(list(p) == ["plain", "+ cache", "+ MbPA", "+ cache + MbPA"] for p in panels.values())


def _runner_pages() -> list[str]:
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs" / "results"
    return sorted(p.stem for p in docs.glob("*.md") if (docs / p.stem / "results.json").is_file()
                  and json.loads((docs / p.stem / "results.json").read_text()).get("command", "").startswith(
                      "python -m lmmem.experiments.softmax_comparison"))


@pytest.mark.parametrize("name", _runner_pages())
def test_every_runner_page_is_what_render_makes_of_its_json(tmp_path, name):
    """A runner page is never edited by hand: what it says is what its committed JSON says."""
    import shutil
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs" / "results"
    (tmp_path / name).mkdir()
    shutil.copy(docs / name / "results.json", tmp_path / name / "results.json")
    assert softmax_comparison.main(["render", str(tmp_path / f"{name}.md")]) == 0
    assert (tmp_path / f"{name}.md").read_text() == (docs / f"{name}.md").read_text()


def test_one_number_format():
    from lmmem.evaluation.report import format_count, format_perplexity

    assert [format_perplexity(x) for x in (8619.644, 14549.2, 10.755, None)] == ["8,619.64", "14,549.20", "10.76", "–"]
    assert format_count(14549) == "14,549"
