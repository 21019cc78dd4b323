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
import statistics
import sys
import time

import numpy as np
import torch

from lmmem.cli import ArgumentParser, run_cli
from lmmem.data.corpus import PreparedCorpus
from lmmem.experiments import describe
from lmmem.experiments.paths import portable_command, portable_path


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
    # here, not at the top: lmmem.hf needs the optional transformers package
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
            "hebbian_options": hebbian_options if head == "hebbian" else None,
            "rule": getattr(model.get_output_embeddings(), "rule", None)}


def head_label(name: str, run: dict, labels: dict[str, str]) -> str:
    """A curve's label: ``labels[name]`` if given, else the head with its Hebbian rule when the run
    recorded it (runs before that recorded no rule: give their label with ``--plot-label``)."""
    if name in labels:
        return labels[name]
    if name == "stock":
        return "stock nn.Linear head"
    rule = run.get("rule") or (run.get("hebbian_options") or {}).get("rule")
    return f"{name} ({rule} rule)" if rule else name


def plot_training_curves(result_files: list[str], out: str, labels: dict[str, str] | None = None) -> None:
    """Mean training loss per step (over seeds) of every head in the given result JSONs, one PNG with
    a panel for tied and one for untied embeddings (where both occur). The stock head is drawn last,
    dashed, so that a head that trains exactly like it does not hide it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[tuple[str, np.ndarray, int]]] = {}
    for path in result_files:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        tied = "tied" if result["meta"].get("tied", True) else "untied"
        for name in dict.fromkeys(r["head"] for r in result["runs"]):
            runs = [r for r in result["runs"] if r["head"] == name]
            curve = np.array([r["train_losses"] for r in runs]).mean(0)
            curves.setdefault(tied, []).append((head_label(name, runs[0], labels or {}), curve, len(runs)))
    panels = [k for k in ("tied", "untied") if k in curves]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), sharey=True, squeeze=False)
    colours = {}
    for ax, panel in zip(axes[0], panels):
        # stock last (on top), dashed and black: under it a curve that coincides still shows at its edges
        for label, curve, seeds in sorted(curves[panel], key=lambda c: c[0].startswith("stock")):
            stock = label.startswith("stock")
            colour = "black" if stock else colours.setdefault(label, f"C{len(colours)}")
            ax.plot(np.arange(1, len(curve) + 1), curve, color=colour, linestyle="--" if stock else "-",
                    linewidth=1.4 if stock else 2.8, alpha=1.0 if stock else 0.8, label=label if panel == panels[0] or label not in colours or stock else None,
                    zorder=3 if stock else 2)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{panel} embeddings ({seeds} seeds)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("training loss (nats/token)")
    handles = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    order = sorted(handles, key=lambda lab: not lab.startswith("stock"))
    fig.legend([handles[lab] for lab in order], order, loc="lower center", ncol=min(3, len(handles)), fontsize=8, frameon=False)
    fig.suptitle("tiny GPT-2 on Gutenberg: training loss of the stock head and the lmmem heads", fontsize=11)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(handles) - 1) // 3), 1, 1))
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = ArgumentParser(description=describe(__doc__), formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
    p.add_argument("--plot-label", nargs="+", default=[], metavar="HEAD=LABEL",
                   help="legend label of a head in the plot (e.g. for runs that did not record their Hebbian rule)")
    args = p.parse_args(argv)
    labels = dict(spec.split("=", 1) for spec in args.plot_label)
    if args.plot_from:
        plot_training_curves(args.plot_from, args.plot or "curves.png", labels)
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
        meta = {"command": portable_command(list(sys.argv[1:] if argv is None else argv), "python -m lmmem.experiments.hf_head_comparison"),
                "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, torch {torch.__version__}",
                "data": portable_path(args.data), "vocab_size": len(corpus.vocab), "tied": not args.untie}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "summary": summary, "runs": runs}, f, indent=1)
        if args.plot:
            plot_training_curves([args.json], args.plot, labels)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
