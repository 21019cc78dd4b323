"""Several seeds of the binding experiment on one page.

    python -m lmmem.experiments.binding_seeds WORK_SEED1 WORK_SEED2 WORK_SEED3 --page PAGE.md

Each WORK is a finished :mod:`lmmem.experiments.binding` folder: one seed, the same branch points
and reference. Per branch point and variant that every seed ran, both endpoints of that runner are
pooled over the seeds:

* the **training stream**: a rare word's NLL at its next sighting, by ``k`` (earlier sightings);
* **held out**: a rare word's valid NLL at the branch end, by the branch's sightings of it.

A cell is the paired difference to the reference branch, averaged over (seed, word type) pairs, with
a 95% interval from a bootstrap that resamples word types within each seed (the seeds are fixed
strata, so the interval is about types, not about seeds); each seed's own mean follows. The valid
perplexity at each branch end is listed per seed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from lmmem.cli import ArgumentParser, run_cli
from lmmem.errors import LmmemError
from lmmem.experiments.binding import K_NAMES, paired_differences
from lmmem.experiments.paths import portable_command, portable_shell


def load_work(work: Path) -> dict:
    """The runner's results (binding.json) with each branch's per-type records beside it."""
    path = work / "binding.json"
    if not path.is_file():
        raise LmmemError(f"{work} holds no binding.json: run python -m lmmem.experiments.binding --work {work} first")
    res = json.loads(path.read_text())
    branches = {}
    for row in res["summary"]:
        b = json.loads((work / f"branch-step{row['point']}-{row['label']}.json").read_text())
        if "held_out" not in b:
            raise LmmemError(f"{work}: branch {row['label']} at step {row['point']} has no held-out endpoint; "
                             f"run the binding command on {work} again (it scores the saved branch)")
        branches[(row["point"], row["label"])] = b
    return {"config": res["config"], "command": res["command"], "machine": res["machine"], "branches": branches}


def pooled_mean(groups: list[np.ndarray], n_boot: int, seed: int = 0) -> tuple[float, float, float, int]:
    """Mean over all entries of all groups, and a percentile 95% interval resampling within each group
    (None for no entries: the JSON beside the page holds no NaN)."""
    groups = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    n = sum(len(g) for g in groups)
    if n == 0:
        return (None, None, None, 0)
    rng = np.random.default_rng(seed)
    sums = sum(g[rng.integers(0, len(g), size=(n_boot, len(g)))].sum(1) for g in groups)
    total = float(sum(g.sum() for g in groups))
    return total / n, float(np.percentile(sums / n, 2.5)), float(np.percentile(sums / n, 97.5)), n


def combine(works: list[dict], n_boot: int = 1000) -> list[dict]:
    cfg = works[0]["config"]
    design = lambda c: (c["branch_points"], c["branch_steps"], c["settle"], c["rare_below"], c["reference"])  # noqa: E731
    if any(design(w["config"]) != design(cfg) for w in works[1:]):
        raise LmmemError("the folders ran different branch points, branch lengths or references: combine runs of one design")
    reference, rows = cfg["reference"], []
    for point, label in works[0]["branches"]:  # the variants every seed ran
        if label == reference or any((point, label) not in w["branches"] for w in works):
            continue
        row = {"point": point, "label": label, "valid": [], "valid_ref": []}
        per = {"stream": [], "held_out": []}
        for w in works:
            b, ref = w["branches"][(point, label)], w["branches"][(point, reference)]
            row["valid"].append(b["valid"]["perplexity"])
            row["valid_ref"].append(ref["valid"]["perplexity"])
            diffs = paired_differences(b, ref)
            for endpoint in per:
                per[endpoint].append(diffs[endpoint])
        for endpoint, seeds in per.items():
            row[endpoint] = {name: {"pooled": pooled_mean([s[name] for s in seeds], n_boot),
                                    "seeds": [float(s[name].mean()) if len(s[name]) else None for s in seeds]}
                             for name in K_NAMES}
        rows.append(row)
    return rows


def _cell(c: dict) -> str:
    m, lo, hi, n = c["pooled"]
    if n == 0:
        return "–"
    seeds = " / ".join("–" if s is None else f"{s:+.3f}" for s in c["seeds"])
    return f"**{m:+.3f}** [{lo:+.3f}, {hi:+.3f}] ({seeds}; n={n})"


def render(works: list[dict], rows: list[dict], name: str, command: str, notes: str = "") -> str:
    cfg = works[0]["config"]
    lines = [f"# Fast binding over {len(works)} seeds: {name}", ""] + ([notes, ""] if notes else []) + [
             f"Branches of {cfg['branch_steps']} steps from steps {', '.join(map(str, cfg['branch_points']))}; the first "
             f"{cfg['settle']} excluded from the training-stream table; rare = fewer than {cfg['rare_below']} training "
             f"occurrences. Cells: Δ NLL (nats) to `{cfg['reference']}`, mean over (seed, word type) pairs "
             f"[95% interval, types resampled within each seed] (each seed's mean; pairs). Negative = the variant's rare "
             "words are more predictable.", ""]
    for row in rows:
        lines += [f"## {row['label']}, step {row['point']}", "",
                  "| endpoint | " + " | ".join(K_NAMES) + " |", "|---|" + "---|" * len(K_NAMES),
                  "| training stream, by k (earlier sightings) | " + " | ".join(_cell(row["stream"][k]) for k in K_NAMES) + " |",
                  "| held out (valid), by sightings in the branch | " + " | ".join(_cell(row["held_out"][k]) for k in K_NAMES) + " |",
                  "", "Valid perplexity at the branch end, per seed: " + "; ".join(
                      f"{v:.1f} against {r:.1f} ({v / r - 1:+.1%})" for v, r in zip(row["valid"], row["valid_ref"])), ""]
    lines += ["## Commands", "", "```"] + [w["command"] for w in works] + [command, "```", "",
              f"Machine: {works[0]['machine']}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("works", nargs="+", help="finished binding folders, one per seed")
    p.add_argument("--name", default="", help="what the runs are, for the page title")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--notes", help="a markdown file whose text the page shows under its title (what the numbers say)")
    p.add_argument("--page", help="write the page here (markdown); a JSON beside it")
    args = p.parse_args(argv)
    works = [load_work(Path(w)) for w in args.works]
    rows = combine(works, args.bootstrap)
    # the page names the folders WORK1, WORK2, ... and any other path outside the project by its flag
    anchors = {w: f"WORK{i + 1}" for i, w in enumerate(args.works)}
    for w in works:
        w["command"] = portable_shell(w["command"], anchors)
    command = portable_command(argv if argv is not None else sys.argv[1:], "python -m lmmem.experiments.binding_seeds", anchors)
    if args.page:
        page = Path(args.page)
        notes = Path(args.notes).read_text(encoding="utf-8").strip() if args.notes else ""
        page.write_text(render(works, rows, args.name or Path(args.works[0]).name, command, notes))
        page.with_suffix(".json").write_text(json.dumps({"rows": rows, "commands": [w["command"] for w in works] + [command]},
                                                        indent=1) + "\n")
        print(f"wrote {page}")
    for row in rows:
        print(row["label"], row["point"], {k: round(row["held_out"][k]["pooled"][0], 3) for k in K_NAMES})
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
