"""Evaluate a checkpoint: perplexity overall and by the target word's training frequency.

    python evaluate.py runs/demo/best.pt --split test --json runs/demo/eval.json
    python evaluate.py                     # the best checkpoint of runs/default, where `python train.py` writes

Prints a table, writes the same numbers as JSON (--json) and a bar chart (--plot, or next to the
JSON when matplotlib is installed). The work is done by lmmem.evaluation.evaluate_checkpoint().

Test-time methods, side by side with the plain model in one table/JSON/chart:

    python evaluate.py runs/wt103/best.pt --cache --mbpa --dynamic --tune --json eval.json

--cache (neural cache, Grave et al. 2017), --mbpa (memory-based parameter adaptation of the softmax,
Sprechmann et al. 2018; with --cache also +cache+mbpa), --dynamic (dynamic evaluation, Krause et al.
2018), --tune (choose θ, the λs and the dynamic learning rate on the valid split, then score the
requested split). --word-probs FILE writes every scored token's log-probability under each method;
--context C scores a Transformer with a sliding window (every token sees at least C tokens before it).
``lmmem evaluate ...`` (installed) and ``python -m lmmem evaluate ...`` are the same command.
"""

import argparse
import sys
from pathlib import Path

from lmmem.cli import ArgumentParser, HelpFormatter
from lmmem.config_file import add_config_argument, argv_with_config
from lmmem.errors import LmmemError
from lmmem.evaluation import (
    DynamicConfig, FrequencyBuckets, evaluate_checkpoint, evaluate_methods, format_table, plot_bucketed_perplexity, write_json,
)
from lmmem.memories import CacheConfig, MbPAConfig
from lmmem.training.config import TrainConfig
from lmmem.validation import check_flags


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("checkpoint", nargs="?", default=None,
                   help=f"best.pt / last.pt written by train.py, its run folder (default: {TrainConfig.out}, train.py's default), or a folder written by python -m lmmem.training.export")
    p.add_argument("--data", help="prepared corpus folder (default: the one the model was trained on)")
    p.add_argument("--split", default="test", help="train | valid | test")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--plot", help="write the bucket bar chart here (PNG; needs matplotlib)")
    p.add_argument("--batch-size", type=int, default=16, help="rows scored in parallel")
    p.add_argument("--bptt", type=int, default=None, help="tokens per chunk (default: the training bptt)")
    p.add_argument("--buckets", default="10000,1000,100", help="training-count edges of the frequency buckets")
    p.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens, 0 for all")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--name", default=None, help="method name in the table and chart")
    p.add_argument("--word-probs", metavar="FILE", default=None,
                   help="write one row per scored token: position, word, training count, bucket and its log-probability "
                        "(natural log) under each method; TSV, or JSON lines when FILE ends in .jsonl")
    p.add_argument("--context", type=int, default=0, metavar="C",
                   help="Transformer: sliding-window scoring (fairseq's --context-window, HF's stride): windows of --bptt "
                        "inputs advance by bptt − C, so every token is predicted from at least C tokens before it; 0: "
                        "independent windows")
    add_config_argument(p)
    m = p.add_argument_group("test-time methods")
    m.add_argument("--cache", action="store_true", help="add the neural cache (Grave et al. 2017)")
    m.add_argument("--cache-window", type=int, default=CacheConfig.window, help="cache size W (pairs per stream)")
    m.add_argument("--cache-theta", type=float, default=CacheConfig.theta, help="cache flatness θ")
    m.add_argument("--cache-lambda", type=float, default=CacheConfig.lam, help="cache interpolation λ")
    m.add_argument("--mbpa", action="store_true", help="add MbPA of the softmax (Sprechmann et al. 2018)")
    m.add_argument("--mbpa-k", type=int, default=MbPAConfig.k, help="neighbours K")
    m.add_argument("--mbpa-steps", type=int, default=MbPAConfig.steps, help="adaptation steps")
    m.add_argument("--mbpa-lr", type=float, default=MbPAConfig.lr, help="adaptation learning rate η")
    m.add_argument("--mbpa-alpha", type=float, default=MbPAConfig.alpha, help="pull α towards the trained softmax")
    m.add_argument("--mbpa-eps", type=float, default=MbPAConfig.eps, help="ε of the kernel 1/(ε + d²)")
    m.add_argument("--mbpa-memory", type=int, default=MbPAConfig.memory, help="memory size (pairs per stream)")
    m.add_argument("--mbpa-lambda", type=float, default=MbPAConfig.lam, help="MbPA interpolation λ")
    m.add_argument("--mbpa-vocab", type=int, default=MbPAConfig.vocab,
                   help="N: adapt only the rows of the query's top-N words and the neighbours' next words (2.2× the plain "
                        "evaluation on CPU at N=128, the same valid perplexity as exact MbPA in docs/results/test-time-memory.md); "
                        "0: every output row (exact MbPA, ~75× the plain evaluation on CPU)")
    m.add_argument("--mbpa-train-pairs", type=int, default=MbPAConfig.train_pairs,
                   help="prefill each stream's MbPA memory with the last N (activation, next word) pairs of the train split")
    m.add_argument("--dynamic", action="store_true", help="add dynamic evaluation (Krause et al. 2018)")
    m.add_argument("--dynamic-method", default=DynamicConfig.method, choices=["rms", "sgd"],
                   help="update rule: rms (Krause et al.'s RMS rule, gradient statistics from the train split) or sgd")
    m.add_argument("--dynamic-lr", type=float, default=DynamicConfig.lr, help="dynamic-evaluation learning rate")
    m.add_argument("--dynamic-decay", type=float, default=DynamicConfig.decay, help="decay towards the trained weights")
    m.add_argument("--dynamic-segment", type=int, default=None, help="segment length (default: --bptt)")
    m.add_argument("--tune", action="store_true",
                   help="choose θ and the λs (--cache, --mbpa) and the learning rate (--dynamic: --dynamic-lr × 0.1…3) on the valid split")
    m.add_argument("--streams", type=int, default=None,
                   help="cut the split into this many independent streams (default: --batch-size); a multiple of "
                        "--batch-size; the scores depend on --streams only, not on --batch-size")
    return p


def _methods(args, buckets) -> int:
    try:
        cache = CacheConfig(args.cache_window, args.cache_theta, args.cache_lambda) if args.cache else None
        mbpa = MbPAConfig(k=args.mbpa_k, steps=args.mbpa_steps, lr=args.mbpa_lr, alpha=args.mbpa_alpha, eps=args.mbpa_eps,
                          memory=args.mbpa_memory, lam=args.mbpa_lambda, vocab=args.mbpa_vocab,
                          train_pairs=args.mbpa_train_pairs) if args.mbpa else None
        dynamic = DynamicConfig(method=args.dynamic_method, lr=args.dynamic_lr, decay=args.dynamic_decay,
                                segment=args.dynamic_segment) if args.dynamic else None
    except ValueError as e:
        raise LmmemError(str(e)) from None
    reports, meta = evaluate_methods(
        args.checkpoint, data=args.data, split=args.split, batch_size=args.batch_size, streams=args.streams, bptt=args.bptt,
        buckets=buckets, device=args.device, max_tokens=args.max_tokens, cache=cache, mbpa=mbpa, dynamic=dynamic,
        tune=args.tune, progress=sys.stderr.isatty(), word_probs=args.word_probs,
    )
    base = args.name or f"{meta['model']['arch']} + {meta['model']['softmax']} softmax"
    named = {(base if m == "plain" else f"{base} {m}"): r for m, r in reports.items()}
    print(f"{args.checkpoint} on {meta['data']} [{args.split}], {reports['plain'].tokens:,} tokens")
    if meta.get("tuned"):
        print("tuned on valid: " + "; ".join(f"{m}: {c}" for m, c in meta["tuned"]["choice"].items()))
    print(format_table(named))
    if meta.get("word_probs"):
        print(f"wrote {meta['word_probs']['rows']:,} rows to {args.word_probs}")
    if args.json:
        write_json({**meta, **reports["plain"].to_dict(), "methods": {m: r.to_dict() for m, r in reports.items()}}, args.json)
        print(f"wrote {args.json}")
    plot = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if plot:
        written = plot_bucketed_perplexity(named, plot, title=f"{base} — {args.split}")
        print(f"wrote {written}" if written else "matplotlib is not installed: no chart (pip install lmmem[plot])")
    return 0


def default_checkpoint(run: str | Path = TrainConfig.out) -> str:
    """The best checkpoint (else the last) of train.py's default run folder; a one-line error naming
    ``python train.py`` when there is none."""
    run = Path(run)
    for name in ("best.pt", "last.pt"):
        if (run / name).is_file():
            return str(run / name)
    raise LmmemError(f"no checkpoint given and no run in {run}/ (train.py's default run folder): train one with "
                     f"`python train.py`, or name a checkpoint: python evaluate.py RUN/best.pt")


def main(argv=None, prog: str | None = None) -> int:
    parser = build_parser()
    if prog:
        parser.prog = prog
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv_with_config(argv, parser, "evaluate"))
    check_flags(vars(args))  # every numeric flag, with its reason (lmmem.validation)
    if args.checkpoint is None:
        args.checkpoint = default_checkpoint()
        print(f"no checkpoint given: evaluating {args.checkpoint} (the default run of train.py)")
    try:
        buckets = FrequencyBuckets.parse(args.buckets)
    except ValueError as e:
        raise LmmemError(str(e)) from None
    if args.cache or args.mbpa or args.dynamic or args.streams:
        if args.context:
            raise LmmemError("--context (sliding-window scoring) works with plain evaluation only; drop --cache/--mbpa/--dynamic/--streams or --context")
        return _methods(args, buckets)
    if args.tune:
        raise LmmemError("--tune needs --cache, --mbpa and/or --dynamic")
    result = evaluate_checkpoint(
        args.checkpoint, data=args.data, split=args.split, batch_size=args.batch_size, bptt=args.bptt,
        buckets=buckets, device=args.device, max_tokens=args.max_tokens, progress=sys.stderr.isatty(),
        context=args.context, word_probs=args.word_probs,
    )
    name = args.name or f"{result.meta['model']['arch']} + {result.meta['model']['softmax']} softmax"
    window = f"; sliding window: {args.context} tokens of context or more" if args.context else ""
    print(f"{args.checkpoint} on {result.meta['data']} [{args.split}], {result.report.tokens:,} tokens{window}")
    print(format_table({name: result.report}))
    if result.words is not None:  # a SentencePiece corpus: the same scores per word, bucketed by word count
        print(f"\nper word (the sum of its pieces' log-probabilities; buckets by the word's training count), "
              f"{result.words.tokens:,} words, {result.report.tokens / max(result.words.tokens, 1):.2f} pieces a word:")
        print(format_table({name: result.words}))
    if result.meta.get("word_probs"):
        print(f"wrote {result.meta['word_probs']['rows']:,} rows to {args.word_probs}")
    if args.json:
        write_json(result.to_dict(), args.json)
        print(f"wrote {args.json}")
    plot = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if plot:
        written = plot_bucketed_perplexity({name: result.report}, plot, title=f"{name} — {args.split}")
        print(f"wrote {written}" if written else "matplotlib is not installed: no chart (pip install lmmem[plot])")
    return 0
