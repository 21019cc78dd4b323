"""Train a word-level language model.

    python train.py --softmax full                  # embedded synthetic corpus, tiny preset
    python train.py --data data/wt103 --preset wt103-paper --softmax hebbian --out runs/wt103-hebb
    torchrun --nproc-per-node 2 train.py --data DIR --out RUN   # data-parallel (gloo on CPU, NCCL on GPU)
    python train.py --out RUN --resume              # continue exactly where RUN stopped

All options: ``python train.py --help``. The work is done by lmmem.training.train().
"""

import sys

from lmmem.cli import run_cli
from lmmem.training import build_parser, config_from_args, resume_config, train


def main(argv=None) -> int:
    args = build_parser(__doc__.splitlines()[1]).parse_args(argv)
    if args.resume:
        cfg = resume_config(args.out or "runs/default", vars(args))
    else:
        cfg = config_from_args(args)
    result = train(cfg)
    return 130 if result.stopped_by == "interrupt" else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
