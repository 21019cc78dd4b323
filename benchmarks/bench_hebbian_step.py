"""Training-step cost of the Hebbian softmax's bookkeeping: full vs Hebbian softmax, plain PyTorch.

Model: a tiny-preset-like LSTM (embed 128, hidden 256 projected to 128, tied), batch 32 × bptt 35,
SGD, at V = 30,000 and a smaller V. For each V:

* throughput: both models built in one process from the same weights, steps interleaved
  (full, hebbian, full, ...) after warm-up; the median step time of each gives tokens/s and the ratio;
* the bookkeeping alone: median time of recording the statistics + applying the update on one
  step's activations (what the Hebbian layer adds to a step);
* peak memory: one fresh subprocess per (V, softmax) running warm-up + a few steps; on CPU the
  process's peak RSS (``VmHWM`` of ``/proc/self/status``, falling back to ``getrusage`` maxrss,
  which on Linux survives ``exec`` and so would report the parent's peak) and its growth over the
  RSS before the first step; on GPU ``torch.cuda.max_memory_allocated``;
* the bookkeeping per rule and backend (``--update-shape N D V``, default one WikiText-103 step:
  8,192 tokens, D = 512, V = 267,735): a bare HebbianSoftmax records the statistics of Zipf targets
  and applies the update, for ``rule`` paper and centred (written from the first update) with
  ``backend`` torch and triton (where Triton runs); the median time of each part and the ratio
  torch / triton per rule.

Prints markdown tables and writes ``benchmarks/results/bench_hebbian_step_<device>.json``.

    python benchmarks/bench_hebbian_step.py [--vocab 30000 5000] [--steps 20] [--device cpu]
    python benchmarks/bench_hebbian_step.py --device cuda --vocab 267735     # the GPU figures
    python benchmarks/bench_hebbian_step.py --smoke --out /tmp/x.json       # CPU, interpreter, tiny
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.common import markdown_table, peak_rss_mib, write_results  # noqa: E402
from lmmem.kernels.runtime import kernel_health, triton_usable  # noqa: E402
from lmmem.models import ModelConfig, build_model  # noqa: E402
from lmmem.output_layers import HebbianSoftmax  # noqa: E402

BATCH, BPTT = 32, 35


def make_cfg(vocab: int, softmax: str) -> ModelConfig:
    return ModelConfig(
        arch="lstm",
        vocab_size=vocab,
        embed_dim=128,
        hidden_dim=256,
        proj_dim=128,
        num_layers=1,
        dropout=0.1,
        output_dropout=0.2,
        tie_weights=True,
        softmax=softmax,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def zipf_batch(vocab: int, device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Zipf-like word ids (as in real text: many repeats of frequent words, a long tail)."""
    ranks = torch.arange(1, vocab + 1, dtype=torch.float64)
    probs = 1.0 / ranks
    ids = torch.multinomial(probs / probs.sum(), BATCH * (BPTT + 1), replacement=True, generator=gen).view(BATCH, BPTT + 1)
    return ids[:, :-1].to(device), ids[:, 1:].to(device)


def make_step(model, device):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.output.attach_to_optimizer(opt)  # no-op hook for the full softmax
    model.train()

    def step(x, y):
        loss, _ = model(x, y, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)

    return step


def throughput(vocab: int, device: torch.device, warmup: int, steps: int) -> dict:
    gen = torch.Generator().manual_seed(vocab)
    full = build_model(make_cfg(vocab, "full")).to(device)
    hebb = build_model(make_cfg(vocab, "hebbian")).to(device)
    hebb.load_state_dict(full.state_dict(), strict=False)
    batches = [zipf_batch(vocab, device, gen) for _ in range(8)]
    runners = {"full": make_step(full, device), "hebbian": make_step(hebb, device)}
    times: dict[str, list[float]] = {"full": [], "hebbian": []}
    for i in range(warmup + steps):
        x, y = batches[i % len(batches)]
        order = ("full", "hebbian") if i % 2 == 0 else ("hebbian", "full")
        for name in order:
            t0 = time.perf_counter()
            runners[name](x, y)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times[name].append(dt)

    # the bookkeeping alone, on one step's real activations
    layer = hebb.output
    x, y = batches[0]
    with torch.no_grad():
        h, _ = hebb.hidden_states(x)
    h, t = h.reshape(-1, h.shape[-1]), y.reshape(-1)
    book = []
    for i in range(warmup + 3 * steps):
        sync(device)
        t0 = time.perf_counter()
        layer._record(h, t, -100)
        layer.hebbian_update_()
        sync(device)
        if i >= warmup:
            book.append(time.perf_counter() - t0)
    unique = int(torch.unique(t).numel())

    med = {k: statistics.median(v) for k, v in times.items()}
    q = {k: statistics.quantiles(v, n=4) for k, v in times.items()}  # [p25, p50, p75]
    tokens = BATCH * BPTT
    return {
        "vocab": vocab,
        "unique_targets_per_batch": unique,
        "full_step_ms": 1e3 * med["full"],
        "hebbian_step_ms": 1e3 * med["hebbian"],
        "full_tokens_per_s": tokens / med["full"],
        "hebbian_tokens_per_s": tokens / med["hebbian"],
        "step_time_ratio": med["hebbian"] / med["full"],
        "bookkeeping_ms": 1e3 * statistics.median(book),
        "bookkeeping_fraction_of_full_step": statistics.median(book) / med["full"],
        "full_step_iqr_pct": 100 * (q["full"][2] - q["full"][0]) / med["full"],
        "hebbian_step_iqr_pct": 100 * (q["hebbian"][2] - q["hebbian"][0]) / med["hebbian"],
        "timed_steps": steps,
        "warmup_steps": warmup,
    }


def update_costs(N: int, D: int, V: int, device: torch.device, warmup: int, repeat: int) -> dict:
    """The bookkeeping alone, per rule and backend: median ms of recording one step's statistics
    (Zipf targets, 1 in 17 ignored) and of applying the update, on a bare layer (fp32 rows), cycling
    through 4 batches (so counts grow and frequent rows saturate, as in training)."""
    gen = torch.Generator().manual_seed(N + V)
    ranks = torch.arange(1, V + 1, dtype=torch.float64)
    batches = []
    for _ in range(4):
        t = torch.multinomial(1.0 / ranks, N, replacement=True, generator=gen)
        t[::17] = -100
        batches.append(((torch.randn(N, D, generator=gen) + 1.0).to(device), t.to(device)))
    backends = ["torch", "triton"] if triton_usable(device) else ["torch"]
    rows = []
    for rule in ("paper", "centred"):
        for backend in backends:
            layer = HebbianSoftmax(D, V, rule=rule, backend=backend, start_step=0).to(device).train()
            rec, upd = [], []
            for i in range(warmup + repeat):
                h, t = batches[i % len(batches)]
                sync(device)
                t0 = time.perf_counter()
                layer._record(h, t, -100)
                sync(device)
                t1 = time.perf_counter()
                layer.hebbian_update_()
                sync(device)
                if i >= warmup:
                    rec.append(t1 - t0)
                    upd.append(time.perf_counter() - t1)
            r, u = 1e3 * statistics.median(rec), 1e3 * statistics.median(upd)
            rows.append({"rule": rule, "backend": backend, "record_ms": r, "update_ms": u, "total_ms": r + u})
            del layer
    by = {(r["rule"], r["backend"]): r for r in rows}
    ratios = {rule: {"update_torch_over_triton": by[rule, "torch"]["update_ms"] / by[rule, "triton"]["update_ms"],
                     "total_torch_over_triton": by[rule, "torch"]["total_ms"] / by[rule, "triton"]["total_ms"]}
              for rule in ("paper", "centred") if (rule, "triton") in by}
    fallbacks = [str(k) for k, ok in kernel_health().items() if not ok]
    return {"shape": {"N": N, "D": D, "V": V, "weight": "fp32", "hidden": "fp32"}, "timed": repeat, "warmup": warmup,
            "rows": rows, "ratios": ratios, "kernel_fallbacks": fallbacks}


def memory_child(vocab: int, softmax: str, device: str, steps: int) -> None:
    """Runs in a fresh process; prints one JSON line."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(vocab)
    model = build_model(make_cfg(vocab, softmax)).to(dev)
    step = make_step(model, dev)
    batches = [zipf_batch(vocab, dev, gen) for _ in range(4)]
    rss_before = peak_rss_mib()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    for i in range(steps):
        step(*batches[i % len(batches)])
    out = {"softmax": softmax, "vocab": vocab}
    rss_after = peak_rss_mib()
    out["peak_rss_mib"] = rss_after
    out["step_rss_growth_mib"] = rss_after - rss_before
    if dev.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        out["cuda_peak_over_model_mib"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    print(json.dumps(out))


def memory(vocab: int, softmax: str, device: str, steps: int) -> dict:
    res = subprocess.run(
        [sys.executable, __file__, "--memory-child", softmax, "--vocab", str(vocab), "--device", device, "--steps", str(steps)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def print_throughput(rows: list[dict], device: torch.device) -> None:
    mem_key = "cuda_peak_mib" if device.type == "cuda" else "peak_rss_mib"
    print(f"\nTraining step, LSTM 128/256→128 tied, batch {BATCH} × bptt {BPTT}, {device.type}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(f"| V | full tok/s | hebbian tok/s | step ratio (hebb/full) | step IQR full / hebb | bookkeeping ms (% of full step) | unique targets | peak mem full / hebb (MiB, {mem_key}) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        m = r.get("memory")
        print(
            f"| {r['vocab']:,} | {r['full_tokens_per_s']:,.0f} | {r['hebbian_tokens_per_s']:,.0f} | {r['step_time_ratio']:.3f} | "
            f"{r['full_step_iqr_pct']:.1f}% / {r['hebbian_step_iqr_pct']:.1f}% | "
            f"{r['bookkeeping_ms']:.2f} ({100 * r['bookkeeping_fraction_of_full_step']:.1f}%) | {r['unique_targets_per_batch']} | "
            + (f"{m['full'][mem_key]:.0f} / {m['hebbian'][mem_key]:.0f} |" if m else "– |")
        )


def print_update(update: dict) -> None:
    sh = update["shape"]
    print(f"\nHebbian bookkeeping per rule and backend, N = {sh['N']:,}, D = {sh['D']}, V = {sh['V']:,} (median ms)\n")
    print(markdown_table(update["rows"], ["rule", "backend", "record_ms", "update_ms", "total_ms"]))
    for rule, r in update["ratios"].items():
        print(f"{rule}: update torch/triton {r['update_torch_over_triton']:.2f}×, record+update {r['total_torch_over_triton']:.2f}×")
    if update["kernel_fallbacks"]:
        print(f"!! kernel variants that fell back to PyTorch: {update['kernel_fallbacks']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[30000, 5000])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per softmax")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--update-shape", type=int, nargs=3, default=[8192, 512, 267_735], metavar=("N", "D", "V"),
                    help="the per-rule bookkeeping comparison's tokens per step, hidden size, vocabulary")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes, no memory children: "
                    "checks that the script runs (JSON only with --out)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.vocab[0], args.memory_child, args.device, args.steps)
        return
    if args.smoke:
        args.device, args.vocab, args.steps, args.warmup, args.update_shape = "cpu", [200], 2, 1, [64, 24, 200]

    device = torch.device(args.device)
    rows = []
    for vocab in args.vocab:
        r = throughput(vocab, device, args.warmup, args.steps)
        if not args.smoke:
            r["memory"] = {s: memory(vocab, s, args.device, args.warmup + 3) for s in ("full", "hebbian")}
        rows.append(r)
    print_throughput(rows, device)
    update = update_costs(*args.update_shape, device, args.warmup, args.steps)
    print_update(update)

    result = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "shapes": {"batch": BATCH, "bptt": BPTT, "embed_dim": 128, "hidden_dim": 256, "proj_dim": 128, "tied": True, "optimizer": "SGD"},
        "results": rows,
        "update": update,
    }
    if args.smoke and not args.out:
        return
    out = write_results(f"bench_hebbian_step_{device.type}", result, args.out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
