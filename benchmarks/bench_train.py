"""Training throughput: tokens/s and peak memory of the real training step (lmmem.training.train_step).

    python benchmarks/bench_train.py                      # CPU: tiny preset, V = 10K and 30K
    python benchmarks/bench_train.py --preset wt103-paper --vocab 267735 --device cuda   # GPU
    # the Triton Hebbian softmax against eager full softmax, end to end (issue 4's target: ≥ 2×)
    python benchmarks/bench_train.py --preset wt103-paper --vocab 267735 --device cuda --softmax full/torch hebbian/triton

A softmax is NAME or NAME/BACKEND (backend auto | torch | triton, see --softmax-backend of train.py).

Each (preset, vocabulary, softmax) runs in a fresh subprocess so peak memory is its own
(VmHWM on CPU, torch.cuda.max_memory_allocated on GPU). Time per step is the median over the
timed steps after warm-up. Softmaxes are measured in the same run and reported as ratios to full.
Random token streams stand in for text: the step's cost does not depend on which words they are.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import markdown_table, peak_rss_mib, write_results  # noqa: E402


def worker(args) -> dict:
    import numpy as np
    import torch

    from lmmem.data.batching import StreamBatcher
    from lmmem.models import build_model
    from lmmem.training import config_from_args
    from lmmem.training.trainer import amp_dtype, make_optimizer, train_step

    device = torch.device(args.device)
    name, _, backend = args.softmax.partition("/")
    cfg = config_from_args({"preset": args.preset, "softmax": name, "device": args.device, "softmax_backend": backend or "auto"})
    torch.manual_seed(0)
    model = build_model(cfg.model_config(args.vocab)).to(device)
    model.output.backend = cfg.softmax_backend
    optimizer = make_optimizer(cfg, model)
    rows, bptt = cfg.batch_size, cfg.bptt
    tokens = np.random.default_rng(0).integers(0, args.vocab, size=rows * bptt * (args.warmup + args.steps) + 1).astype("<u4")
    batcher = StreamBatcher(tokens, rows, bptt)
    amp = amp_dtype(cfg, device)
    state = model.init_state(rows, device)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup + args.steps):
        b = batcher.batch(step)
        x, y = b.inputs.to(device), b.targets.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss, state = train_step(model, model, optimizer, x, y, state, clip=cfg.clip, device=device, amp=amp)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        else:
            loss.item()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_mib() * 2**20
    return {"preset": args.preset, "vocab": args.vocab, "softmax": args.softmax, "device": str(device),
            "backend": "triton" if model.output.uses_triton(model.output.weight) else "torch",
            "tokens_per_step": rows * bptt, "ms_per_step": 1e3 * t, "tokens_per_s": rows * bptt / t,
            "peak_mem_mb": peak / 2**20, "steps_timed": len(times), "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--vocab", type=int, nargs="+", default=[10_000, 30_000])
    p.add_argument("--softmax", nargs="+", default=None,
                   help="NAME or NAME/BACKEND; the first is the baseline of the ratios (default: every registered output layer)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_train_<device>.json)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.vocab, args.softmax = args.vocab[0], args.softmax[0]
        print(json.dumps(worker(args)))
        return
    from lmmem.output_layers import OUTPUT_LAYERS

    softmaxes = args.softmax or list(OUTPUT_LAYERS)
    rows = []
    for vocab in args.vocab:
        base = None
        for sm in softmaxes:
            cmd = [sys.executable, __file__, "--worker", "--preset", args.preset, "--vocab", str(vocab), "--softmax", sm,
                   "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup)]
            r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
            base = base or r
            r["time_vs_first"] = r["ms_per_step"] / base["ms_per_step"]
            rows.append(r)
            print(f"  {args.preset} V={vocab:,} {sm}: {r['tokens_per_s']:,.0f} tok/s, {r['peak_mem_mb']:,.0f} MB", file=sys.stderr)
    cols = ["preset", "vocab", "softmax", "backend", "device", "tokens_per_step", "ms_per_step", "tokens_per_s", "time_vs_first",
            "peak_mem_mb"]
    print(markdown_table(rows, cols))
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    path = write_results(f"bench_train_{dev}", {"results": rows, "steps": args.steps, "warmup": args.warmup}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
