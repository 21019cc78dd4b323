"""Grid over MbPA's settings on the validation split of a checkpoint's corpus: learning rate η,
pull α, kernel ε and the restricted candidate set N (0 = exact MbPA, every output row adapted).

    python -m lmmem.experiments.mbpa_sweep runs/cmp-news/full-seed1/best.pt --json sweep.json
    python -m lmmem.experiments.mbpa_sweep CKPT --lrs 0.3 --alphas 0.1 --mbpa-vocab 0 32 128 512 --lambdas 0.1 0.2 1.0

For every cell: one pass over the split with MbPA alone, λ chosen from ``--lambdas`` on the same
pass (the mixture is computed for every λ at once; the perplexity at every λ is kept too, so λ = 1,
the adapted softmax alone, compares variants without the mixture). Prints a line per cell and
writes JSON. ``--with-cache`` scores each cell on top of the neural cache as well (θ and both λs
chosen on the same pass), since the settings best for MbPA alone need not be best for the
combination. Valid split only by default: choosing settings on test would be tuning on test.
"""

from __future__ import annotations

import itertools
import sys
import time

from lmmem.cli import ArgumentParser, run_cli
from lmmem.evaluation import EvalConfig, Evaluation, Methods, write_json
from lmmem.experiments import describe
from lmmem.experiments.paths import portable_command, portable_path
from lmmem.memories import CacheConfig, MbPAConfig
from lmmem.validation import check_flags


def sweep(checkpoint, *, lrs, alphas, lambdas, split="valid", k=32, steps=5, vocabs=(MbPAConfig.vocab,),
          epss=(MbPAConfig.eps,), with_cache=False, thetas=(0.1, 0.3, 1.0), batch_size=16, device="auto"):
    ev = Evaluation(checkpoint, config=EvalConfig(split=split, batch_size=batch_size, device=device))
    rows = []
    for vocab, eps, lr, alpha in itertools.product(vocabs, epss, lrs, alphas):
        t0 = time.monotonic()
        cfg = MbPAConfig(k=k, steps=steps, lr=lr, alpha=alpha, eps=eps, vocab=vocab)
        methods = Methods(cache=CacheConfig() if with_cache else None, mbpa=cfg)
        mem = ev.memory_set(methods, None, thetas=list(thetas), cache_lambdas=[0.0, *lambdas], mbpa_lambdas=[0.0, *lambdas])
        res = ev.run_pass(split, mem, desc=f"{split} N {vocab} ε {eps} η {lr} α {alpha}")
        totals, grid = res.sums.totals(), mem.grid

        def ppl(**point):
            return res.sums.report(ev.buckets, grid.index(**point)).perplexity

        best = min(lambdas, key=lambda lam: totals[grid.index(mbpa_lambda=lam)])  # MbPA alone: θ does not matter
        row = {"vocab": vocab, "eps": eps, "lr": lr, "alpha": alpha, "best_lambda": best, f"{split}_ppl": ppl(mbpa_lambda=best),
               "ppl_by_lambda": {str(lam): ppl(mbpa_lambda=lam) for lam in lambdas}, "plain_ppl": ppl()}
        line = ""
        if with_cache:  # the paper's combination: θ, cache λ and MbPA λ chosen on the same pass
            both, alone = grid.best(totals, ("cache", "mbpa")), grid.best(totals, ("cache",))
            row.update({"cache_ppl": res.sums.report(ev.buckets, alone).perplexity, "cache_choice": grid.point(alone),
                        f"cache_mbpa_{split}_ppl": res.sums.report(ev.buckets, both).perplexity,
                        "cache_mbpa_choice": grid.point(both)})
            line = f", +cache {row['cache_ppl']:.2f}, +cache+MbPA {row[f'cache_mbpa_{split}_ppl']:.2f}"
        rows.append({**row, "seconds": round(time.monotonic() - t0, 1)})
        print(f"N {vocab or 'exact':<6} ε {eps:<6} η {lr:<6} α {alpha:<5} λ {best:<5} {split} ppl {row[f'{split}_ppl']:.2f} "
              f"(plain {row['plain_ppl']:.2f}{line}, {rows[-1]['seconds']} s)", flush=True)
    return rows


def main(argv=None) -> int:
    p = ArgumentParser(description=describe(__doc__))
    p.add_argument("checkpoint")
    p.add_argument("--split", default="valid")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5, 2.0])
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5])
    p.add_argument("--mbpa-k", type=int, default=MbPAConfig.k)
    p.add_argument("--mbpa-steps", type=int, default=MbPAConfig.steps)
    p.add_argument("--mbpa-vocab", type=int, nargs="+", default=[MbPAConfig.vocab], help="candidate rows N (0: exact MbPA)")
    p.add_argument("--with-cache", action="store_true",
                   help="also score MbPA on top of the neural cache (θ from --thetas, both λs from --lambdas)")
    p.add_argument("--thetas", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    p.add_argument("--eps", type=float, nargs="+", default=[MbPAConfig.eps], help="ε of the kernel 1/(ε + d²)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--json")
    args = p.parse_args(argv)
    check_flags(vars(args))
    rows = sweep(args.checkpoint, lrs=args.lrs, alphas=args.alphas, lambdas=args.lambdas, split=args.split, k=args.mbpa_k,
                 steps=args.mbpa_steps, vocabs=args.mbpa_vocab, epss=args.eps, with_cache=args.with_cache,
                 thetas=args.thetas, batch_size=args.batch_size, device=args.device)
    if args.json:
        command = portable_command(list(sys.argv[1:] if argv is None else argv), "python -m lmmem.experiments.mbpa_sweep")
        write_json({"checkpoint": portable_path(args.checkpoint, "CHECKPOINT"), "command": command, "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
