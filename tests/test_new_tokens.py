"""python -m lmmem.experiments.new_tokens end to end on the small Gutenberg and news fixtures (tiny
sizes, CPU): every piece is written, resumed and reused, the heads start as documented, and the page
is what `render` makes of its JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="lmmem[hf] extra not installed")
pytest.importorskip("tokenizers", reason="lmmem[hf] extra not installed")

from lmmem.errors import LmmemError  # noqa: E402
from lmmem.experiments import new_tokens  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
TINY = ["--gutenberg", str(FIXTURES / "gutenberg"), "--news", str(FIXTURES / "news"), "--new-tokens", "8", "--bpe-vocab", "300",
        "--n-embd", "16", "--n-layer", "1", "--n-head", "2", "--context", "16", "--batch-size", "4", "--pretrain-steps", "6",
        "--finetune-steps", "8", "--warmup", "2", "--seeds", "1", "2", "--valid-windows", "4", "--bootstrap", "50"]


def test_new_tokens_end_to_end(tmp_path):
    work, page = tmp_path / "work", tmp_path / "docs" / "new-tokens.md"
    assert new_tokens.main([*TINY, "--work", str(work), "--page", str(page)]) == 0
    results = json.loads(page.with_suffix(".json").read_text())
    assert page.with_suffix(".png").stat().st_size > 10_000
    assert str(tmp_path) not in page.with_suffix(".json").read_text() and results["config"]["work"] == "WORK"
    assert list(results["summary"]) == list(new_tokens.ARMS) and len(results["words"]) == 8
    # every new-token target of a run is filed under exactly one k, and the arms saw the same targets
    runs = {arm: json.loads((work / "seed1" / f"{arm}.json").read_text()) for arm in new_tokens.ARMS}
    counts = {arm: np.asarray(r["cnts"]).sum() for arm, r in runs.items()}
    assert len(set(counts.values())) == 1 and next(iter(counts.values())) > 0
    assert np.array_equal(np.asarray(runs["hebbian"]["cnts"]), np.asarray(runs["stock-default"]["cnts"]))
    first = runs["stock-default"]
    assert first["new_share"] == pytest.approx(next(iter(counts.values())) / (8 * 4 * 15))
    # the page is what render makes of the JSON
    text = page.read_text()
    assert new_tokens.main(["render", str(page)]) == 0 and page.read_text() == text
    assert "## What comes out" in text and "| hebbian |" in text and "One pretrained model (seed 1)" in text
    # the Hebbian head's rule settings are recorded with each run and named on the page
    assert runs["hebbian"]["rule"]["smoothing_limit"] == 100 and runs["stock-default"]["rule"] == {}
    assert "(default rule, centred, T = 100, γ = 0.01, momentum scaled," in text
    # a repeated command trains nothing again
    stamps = {p: p.stat().st_mtime_ns for p in [*work.glob("seed*/*.json"), *work.glob("seed*/pretrained/*"), work / "data.npz"]}
    assert new_tokens.main([*TINY, "--work", str(work)]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # other settings in the same WORK are refused, naming the difference
    with pytest.raises(LmmemError, match="finetune_steps: 8 → 9"):
        new_tokens.main([*TINY, "--work", str(work), "--finetune-steps", "9"])


def test_heads_start_as_documented(tmp_path):
    cfg = new_tokens.NewTokensConfig(gutenberg=str(FIXTURES / "gutenberg"), news=str(FIXTURES / "news"), work=str(tmp_path),
                                     new_tokens=8, bpe_vocab=300, n_embd=16, n_layer=1, n_head=2, context=16, batch_size=4,
                                     pretrain_steps=4, valid_windows=4)
    data = new_tokens.load_data(cfg, log=lambda *_: None)
    base = data.base_vocab
    models = {arm: new_tokens.start_model(cfg, data, 1, arm) for arm in new_tokens.ARMS}
    emb = {arm: m.get_input_embeddings().weight.detach() for arm, m in models.items()}
    assert all(e.shape == (data.vocab, 16) for e in emb.values())
    old = emb["stock-default"][:base]
    assert all(torch.equal(e[:base], old) for e in emb.values())  # old rows untouched by every arm
    assert torch.equal(emb["hebbian"], emb["stock-default"])  # the same new rows (transformers' default)
    torch.testing.assert_close(emb["stock-default"][base:], old.mean(0).expand(data.vocab - base, -1), atol=1e-3, rtol=0)
    for j, w in enumerate(data.words):  # pieces-mean: each new row is the mean of its word's pieces
        torch.testing.assert_close(emb["stock-pieces-mean"][base + j], old[w["pieces"]].mean(0))
    head = models["hebbian"].get_output_embeddings()
    pre = np.load(tmp_path / "seed1" / "pretrained" / "target_counts.npy")
    assert type(head).__name__ == "HebbianLMHead" and head.start_step == 0
    assert torch.equal(head.counts[:base], torch.from_numpy(pre)) and int(head.counts[base:].sum()) == 0
