"""The README's "drop the Hebbian softmax into your own LM" snippet runs as written.

The code is taken from README.md between ``<!-- snippet:hebbian-drop-in -->`` and ``<!-- /snippet -->``
when the README has those markers; until then, from the copy below (which is what the README shows).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- snippet:hebbian-drop-in -->", "<!-- /snippet -->"

SNIPPET = '''
import torch
from torch import nn
from lmmem.output_layers import HebbianSoftmax

class TinyLM(nn.Module):
    def __init__(self, vocab_size, dim=64):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.softmax = HebbianSoftmax(dim, vocab_size)  # gamma=0.01, smoothing_limit=500

    def forward(self, inputs, targets):
        h, _ = self.rnn(self.embed(inputs))
        return self.softmax.loss(h.reshape(-1, h.shape[-1]), targets.reshape(-1))

model = TinyLM(vocab_size=1000)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
model.softmax.attach_to_optimizer(opt)  # Hebbian update after every opt.step()
tokens = torch.randint(0, 1000, (8, 21))
for _ in range(3):
    loss = model(tokens[:, :-1], tokens[:, 1:])
    opt.zero_grad(); loss.backward(); opt.step()
'''


def snippet_source() -> str:
    if README.exists():
        text = README.read_text(encoding="utf-8")
        if START in text and END in text:
            block = text.split(START, 1)[1].split(END, 1)[0]
            fenced = re.search(r"```(?:python|py)?\n(.*?)```", block, re.S)
            return fenced.group(1) if fenced else block
    return SNIPPET


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
