"""Grid over dynamic evaluation's update rule and learning rate on the validation split of a
checkpoint's corpus — how the defaults of lmmem.evaluation.dynamic were chosen.

    python -m lmmem.experiments.dynamic_sweep runs/news/best.pt --max-tokens 30000 --json sweep.json
    python -m lmmem.experiments.dynamic_sweep CKPT --sgd-lrs 0.01 0.1 0.3 --rms-lrs 1e-4 3e-4 --rms-eps 2e-5 1e-8

One pass per cell (the rms rule's training statistics are computed once and shared); the plain
model on the same layout (batch rows × bptt) is the reference. A diverged cell (non-finite loss)
is recorded as ``null``. Valid split by default: choosing settings on test would be tuning on test.
"""

from __future__ import annotations

import math
import sys
import time

from lmmem.cli import ArgumentParser, HelpFormatter, run_cli
from lmmem.evaluation import EvalConfig, Evaluation, write_json
from lmmem.evaluation.dynamic import DynamicConfig
from lmmem.evaluation.engine import DynamicRun
from lmmem.evaluation.methods import MemorySet
from lmmem.experiments import describe
from lmmem.experiments.paths import portable_command, portable_path
from lmmem.validation import check_flags


def _ppl(sums) -> float | None:
    loss = float(sums.totals()[0] / max(float(sums.count.sum()), 1))
    return math.exp(loss) if loss < 700 else None  # inf/NaN: diverged


def sweep(checkpoint, *, sgd_lrs=(), rms_lrs=(), rms_eps=(DynamicConfig.eps,), decay=DynamicConfig.decay, split="valid",
          batch_size=16, bptt=None, max_tokens=0, stat_batches=DynamicConfig.stat_batches, device="auto", log=print) -> dict:
    ev = Evaluation(checkpoint, config=EvalConfig(split=split, batch_size=batch_size, bptt=bptt, max_tokens=max_tokens,
                                                  device=device, buckets="1"))
    none = MemorySet([])
    t = time.monotonic()
    plain = _ppl(ev.run_pass(split, none, desc=f"{split} plain").sums)
    log(f"plain: {plain:.2f} ({time.monotonic() - t:.0f}s)")
    cells = [("sgd", lr, None) for lr in sgd_lrs] + [("rms", lr, eps) for eps in rms_eps for lr in rms_lrs]
    rows = []
    for method, lr, eps in cells:
        cfg = DynamicConfig(method=method, lr=lr, decay=decay, stat_batches=stat_batches, **({"eps": eps} if eps else {}))
        t = time.monotonic()
        run = DynamicRun(cfg, ev.gradient_statistics(cfg))  # the rms statistics: computed once, shared by every cell
        ppl = _ppl(ev.run_pass(split, none, desc=f"{split} {method} lr {lr:g}", dynamic=run).sums)
        rows.append({"method": method, "lr": lr, "eps": cfg.eps if method == "rms" else None, "decay": decay, "perplexity": ppl,
                     "change": None if ppl is None else ppl / plain - 1, "seconds": round(time.monotonic() - t, 1)})
        log(f"{method} lr {lr:g}" + (f" eps {cfg.eps:g}" if method == "rms" else "") + ": "
            + ("diverged" if ppl is None else f"{ppl:.2f} ({100 * (ppl / plain - 1):+.1f}%)"))
    return {"checkpoint": portable_path(checkpoint, "CHECKPOINT"), "data": portable_path(ev.source.describe()["data"]), "split": split,
            "tokens": len(ev.data.tokens) - 1, "batch_size": batch_size, "bptt": ev.bptt, "stat_batches": stat_batches,
            "plain": plain, "rows": rows}


def main(argv=None) -> int:
    p = ArgumentParser(description=describe(__doc__), formatter_class=HelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--split", default="valid")
    p.add_argument("--sgd-lrs", type=float, nargs="*", default=[1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0])
    p.add_argument("--rms-lrs", type=float, nargs="*", default=[1e-5, 3e-5, 1e-4, 2e-4, 3e-4, 6e-4, 1e-3])
    p.add_argument("--rms-eps", type=float, nargs="*", default=[DynamicConfig.eps])
    p.add_argument("--decay", type=float, default=DynamicConfig.decay)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bptt", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--stat-batches", type=int, default=DynamicConfig.stat_batches)
    p.add_argument("--device", default="auto")
    p.add_argument("--json")
    args = p.parse_args(argv)
    check_flags(vars(args))
    result = sweep(args.checkpoint, sgd_lrs=args.sgd_lrs, rms_lrs=args.rms_lrs, rms_eps=args.rms_eps, decay=args.decay,
                   split=args.split, batch_size=args.batch_size, bptt=args.bptt, max_tokens=args.max_tokens,
                   stat_batches=args.stat_batches, device=args.device)
    if args.json:
        command = portable_command(list(sys.argv[1:] if argv is None else argv), "python -m lmmem.experiments.dynamic_sweep")
        write_json({**result, "command": command}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
