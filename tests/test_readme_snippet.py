"""The snippets of the README and the guides (docs/*.md) run as written: "drop the Hebbian softmax
into your own LM" and the Hugging Face GPT-2 and Trainer examples.

The code is taken from the one document holding ``<!-- snippet:NAME -->`` … ``<!-- /snippet -->``,
so the docs cannot drift from what works, wherever a snippet moves.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
END = "<!-- /snippet -->"


def documents() -> list[Path]:
    """The README and the guides: where commands and snippets that the tests run may live."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def snippet_source(name: str = "hebbian-drop-in") -> str:
    start = f"<!-- snippet:{name} -->"
    holders = [p for p in documents() if start in p.read_text(encoding="utf-8")]
    assert len(holders) == 1, f"snippet {name!r} must be in exactly one of README.md and docs/*.md, found in {holders}"
    text = holders[0].read_text(encoding="utf-8")
    assert END in text.split(start, 1)[1], f"{holders[0]}: snippet {name!r} has no end marker"
    block = text.split(start, 1)[1].split(END, 1)[0]
    fenced = re.search(r"```(?:python|py)?\n(.*?)```", block, re.S)
    assert fenced, "the README snippet must be a fenced python block"
    return fenced.group(1)


def test_readme_snippet_runs_and_updates_rows():
    ns: dict = {}
    exec(compile(snippet_source(), "README-snippet", "exec"), ns)
    model, tokens = ns["model"], ns["tokens"]
    layer = model.softmax
    targets = tokens[:, 1:].reshape(-1)
    # three steps of 8 × 20 targets were counted, and the update ran after each step (nothing pending)
    assert int(layer.counts.sum()) == 3 * targets.numel()
    assert torch.equal(layer.counts, torch.bincount(targets, minlength=1000) * 3)
    assert layer.pending_statistics() is None


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()


def test_readme_hf_gpt2_snippet(tmp_path, monkeypatch, one_thread):
    pytest.importorskip("transformers", reason="lmmem[hf] extra not installed")
    _quiet_transformers()
    monkeypatch.chdir(tmp_path)  # it saves to ./gpt2-hebbian
    ns: dict = {}
    exec(compile(snippet_source("hf-gpt2"), "README-hf-gpt2", "exec"), ns)
    model, reloaded, tokens = ns["model"], ns["reloaded"], ns["tokens"]
    counts = model.lm_head.counts
    assert int(counts.sum()) == 3 * tokens[:, 1:].numel()  # 3 steps, every shifted label counted
    assert torch.equal(reloaded.lm_head.counts, counts)
    assert reloaded.lm_head.weight is reloaded.transformer.wte.weight  # still tied after loading
    assert ns["generated"].shape == (1, 15)
    reloaded.eval()
    assert torch.equal(reloaded(tokens).logits, model(tokens).logits)


def test_readme_hf_trainer_snippet(tmp_path, monkeypatch, one_thread):
    pytest.importorskip("transformers", reason="lmmem[hf] extra not installed")
    _quiet_transformers()
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(snippet_source("hf-trainer"), "README-hf-trainer", "exec"), ns)
    # 4 optimizer steps of 4 × 2 sequences = 2 epochs over the 16 sequences of 31 targets
    assert int(ns["model"].lm_head.counts.sum()) == 2 * 16 * 31
