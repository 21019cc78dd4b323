"""Procedural glyphs (deterministic, fast, class structure) and the Omniglot loader on a fixture."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from lmmem.data.glyphs import GlyphConfig, load_omniglot, make_glyphs
from lmmem.errors import DataError, LmmemError

FIXTURE = Path(__file__).parent / "fixtures" / "omniglot"


def test_shapes_range_and_labels():
    x, y = make_glyphs(5, 3)
    assert x.shape == (15, 1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert y.tolist() == [c for c in range(5) for _ in range(3)]
    assert 0.03 < float(x.mean()) < 0.5  # some ink, mostly background


def test_deterministic_and_per_class():
    a, _ = make_glyphs(4, 2, GlyphConfig(seed=3))
    b, _ = make_glyphs(4, 2, GlyphConfig(seed=3))
    assert torch.equal(a, b)
    c, _ = make_glyphs(4, 2, GlyphConfig(seed=4))
    assert not torch.equal(a, c)
    # A class's samples do not depend on which other classes are requested (noise aside).
    quiet = GlyphConfig(seed=3, noise=0.0)
    one, _ = make_glyphs([2], 2, quiet)
    many, _ = make_glyphs(4, 2, quiet)
    assert torch.allclose(one, many[4:6])


def test_samples_vary_but_classes_are_distinguishable():
    x, y = make_glyphs(20, 4, GlyphConfig(noise=0.0))
    assert not torch.equal(x[0], x[1])  # jitter, rotation
    flat = torch.nn.functional.normalize(x.flatten(1), dim=1)
    sim = flat @ flat.T
    same = y[:, None] == y[None, :]
    off_diag = ~torch.eye(len(y), dtype=torch.bool)
    assert sim[same & off_diag].mean() > sim[~same].mean() + 0.1


def test_fast():
    t = time.perf_counter()
    make_glyphs(200, 5)
    assert time.perf_counter() - t < 10  # ~0.3 s unloaded


def test_bad_config():
    with pytest.raises(LmmemError):
        make_glyphs(0, 3)
    with pytest.raises(LmmemError, match="strokes"):
        make_glyphs(2, 2, GlyphConfig(min_strokes=3, max_strokes=2))


def test_load_omniglot_from_local_fixture(tmp_path):
    for source in (FIXTURE, FIXTURE / "train.parquet"):
        x, y = load_omniglot(source, image_size=28, cache_dir=tmp_path)
        assert x.shape == (6, 1, 28, 28)
        assert y.tolist() == [0, 0, 1, 1, 2, 2]  # labels 10, 11, 12 remapped in order of appearance
        assert float(x.mean()) < 0.5  # black-on-white inverted: ink = 1
    x, y = load_omniglot(FIXTURE, max_classes=2, cache_dir=tmp_path)
    assert y.tolist() == [0, 0, 1, 1]


def test_load_omniglot_errors(tmp_path):
    with pytest.raises(DataError, match="label"):
        load_omniglot(FIXTURE, label_column="nope", cache_dir=tmp_path)
    with pytest.raises(DataError, match="split"):
        load_omniglot(FIXTURE, split="test", cache_dir=tmp_path)
    with pytest.raises(DataError):
        load_omniglot(tmp_path / "missing", cache_dir=tmp_path)
