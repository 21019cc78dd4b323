"""lmmem.experiments.real_text: the grid's corpora and LSTM runs are those of the reproduction pages
(docs/results/reproduction-*), so the LSTM numbers of the real-text page compare with them."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from lmmem.experiments.real_text import CORPORA, prepare_command, train_command

REPO = Path(__file__).resolve().parents[1]
PAGES = {"gutenberg": "reproduction-gutenberg", "news-abc": "reproduction-news-abc", "wikitext-2": "reproduction-wikitext-2"}


def options(cmd: list[str]) -> dict[str, str]:
    """{flag: value} of a command line, the data/run folders left out (they differ by design)."""
    pairs, i = {}, 0
    while i < len(cmd):
        if cmd[i].startswith("--"):
            has_value = i + 1 < len(cmd) and not cmd[i + 1].startswith("--")
            pairs[cmd[i]] = cmd[i + 1] if has_value else ""
            i += 2 if has_value else 1
        else:
            i += 1
    for flag in ("--out", "--data", "--no-progress"):
        pairs.pop(flag, None)
    pairs["--source"] = Path(pairs["--source"]).name if "--source" in pairs else None
    return pairs


@pytest.mark.parametrize("corpus", sorted(CORPORA))
def test_same_corpora_and_lstm_runs_as_the_reproduction_pages(corpus, tmp_path):
    steps = json.loads((REPO / "docs" / "results" / PAGES[corpus] / "results.json").read_text())["steps"]
    prep = shlex.split(next(s for s in steps if s.startswith("python -m data_prep")))
    ours = prepare_command(corpus, REPO.parent / "shared" / "data", tmp_path)
    assert ours[3] == prep[3] and options(ours) == options(prep)  # the data_prep corpus and every option
    lstm = shlex.split(next(s for s in steps if s.startswith("python train.py") and "--softmax full" in s))
    assert options(train_command("lstm", corpus, 1, tmp_path, tmp_path / "run")) == options(lstm)


@pytest.mark.parametrize("corpus", sorted(CORPORA))
def test_hf_commands_parse(corpus, tmp_path):
    from lmmem.cli import dataclass_from_args
    from lmmem.experiments.train_hf import HFTrainConfig, build_parser

    for arch in ("gpt2", "llama"):
        cmd = train_command(arch, corpus, 3, tmp_path, tmp_path / "run")
        parser, dests = build_parser()
        cfg = dataclass_from_args(HFTrainConfig, parser.parse_args(cmd[3:]), dests)
        assert (cfg.arch, cfg.seed, cfg.steps) == (arch, 3, CORPORA[corpus]["hf_steps"])


def test_a_call_for_other_corpora_keeps_the_records_of_earlier_calls():
    """training.json / real-text-evaluation.json are the grid's whole record: `train --corpora
    gutenberg` after `train --corpora news-abc` must not drop news-abc's runs (it once did)."""
    from lmmem.experiments.real_text import merge_summaries

    old = {"commands": ["a", "b"], "runs": {"news-abc": {"gpt2": [{"seed": 1, "x": 1}]},
                                            "gutenberg": {"gpt2": [{"seed": 1, "x": 2}, {"seed": 2, "x": 3}]}},
           "machine": {"m": 0}}
    new = {"commands": ["b", "c"], "runs": {"gutenberg": {"gpt2": [{"seed": 1, "x": 9}], "llama": [{"seed": 1, "x": 4}]}},
           "machine": {"m": 1}}
    merged = merge_summaries(old, new)
    assert merged["commands"] == ["a", "b", "c"]
    assert merged["runs"]["news-abc"] == old["runs"]["news-abc"]
    assert merged["runs"]["gutenberg"]["gpt2"] == [{"seed": 1, "x": 9}, {"seed": 2, "x": 3}]
    assert merged["runs"]["gutenberg"]["llama"] == [{"seed": 1, "x": 4}]
    assert merged["machine"] == {"m": 1} and old["runs"]["gutenberg"]["gpt2"][0]["x"] == 2  # old untouched
    assert merge_summaries({}, new)["runs"] == new["runs"]


def test_a_method_that_diverged_on_test_is_shown_as_such():
    from lmmem.experiments.real_text import METHODS, render_tables

    def rec(seed, diverged):
        rep = {"word_perplexity": 100.0 * seed, "token_perplexity": 90.0, "buckets": {"<100": 1000.0, ">10K": 10.0}}
        methods = {m: rep for m in METHODS if not (diverged and m.startswith("+dynamic"))}
        return {"seed": seed, "words": 5, "tokens": 6, "bucket_share": {"<100": 0.5, ">10K": 0.5}, "tuned": {},
                "diverged": {"split": "test", "dynamic_lr": 6e-4, "methods": ["+dynamic", "+dynamic+cache+knn"]} if diverged else None,
                "methods": methods}

    one = render_tables({"runs": {"c": {"lstm": [rec(1, True)]}}, "settings": {"methods": METHODS}})
    assert "| +dynamic | diverged on test (seed 1) | | |" in one and "| +all | diverged on test (seed 1) |" in one
    two = render_tables({"runs": {"c": {"lstm": [rec(1, True), rec(2, False)]}}, "settings": {"methods": METHODS}})
    # the change is from the same seeds' base (seed 2's 200.0), not from the mean base of all seeds (141.4)
    assert "| +dynamic (diverged in seed 1; mean of the others, change from their base) | 200.0 (+0.0%) |" in two


def test_two_grid_processes_writing_the_summary_keep_each_others_records(tmp_path, monkeypatch):
    """Two `train` processes for different corpora share WORK/training.json. Each finishes runs
    while the other trains; a merge into a copy read at start-up dropped the other's newer records
    (it once did). Here the other process's record lands while this one trains."""
    from lmmem.experiments import real_text

    work = tmp_path / "work"
    (work / "data" / "news-abc").mkdir(parents=True)
    (work / "data" / "news-abc" / "meta.json").write_text("{}")
    other = {"commands": ["other"], "runs": {"gutenberg": {"gpt2": [{"seed": 2, "x": 7}]}}, "machine": {}}

    def fake_train(cmd, log, extra):  # the run, and meanwhile the other process's write
        real_text.update_summary(work / "training.json", other)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "run.json").write_text("{}")

    monkeypatch.setattr(real_text, "run_one", fake_train)
    monkeypatch.setattr(real_text, "hf_record", lambda out: {"x": 1})
    real_text.train_grid(work, tmp_path, ["news-abc"], [2], ["gpt2"])
    runs = json.loads((work / "training.json").read_text())["runs"]
    assert runs["gutenberg"]["gpt2"] == [{"seed": 2, "x": 7}]
    assert runs["news-abc"]["gpt2"] == [{"seed": 2, "out": "runs/news-abc/gpt2-seed2", "x": 1}]
