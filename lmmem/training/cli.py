"""Train a word-level language model.

    python train.py --softmax full                  # embedded synthetic corpus, tiny preset
    python train.py --data data/wt103 --preset wt103-paper --softmax hebbian --out runs/wt103-hebb
    torchrun --nproc-per-node 2 train.py --data DIR --out RUN   # data-parallel (gloo on CPU, NCCL on GPU)
    python train.py --out RUN --resume              # continue exactly where RUN stopped
    python train.py --config runs/x/config.json --out runs/y   # train run x's configuration again

``lmmem train ...`` (installed) and ``python -m lmmem train ...`` are the same command.
All options: ``python train.py --help``. The work is done by lmmem.training.train().
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from lmmem.config_file import add_config_argument, argv_with_config
from lmmem.training.config import TrainConfig, build_parser, config_from_args
from lmmem.training.run_folder import resume_config
from lmmem.training.trainer import TrainResult, train


def next_steps(result: TrainResult, evaluate: str = "python evaluate.py") -> str:
    """Where the run went, which checkpoint is best, and the command to evaluate it."""
    out = Path(result.out)
    best = out / "best.pt"
    lines = [f"run folder:      {out}"]
    if not best.is_file():
        lines.append(f"no best.pt yet (validation has not run); continue with --resume --out {out}")
        return "\n".join(lines)
    p = result.progress
    if "valid" not in result.splits:
        score = " (the last model: the corpus has no valid split to choose on)"
    elif math.isfinite(p.best_val_loss):
        score = f" (step {p.best_step}, valid ppl {math.exp(min(p.best_val_loss, 700)):.2f})"
    else:
        score = ""
    lines.append(f"best checkpoint: {best}{score}")
    target = "" if out == Path(TrainConfig.out) else f" {best}"
    if "test" in result.splits:
        lines.append(f"next:            {evaluate}{target}    # test perplexity by word frequency; add --cache --tune for the neural cache")
    else:  # evaluate.py scores the test split unless told otherwise
        split = "valid" if "valid" in result.splits else result.splits[0]
        lines.append(f"next:            {evaluate}{target} --split {split}    # the corpus has no test split; "
                     f"--split can score {', '.join(result.splits)}")
    return "\n".join(lines)


def main(argv=None, prog: str | None = None, evaluate: str = "python evaluate.py") -> int:
    parser = build_parser(__doc__.splitlines()[0])
    if prog:
        parser.prog = prog
    add_config_argument(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv_with_config(argv, parser, "train"))
    given = {k: v for k, v in vars(args).items() if k != "config"}
    if args.resume:
        cfg = resume_config(args.out or TrainConfig.out, given)
    else:
        cfg = config_from_args(given)
    result = train(cfg)
    if result.is_main:
        print(next_steps(result, evaluate))
    return 130 if result.stopped_by == "interrupt" else 0
