"""The README's "drop the Hebbian softmax into your own LM" snippet runs as written.

The code is taken from README.md between ``<!-- snippet:hebbian-drop-in -->`` and ``<!-- /snippet -->``,
so the README cannot drift from what works.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- snippet:hebbian-drop-in -->", "<!-- /snippet -->"

def snippet_source() -> str:
    text = README.read_text(encoding="utf-8")
    assert START in text and END in text, "README.md lost its hebbian drop-in snippet markers"
    block = text.split(START, 1)[1].split(END, 1)[0]
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
