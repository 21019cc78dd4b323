"""Which words make the difference between two models: ``python -m lmmem.evaluation.word_diff A B``.

A and B are ``--word-probs`` files of ``evaluate.py`` (TSV or ``.jsonl``) on the same split. The
tool prints the mean NLL difference B − A per scored token, its split by frequency bucket, and the
words whose summed difference is largest either way (summed over the word's tokens, and per token).

Why: a perplexity gap is a sum over tokens, and on a small or unusual split a few frequent tokens
can carry most of it. Before reading a gap between two softmaxes as a rare-word effect, look at
which words it comes from; a model's gap to itself at another checkpoint (``A`` = step k, ``B`` =
step k') shows how much of it the snapshot alone moves. Only positions that both files scored
count, and they must name the same word at every position (else: two different splits).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

from lmmem.errors import LmmemError
from lmmem.jsonio import dumps
from lmmem.safety import write_text_atomic


def read_word_probs(path, column: str) -> dict[int, tuple[str, int, str, float]]:
    """position → (word, training count, bucket, log-probability under ``column``)."""
    path = Path(path)
    if not path.is_file():
        raise LmmemError(f"{path} does not exist: write it with `python evaluate.py CHECKPOINT --word-probs {path}`")
    rows: dict[int, tuple[str, int, str, float]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        if path.suffix.lower() == ".jsonl":
            for line in f:
                r = json.loads(line)
                if column not in r["log_probs"]:
                    raise LmmemError(f"{path} has no method {column!r} (it has {', '.join(r['log_probs'])}); give --column")
                rows[int(r["position"])] = (r["word"], int(r["train_count"]), r["bucket"], float(r["log_probs"][column]))
            return rows
        # QUOTE_NONE: a word may be a lone quote character; the writer never quotes
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if reader.fieldnames is None or column not in reader.fieldnames:
            have = ", ".join((reader.fieldnames or [])[4:]) or "none"
            raise LmmemError(f"{path} has no method column {column!r} (it has {have}); give --column")
        for r in reader:
            rows[int(r["position"])] = (r["word"], int(r["train_count"]), r["bucket"], float(r[column]))
    return rows


def word_diff(a: dict, b: dict, top: int = 10) -> dict:
    """The NLL difference B − A: overall, by bucket and by word (``top`` each way)."""
    shared = sorted(set(a) & set(b))
    if not shared:
        raise LmmemError("the two files share no scored position: give word-probs files of the same split")
    for i in shared:
        if a[i][0] != b[i][0]:
            raise LmmemError(f"position {i} is {a[i][0]!r} in one file and {b[i][0]!r} in the other: "
                             "give word-probs files of the same split and vocabulary")
    total = 0.0
    buckets: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    words: dict[str, list] = defaultdict(lambda: [0, 0.0, 0, ""])
    top_count: dict[str, int] = defaultdict(int)
    for i in shared:
        word, count, bucket, lp_a = a[i]
        d = lp_a - b[i][3]  # NLL_B − NLL_A
        total += d
        buckets[bucket][0] += 1
        buckets[bucket][1] += d
        w = words[word]
        w[0] += 1
        w[1] += d
        w[2], w[3] = count, bucket
        top_count[bucket] = max(top_count[bucket], count)
    n = len(shared)

    def word_rows(items):
        return [{"word": k, "tokens": c, "train_count": tc, "bucket": bk, "sum": s, "mean": s / c}
                for k, (c, s, tc, bk) in items]

    ranked = sorted(words.items(), key=lambda kv: kv[1][1])
    return {
        "tokens": n, "only_in_a": len(a) - n, "only_in_b": len(b) - n,
        "mean": total / n, "sum": total,
        # most frequent bucket first, as evaluate.py lists them
        "buckets": [{"bucket": k, "tokens": c, "sum": s, "mean": s / c}
                    for k, (c, s) in sorted(buckets.items(), key=lambda kv: -top_count[kv[0]])],
        "worse_in_b": word_rows(ranked[::-1][:top]),
        "better_in_b": word_rows(ranked[:top]),
    }


def format_diff(r: dict, a: str, b: str) -> str:
    lines = [f"{r['tokens']:,} tokens scored by both; NLL of B − A, nats: mean {r['mean']:+.4f} per token, "
             f"sum {r['sum']:+.1f} (B = {b}, A = {a})", "", "| bucket | tokens | sum | mean |", "|---|---|---|---|"]
    lines += [f"| {x['bucket']} | {x['tokens']:,} | {x['sum']:+.1f} | {x['mean']:+.3f} |" for x in r["buckets"]]
    for title, key in (("worse in B", "worse_in_b"), ("better in B", "better_in_b")):
        lines += ["", f"Words {title} (largest summed difference):", "",
                  "| word | tokens | train count | sum | mean |", "|---|---|---|---|---|"]
        for x in r[key]:
            lines.append(f"| {x['word']} | {x['tokens']:,} | {x['train_count']:,} | {x['sum']:+.1f} | {x['mean']:+.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmmem.evaluation.word_diff", description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="--word-probs file of the reference model")
    p.add_argument("b", help="--word-probs file of the model compared with it")
    p.add_argument("--column", default="plain", help="method column to compare (default: plain)")
    p.add_argument("--column-b", help="method column of B, if other than --column (e.g. plain vs cache)")
    p.add_argument("--top", type=int, default=10, help="words listed each way (default: 10)")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    if args.top < 1:
        raise LmmemError(f"--top must be at least 1, got {args.top}")
    r = word_diff(read_word_probs(args.a, args.column), read_word_probs(args.b, args.column_b or args.column), args.top)
    print(format_diff(r, args.a, args.b))
    if args.json:
        write_text_atomic(Path(args.json), dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    from lmmem.cli import run_cli

    sys.exit(run_cli(main))
