"""The CPU chunk size of the fused linear cross-entropy (``chunk_rows``): the rule against the
previous one (200 MiB of logits per chunk at every vocabulary size), in one process, interleaved
(this VM's speed drifts between processes; ratios within a run are what to compare).

Timed per variant, CPU time, median over ``--repeats``:

* ``op train`` / ``op eval``: :func:`lmmem.linear_cross_entropy` forward + backward / forward
  without autograd, random inputs, at each ``--shapes`` entry ``N,V,D``;
* ``lstm train step`` / ``lstm eval window``: the ``tiny`` preset's LSTM (V = ``--vocab``): a
  training step (forward, loss, backward, Adam) on 32 × 35 tokens and the scoring of a 16 × 35
  evaluation window, which run the op as the library does.

    python benchmarks/bench_cpu_chunk.py                       # V = 30,000 (a tiny LSTM's) and 50,257
    python benchmarks/bench_cpu_chunk.py --smoke --out /tmp/x.json

Prints a table and writes ``benchmarks/results/bench_cpu_chunk.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import markdown_table, write_results  # noqa: E402
from lmmem.kernels import linear_cross_entropy as lce  # noqa: E402
from lmmem.models import ModelConfig, build_model  # noqa: E402
from lmmem.training.config import PRESETS  # noqa: E402


def variant(name: str):
    """Set the chunk rule for ``name`` ("rule": the library's; "200MiB": the previous CPU rule)."""
    lce.CPU_REUSED_BYTES = 0 if name == "200MiB" else RULE_REUSED


RULE_REUSED = lce.CPU_REUSED_BYTES


def op_workloads(N: int, V: int, D: int) -> dict:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).requires_grad_()
    W = (torch.randn(V, D, generator=g) * 0.05).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)

    def train():
        lce.linear_cross_entropy(h, W, b, t).backward()

    def evaluate():
        with torch.no_grad():
            lce.linear_cross_entropy(h, W, b, t, reduction="none")
    return {f"op train N={N} V={V} D={D}": train, f"op eval N={N} V={V} D={D}": evaluate}


def lstm_workloads(V: int) -> dict:
    p = PRESETS["tiny"]
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=V, embed_dim=p["embed_dim"], hidden_dim=p["hidden_dim"],
                                    proj_dim=p["proj_dim"], num_layers=p["num_layers"], tie_weights=p["tie_weights"],
                                    dropout=p["dropout"], output_dropout=p["output_dropout"]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, V, (p["batch_size"], p["bptt"]), generator=g), torch.randint(0, V, (p["batch_size"], p["bptt"]), generator=g)
    xe, ye = x[:16], y[:16]

    def train():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss, _ = model(x, y, None)
        loss.backward()
        opt.step()

    def evaluate():
        model.eval()
        with torch.no_grad():
            h, _ = model.hidden_states(xe, None)
            model.output.target_log_probs(h.reshape(-1, h.shape[-1]), ye.reshape(-1))
    return {f"lstm train step V={V}": train, f"lstm eval window V={V}": evaluate}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["2240,30000,128", "2048,50257,512"], help="N,V,D of the op")
    p.add_argument("--vocab", type=int, nargs="+", default=[30_000], help="V of the tiny LSTM")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one repeat: checks that the script runs")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.smoke:
        args.shapes, args.vocab, args.repeats = ["64,3000,16"], [3000], 1
    torch.set_num_threads(args.threads)
    work = {}
    for s in args.shapes:
        N, V, D = (int(v) for v in s.split(","))
        work.update(op_workloads(N, V, D))
    for V in args.vocab:
        work.update(lstm_workloads(V))
    variants = ("rule", "200MiB")
    times = {(w, v): [] for w in work for v in variants}
    for fn in work.values():  # warm-up: allocator, MKL
        for v in variants:
            variant(v)
            fn()
    for _ in range(args.repeats):
        for w, fn in work.items():
            for v in variants:
                variant(v)
                c0 = time.process_time()
                fn()
                times[(w, v)].append(time.process_time() - c0)
    variant("rule")
    rows = []
    for w in work:
        new, old = (statistics.median(times[(w, v)]) * 1e3 for v in variants)
        rows.append({"workload": w, "rule ms": new, "200MiB ms": old, "rule / 200MiB": new / old})
    print(markdown_table(rows, ["workload", "rule ms", "200MiB ms", "rule / 200MiB"]))
    path = write_results("bench_cpu_chunk", {"config": vars(args), "rows": rows,
                                             "times": {f"{w} | {v}": t for (w, v), t in times.items()}}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
