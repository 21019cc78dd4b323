"""Fast binding, measured directly: does a softmax rule make rare words predictable after a few
sightings (the mechanism Rae et al. 2018 propose), without moving probability onto rare words in general?

One command::

    python -m lmmem.experiments.binding --data /tmp/data/gutenberg --work runs/binding-gutenberg \\
        --page docs/results/binding-gutenberg.md

1. **Trunk.** A model with a full softmax is trained on the training stream (constant learning rate
   after the warm-up, so that branch points differ only in how far training got) and saved at every
   branch point (``trunk-step{P}.pt``; the run resumes from the last one saved).
2. **Branches.** From each trunk checkpoint, one branch per variant (full softmax, the paper's rule,
   the centred rule, …: a variant is ``LABEL:key=value,...`` of :class:`~lmmem.training.TrainConfig`
   fields) continues training on *identical* batches with an identical dropout stream and the
   trunk's optimizer state. A Hebbian branch starts with ``counts`` set to each word's real number of
   sightings so far (so ``λ`` is what it would be had the rule run from the start).
3. **Endpoint.** During a branch, after a settle-in window of ``--settle`` steps, every training
   token's NLL (the forward before that step's update) is filed by its word's training frequency and
   by ``k``, the word's sightings in *earlier batches* of the stream (trunk included). Primary:
   rare words (fewer than ``--rare-below`` training occurrences) at k = 1, 2, 3–4, 5–9: mean over
   word types of each type's mean NLL, with bootstrap 95% intervals over types, and the paired
   difference to the full-softmax branch (same types, same positions). Guards: k = 0 (never seen:
   a rule cannot know these, so a gain there means mass was moved onto rare words in general),
   frequent words (``--frequent-from`` occurrences or more), and the probability mass the model puts
   on all rare words against their true share of the window's tokens. Secondary: bucketed valid
   perplexity at the end of each branch.

Results go to ``WORK/binding.json`` (each branch also to its own JSON, so an interrupted run resumes
where it stopped) and, with ``--page``, a markdown page with the commands.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmmem.cli import ArgumentParser
from lmmem.data.batching import StreamBatcher
from lmmem.data.corpus import PreparedCorpus
from lmmem.errors import LmmemError
from lmmem.evaluation.perplexity import FrequencyBuckets, PerplexityReport, score_stream
from lmmem.experiments.softmax_comparison import _coerce, parse_variant
from lmmem.models import build_model
from lmmem.training import TrainConfig
from lmmem.training.checkpoint import load_checkpoint, save_checkpoint
from lmmem.training.config import config_from_args
from lmmem.training.trainer import lr_multiplier, make_optimizer
from lmmem.validation import check_flags

K_BUCKETS = ((0, 0), (1, 1), (2, 2), (3, 4), (5, 9))  # inclusive ranges of earlier sightings
K_NAMES = ["0", "1", "2", "3–4", "5–9"]
# hebbian_start_step=0: the branches start from a trained trunk, so the rule writes from their first step
DEFAULT_VARIANTS = [
    "full",
    "paper:softmax=hebbian,hebbian_rule=paper,hebbian_start_step=0",
    "centred-row:softmax=hebbian,hebbian_rule=centred,hebbian_write_norm=row,hebbian_start_step=0",
    "centred-running:softmax=hebbian,hebbian_rule=centred,hebbian_write_norm=running,hebbian_start_step=0",
]


@dataclass
class BindingConfig:
    data: str
    work: str
    branch_points: tuple[int, ...] = (100, 300)
    branch_steps: int = 100
    settle: int = 20
    rare_below: int = 100
    frequent_from: int = 1000
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    train_args: dict = field(default_factory=dict)  # TrainConfig fields for trunk and branches (preset, sizes, lr, ...)
    bootstrap: int = 1000
    mass_every: int = 4  # measure the rare-word mass every this many steps (a full N × V softmax)
    eval_tokens: int = 0  # valid tokens for the bucketed perplexity, 0 = all
    eval_batch_size: int = 16


def _train_config(bc: BindingConfig, overrides: dict) -> TrainConfig:
    flags = {"data": bc.data, "out": str(Path(bc.work) / "unused"), "lr_schedule": "constant", **bc.train_args, **overrides}
    flags.setdefault("max_steps", max(bc.branch_points) + bc.branch_steps)
    return config_from_args({k: _coerce(k, v) for k, v in flags.items()})


def _step(model, optimizer, cfg: TrainConfig, step: int, x, y, state, measure=None):
    """One training step (as the trainer's, at the learning rate of ``step``); returns per-token
    NLL (detached, ``(N,)``) and the carried state. ``measure(h)``, if given, sees the final
    activations (detached) while the model is still the one that made them."""
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * lr_multiplier(cfg, step)
    h, state = model.hidden_states(x, state)
    h = h.reshape(-1, h.shape[-1])
    nll = model.output.loss(h, y.reshape(-1), reduction="none")
    if measure is not None:
        with torch.no_grad():
            measure(h.detach())
    optimizer.zero_grad(set_to_none=True)
    nll.mean().backward()
    if cfg.clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
    optimizer.step()
    model.output.on_optimizer_step()
    return nll.detach(), model.detach_state(state)


def train_trunk(bc: BindingConfig, log=print) -> None:
    """Full-softmax trunk, saved at every branch point; resumes from the last one saved."""
    work = Path(bc.work)
    cfg = _train_config(bc, {"softmax": "full"})
    corpus = PreparedCorpus.open(cfg.data)
    points = sorted(bc.branch_points)
    todo = [p for p in points if not (work / f"trunk-step{p}.pt").is_file()]
    if not todo:
        return
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model_config(len(corpus.vocab)))
    optimizer = make_optimizer(cfg, model)
    batcher = StreamBatcher(corpus.tokens("train"), cfg.batch_size, cfg.bptt)
    done = [p for p in points if p not in todo]
    start, state = 0, None
    if done:
        ckpt = load_checkpoint(work / f"trunk-step{done[-1]}.pt", require=TRUNK_KEYS)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        start, state = done[-1], ckpt["carried_state"]
    model.train()
    t0 = time.monotonic()
    for step in range(start, todo[-1]):
        b = batcher.batch(step % len(batcher))
        if step % len(batcher) == 0:
            state = None
        if state is None:
            state = model.init_state(len(batcher.rows))
        nll, state = _step(model, optimizer, cfg, step, b.inputs, b.targets, state)
        if (step + 1) % 50 == 0:
            log(f"trunk step {step + 1}: loss {float(nll[b.targets.reshape(-1) >= 0].mean()):.3f} ({time.monotonic() - t0:.0f} s)")
        if step + 1 in todo:
            save_checkpoint({"model_config": cfg.model_config(len(corpus.vocab)).to_dict(), "train_config": cfg.to_dict(),
                             "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1,
                             "rng": torch.get_rng_state(), "carried_state": state}, work / f"trunk-step{step + 1}.pt")


# The experiment's own trunk snapshots (not train.py runs): what a branch needs to start from.
TRUNK_KEYS = ("model_config", "train_config", "model", "optimizer", "step")


def _sightings_before(batcher: StreamBatcher, steps: int, vocab: int) -> np.ndarray:
    seen = np.zeros(vocab, dtype=np.int64)
    for step in range(steps):
        t = batcher.batch(step % len(batcher)).targets.reshape(-1).numpy()
        seen += np.bincount(t[t >= 0], minlength=vocab)
    return seen


def run_branch(bc: BindingConfig, point: int, label: str, overrides: dict) -> dict:
    """One branch from ``trunk-step{point}.pt``: per-type NLL sums by k bucket, guards, valid buckets."""
    work = Path(bc.work)
    cfg = _train_config(bc, overrides)
    corpus = PreparedCorpus.open(cfg.data)
    V = len(corpus.vocab)
    train_counts = corpus.train_counts()
    ckpt = load_checkpoint(work / f"trunk-step{point}.pt", require=TRUNK_KEYS)
    model = build_model(cfg.model_config(V))
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    rule_state = {"output.counts", "output.activation_mean", "output.running_row_norm", "output.updates"}
    if unexpected or not set(missing) <= rule_state:
        raise LmmemError(f"variant {label!r} builds a different model than the trunk (missing {missing}, unexpected {unexpected})")
    optimizer = make_optimizer(cfg, model)
    optimizer.load_state_dict(ckpt["optimizer"])
    batcher = StreamBatcher(corpus.tokens("train"), cfg.batch_size, cfg.bptt)
    seen = _sightings_before(batcher, point, V)
    if hasattr(model.output, "counts"):
        model.output.counts.copy_(torch.from_numpy(seen))
    # the same dropout stream in every branch of this point
    torch.manual_seed(cfg.seed * 100_003 + point)
    state = ckpt["carried_state"]
    rare = train_counts < bc.rare_below
    frequent = train_counts >= bc.frequent_from
    rare_ids = torch.from_numpy(np.flatnonzero(rare))
    sums = np.zeros((len(K_BUCKETS), V))  # rare words: NLL sum by k bucket and type
    cnts = np.zeros((len(K_BUCKETS), V), dtype=np.int64)
    freq_sum, freq_cnt = np.zeros(V), np.zeros(V, dtype=np.int64)
    mass, mass_n, rare_tokens, window_tokens = 0.0, 0, 0, 0
    model.train()
    t0 = time.monotonic()
    for i in range(bc.branch_steps):
        step = point + i
        b = batcher.batch(step % len(batcher))
        if step % len(batcher) == 0:
            state = None
        if state is None:
            state = model.init_state(len(batcher.rows))
        t = b.targets.reshape(-1).numpy()
        keep = t >= 0
        masses: list[float] = []
        if i >= bc.settle and (i - bc.settle) % bc.mass_every == 0:
            keep_t = torch.from_numpy(keep)

            def measure(h):  # before the step: the mass the model that predicted these tokens gave rare words
                lp = model.output.log_probs(h[keep_t])
                masses.append(float(torch.logsumexp(lp[:, rare_ids], dim=1).exp().sum()))
        else:
            measure = None
        nll, state = _step(model, optimizer, cfg, step, b.inputs, b.targets, state, measure)
        if masses:
            mass += masses[0]
            mass_n += int(keep.sum())
        if i >= bc.settle:
            tk, nk = t[keep], nll.numpy()[keep]
            k = seen[tk]
            r = rare[tk]
            for j, (lo, hi) in enumerate(K_BUCKETS):
                m = r & (k >= lo) & (k <= hi)
                np.add.at(sums[j], tk[m], nk[m])
                np.add.at(cnts[j], tk[m], 1)
            f = frequent[tk]
            np.add.at(freq_sum, tk[f], nk[f])
            np.add.at(freq_cnt, tk[f], 1)
            rare_tokens += int(r.sum())
            window_tokens += int(keep.sum())
        seen += np.bincount(t[keep], minlength=V)
    minutes = (time.monotonic() - t0) / 60
    buckets = FrequencyBuckets()
    nll_b, cnt_b = score_stream(model, corpus.tokens("valid"), bucket_of=buckets.assign(train_counts), num_buckets=len(buckets.names),
                                batch_size=bc.eval_batch_size, bptt=cfg.bptt, max_tokens=bc.eval_tokens)
    valid = PerplexityReport.from_sums(nll_b, cnt_b, buckets).to_dict()
    by_k = {}
    for j, name in enumerate(K_NAMES):
        ids = np.flatnonzero(cnts[j])
        by_k[name] = {"types": ids.tolist(), "mean_nll": (sums[j, ids] / cnts[j, ids]).tolist(), "tokens": int(cnts[j].sum())}
    fids = np.flatnonzero(freq_cnt)
    return {
        "label": label, "point": point, "overrides": overrides, "train_minutes": round(minutes, 2),
        "rare_by_k": by_k,
        "frequent": {"types": fids.tolist(), "mean_nll": (freq_sum[fids] / freq_cnt[fids]).tolist(), "tokens": int(freq_cnt.sum()),
                     "token_mean_nll": float(freq_sum.sum() / max(freq_cnt.sum(), 1))},
        "rare_mass": mass / max(mass_n, 1), "rare_share": rare_tokens / max(window_tokens, 1),
        "valid": valid,
    }


def bootstrap_mean(values: np.ndarray, n: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean and percentile 95% interval of the mean, resampling the entries (word types)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return (math.nan, math.nan, math.nan)
    idx = rng.integers(0, values.size, size=(n, values.size))
    means = values[idx].mean(1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarise(branches: list[dict], n_boot: int, seed: int = 0) -> list[dict]:
    """Per branch: each k bucket's mean over types with its interval, and the paired difference to
    the ``full`` branch of the same point over the types both have (all of them: same stream)."""
    # a fresh generator per statistic: identical inputs get identical intervals, whatever the order
    boot = lambda v: bootstrap_mean(v, n_boot, np.random.default_rng(seed))  # noqa: E731
    full = {b["point"]: b for b in branches if b["label"] == "full"}
    rows = []
    for b in branches:
        row = {"label": b["label"], "point": b["point"], "k": {}, "delta_vs_full": {}}
        for name in K_NAMES:
            d = b["rare_by_k"][name]
            row["k"][name] = (*boot(np.array(d["mean_nll"])), len(d["types"]))
            ref = full.get(b["point"])
            if ref is not None and b is not ref:
                a = dict(zip(d["types"], d["mean_nll"]))
                r = dict(zip(ref["rare_by_k"][name]["types"], ref["rare_by_k"][name]["mean_nll"]))
                both = sorted(set(a) & set(r))
                row["delta_vs_full"][name] = boot(np.array([a[t] - r[t] for t in both]))
        row["frequent"] = boot(np.array(b["frequent"]["mean_nll"]))
        row["frequent_token_nll"] = b["frequent"]["token_mean_nll"]
        row["rare_mass"], row["rare_share"] = b["rare_mass"], b["rare_share"]
        row["valid_ppl"] = b["valid"]["perplexity"]
        row["valid_buckets"] = {x["name"]: x["perplexity"] for x in b["valid"]["buckets"]}
        rows.append(row)
    return rows


def _ci(t) -> str:
    m, lo, hi = t[:3]
    return "–" if math.isnan(m) else f"{m:.2f} [{lo:.2f}, {hi:.2f}]"


def render_page(results: dict) -> str:
    bc = results["config"]
    lines = [f"# Fast binding on {results['name']}", "",
             f"Trunk: full softmax, `{bc['train_args'].get('preset', 'tiny')}` preset, constant lr after warm-up; branches at steps "
             f"{', '.join(map(str, bc['branch_points']))} for {bc['branch_steps']} steps each on identical batches; the first "
             f"{bc['settle']} steps of each branch excluded (settle-in). Rare = fewer than {bc['rare_below']} training occurrences, "
             f"frequent = {bc['frequent_from']} or more. k = sightings in earlier batches. Entries: mean over word types of "
             f"the type's mean training-stream NLL (nats), [bootstrap 95% interval over types, {bc['bootstrap']} resamples]; "
             "Δ = paired difference to the full-softmax branch (negative = the rule binds faster).", ""]
    for point in bc["branch_points"]:
        rows = [r for r in results["summary"] if r["point"] == point]
        lines += [f"## Branch point: step {point}", "",
                  "| variant | " + " | ".join(f"k={k}" for k in K_NAMES) + " | frequent | rare mass / share | valid ppl |",
                  "|---|" + "---|" * (len(K_NAMES) + 3)]
        for r in rows:
            cells = [_ci(r["k"][k]) + f" (n={r['k'][k][3]})" for k in K_NAMES]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {_ci(r['frequent'])} | {r['rare_mass']:.3f} / {r['rare_share']:.3f} | {r['valid_ppl']:.1f} |")
        lines += ["", "Paired difference to full (Δ NLL, nats):", "",
                  "| variant | " + " | ".join(f"k={k}" for k in K_NAMES) + " |", "|---|" + "---|" * len(K_NAMES)]
        for r in rows:
            if r["delta_vs_full"]:
                lines.append(f"| {r['label']} | " + " | ".join(_ci(r["delta_vs_full"][k]) for k in K_NAMES) + " |")
        names = list(rows[0]["valid_buckets"]) if rows else []
        lines += ["", "Valid perplexity by training-frequency bucket at the end of the branch:", "",
                  "| variant | all | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for r in rows:
            lines.append(f"| {r['label']} | {r['valid_ppl']:.1f} | " + " | ".join(
                "–" if r["valid_buckets"][n] is None else f"{r['valid_buckets'][n]:.1f}" for n in names) + " |")
        lines.append("")
    lines += ["## Command", "", "```", results["command"], "```", "",
              f"Machine: {results['machine']}; {results['minutes']:.0f} minutes of branch training in all.", ""]
    return "\n".join(lines)


def run(bc: BindingConfig, name: str = "", command: str = "", log=print) -> dict:
    work = Path(bc.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (Path(bc.data) / "meta.json").is_file():
        raise LmmemError(f"{bc.data} is not a prepared corpus (no meta.json); prepare it with python -m data_prep")
    todo = [(p, *parse_variant(spec)) for p in sorted(bc.branch_points) for spec in bc.variants]
    if any(not (work / f"branch-step{p}-{label}.json").is_file() for p, label, _ in todo):
        train_trunk(bc, log)
    branches = []
    for point, label, overrides in todo:
        path = work / f"branch-step{point}-{label}.json"
        if path.is_file():
            branches.append(json.loads(path.read_text()))
            continue
        log(f"branch {label} from step {point}")
        res = run_branch(bc, point, label, overrides)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res))
        tmp.replace(path)  # atomic: an interrupted branch is redone, a finished one never lost
        branches.append(res)

    results = {"name": name or Path(bc.data).name, "config": bc.__dict__ | {"branch_points": list(bc.branch_points)},
               "command": command, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
               "minutes": sum(b["train_minutes"] for b in branches), "summary": summarise(branches, bc.bootstrap)}
    (work / "binding.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="prepared corpus folder (python -m data_prep); default: a small synthetic corpus written to WORK/data")
    p.add_argument("--work", required=True, help="folder for the trunk, branches and results (resumable)")
    p.add_argument("--name", help="corpus name on the page")
    p.add_argument("--branch-points", type=int, nargs="+", default=list(BindingConfig.branch_points))
    p.add_argument("--branch-steps", type=int, default=BindingConfig.branch_steps)
    p.add_argument("--settle", type=int, default=BindingConfig.settle)
    p.add_argument("--rare-below", type=int, default=BindingConfig.rare_below)
    p.add_argument("--frequent-from", type=int, default=BindingConfig.frequent_from)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="LABEL:key=value,... (TrainConfig fields); 'full' is the reference")
    p.add_argument("--train-args", default="preset=tiny seed=1", help="TrainConfig fields as KEY=VALUE pairs for trunk and branches")
    p.add_argument("--bootstrap", type=int, default=BindingConfig.bootstrap)
    p.add_argument("--eval-tokens", type=int, default=0)
    p.add_argument("--page", help="write the results page here (markdown)")
    args = p.parse_args(argv)
    check_flags(vars(args))
    if args.settle >= args.branch_steps:
        raise LmmemError("--settle must be smaller than --branch-steps")
    if not any(parse_variant(v)[0] == "full" for v in args.variants):
        raise LmmemError("--variants must include 'full' (the reference of the paired differences)")
    data = args.data
    if data is None:
        from lmmem.data.synthetic import write_synthetic_corpus

        data = str(Path(args.work) / "data")
        if not (Path(data) / "meta.json").is_file():
            write_synthetic_corpus(data, train_tokens=60_000, valid_tokens=6_000, test_tokens=6_000)
    bc = BindingConfig(data=data, work=args.work, branch_points=tuple(args.branch_points), branch_steps=args.branch_steps,
                       settle=args.settle, rare_below=args.rare_below, frequent_from=args.frequent_from, variants=args.variants,
                       train_args=dict(kv.split("=", 1) for kv in args.train_args.split()), bootstrap=args.bootstrap,
                       eval_tokens=args.eval_tokens)
    command = "python -m lmmem.experiments.binding " + shlex.join(argv if argv is not None else sys.argv[1:])
    results = run(bc, args.name or "", command)
    if args.page:
        Path(args.page).parent.mkdir(parents=True, exist_ok=True)
        Path(args.page).write_text(render_page(results))
        print(f"wrote {args.page}")
    for r in results["summary"]:
        print(r["label"], r["point"], {k: round(v[0], 3) for k, v in r["k"].items()}, f"rare mass {r['rare_mass']:.3f}/{r['rare_share']:.3f}",
              f"valid ppl {r['valid_ppl']:.1f}")
    return 0


if __name__ == "__main__":
    from lmmem.cli import run_cli

    sys.exit(run_cli(main))
