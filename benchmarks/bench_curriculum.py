"""Rare-class curriculum: accuracy by presentation number for softmax, Hebbian softmax, the key-value
memory and the memory with a synthetic-gradient controller (see :mod:`lmmem.experiments.curriculum`).

Prints the markdown tables (glyph curriculum; synthetic-text names on their 2nd/3rd occurrence), writes
``benchmarks/results/bench_curriculum.json`` and the plot ``bench_curriculum.png`` next to it.

    python benchmarks/bench_curriculum.py [--classes 300] [--presentations 5] [--omniglot PATH_OR_NAME]

Default run: ~2–3 minutes on 2 shared CPU cores (one torch thread).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, markdown_table, write_results  # noqa: E402
from lmmem.experiments import curriculum  # noqa: E402


def main(argv=None) -> None:
    t0 = time.perf_counter()
    out = curriculum.main(argv)
    rows = out["rows"]
    P = out["config"]["presentations"]
    cols = ["method", "lr"] + [f"acc@{j}" for j in range(1, P + 1)] + ["acc@2+"] + [k for k in rows[0] if k.startswith("gap")] + ["seconds"]
    print(f"\nCurriculum on {out['data']}: {out['config']['num_classes']} new classes × {P} presentations "
          f"({out['stream_items']} items), mean gap between presentations {out['gap_stats']['mean']:.0f} items\n")
    print(markdown_table([{**r, "lr": f"{r['lr']:g}" if isinstance(r.get("lr"), float) else r.get("lr")} for r in rows], cols))
    if out.get("text_rows"):
        print("\nSynthetic text: top-1 accuracy where the target is a name on its k-th occurrence in the document\n")
        print(markdown_table(out["text_rows"], list(out["text_rows"][0])))
    name = "bench_curriculum" if out["data"] == "procedural glyphs" else "bench_curriculum_omniglot"
    path = write_results(name, {"total_seconds": time.perf_counter() - t0, **out})
    png = RESULTS / f"{name}.png"
    curriculum.plot(rows, P, png)
    print(f"\nwrote {path} and {png}")


if __name__ == "__main__":
    main()
