"""Cost of the test-time memories against the plain evaluation, measured in one run.

Model: the ``tiny`` preset LSTM (embed 128, hidden 256 projected to 128, tied), untrained weights,
vocabulary ``--vocab`` (30,000), a Zipf-distributed token stream of ``--tokens`` positions, batch
``--batch-size`` × the preset's bptt (35). Methods, each timed on the same stream (median of
``--repeats``): plain (``score_stream``), the same loop through ``score_test_time`` with no memory,
+cache (W = 2000, one θ), +mbpa (K = 32, 5 steps, memory 2000; exact, every output row adapted),
+mbpa-restricted (the same with only the ``--mbpa-vocab`` candidate rows adapted, see
lmmem/memories/mbpa.py), and the combinations with the cache. Reports wall and CPU seconds,
tokens/s and the ratio to plain (of CPU time on CPU, where other jobs' load moves the wall clock; of
wall time on GPU), the bytes of the per-stream memories, and writes
``benchmarks/results/bench_test_time_<device>.json``.

    python benchmarks/bench_test_time.py                          # CPU, V = 30K
    python benchmarks/bench_test_time.py --device cuda --vocab 267735 --tokens 245000 --dim 512   # WT103 scale
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import markdown_table, write_results  # noqa: E402
from lmmem.evaluation import score_stream, score_test_time  # noqa: E402
from lmmem.memories import CacheConfig, MbPAConfig  # noqa: E402
from lmmem.models import ModelConfig, build_model  # noqa: E402
from lmmem.training import PRESETS  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", type=int, default=30_000)
    p.add_argument("--tokens", type=int, default=40_000, help="stream length (16 rows × 2,500: the 2,000-pair memories fill)")
    p.add_argument("--exact-tokens", type=int, default=5_600,
                   help="stream length for exact MbPA (every output row adapted; ~75× plain on CPU), timed with its own plain baseline")
    p.add_argument("--dim", type=int, default=0, help="softmax input width (0: the tiny preset's 128)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--window", type=int, default=2000)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--memory", type=int, default=2000)
    p.add_argument("--mbpa-vocab", type=int, default=128, help="candidate rows of the restricted MbPA (top-N + neighbours' words)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--methods", default="plain,plain-loop,cache,mbpa-restricted,cache+mbpa-restricted")
    p.add_argument("--exact-methods", default="plain,mbpa", help="methods timed on --exact-tokens ('' to skip)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    pre = PRESETS["tiny"]
    dim = args.dim or pre["proj_dim"]
    torch.manual_seed(0)
    cfg = ModelConfig(arch="lstm", vocab_size=args.vocab, embed_dim=dim, hidden_dim=max(pre["hidden_dim"], 2 * dim),
                      proj_dim=dim, num_layers=pre["num_layers"], tie_weights=True, dropout=pre["dropout"],
                      output_dropout=pre["output_dropout"])
    model = build_model(cfg).to(dev).eval()
    bptt = pre["bptt"]
    rng = np.random.default_rng(0)
    ranks = np.arange(1, args.vocab + 1)
    prob = 1.0 / ranks**1.1
    stream = rng.choice(args.vocab, size=max(args.tokens, args.exact_tokens) + 1, p=prob / prob.sum()).astype("<u4")
    bucket_of = np.zeros(args.vocab, dtype=np.int64)
    cache = CacheConfig(window=args.window)
    mbpa = MbPAConfig(k=args.k, steps=args.steps, memory=args.memory, vocab=0)
    mbpa_r = MbPAConfig(k=args.k, steps=args.steps, memory=args.memory, vocab=args.mbpa_vocab)
    common = dict(bucket_of=bucket_of, num_buckets=1, batch_size=args.batch_size, bptt=bptt, device=dev)
    runs = {
        "plain": lambda t: score_stream(model, t, **common),
        "plain-loop": lambda t: score_test_time(model, t, **common),
        "cache": lambda t: score_test_time(model, t, cache=cache, **common),
        "mbpa": lambda t: score_test_time(model, t, mbpa=mbpa, **common),
        "cache+mbpa": lambda t: score_test_time(model, t, cache=cache, mbpa=mbpa, **common),
        "mbpa-restricted": lambda t: score_test_time(model, t, mbpa=mbpa_r, **common),
        "cache+mbpa-restricted": lambda t: score_test_time(model, t, cache=cache, mbpa=mbpa_r, **common),
    }

    def timed(fn, t):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0, c0 = time.perf_counter(), time.process_time()
        res = fn(t)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        # on CPU the ratio uses this process's CPU time: the wall clock of a shared machine swings
        # with other jobs' load; on GPU the wall clock
        return (time.perf_counter() - t0, time.process_time() - c0), res

    timed(runs["plain"], stream[: 20 * bptt * args.batch_size])  # warm-up
    rows, times = [], {}
    for n_tokens, methods in ((args.tokens, args.methods), (args.exact_tokens, args.exact_methods)):
        names = [m for m in methods.split(",") if m]
        if not names:
            continue
        tokens = stream[: n_tokens + 1]
        ts: dict[str, list[float]] = {m: [] for m in names}
        results = {}
        for _ in range(args.repeats):
            for m in names:  # interleaved, so background load hits every method alike
                t, results[m] = timed(runs[m], tokens)
                ts[m].append(t)
        key = 0 if dev.type == "cuda" else 1

        def med(m, i):
            return statistics.median(x[i] for x in ts[m])

        base = med("plain", key) if "plain" in ts else None
        for m in names:
            t = med(m, key)
            res = results[m]
            row = {"method": m, "tokens": n_tokens, "seconds": round(med(m, 0), 3), "cpu seconds": round(med(m, 1), 3),
                   "tokens/s": round(n_tokens / med(m, 0), 1)}
            if base:
                row["× plain"] = round(t / base, 2)
            if hasattr(res, "memory_bytes"):
                row["memory MiB"] = round(sum(res.memory_bytes.values()) / 2**20, 2)
            rows.append(row)
            times[f"{m}@{n_tokens}"] = ts[m]
    cols = ["method", "tokens", "seconds", "cpu seconds", "tokens/s", "× plain", "memory MiB"]
    print(f"V={args.vocab:,} D={dim} batch={args.batch_size} bptt={bptt} device={dev} threads={torch.get_num_threads()} "
          f"W={args.window} K={args.k} steps={args.steps} M={args.memory} restricted vocab={args.mbpa_vocab}")
    print(markdown_table(rows, cols))
    path = write_results(f"bench_test_time_{dev.type}", {
        "config": {**vars(args), "dim": dim, "bptt": bptt, "cache": vars(cache), "mbpa": vars(mbpa), "mbpa_restricted": vars(mbpa_r)},
        "rows": rows, "times": times}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
