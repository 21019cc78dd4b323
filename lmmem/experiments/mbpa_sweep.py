"""Grid over MbPA's learning rate η and pull α on the validation split of a checkpoint's corpus.

    python -m lmmem.experiments.mbpa_sweep runs/cmp-news/full-seed1/best.pt --json sweep.json

For every (η, α): one pass over the split with MbPA alone, λ chosen from ``--lambdas`` on the same
pass (the mixture is computed for every λ at once). Prints a table and writes JSON. Valid split
only by default: choosing η and α on test would be tuning on test.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

from lmmem.data.corpus import PreparedCorpus
from lmmem.evaluation import FrequencyBuckets, score_test_time, write_json
from lmmem.memories import MbPAConfig
from lmmem.training.checkpoint import load_checkpoint, model_from_checkpoint
from lmmem.training.distributed import resolve_device


def sweep(checkpoint, *, lrs, alphas, lambdas, split="valid", k=32, steps=5, vocab=128, batch_size=16, device="auto"):
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint, map_location=dev)
    corpus = PreparedCorpus.open(ckpt["train_config"]["data"])
    model = model_from_checkpoint(ckpt, dev)
    buckets = FrequencyBuckets()
    kw = dict(bucket_of=buckets.assign(corpus.train_counts()), num_buckets=len(buckets.names), batch_size=batch_size,
              bptt=int(ckpt["train_config"]["bptt"]), device=dev)
    tokens = corpus.tokens(split)
    rows = []
    for lr, alpha in itertools.product(lrs, alphas):
        t0 = time.monotonic()
        cfg = MbPAConfig(k=k, steps=steps, lr=lr, alpha=alpha, vocab=vocab)
        s = score_test_time(model, tokens, mbpa=cfg, mbpa_lambdas=[0.0, *lambdas], **kw)
        best = min(lambdas, key=lambda lam: s.sums(mbpa_lambda=lam).sum())
        rows.append({"lr": lr, "alpha": alpha, "best_lambda": best, f"{split}_ppl": s.report(buckets, mbpa_lambda=best).perplexity,
                     "plain_ppl": s.report(buckets).perplexity, "seconds": round(time.monotonic() - t0, 1)})
        print(f"η {lr:<6} α {alpha:<5} λ {best:<5} {split} ppl {rows[-1][f'{split}_ppl']:.2f} "
              f"(plain {rows[-1]['plain_ppl']:.2f})", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--split", default="valid")
    p.add_argument("--lrs", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.1, 0.5, 2.0])
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5])
    p.add_argument("--mbpa-k", type=int, default=MbPAConfig.k)
    p.add_argument("--mbpa-steps", type=int, default=MbPAConfig.steps)
    p.add_argument("--mbpa-vocab", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = sweep(args.checkpoint, lrs=args.lrs, alphas=args.alphas, lambdas=args.lambdas, split=args.split, k=args.mbpa_k,
                 steps=args.mbpa_steps, vocab=args.mbpa_vocab, batch_size=args.batch_size, device=args.device)
    if args.json:
        write_json({"checkpoint": args.checkpoint, "command": " ".join(sys.argv), "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
