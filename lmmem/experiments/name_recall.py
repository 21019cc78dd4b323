"""Rare-name recall of trained LMs on the embedded synthetic corpus (the text version of the curriculum).

    python -m lmmem.experiments.name_recall runs/syn-full/best.pt runs/syn-hebbian/best.pt --json out.json

The synthetic corpus (lmmem.data.synthetic) introduces capitalised names that recur within a
document. For every test position whose target is a name, we count how many times that name has
occurred in the test stream so far (1 = first sighting in the stream) and report the model's top-1
accuracy at the 1st, 2nd and 3rd occurrence — with the plain model, and with the neural cache
(which can only help from the 2nd occurrence on). The prepared ``.bin`` stream has no document
boundaries, so occurrences are counted over the whole test stream; names are document-specific in
the generator, so this is close to the per-document count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from lmmem.cli import ArgumentParser, run_cli
from lmmem.data.corpus import PreparedCorpus
from lmmem.jsonio import write_json
from lmmem.training.checkpoint import data_dir_for, load_checkpoint, model_from_checkpoint
from lmmem.validation import check_flags


def occurrence_index(targets: np.ndarray, is_name: np.ndarray) -> np.ndarray:
    """k for a target that is the k-th occurrence of a name in the stream; 0 for non-names."""
    occ = np.zeros(len(targets), dtype=np.int64)
    seen: dict[int, int] = {}
    for t in np.flatnonzero(is_name[targets]):
        w = int(targets[t])
        seen[w] = seen.get(w, 0) + 1
        occ[t] = seen[w]
    return occ


@torch.no_grad()
def predictions(model, tokens: np.ndarray, bptt: int = 128, cache_window: int = 0, theta: float = 0.3, lam: float = 0.1):
    """(top-1 next-word predictions, log p(actual next word)) along one stream (batch 1, state
    carried); with cache_window > 0 the model is mixed with a neural cache over the last
    ``cache_window`` (hidden, next word) pairs."""
    x_all = torch.as_tensor(tokens[:-1].astype(np.int64))
    y_all = torch.as_tensor(tokens[1:].astype(np.int64))
    state, preds, logp = None, [], []
    keys = torch.empty(0, model.output.in_features)
    vals = torch.empty(0, dtype=torch.long)
    for s in range(0, len(x_all), bptt):
        h, state = model.hidden_states(x_all[s : s + bptt][None], state)
        h = h[0].float()
        p = model.output.log_probs(h).exp()
        if cache_window:
            for i in range(len(h)):  # small evaluation: clarity over speed
                if len(keys):
                    w = torch.softmax(theta * keys @ h[i], 0)
                    pc = torch.zeros_like(p[i]).index_add_(0, vals, w)
                    p[i] = (1 - lam) * p[i] + lam * pc
                keys = torch.cat([keys, h[i : i + 1]])[-cache_window:]
                vals = torch.cat([vals, y_all[s + i : s + i + 1]])[-cache_window:]
        preds.append(p.argmax(-1))
        logp.append(p[torch.arange(len(h)), y_all[s : s + bptt]].clamp_min(1e-30).log())
    return torch.cat(preds).numpy(), torch.cat(logp).numpy()


def name_recall(checkpoint: str | Path, split: str = "test", max_tokens: int = 20_000, cache_window: int = 500) -> dict:
    ckpt = load_checkpoint(checkpoint)
    corpus = PreparedCorpus.open(data_dir_for(ckpt, None, checkpoint))
    tokens = np.asarray(corpus.tokens(split)[: max_tokens + 1])
    is_name = np.array([t[:1].isupper() for t in corpus.vocab.tokens])
    model = model_from_checkpoint(ckpt)
    occ = occurrence_index(tokens[1:], is_name)
    row = {"checkpoint": str(checkpoint), "softmax": ckpt["model_config"]["softmax"],
           "softmax_options": ckpt["model_config"]["softmax_options"], "steps": ckpt["progress"]["step"]}
    for label, window in (("model", 0), ("model+cache", cache_window)):
        pred, logp = predictions(model, tokens, cache_window=window)
        for k in (1, 2, 3):
            m = occ == k
            row[f"{label} name@{k}"] = float((pred[m] == tokens[1:][m]).mean()) if m.any() else None
            row[f"{label} ppl@{k}"] = float(np.exp(-logp[m].mean())) if m.any() else None
    for k in (1, 2, 3):
        row[f"n@{k}"] = int((occ == k).sum())
    return row


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--max-tokens", type=int, default=20_000)
    p.add_argument("--json")
    args = p.parse_args(argv)
    check_flags(vars(args))
    rows = [name_recall(c, max_tokens=args.max_tokens) for c in args.checkpoints]
    cols = [f"{m} {q}@{k}" for m in ("model", "model+cache") for q in ("name", "ppl") for k in (1, 2, 3)]
    print("| checkpoint | softmax | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['checkpoint']} | {r['softmax']} {r['softmax_options'] or ''} | " + " | ".join((f"{r[c]:.3f}" if "name@" in c else f"{r[c]:,.0f}") if r[c] is not None else "–" for c in cols) + " |")
    print(f"positions: 1st {rows[0]['n@1']}, 2nd {rows[0]['n@2']}, 3rd {rows[0]['n@3']} occurrences")
    if args.json:
        write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
