"""Several seeds of the binding experiment on one page (lmmem.experiments.binding_seeds): the pooled
paired differences are the means over (seed, word type) pairs of the runner's own records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmmem.errors import LmmemError
from lmmem.experiments import binding, binding_seeds

TINY = "preset=tiny batch_size=4 bptt=10 embed_dim=16 hidden_dim=24 proj_dim=16 warmup_steps=2 dropout=0.1 output_dropout=0.1"


@pytest.fixture(scope="module")
def works(small_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    out = []
    for seed in (1, 2):
        work = root / f"s{seed}"
        assert binding.main(["--data", str(small_corpus), "--work", str(work), "--train-args", f"{TINY} seed={seed}",
                             "--branch-points", "6", "--branch-steps", "9", "--settle", "2", "--rare-below", "40",
                             "--bootstrap", "50", "--variants", "full", "centred:softmax=hebbian,hebbian_start_step=0",
                             "inert:softmax=hebbian,hebbian_T=0"]) == 0
        out.append(work)
    return out


def test_pooled_differences_are_the_means_of_the_runners_records(works, tmp_path):
    page, notes = tmp_path / "page.md", tmp_path / "notes.md"
    notes.write_text("**In short.** What the numbers say.\n")
    assert binding_seeds.main([*map(str, works), "--name", "tiny", "--bootstrap", "200", "--notes", str(notes), "--page", str(page)]) == 0
    rows = {r["label"]: r for r in json.loads(page.with_suffix(".json").read_text())["rows"]}
    assert set(rows) == {"centred", "inert"}
    diffs = {"held_out": [], "stream": []}
    for w in works:
        b = json.loads((w / "branch-step6-centred.json").read_text())
        ref = json.loads((w / "branch-step6-full.json").read_text())
        r = dict(zip(ref["held_out"]["types"], ref["held_out"]["mean_nll"]))
        diffs["held_out"] += [v - r[t] for t, v, s in zip(b["held_out"]["types"], b["held_out"]["mean_nll"],
                                                         b["held_out"]["branch_sightings"]) if s == 1]
        a = dict(zip(b["rare_by_k"]["1"]["types"], b["rare_by_k"]["1"]["mean_nll"]))
        r = dict(zip(ref["rare_by_k"]["1"]["types"], ref["rare_by_k"]["1"]["mean_nll"]))
        diffs["stream"] += [a[t] - r[t] for t in set(a) & set(r)]
    for endpoint, values in diffs.items():
        m, lo, hi, n = rows["centred"][endpoint]["1"]["pooled"]
        assert n == len(values) > 0 and np.isclose(m, np.mean(values)) and lo <= m <= hi
        assert rows["inert"][endpoint]["1"]["pooled"][:3] == [0.0, 0.0, 0.0]  # T = 0 never writes: the reference itself
    assert "NaN" not in page.with_suffix(".json").read_text()
    text = page.read_text()
    assert "held out (valid)" in text and "WORK1" in text and str(works[0]) not in text
    assert text.splitlines()[2] == "**In short.** What the numbers say."


def test_pooled_interval_resamples_within_each_seed():
    a, b = np.zeros(50), np.ones(5)
    m, lo, hi, n = binding_seeds.pooled_mean([a, b], 500)
    assert n == 55 and np.isclose(m, 5 / 55) and lo == hi == m  # each seed's values are constant: nothing to resample
    assert binding_seeds.pooled_mean([np.zeros(0), np.zeros(0)], 10) == (None, None, None, 0)  # JSON null, never NaN


def test_a_folder_without_the_held_out_endpoint_is_named(works, tmp_path):
    import shutil

    with pytest.raises(LmmemError, match="no binding.json"):
        binding_seeds.main([str(tmp_path)])
    old = tmp_path / "old"
    shutil.copytree(works[0], old, ignore=shutil.ignore_patterns("*.pt"))
    branch = json.loads((old / "branch-step6-centred.json").read_text())
    del branch["held_out"]  # as the runner wrote it before the endpoint existed
    (old / "branch-step6-centred.json").write_text(json.dumps(branch))
    with pytest.raises(LmmemError, match="no held-out endpoint"):
        binding_seeds.main([str(old), str(works[1])])
