"""The demo: the full and the Hebbian softmax trained briefly on the embedded corpus, each scored
plain and with the neural cache + MbPA, in one table and one chart (what ``make demo`` runs).

    python -m lmmem.experiments.demo                 # runs/demo: two runs, demo.json, demo.png

Both models are the ``tiny`` LSTM preset with the same seed (same initial weights and dropout
noise) and budget; the Hebbian softmax uses the layer's default rule. Each best checkpoint (by
validation loss) is scored on the first ``--eval-tokens`` tokens of the test split, by the
training frequency of the target word, plain and with the cache + MbPA, whose θ and λs are chosen
on the same number of validation tokens (never on test). The embedded corpus is synthetic, with
recurring rare names (:mod:`lmmem.data.synthetic`): the case the memories are for. A demo run is
brief, one seed: its numbers show what the toolkit does, not how the methods compare; the
measured comparisons are in docs/results.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lmmem.cli import ArgumentParser, run_cli
from lmmem.evaluation import Methods, PerplexityReport, evaluate, format_table, write_json
from lmmem.evaluation.report import plot_bucket_panels
from lmmem.experiments import describe
from lmmem.memories import CacheConfig, MbPAConfig
from lmmem.training import config_from_args, train
from lmmem.validation import check_flags

SOFTMAXES = ("full", "hebbian")
PANELS = {"full": "full softmax", "hebbian": "Hebbian softmax (default rule)"}


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    steps: int = 400
    eval_tokens: int = 10_000
    seed: int = 1
    progress: bool = True


def score(checkpoint: Path, cfg: DemoConfig) -> dict[str, PerplexityReport]:
    """Test perplexity of ``checkpoint``, plain and with cache + MbPA tuned on valid: the demo's one
    call into the evaluation engine."""
    result = evaluate(checkpoint, split="test", methods=Methods(cache=CacheConfig(), mbpa=MbPAConfig()), tune=True,
                      max_tokens=cfg.eval_tokens, progress=cfg.progress)
    return {"plain": result.reports["plain"].report, "+ cache + MbPA": result.reports["+cache+mbpa"].report}


def run_demo(cfg: DemoConfig = DemoConfig(), log=print) -> dict[str, PerplexityReport]:
    """Train both softmaxes, score them, write ``OUT/demo.json`` and ``OUT/demo.png``; returns the
    table's rows ``{"full", "full + cache + MbPA", "hebbian", ...: report}``."""
    out = Path(cfg.out)
    panels: dict[str, dict[str, PerplexityReport]] = {}
    t0 = time.monotonic()
    for softmax in SOFTMAXES:
        log(f"== training the {softmax} softmax ({cfg.steps} steps, tiny preset, embedded corpus)")
        train(config_from_args({"out": str(out / softmax), "preset": "tiny", "softmax": softmax, "seed": cfg.seed,
                                "max_steps": cfg.steps, "eval_interval": cfg.steps, "eval_tokens": cfg.eval_tokens, "overwrite": True,
                                "progress": cfg.progress}))
        log(f"== scoring {softmax}: test, plain and + cache + MbPA (tuned on valid)")
        panels[PANELS[softmax]] = score(out / softmax / "best.pt", cfg)
    rows = {softmax + ("" if method == "plain" else f" {method}"): report
            for softmax, panel in zip(SOFTMAXES, panels.values()) for method, report in panel.items()}
    minutes = (time.monotonic() - t0) / 60
    write_json({"steps": cfg.steps, "eval_tokens": cfg.eval_tokens, "seed": cfg.seed, "minutes": round(minutes, 2),
                "rows": {k: r.to_dict() for k, r in rows.items()}}, out / "demo.json")
    plot_bucket_panels(panels, out / "demo.png", title=f"demo on the embedded corpus ({cfg.steps} steps each, one seed): test "
                       f"perplexity by the word's training frequency, first {cfg.eval_tokens:,} tokens")
    return rows


def main(argv=None) -> int:
    d = DemoConfig()
    p = ArgumentParser(description=describe(__doc__))
    p.add_argument("--out", default=d.out, help="folder for the two runs, demo.json and demo.png (replaced on every run)")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps of each model")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="test (and tuning valid) tokens scored")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    check_flags(vars(args))
    cfg = DemoConfig(out=args.out, steps=args.steps, eval_tokens=args.eval_tokens, seed=args.seed, progress=not args.no_progress)
    t0 = time.monotonic()
    rows = run_demo(cfg)
    print()
    print(f"Test perplexity on the embedded corpus (first {cfg.eval_tokens:,} tokens), by training frequency of the word:")
    print(format_table(rows))
    print(f"\nchart: {Path(cfg.out) / 'demo.png'}; numbers: {Path(cfg.out) / 'demo.json'}; "
          f"{(time.monotonic() - t0) / 60:.1f} minutes. Measured comparisons on real corpora: docs/results/README.md")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
