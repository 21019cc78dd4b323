"""Long training, pass by pass: each softmax variant trained for several passes over the training
split, with its valid perplexity (overall and by the target word's training frequency) at the end
of every pass, and its test perplexity at the end of the last.

    python -m lmmem.experiments.long_training wikitext-103 --source ../shared/data/wikitext-2 \\
        --prep-args '--train-from valid' --work runs/long-wt2 --passes 6 --seeds 1 2 3 \\
        --variants full hebbian --page docs/results/long-training-wikitext-2.md

Why pass by pass: a rule that helps while words are new may hurt once every word has been seen
(the Hebbian softmax on a second pass over WikiText-2, docs/results/binding-wikitext-2-second-pass.md);
users train small corpora for many passes, so every pass end is a result.

How. One ``train.py`` run per (variant, seed) with ``--max-steps`` = passes × steps per pass (so
the learning-rate schedule is the one of the whole run) is trained one pass at a time: ``--max-epochs
1``, then ``--resume --max-epochs 2``, …; each stop lands exactly at a pass end and saves ``last.pt``
(a resumed run continues bit for bit: checked by tests/test_long_training.py), which is copied to
``pass-K.pt`` and evaluated on the valid split (``evaluate.py pass-K.pt --split valid``). The last
pass's snapshot is also evaluated on test; nothing is chosen on test. Same seed: same initial
weights, batches and dropout noise for every variant. A finished pass is never trained again and
an interrupted one is continued from its ``last.pt``, so an interrupted command is simply repeated;
a run folder made with other settings is refused (use another ``--work``).

``python -m lmmem.experiments.long_training render PAGE...`` rewrites pages and charts from the
JSON beside them (PAGE with ``.json``), without training or evaluating; the page itself is
:mod:`lmmem.experiments.long_training_page`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import sys
from pathlib import Path

import torch

from lmmem.data.batching import StreamBatcher
from lmmem.data.corpus import PreparedCorpus
from lmmem.errors import LmmemError
from lmmem.evaluation import FrequencyBuckets, evaluate
from lmmem.experiments.softmax_comparison import prepare
from lmmem.experiments.long_training_page import write_outputs
from lmmem.experiments.variants import parse_train_args, parse_variant
from lmmem.jsonio import dumps
from lmmem.safety import write_text_atomic
from lmmem.training import config_from_args, load_checkpoint, train
from lmmem.training.config import config_value
from lmmem.validation import check_flags

# flags the runner sets itself (a --train-args entry for one of them would break the pass bookkeeping)
_RUNNER_FLAGS = ("data", "out", "seed", "max_steps", "max_epochs", "resume", "overwrite", "time_budget")
# settings that may differ between a run's passes (the rest must match the run folder's last.pt);
# validating during training changes nothing in the model (tests/test_long_training.py)
_PER_CALL = ("resume", "overwrite", "progress", "out", "max_epochs", "data", "eval_interval")


def steps_per_pass(data: Path, batch_size: int, bptt: int) -> int:
    return len(StreamBatcher(PreparedCorpus.open(data).tokens("train"), batch_size, bptt))


def _check_same_settings(last: Path, cfg) -> None:
    saved = dict(load_checkpoint(last)["train_config"])
    wanted = cfg.to_dict()
    differ = sorted(k for k in wanted if k not in _PER_CALL and saved.get(k, wanted[k]) != wanted[k])
    if differ:
        raise LmmemError(f"{last.parent} holds a run made with other settings ({', '.join(differ)}); "
                         "give another --work (or delete that run folder) to train these settings")


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def train_by_pass(flags: dict, out: Path, passes: int, spp: int, log=print) -> bool:
    """Train ``out`` pass by pass up to ``passes``, leaving ``pass-K.pt`` at every pass end.
    Returns False if interrupted (Ctrl-C), True when every pass is done."""
    for k in range(1, passes + 1):
        snap = out / f"pass-{k}.pt"
        if snap.is_file():
            continue
        last = out / "last.pt"
        if not last.is_file() and k > 1:  # pass-(k-1).pt is last.pt as it was saved at that pass end
            _copy_atomic(out / f"pass-{k - 1}.pt", last)
        resume = last.is_file()
        cfg = config_from_args({**flags, "out": str(out), "max_epochs": k, "resume": resume, "overwrite": not resume})
        if resume:
            _check_same_settings(last, cfg)
        log(f"{out.name}: pass {k} of {passes}")
        result = train(cfg)
        if result.stopped_by == "interrupt":
            return False
        if result.progress.step != k * spp:
            raise LmmemError(f"{out}: pass {k} ended at step {result.progress.step}, expected {k * spp}")
        _copy_atomic(last, snap)
    return True


def valid_curve(metrics: Path, last_step: int) -> list[list[float]]:
    """[step, valid loss] of every validation the trainer logged (``--eval-every``), by step; a step
    validated twice (a pass end, again when the next pass resumed) counts once."""
    by_step = {}
    for line in metrics.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if "val_loss" in r and r["step"] <= last_step:
            by_step[r["step"]] = r["val_loss"]
    return [[s, by_step[s]] for s in sorted(by_step)]


def evaluate_pass(snap: Path, split: str, batch_size: int, buckets: FrequencyBuckets) -> dict:
    """Bucketed perplexity of one pass snapshot, cached beside it (keyed by its step)."""
    path = snap.with_name(f"{snap.stem}-{split}.json")
    step = load_checkpoint(snap)["progress"]["step"]
    key = {"step": step, "batch_size": batch_size, "bucket_edges": list(buckets.edges)}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["report"]
    report = evaluate(snap, split=split, batch_size=batch_size, buckets=",".join(map(str, buckets.edges)),
                      progress=False).plain.to_dict()
    write_text_atomic(path, dumps({"key": key, "report": report}, what="the evaluation") + "\n")
    return report


def _flags_text(flags: dict) -> str:
    return " ".join(f"--{'' if v else 'no-'}{k.replace('_', '-')}" if isinstance(v, bool) else f"--{k.replace('_', '-')} {v}"
                    for k, v in flags.items())


def _shown(text: str, work: Path, page: str | None, notes: str | None = None) -> str:
    """Commands as the page shows them, without paths of this machine: the work folder is WORK, and
    a page (or --notes file) outside the current folder is PAGE (NOTES: its text is on the page)."""
    text = re.sub(re.escape(str(work)) + r"(?=[/\s']|$)", "WORK", text)
    for path, name in ((page, "PAGE"), (notes, "NOTES")):
        if path and Path(path).is_absolute():
            try:
                shown = Path(path).relative_to(Path.cwd()).as_posix()
            except ValueError:
                shown = name
            text = text.replace(path, shown)
    return text


def _rule_name(cfg) -> str | None:
    return cfg.hebbian_rule if cfg.softmax == "hebbian" else None


def run(args, argv: list[str]) -> int:
    work = Path(args.work)
    data = work / "data"
    commands = [shlex.join(prepare(args.corpus, args.source, data, shlex.split(args.prep_args)))]
    extra = parse_train_args(args.train_args)
    clash = sorted(set(extra) & set(_RUNNER_FLAGS))
    if clash:
        raise LmmemError(f"--train-args must not set {', '.join(clash)}: the runner sets them (use --passes and --seeds)")
    variants = dict(parse_variant(v) for v in args.variants)
    if "full" not in variants:
        raise LmmemError("--variants must include 'full' (the reference)")
    references = parse_references(args.reference, variants)
    notes = Path(args.notes).read_text(encoding="utf-8").strip() if args.notes else ""
    probe = config_from_args({k: config_value(k, v) for k, v in {"data": str(data), **extra}.items()})
    spp = steps_per_pass(data, probe.batch_size, probe.bptt)
    buckets = FrequencyBuckets()
    runs: dict[str, list[dict]] = {label: [] for label in variants}
    rules: dict[str, str] = {}
    for seed in args.seeds:
        for label, overrides in variants.items():
            out = work / f"{label}-seed{seed}"
            flags = {k: config_value(k, v) for k, v in {"data": str(data), "seed": seed, "max_steps": args.passes * spp,
                                                   "eval_interval": args.eval_every, "progress": False, **extra, **overrides}.items()}
            rule = _rule_name(config_from_args(flags))
            if rule:
                rules[label] = rule
            commands.append(f"python train.py {_flags_text({**flags, 'out': out})} --max-epochs K [--resume]   # K = 1 … {args.passes}")
            if not train_by_pass(flags, out, args.passes, spp):
                print(f"interrupted: {out} is incomplete; run the same command again to continue it")
                return 130
            record = {"seed": seed, "passes": [], "train_minutes": round(load_checkpoint(out / f"pass-{args.passes}.pt").get("train_seconds", 0) / 60, 2)}
            for k in range(1, args.passes + 1):
                record["passes"].append({"pass": k, "step": k * spp,
                                         "valid": evaluate_pass(out / f"pass-{k}.pt", "valid", args.eval_batch_size, buckets)})
            record["test"] = evaluate_pass(out / f"pass-{args.passes}.pt", "test", args.eval_batch_size, buckets)
            if args.eval_every:
                record["curve"] = valid_curve(out / "metrics.jsonl", args.passes * spp)
            runs[label].append(record)
            print(f"{label} seed {seed}: valid ppl by pass " + ", ".join(f"{p['valid']['perplexity']:.2f}" for p in record["passes"])
                  + f"; test ppl {record['test']['perplexity']:.2f}")
    commands.append(f"python evaluate.py RUN/pass-K.pt --split valid --batch-size {args.eval_batch_size}   # every run, K = 1 … {args.passes}")
    commands.append(f"python evaluate.py RUN/pass-{args.passes}.pt --split test --batch-size {args.eval_batch_size}")
    results = {
        "name": args.name or args.corpus, "corpus": args.corpus, "source": Path(args.source).name, "prep_args": args.prep_args,
        "passes": args.passes, "steps_per_pass": spp, "eval_every": args.eval_every, "seeds": args.seeds, "train_args": extra, "variants": variants,
        "hebbian_rules": rules, "bucket_names": buckets.names, "runs": runs, "references": references, "notes": notes,
        "command": _shown("python -m lmmem.experiments.long_training " + shlex.join(argv), work, args.page, args.notes),
        "steps": [_shown(c, work, args.page) for c in commands],
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
    }
    targets = [work / "results.md"] + ([Path(args.page)] if args.page else [])
    for page in targets:
        write_outputs(results, page)
    print((work / "results.md").read_text())
    return 0


def parse_references(pairs: list[str], variants: dict) -> dict[str, str]:
    """``--reference VARIANT=REF`` pairs: VARIANT's Δ columns against REF instead of ``full`` (e.g.
    an untied variant against the untied full softmax: equal parameters)."""
    refs = {}
    for pair in pairs:
        v, sep, ref = pair.partition("=")
        if not sep or v not in variants or ref not in variants or v == ref:
            raise LmmemError(f"--reference {pair!r} must be VARIANT=REF, two different labels of --variants ({', '.join(variants)})")
        refs[v] = ref
    return refs


def render_main(argv: list[str]) -> int:
    """``render PAGE...``: rewrite each page and chart from the JSON beside it."""
    p = argparse.ArgumentParser(prog="python -m lmmem.experiments.long_training render")
    p.add_argument("pages", nargs="+")
    for page in map(Path, p.parse_args(argv).pages):
        js = page.with_suffix(".json")
        if not js.is_file():
            raise LmmemError(f"{js} does not exist; render needs the JSON that --page wrote beside {page}")
        write_outputs(json.loads(js.read_text(encoding="utf-8")), page)
        print(f"wrote {page}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("corpus", choices=["wikitext-103", "gutenberg", "gigaword"])
    p.add_argument("--source", required=True, help="corpus source folder for data_prep")
    p.add_argument("--prep-args", default="", help="extra data_prep flags, one string")
    p.add_argument("--work", required=True, help="folder for the data, runs and results (resumable)")
    p.add_argument("--passes", type=int, default=4, help="passes over the training split")
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--variants", nargs="+", default=["full", "hebbian"],
                   help="a softmax name, or LABEL:key=value,... (TrainConfig fields); 'full' is the reference")
    p.add_argument("--train-args", default="preset=tiny", help="TrainConfig fields as KEY=VALUE pairs for every run")
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="also validate every N steps while training (the trainer's --eval-interval; the model is unchanged): the page "
                        "adds the valid perplexity averaged over each pass's last quarter, the gap to the reference by position "
                        "within the pass, and a chart of the curves")
    p.add_argument("--reference", nargs="*", default=[], metavar="VARIANT=REF",
                   help="compare VARIANT with REF instead of full (e.g. an untied variant with the untied full softmax)")
    p.add_argument("--notes", help="a markdown file whose text the page shows under its title (what the numbers say)")
    p.add_argument("--name", help="corpus name on the page")
    p.add_argument("--page", help="also write the page here (with its .json and .png beside it)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["render"]:
        return render_main(argv[1:])
    args = build_parser().parse_args(argv)
    check_flags(vars(args))
    return run(args, argv)


if __name__ == "__main__":
    from lmmem.cli import run_cli

    sys.exit(run_cli(main))
