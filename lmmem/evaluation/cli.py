"""Evaluate a language model: perplexity by frequency bucket, per word and per byte, with test-time memories.

Perplexity overall, by the target word's training frequency, per word and per byte, with the
test-time memories side by side:

    python evaluate.py runs/demo/best.pt --split test --json runs/demo/eval.json
    python evaluate.py                     # the best checkpoint of runs/default, where `python train.py` writes
    python evaluate.py runs/wt103/best.pt --cache --mbpa --dynamic --tune --json eval.json
    python evaluate.py HF_FOLDER --data data/gutenberg --window sliding --context 512 --cache --knn DS --tune

MODEL is an lmmem checkpoint (best.pt / last.pt), its run folder or an export folder, or a Hugging
Face causal-LM folder (save_pretrained: config, weights, tokenizer; lmmem heads included). An lmmem
model reads a prepared corpus (by default the one it was trained on); a Hugging Face model reads
--data: a prepared corpus folder (the same text an lmmem model of it reads) or a text source
(.txt/.jsonl/.parquet file, folder of files named by split, hub:NAME), encoded with its tokenizer.

Methods: --cache (neural cache, Grave et al. 2017), --mbpa (MbPA of the softmax, Sprechmann et al.
2018), --knn DS (kNN-LM, Khandelwal et al. 2020, over a datastore written by `lmmem datastore`),
--dynamic (dynamic evaluation, Krause et al. 2018), each alone and all together; --tune chooses
their settings on the valid split, then the requested split is scored once. The window convention
(--window bptt | sliding | lm-eval) is named in every result. Prints a table, writes the same
numbers as JSON (--json) and a bar chart (--plot, or next to the JSON). ``lmmem evaluate ...`` is
the same command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lmmem.checkpoints import DEFAULT_RUN
from lmmem.cli import ArgumentParser, HelpFormatter, add_dataclass_arguments, dataclass_from_args
from lmmem.config_file import add_config_argument, argv_with_config
from lmmem.errors import LmmemError
from lmmem.evaluation.config import EvalConfig, KNNSpec, Methods
from lmmem.evaluation.dynamic import DynamicConfig
from lmmem.evaluation.run import Evaluation
from lmmem.memories import CacheConfig, MbPAConfig
from lmmem.safety import check_writable_folder
from lmmem.validation import check_flags


def _knn_config_class():
    try:
        from lmmem.memories.knn import KNNConfig
    except ImportError:  # the kNN-LM library is optional until it is installed with lmmem
        return None
    return KNNConfig


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("checkpoint", nargs="?", default=None, metavar="MODEL",
                   help=f"lmmem checkpoint, run folder (default: {DEFAULT_RUN}, train.py's default) or export folder, or "
                        "a Hugging Face causal-LM folder")
    p.add_argument("--data", help="prepared corpus folder (default for lmmem models: the one they were trained on), or for a "
                                  "model with a tokenizer a text source: .txt/.jsonl/.parquet file, folder by split, hub:NAME")
    dests = {"eval": add_dataclass_arguments(p, EvalConfig)}
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--plot", help="write the bucket bar chart here (PNG; needs matplotlib)")
    p.add_argument("--name", default=None, help="the model's name in the table and chart")
    p.add_argument("--word-probs", metavar="FILE", default=None,
                   help="write one row per scored token: position, word (and token), training count, bucket and its "
                        "log-probability (natural log) under each method; TSV, or JSON lines when FILE ends in .jsonl")
    add_config_argument(p)
    m = p.add_argument_group("test-time methods")
    m.add_argument("--cache", action="store_true", help="add the neural cache (Grave et al. 2017)")
    dests["cache"] = add_dataclass_arguments(p, CacheConfig, prefix="cache-", group=m)
    m.add_argument("--mbpa", action="store_true", help="add MbPA of the softmax (Sprechmann et al. 2018)")
    dests["mbpa"] = add_dataclass_arguments(p, MbPAConfig, prefix="mbpa-", group=m)
    m.add_argument("--knn", metavar="DS", default=None, help="add kNN-LM (Khandelwal et al. 2020) over the datastore DS "
                                                              "(written by `lmmem datastore`)")
    knn_cls = _knn_config_class()
    if knn_cls is not None:
        dests["knn"] = add_dataclass_arguments(p, knn_cls, prefix="knn-", group=m)
    m.add_argument("--dynamic", action="store_true", help="add dynamic evaluation (Krause et al. 2018)")
    dests["dynamic"] = add_dataclass_arguments(p, DynamicConfig, prefix="dynamic-", group=m)
    p.set_defaults(_dests=dests)
    return p


def methods_from_args(args) -> Methods:
    d = args._dests
    knn = None
    if args.knn:
        cls = _knn_config_class()
        if cls is None:
            raise LmmemError("--knn needs lmmem's kNN-LM library (lmmem.memories.knn), which this installation lacks")
        knn = KNNSpec(args.knn, dataclass_from_args(cls, args, d["knn"]))
    return Methods(cache=dataclass_from_args(CacheConfig, args, d["cache"]) if args.cache else None,
                   mbpa=dataclass_from_args(MbPAConfig, args, d["mbpa"]) if args.mbpa else None,
                   knn=knn, dynamic=dataclass_from_args(DynamicConfig, args, d["dynamic"]) if args.dynamic else None)


def default_checkpoint(run: str | Path = DEFAULT_RUN) -> str:
    """The best checkpoint (else the last) of train.py's default run folder; a one-line error naming
    ``python train.py`` when there is none."""
    run = Path(run)
    for name in ("best.pt", "last.pt"):
        if (run / name).is_file():
            return str(run / name)
    raise LmmemError(f"no checkpoint given and no run in {run}/ (train.py's default run folder): train one with "
                     f"`python train.py`, or name a checkpoint: python evaluate.py RUN/best.pt")


def _check_outputs(args) -> None:
    """Refuse output paths that cannot be written before the (possibly long) scoring, not after."""
    for flag, value in (("--json", args.json), ("--plot", args.plot), ("--word-probs", args.word_probs)):
        if value:
            path = Path(value)
            if path.is_dir():
                raise LmmemError(f"{flag} {path} is a folder; give a file path")
            check_writable_folder(path.parent, flag)


def main(argv=None, prog: str | None = None) -> int:
    parser = build_parser()
    if prog:
        parser.prog = prog
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv_with_config(argv, parser, "evaluate"))
    check_flags({k: v for k, v in vars(args).items() if not k.startswith("_")})  # every numeric flag, with its reason
    if args.checkpoint is None:
        args.checkpoint = default_checkpoint()
        print(f"no checkpoint given: evaluating {args.checkpoint} (the default run of train.py)", flush=True)
    _check_outputs(args)
    config = dataclass_from_args(EvalConfig, args, args._dests["eval"])
    methods = methods_from_args(args)
    if config.tune and not methods.any:
        raise LmmemError("--tune needs --cache, --mbpa, --knn and/or --dynamic")
    ev = Evaluation(args.checkpoint, data=args.data, config=config, progress=True)
    # said (and flushed) before the long work: a run stopped with Ctrl-C, its output sent to a file, keeps it
    print(ev.header(), flush=True)
    result = ev.run(methods, word_probs=args.word_probs)
    for line in result.lines(args.name):
        print(line)
    if result.meta.get("word_probs"):
        print(f"wrote {result.meta['word_probs']['rows']:,} rows to {args.word_probs}")
    for line in result.write(args.json, args.plot, args.name):
        print(line)
    return 0
