"""The long-training runner (python -m lmmem.experiments.long_training): trains pass by pass with one
schedule over the whole run, snapshots every pass end, and a run trained in stages is the run
trained straight through."""

import json
import math
import statistics

import pytest
import torch

from conftest import write_prepared_corpus

from lmmem.errors import LmmemError
from lmmem.experiments import long_training, long_training_page
from lmmem.training import config_from_args, load_checkpoint, train

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = "preset=tiny embed_dim=16 hidden_dim=24 proj_dim=16 batch_size=4 bptt=8 log_interval=1000"


def _argv(work, page, *extra):
    return ["gutenberg", "--source", "unused", "--work", str(work), "--passes", "3", "--seeds", "1", "2",
            "--train-args", SMALL, "--eval-batch-size", "2", "--page", str(page),
            "--variants", "full", "centred:softmax=hebbian,hebbian_rule=centred,hebbian_start_step=5", *extra]


def test_passes_are_snapshots_of_one_uninterrupted_run_and_nothing_is_trained_twice(tmp_path):
    work, page = tmp_path / "work", tmp_path / "docs" / "long.md"
    write_prepared_corpus(work / "data", vocab_size=120, tokens={"train": 1000, "valid": 300, "test": 300})
    assert long_training.main(_argv(work, page)) == 0
    results = json.loads(page.with_suffix(".json").read_text())
    spp = results["steps_per_pass"]
    assert spp == 32  # rows of 250 tokens: 249 targets, 8 a step
    run = work / "centred-seed2"
    for k in (1, 2, 3):
        assert load_checkpoint(run / f"pass-{k}.pt")["progress"]["step"] == k * spp
    # the same run trained straight through (no stops at pass ends): bit for bit the same model
    flags = {"data": str(work / "data"), "out": str(tmp_path / "straight"), "seed": 2, "max_steps": 3 * spp, "eval_interval": 0,
             "progress": False, "softmax": "hebbian", "hebbian_rule": "centred", "hebbian_start_step": 5,
             **{k: long_training.config_value(k, v) for k, v in (kv.split("=") for kv in SMALL.split())}}
    train(config_from_args(flags))
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(run / "pass-3.pt")
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["model"]["output.counts"].sum() == 3 * 4 * 249  # every target of three passes (4 rows of 250 tokens) counted once
    # the page: per pass, the full softmax and the variant, and Δ from the seeds' means
    full = [[p["valid"]["perplexity"] for p in r["passes"]] for r in results["runs"]["full"]]
    mine = [[p["valid"]["perplexity"] for p in r["passes"]] for r in results["runs"]["centred"]]
    delta = (sum(m[1] for m in mine) / 2) / (sum(f[1] for f in full) / 2) - 1
    text = page.read_text()
    assert f"| 2 | {2 * spp:,} | " in text and f"{100 * delta:+.1f}%" in text
    assert "/tmp" not in text and str(tmp_path) not in page.with_suffix(".json").read_text()  # no paths of this machine
    assert results["hebbian_rules"] == {"centred": "centred"}
    # a second invocation trains and evaluates nothing
    stamps = {p: p.stat().st_mtime_ns for p in work.glob("*-seed*/pass-*")}
    assert len(stamps) == 4 * (3 + 3 + 1)  # 3 snapshots, 3 valid evaluations, 1 test evaluation per run
    assert long_training.main(_argv(work, page)) == 0
    assert {p: p.stat().st_mtime_ns for p in work.glob("*-seed*/pass-*")} == stamps
    # render rewrites the page from its JSON alone
    committed = text
    page.write_text("stale")
    assert long_training.main(["render", str(page)]) == 0
    assert page.read_text() == committed


def test_a_lost_last_checkpoint_continues_from_the_pass_snapshot_and_other_settings_are_refused(tmp_path):
    work, page = tmp_path / "work", tmp_path / "long.md"
    write_prepared_corpus(work / "data", vocab_size=100, tokens={"train": 700, "valid": 200, "test": 200})
    argv = _argv(work, page)
    argv[argv.index("--passes") + 1] = "2"
    argv[argv.index("--seeds") + 1 : argv.index("--seeds") + 3] = ["1"]
    assert long_training.main(argv) == 0
    run = work / "full-seed1"
    final = load_checkpoint(run / "pass-2.pt")["model"]
    (run / "pass-2.pt").unlink()
    (run / "last.pt").unlink()  # as if the run had been lost after pass 1
    assert long_training.main(argv) == 0
    again = load_checkpoint(run / "pass-2.pt")["model"]
    assert all(torch.equal(v, again[k]) for k, v in final.items())
    (run / "pass-2.pt").unlink()
    other = [a.replace("bptt=8", "bptt=8 lr=0.001") for a in argv]
    with pytest.raises(LmmemError, match=r"other settings \(lr\)"):
        long_training.main(other)
    with pytest.raises(LmmemError, match="must not set max_steps"):
        long_training.main([a.replace("bptt=8", "bptt=8 max_steps=5") for a in argv])
    with pytest.raises(LmmemError, match="must include 'full'"):
        long_training.main(argv[: argv.index("--variants") + 1] + ["hebbian"])


def test_reference_pairs_and_notes_on_the_page(tmp_path):
    """--reference V=REF puts V's Δ columns against REF (an untied variant against the untied full
    softmax); --notes shows a text under the title; render keeps both (they live in the JSON)."""
    def rec(seed, ppl):
        rep = {"perplexity": ppl, "buckets": [{"name": "<100", "perplexity": 10 * ppl}, {"name": "100–1K", "perplexity": 2 * ppl}]}
        return {"seed": seed, "train_minutes": 1.0, "passes": [{"pass": 1, "step": 10, "valid": rep}], "test": rep}

    runs = {"full": [rec(1, 100.0)], "centred": [rec(1, 110.0)], "full-untied": [rec(1, 120.0)], "centred-untied": [rec(1, 126.0)]}
    with pytest.raises(LmmemError, match="--reference"):
        long_training.parse_references(["centred-untied=nope"], dict.fromkeys(runs))
    refs = long_training.parse_references(["centred-untied=full-untied"], dict.fromkeys(runs))
    results = {"name": "x", "passes": 1, "steps_per_pass": 10, "seeds": [1], "runs": runs, "references": refs,
               "notes": "**In short.** words.", "bucket_names": ["<100", "100–1K"], "variants": {k: {} for k in runs},
               "train_args": {}, "command": "c", "steps": [], "machine": {}}
    text = long_training_page.markdown(results, None)
    assert text.splitlines()[2] == "**In short.** words."
    row = next(line for line in text.splitlines() if line.startswith("| 1 | 10 |"))
    assert row.endswith("| +10.0% | +20.0% | +5.0% |")  # centred vs full, full-untied vs full, centred-untied vs full-untied
    assert "Δ centred-untied vs full-untied" in text and "| centred-untied | 126.00 | +5.0% vs full-untied |" in text
    page = tmp_path / "p.md"
    page.with_suffix(".json").write_text(json.dumps(results))
    assert long_training.main(["render", str(page)]) == 0 and page.read_text().startswith(text.split("![")[0][:200])


def test_validating_while_training_changes_no_weight_and_the_page_averages_each_pass_end(tmp_path):
    """--eval-every N: the trainer validates every N steps; the pass snapshots are bit for bit those
    of a run that never validated, and the page's last-quarter table is computed from the curve."""
    def argv(work, page, *extra):
        a = _argv(work, page, *extra)
        a[a.index("--passes") + 1] = "2"
        a[a.index("--seeds") + 1 : a.index("--seeds") + 3] = ["1"]
        return a

    corpus = tmp_path / "corpus"
    write_prepared_corpus(corpus, vocab_size=100, tokens={"train": 700, "valid": 200, "test": 200})
    for name in ("plain", "validated"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "data").symlink_to(corpus)
    assert long_training.main(argv(tmp_path / "plain", tmp_path / "plain.md")) == 0
    page = tmp_path / "docs" / "v.md"
    assert long_training.main(argv(tmp_path / "validated", page, "--eval-every", "3")) == 0
    results = json.loads(page.with_suffix(".json").read_text())
    spp = results["steps_per_pass"]
    for label in ("full", "centred"):
        a = load_checkpoint(tmp_path / "plain" / f"{label}-seed1" / "pass-2.pt")["model"]
        b = load_checkpoint(tmp_path / "validated" / f"{label}-seed1" / "pass-2.pt")["model"]
        assert all(torch.equal(v, b[k]) for k, v in a.items()), label
        curve = results["runs"][label][0]["curve"]
        steps = [s for s, _ in curve]
        assert steps == sorted(set(steps)) and set(range(3, 2 * spp, 3)) <= set(steps) and {spp, 2 * spp} <= set(steps)
        # the last validation of a pass is the pass snapshot's own valid loss (its evaluation at batch 2 may differ a little)
        end = dict(map(tuple, curve))[spp]
        assert end == pytest.approx(math.log(results["runs"][label][0]["passes"][0]["valid"]["perplexity"]), rel=0.05)
    window = {label: [math.exp(statistics.mean(x for s, x in rs[0]["curve"] if (k - 0.25) * spp < s <= k * spp)) for k in (1, 2)]
              for label, rs in results["runs"].items()}
    text = page.read_text()
    for k in (1, 2):
        delta = window["centred"][k - 1] / window["full"][k - 1] - 1
        assert f"| {k} | {window['full'][k - 1]:.2f} | {window['centred'][k - 1]:.2f} | {100 * delta:+.1f}% |" in text
    assert (page.parent / "v-curves.png").is_file() and "](v-curves.png)" in text
    # by position within the pass: the paired difference at equal steps, each fifth of the pass, then the whole pass
    full, centred = (dict(map(tuple, results["runs"][v][0]["curve"])) for v in ("full", "centred"))
    for k in (1, 2):
        cells = []
        for lo, hi in [((k - 1 + i / 5) * spp, (k - 1 + (i + 1) / 5) * spp) for i in range(5)] + [((k - 1) * spp, k * spp)]:
            gaps = [centred[s] - full[s] for s in full if lo < s <= hi]
            cells.append(f"{100 * (math.exp(statistics.mean(gaps)) - 1):+.1f}%" if gaps else "–")
        assert f"| {k} | " + " | ".join(cells) + " |" in text, k
    # a run folder trained without validations is reused as it is (eval_interval is not a training setting)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "plain").glob("*-seed*/pass-*.pt")}
    assert long_training.main(argv(tmp_path / "plain", tmp_path / "plain.md", "--eval-every", "3")) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "plain").glob("*-seed*/pass-*.pt")} == stamps


def test_phase_deltas_pair_seeds_and_steps():
    """Per seed the mean gap over the stretch's shared steps, then the mean over seeds; a step the
    reference lacks is left out, and a stretch without validations is None."""
    ref = [{"seed": 1, "curve": [[2, 1.0], [4, 1.0], [6, 2.0], [8, 2.0]]}, {"seed": 2, "curve": [[2, 3.0], [6, 3.0], [8, 3.0]]}]
    var = [{"seed": 2, "curve": [[2, 3.5], [4, 9.0], [6, 3.1], [8, 3.3]]}, {"seed": 1, "curve": [[2, 1.2], [4, 0.8], [6, 2.4], [8, 2.0]]}]
    out = long_training_page.phase_deltas(var, ref, 1, 10)  # fifths of steps 0–10: (0, 2], (2, 4], (4, 6], (6, 8], (8, 10]
    assert out[0] == pytest.approx(math.exp((0.2 + 0.5) / 2) - 1)
    assert out[1] == pytest.approx(math.exp(-0.2) - 1)  # seed 2's step 4 has no reference validation
    assert out[2] == pytest.approx(math.exp((0.4 + 0.1) / 2) - 1)
    assert out[3] == pytest.approx(math.exp((0.0 + 0.3) / 2) - 1)
    assert out[4] is None
    seed1, seed2 = statistics.mean([0.2, -0.2, 0.4, 0.0]), statistics.mean([0.5, 0.1, 0.3])
    assert out[5] == pytest.approx(math.exp((seed1 + seed2) / 2) - 1)
