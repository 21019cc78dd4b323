"""Evaluate a checkpoint: perplexity overall and by the target word's training frequency.

    python evaluate.py runs/demo/best.pt --split test --json runs/demo/eval.json

Prints a table, writes the same numbers as JSON (--json) and a bar chart (--plot, or next to the
JSON when matplotlib is installed). The work is done by lmmem.evaluation.evaluate_checkpoint().
"""

import argparse
import sys
from pathlib import Path

from lmmem.cli import run_cli
from lmmem.errors import LmmemError
from lmmem.evaluation import FrequencyBuckets, evaluate_checkpoint, format_table, plot_bucketed_perplexity, write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="best.pt / last.pt written by train.py (or the run folder)")
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
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        buckets = FrequencyBuckets.parse(args.buckets)
    except ValueError as e:
        raise LmmemError(str(e)) from None
    result = evaluate_checkpoint(
        args.checkpoint, data=args.data, split=args.split, batch_size=args.batch_size, bptt=args.bptt,
        buckets=buckets, device=args.device, max_tokens=args.max_tokens, progress=sys.stderr.isatty(),
    )
    name = args.name or f"{result.meta['model']['arch']} + {result.meta['model']['softmax']} softmax"
    print(f"{args.checkpoint} on {result.meta['data']} [{args.split}], {result.report.tokens:,} tokens")
    print(format_table({name: result.report}))
    if args.json:
        write_json(result.to_dict(), args.json)
        print(f"wrote {args.json}")
    plot = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if plot:
        written = plot_bucketed_perplexity({name: result.report}, plot, title=f"{name} — {args.split}")
        print(f"wrote {written}" if written else "matplotlib is not installed: no chart (pip install lmmem[plot])")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
