"""A tiny randomly initialised Hugging Face GPT-2 trained on a prepared corpus with its stock head,
with :func:`lmmem.hf.apply_fused_softmax` and with :func:`lmmem.hf.apply_hebbian_softmax`: does the
Hebbian head end within a few percent of the stock head's loss?

    python -m data_prep gutenberg --source ../shared/data/gutenberg --encoding-errors fallback --max-vocab 10000 --out DATA
    python -m lmmem.experiments.hf_head_comparison --data DATA --steps 200 --seeds 1 2 3 --json results.json
    python -m lmmem.experiments.hf_head_comparison --data DATA --heads hebbian \\
        --hebbian-options '{"gamma": 0.01, "smoothing_limit": 500}' --name hebbian-g0.01-T500 --json more.json

Training batches are random windows of the train split (``--batch-size`` × ``--context`` tokens,
the same windows for every head at a given seed); the model is the same random GPT-2 (same seed, same
initial weights) for every head. Reported per run: the mean training loss of the last 20 steps and the
validation loss (non-overlapping windows of the valid split, model in eval mode). Validation only: the
test split is not touched. Writes every run and the per-head mean ± standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time

import numpy as np
import torch

from lmmem.cli import ArgumentParser
from lmmem.data.corpus import PreparedCorpus


def gpt2(vocab_size: int, context: int, seed: int, n_embd: int, n_layer: int, n_head: int, tie: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=context, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     tie_word_embeddings=tie)
    return GPT2LMHeadModel(cfg)


def windows(tokens: np.ndarray, count: int, context: int, rng: np.random.Generator) -> torch.Tensor:
    starts = rng.integers(0, len(tokens) - context, size=count)
    return torch.from_numpy(np.stack([tokens[s : s + context] for s in starts]).astype(np.int64))


@torch.no_grad()
def validation_loss(model, tokens: np.ndarray, context: int, batch_size: int, max_windows: int) -> float:
    model.eval()
    n = min((len(tokens) - 1) // context, max_windows)
    ids = torch.from_numpy(tokens[: n * context].astype(np.int64)).view(n, context)
    total, count = 0.0, 0
    for i in range(0, n, batch_size):
        x = ids[i : i + batch_size]
        loss = model(input_ids=x, labels=x).loss  # stock path in eval mode: logits + HF's mean loss
        k = x.numel() - x.shape[0]
        total += loss.item() * k
        count += k
    model.train()
    return total / count


def run(corpus: PreparedCorpus, head: str, seed: int, args, hebbian_options: dict) -> dict:
    from lmmem.hf import apply_fused_softmax, apply_hebbian_softmax, attach_to_optimizer

    model = gpt2(len(corpus.vocab), args.context, seed, args.n_embd, args.n_layer, args.n_head, tie=not args.untie)
    if head == "fused":
        apply_fused_softmax(model)
    elif head == "hebbian":
        apply_hebbian_softmax(model, **hebbian_options)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    attach_to_optimizer(model, opt)
    train, valid = corpus.tokens("train"), corpus.tokens("valid")
    rng = np.random.default_rng(seed)
    model.train()
    losses, t0 = [], time.monotonic()
    for step in range(args.steps):
        x = windows(train, args.batch_size, args.context, rng)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    seconds = time.monotonic() - t0
    val = validation_loss(model, valid, args.context, args.batch_size, args.valid_windows)
    return {"head": args.name if (args.name and head == "hebbian") else head, "seed": seed, "train_loss_last20": float(np.mean(losses[-20:])),
            "valid_loss": val, "train_losses": [round(v, 4) for v in losses], "seconds": round(seconds, 1),
            "hebbian_options": hebbian_options if head == "hebbian" else None}


def plot_training_curves(result_files: list[str], out: str) -> None:
    """Mean training loss per step (over seeds) of every head in the given result JSONs, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for path in result_files:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        tied = "tied" if result["meta"].get("tied", True) else "untied"
        for name in dict.fromkeys(r["head"] for r in result["runs"]):
            curves = np.array([r["train_losses"] for r in result["runs"] if r["head"] == name])
            ax.plot(np.arange(1, curves.shape[1] + 1), curves.mean(0), label=f"{name} ({tied}, {len(curves)} seeds)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_yscale("log")
    ax.set_title("tiny GPT-2 on Gutenberg: stock head vs lmmem heads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", help="prepared corpus folder (python -m data_prep)")
    p.add_argument("--heads", nargs="+", default=["stock", "fused", "hebbian"], choices=["stock", "fused", "hebbian"])
    p.add_argument("--hebbian-options", default="{}", help="JSON of HebbianSoftmax options (default: the layer's defaults)")
    p.add_argument("--name", default=None, help="name of the hebbian variant in the results")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--untie", action="store_true", help="separate input and output embeddings (GPT-2 ties them)")
    p.add_argument("--valid-windows", type=int, default=256, help="at most this many validation windows")
    p.add_argument("--json", help="write all runs and the summary here")
    p.add_argument("--plot", help="PNG of the training curves of --plot-from (or of this run's --json)")
    p.add_argument("--plot-from", nargs="+", help="only plot these result JSONs (no training)")
    args = p.parse_args(argv)
    if args.plot_from:
        plot_training_curves(args.plot_from, args.plot or "curves.png")
        return 0
    if not args.data:
        p.error("--data is required (unless --plot-from)")
    corpus = PreparedCorpus.open(args.data)
    hebbian_options = json.loads(args.hebbian_options)
    runs = []
    for seed in args.seeds:
        for head in args.heads:
            r = run(corpus, head, seed, args, hebbian_options)
            runs.append(r)
            print(f"{r['head']:<12} seed {seed}: train (last 20) {r['train_loss_last20']:.4f}  valid {r['valid_loss']:.4f}  "
                  f"({r['seconds']} s)", flush=True)
    summary = {}
    for name in dict.fromkeys(r["head"] for r in runs):
        vals = [r["valid_loss"] for r in runs if r["head"] == name]
        trains = [r["train_loss_last20"] for r in runs if r["head"] == name]
        summary[name] = {"valid_mean": statistics.mean(vals), "valid_sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                         "train_mean": statistics.mean(trains), "train_sd": statistics.stdev(trains) if len(trains) > 1 else 0.0}
        print(f"{name:<12} valid {summary[name]['valid_mean']:.4f} ± {summary[name]['valid_sd']:.4f}   "
              f"train {summary[name]['train_mean']:.4f} ± {summary[name]['train_sd']:.4f}")
    if args.json:
        meta = {"command": "python -m lmmem.experiments.hf_head_comparison " + shlex.join(argv if argv is not None else sys.argv[1:]),
                "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, torch {torch.__version__}",
                "data": args.data, "vocab_size": len(corpus.vocab), "tied": not args.untie}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "summary": summary, "runs": runs}, f, indent=1)
        if args.plot:
            plot_training_curves([args.json], args.plot)
    return 0


if __name__ == "__main__":
    from lmmem.cli import run_cli

    sys.exit(run_cli(main))
