"""The rare-class curriculum runner (tiny configs) and the text name-recall measure."""

from __future__ import annotations

import numpy as np
import pytest

from lmmem.errors import LmmemError
from lmmem.experiments import curriculum as cur

TINY = cur.CurriculumConfig(num_classes=12, presentations=3, background_classes=5, background_samples=4, background_steps=4,
                            batch_size=4, mean_gap=12, min_gap=6, embed=16, memory_size=128, memory_k=8, key_size=16, sg_hidden=8)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_stream_shows_every_class_p_times_in_order():
    s = cur.build_stream(TINY)
    assert len(s["cls"]) == 12 * 3
    for c in range(12):
        pres = s["presentation"][s["cls"] == c]
        assert pres.tolist() == [1, 2, 3]
    assert (s["since"][s["presentation"] == 1] == -1).all()
    assert (s["since"][s["presentation"] > 1] >= 1).all()
    # Classes arrive over time: the first presentations are spread along the stream, not all at the start.
    first = np.flatnonzero(s["presentation"] == 1)
    assert first[-1] > len(s["cls"]) // 3


def test_run_all_methods_tiny(tmp_path):
    out = cur.run_curriculum(TINY)
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == set(cur.METHODS)
    for m, r in rows.items():
        for j in (1, 2, 3):
            assert 0.0 <= r[f"acc@{j}"] <= 1.0
    # A memory cannot predict a label it has never been written: the first presentation is always wrong.
    assert rows["kv_memory"]["acc@1"] == 0.0 and rows["kv_memory_sg"]["acc@1"] == 0.0 and rows["pixel_nn"]["acc@1"] == 0.0
    assert sum(rows["softmax"]["items_per_gap_bucket"].values()) == 12 * 2  # presentations 2 and 3
    cur.plot(out["rows"], TINY.presentations, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_pools_from_dataset_and_errors():
    from lmmem.data.glyphs import make_glyphs

    x, y = make_glyphs(20, 4)
    cfg = cur.CurriculumConfig(num_classes=12, presentations=3, background_classes=5, background_samples=4)
    pools = cur.pools_from_dataset(x, y, cfg)
    assert pools.curr.shape == (12, 3, 1, 28, 28)
    assert sorted(set(pools.bg_labels.tolist())) == list(range(12, 17))
    with pytest.raises(LmmemError, match="classes"):
        cur.pools_from_dataset(x, y, cur.CurriculumConfig(num_classes=30, presentations=3))
    with pytest.raises(LmmemError, match="unknown method"):
        cur.CurriculumConfig(methods=("nope",)).validate()


def test_cli_tiny(capsys):
    out = cur.main(["--threads", "1", "--lrs", "1e-3", "--classes", "6", "--presentations", "2", "--background-steps", "0", "--methods", "kv_memory", "--no-text"])
    assert out["rows"][0]["method"] == "kv_memory"
    assert "kv_memory:" in capsys.readouterr().out


def test_recall_at_occurrences():
    is_name = np.array([False, False, True, True])
    doc = np.array([0, 2, 1, 3, 2, 0, 2, 3])
    assert cur.occurrence_index(doc, is_name).tolist() == [0, 1, 0, 1, 2, 0, 3, 2]
    oracle = cur.recall_at_occurrences(lambda d: d[1:], [doc], is_name)
    assert oracle["name@1"] == oracle["name@2"] == oracle["name@3"] == 1.0
    assert oracle["n@2"] == 2


def test_text_name_recall_cache_beats_counts_on_repeats():
    train, test, words, is_name = cur.synthetic_documents(seed=0, train_tokens=8000, test_tokens=3000)
    assert is_name.any() and len(test) > 0
    counts = cur.recall_at_occurrences(cur.bigram_predictor(train, len(words)), test, is_name)
    cache = cur.recall_at_occurrences(cur.bigram_predictor(train, len(words), is_name), test, is_name)
    assert cache["name@2"] > counts["name@2"]


def test_curriculum_runs_on_the_omniglot_fixture(tmp_path):
    from pathlib import Path

    from lmmem.data.glyphs import load_omniglot

    x, y = load_omniglot(Path(__file__).parent / "fixtures" / "omniglot", cache_dir=tmp_path)
    cfg = cur.CurriculumConfig(num_classes=2, presentations=2, background_steps=0, batch_size=2, min_gap=2, mean_gap=3,
                               embed=8, memory_size=16, memory_k=4, key_size=8, sg_hidden=4, methods=("hebbian", "kv_memory"))
    out = cur.run_curriculum(cfg, cur.pools_from_dataset(x, y, cfg))
    assert [r["method"] for r in out["rows"]] == ["hebbian", "kv_memory"]
