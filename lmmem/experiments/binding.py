"""Fast binding, measured directly: does a softmax rule make rare words predictable after a few
sightings (the mechanism Rae et al. 2018 propose), without moving probability onto rare words in general?

One command::

    python -m lmmem.experiments.binding --data /tmp/data/gutenberg --work runs/binding-gutenberg \\
        --page docs/results/binding-gutenberg.md

1. **Trunk.** A ``train.py`` run with a full softmax (``WORK/trunk``; constant learning rate after
   the warm-up, so that branch points differ only in how far training got). ``--trunk`` trains it
   otherwise, e.g. ``--trunk softmax=hebbian`` for the question a long Hebbian run asks: from a
   model trained *with* the rule, do its later writes help or hurt (against ``--reference`` = a
   branch that stops writing, ``hebbian_T=0``)? A step hook keeps its
   checkpoint at every branch point (``WORK/trunk/step{P}.pt``, train.py's format); an interrupted
   trunk is continued as ``train.py --resume`` would.
2. **Branches.** From each trunk checkpoint, one ``train.py`` run per variant (``WORK/branch-step{P}-LABEL``;
   full softmax, the paper's rule, the centred rule, …: a variant is ``LABEL:key=value,...`` of
   :class:`~lmmem.training.TrainConfig` fields) continues training on *identical* batches with an
   identical dropout stream and the trunk's optimizer state, in train.py's loop
   (:func:`lmmem.training.trainer.fit`). A Hebbian branch starts with ``counts`` set to each word's
   real number of sightings so far (so ``λ`` is what it would be had the rule run from the start).
3. **Endpoint.** During a branch, after a settle-in window of ``--settle`` steps, every training
   token's NLL (the forward before that step's update, seen by a forward hook on the output layer)
   is filed by its word's training frequency and by ``k``, the word's sightings in *earlier batches* of the stream (trunk included). Primary:
   rare words (fewer than ``--rare-below`` training occurrences) at k = 1, 2, 3–4, 5–9: mean over
   word types of each type's mean NLL, with bootstrap 95% intervals over types, and the paired
   difference to the reference branch (``--reference``, default ``full``; same types, same positions). Guards: k = 0 (never seen:
   a rule cannot know these, so a gain there means mass was moved onto rare words in general),
   frequent words (``--frequent-from`` occurrences or more), and the probability mass the model puts
   on all rare words against their true share of the window's tokens.
4. **Held-out endpoint** (:func:`held_out`). At the end of each branch, the valid split is scored
   word by word: bucketed valid perplexity, and each rare word's mean valid NLL filed by how often
   *the branch* sighted it (0, 1, 2, 3–4, 5–9), paired with the reference branch like the
   training-stream table. From a later pass, the next training sighting is text the model has read
   before; this endpoint asks instead whether the writes help on text it has not.

Results go to ``WORK/binding.json`` (each branch also to its own JSON, so an interrupted run resumes
where it stopped; each branch's last model is its run folder's ``last.pt``) and, with ``--page``, a
markdown page with the commands.
"""

from __future__ import annotations

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

from lmmem.checkpoints import RESUME_KEYS, load_checkpoint, model_from_checkpoint
from lmmem.cli import ArgumentParser, run_cli
from lmmem.data.batching import Batch, StreamBatcher
from lmmem.data.corpus import PreparedCorpus
from lmmem.data.synthetic import write_synthetic_corpus
from lmmem.errors import LmmemError
from lmmem.evaluation import FrequencyBuckets, PerplexityReport, score_stream
from lmmem.experiments.variants import parse_train_args, parse_variant
from lmmem.training import Run, TrainConfig, config_from_args, train
from lmmem.training.config import config_value
from lmmem.training.run import restore, save
from lmmem.training.run_folder import run_state
from lmmem.training.trainer import fit, open_run
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
    trunk: dict = field(default_factory=lambda: {"softmax": "full"})  # TrainConfig fields for the trunk only
    reference: str = "full"  # the branch label every paired difference is taken against
    bootstrap: int = 1000
    mass_every: int = 4  # measure the rare-word mass every this many steps (a full N × V softmax)
    eval_tokens: int = 0  # valid tokens for the bucketed perplexity, 0 = all
    eval_batch_size: int = 16


def _train_config(bc: BindingConfig, out: Path, overrides: dict) -> TrainConfig:
    flags = {"data": bc.data, "out": str(out), "lr_schedule": "constant", "eval_interval": 0, "progress": False,
             **bc.train_args, **overrides}
    return config_from_args({k: config_value(k, v) for k, v in flags.items()})


def train_trunk(bc: BindingConfig, log=print) -> None:
    """The trunk (a full softmax unless ``bc.trunk`` says otherwise): a train.py run in WORK/trunk
    whose checkpoint at every branch point a step hook keeps as ``step{P}.pt``; continued as
    ``--resume`` would when interrupted."""
    out = Path(bc.work) / "trunk"
    points = sorted(bc.branch_points)
    if all((out / f"step{p}.pt").is_file() for p in points):
        return
    cfg = _train_config(bc, out, {**bc.trunk, "max_steps": points[-1]})
    state = run_state(out, cfg)
    if state != "resumable":  # new settings (or a finished trunk missing a snapshot): train it again
        for old in out.glob("step*.pt"):
            old.unlink()
    cfg.resume, cfg.overwrite = state == "resumable", state != "resumable"

    def keep_branch_points(run: Run, batch: Batch) -> None:
        if run.progress.step in points:
            save(run, out / f"step{run.progress.step}.pt")

    log(f"trunk: {'continuing ' if cfg.resume else ''}train.py run in {out} to step {points[-1]}")
    if train(cfg, hooks=[keep_branch_points]).stopped_by == "interrupt":
        raise KeyboardInterrupt


def sightings_before(batcher: StreamBatcher, steps: int, vocab: int, start: int = 0) -> np.ndarray:
    """How often each word was a target in batches ``start`` … ``steps − 1`` of the training stream."""
    seen = np.zeros(vocab, dtype=np.int64)
    for step in range(start, steps):
        t = batcher.batch(step % len(batcher)).targets.reshape(-1).numpy()
        seen += np.bincount(t[t >= 0], minlength=vocab)
    return seen


class BranchRecorder:
    """What a branch measures, as hooks on train.py's loop: a forward hook on the output layer sees
    each training batch's activations before the update (per-token NLL; every ``mass_every`` steps
    the probability mass on all rare words), and the step hook files the NLLs by each word's earlier
    sightings ``k`` and counts this batch's words as seen."""

    def __init__(self, bc: BindingConfig, run: Run, point: int, seen: np.ndarray, train_counts: np.ndarray):
        V = len(train_counts)
        self.bc, self.run, self.point, self.seen = bc, run, point, seen
        self.rare = train_counts < bc.rare_below
        self.frequent = train_counts >= bc.frequent_from
        self.rare_ids = torch.from_numpy(np.flatnonzero(self.rare))
        self.sums = np.zeros((len(K_BUCKETS), V))  # rare words: NLL sum by k bucket and type
        self.cnts = np.zeros((len(K_BUCKETS), V), dtype=np.int64)
        self.freq_sum, self.freq_cnt = np.zeros(V), np.zeros(V, dtype=np.int64)
        self.mass, self.mass_n, self.rare_tokens, self.window_tokens = 0.0, 0, 0, 0
        self.nll: np.ndarray | None = None
        self.masses: list[float] = []

    def on_forward(self, layer, args, loss) -> None:
        """Forward hook of the output layer: ``args`` are the activations and targets it scores."""
        if not layer.training:
            return
        h, y = args[0].detach(), args[1]
        i = self.run.progress.step - self.point  # this branch's step, not yet taken
        with torch.no_grad():
            self.nll = (-layer.target_log_probs(h, y)).numpy()
            if i >= self.bc.settle and (i - self.bc.settle) % self.bc.mass_every == 0:
                # the mass the model that predicted these tokens gave rare words, before the update
                lp = layer.log_probs(h[y >= 0])
                self.masses.append(float(torch.logsumexp(lp[:, self.rare_ids], dim=1).exp().sum()))

    def after_step(self, run: Run, batch: Batch) -> None:
        t = batch.targets.reshape(-1).numpy()
        keep = t >= 0
        if self.masses:
            self.mass += self.masses.pop()
            self.mass_n += int(keep.sum())
        if run.progress.step - 1 - self.point >= self.bc.settle:
            tk, nk = t[keep], self.nll[keep]
            k, r = self.seen[tk], self.rare[tk]
            for j, (lo, hi) in enumerate(K_BUCKETS):
                m = r & (k >= lo) & (k <= hi)
                np.add.at(self.sums[j], tk[m], nk[m])
                np.add.at(self.cnts[j], tk[m], 1)
            f = self.frequent[tk]
            np.add.at(self.freq_sum, tk[f], nk[f])
            np.add.at(self.freq_cnt, tk[f], 1)
            self.rare_tokens += int(r.sum())
            self.window_tokens += int(keep.sum())
        self.seen += np.bincount(t[keep], minlength=len(self.seen))

    def results(self) -> dict:
        by_k = {}
        for j, name in enumerate(K_NAMES):
            ids = np.flatnonzero(self.cnts[j])
            by_k[name] = {"types": ids.tolist(), "mean_nll": (self.sums[j, ids] / self.cnts[j, ids]).tolist(),
                          "tokens": int(self.cnts[j].sum())}
        fids = np.flatnonzero(self.freq_cnt)
        return {
            "rare_by_k": by_k,
            "frequent": {"types": fids.tolist(), "mean_nll": (self.freq_sum[fids] / self.freq_cnt[fids]).tolist(),
                         "tokens": int(self.freq_cnt.sum()), "token_mean_nll": float(self.freq_sum.sum() / max(self.freq_cnt.sum(), 1))},
            "rare_mass": self.mass / max(self.mass_n, 1), "rare_share": self.rare_tokens / max(self.window_tokens, 1),
        }


def run_branch(bc: BindingConfig, point: int, label: str, overrides: dict) -> dict:
    """One branch from the trunk's ``step{point}.pt``, a train.py run of its own: per-type NLL sums
    by k bucket, guards, valid buckets."""
    work = Path(bc.work)
    cfg = _train_config(bc, work / f"branch-step{point}-{label}", {**overrides, "max_steps": point + bc.branch_steps})
    cfg.overwrite = True  # a branch without its results JSON is redone whole
    trunk = load_checkpoint(work / "trunk" / f"step{point}.pt", require=RESUME_KEYS)
    with open_run(cfg) as run:
        rule_state = {f"output.{name}" for name, _ in run.model.output.named_buffers()}  # a Hebbian layer's own state
        try:
            restore(run, trunk, rng=False, missing_ok=rule_state)
        except LmmemError as e:
            raise LmmemError(f"variant {label!r} builds a different model than the trunk: {e}") from None
        train_counts = run.corpus.train_counts()
        seen = sightings_before(run.batcher, point, len(train_counts))
        if hasattr(run.model.output, "counts"):
            run.model.output.counts.copy_(torch.from_numpy(seen))
        torch.manual_seed(cfg.seed * 100_003 + point)  # the same dropout stream in every branch of this point
        recorder = BranchRecorder(bc, run, point, seen.copy(), train_counts)
        handle = run.model.output.register_forward_hook(recorder.on_forward)
        t0 = time.monotonic()
        try:
            fit(run, hooks=[recorder.after_step])
        finally:
            handle.remove()
        minutes = (time.monotonic() - t0) / 60
        save(run, run.last_path)
        ends = held_out(bc, run.model, run.valid_tokens, train_counts, recorder.seen - seen, cfg.bptt)
    return {"label": label, "point": point, "overrides": overrides, "train_minutes": round(minutes, 2), **recorder.results(), **ends}


def held_out(bc: BindingConfig, model: torch.nn.Module, valid: np.ndarray, train_counts: np.ndarray,
             branch_sightings: np.ndarray, bptt: int) -> dict:
    """The branch's end, scored on the valid split (text no branch trains on): bucketed perplexity,
    and each rare word's mean valid NLL with its sightings *in this branch*.

    Why both endpoints: in a later pass a rare word's next training sighting is text the model has
    read before, so a lower training-stream NLL there can be memorisation. The held-out NLL of the
    words a branch sighted (and the rule wrote) asks whether those writes help on new text; words it
    never sighted (0) carry only the cost of other rows' writes."""
    V = len(train_counts)
    # one scoring pass, per word type; the frequency buckets are sums of types
    nll_t, cnt_t = score_stream(model, valid, bucket_of=np.arange(V), num_buckets=V, batch_size=bc.eval_batch_size,
                                bptt=bptt, max_tokens=bc.eval_tokens)
    nll_t, cnt_t = np.asarray(nll_t).reshape(-1), np.asarray(cnt_t).reshape(-1)
    buckets = FrequencyBuckets()
    of = buckets.assign(train_counts)
    nb = len(buckets.names)
    report = PerplexityReport.from_sums(np.bincount(of, weights=nll_t, minlength=nb), np.bincount(of, weights=cnt_t, minlength=nb), buckets)
    ids = np.flatnonzero((train_counts < bc.rare_below) & (cnt_t > 0))
    return {"valid": report.to_dict(),
            "held_out": {"types": ids.tolist(), "branch_sightings": branch_sightings[ids].tolist(),
                         "mean_nll": (nll_t[ids] / cnt_t[ids]).tolist(), "counts": cnt_t[ids].astype(np.int64).tolist()}}


def held_out_from_saved(bc: BindingConfig, point: int, label: str, overrides: dict) -> dict:
    """:func:`held_out` for a branch finished before that endpoint existed, from its saved last.pt
    and the same batches (the sightings are a function of the stream, the step and the branch length)."""
    folder = Path(bc.work) / f"branch-step{point}-{label}"
    cfg = _train_config(bc, folder, {**overrides, "max_steps": point + bc.branch_steps})
    model = model_from_checkpoint(load_checkpoint(folder / "last.pt"))
    corpus = PreparedCorpus.open(bc.data)
    batcher = StreamBatcher(corpus.tokens("train"), cfg.batch_size, cfg.bptt)
    train_counts = corpus.train_counts()
    sightings = sightings_before(batcher, point + bc.branch_steps, len(train_counts), start=point)
    return held_out(bc, model, corpus.tokens("valid"), train_counts, sightings, cfg.bptt)


def bootstrap_mean(values: np.ndarray, n: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean and percentile 95% interval of the mean, resampling the entries (word types)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return (math.nan, math.nan, math.nan)
    idx = rng.integers(0, values.size, size=(n, values.size))
    means = values[idx].mean(1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarise(branches: list[dict], n_boot: int, seed: int = 0, reference: str = "full") -> list[dict]:
    """Per branch: each k bucket's mean over types with its interval, and the paired difference to
    the ``reference`` branch of the same point over the types both have (all of them: same stream);
    the JSON key stays ``delta_vs_full`` whatever the reference is called."""
    # a fresh generator per statistic: identical inputs get identical intervals, whatever the order
    boot = lambda v: bootstrap_mean(v, n_boot, np.random.default_rng(seed))  # noqa: E731
    full = {b["point"]: b for b in branches if b["label"] == reference}
    rows = []
    for b in branches:
        row = {"label": b["label"], "point": b["point"], "k": {}, "delta_vs_full": {}}
        ref = full.get(b["point"])
        diffs = paired_differences(b, ref) if ref is not None and b is not ref else None
        for name in K_NAMES:
            d = b["rare_by_k"][name]
            row["k"][name] = (*boot(np.array(d["mean_nll"])), len(d["types"]))
            if diffs is not None:
                row["delta_vs_full"][name] = boot(diffs["stream"][name])
        row["held_out"], row["held_out_delta"] = _held_out_rows(b, diffs, boot)
        row["frequent"] = boot(np.array(b["frequent"]["mean_nll"]))
        row["frequent_token_nll"] = b["frequent"]["token_mean_nll"]
        row["rare_mass"], row["rare_share"] = b["rare_mass"], b["rare_share"]
        row["valid_ppl"] = b["valid"]["perplexity"]
        row["valid_buckets"] = {x["name"]: x["perplexity"] for x in b["valid"]["buckets"]}
        rows.append(row)
    return rows


def paired_differences(branch: dict, ref: dict) -> dict[str, dict[str, np.ndarray]]:
    """A branch's per-type NLL minus the reference branch's, over the types both have, per bucket:
    ``stream`` by ``k`` (earlier sightings), ``held_out`` by the branch's sightings of the word
    (:data:`K_BUCKETS`; the same types in both branches: the same stream and valid split)."""
    out: dict[str, dict[str, np.ndarray]] = {"stream": {}, "held_out": {}}
    for name in K_NAMES:
        a = dict(zip(branch["rare_by_k"][name]["types"], branch["rare_by_k"][name]["mean_nll"]))
        r = dict(zip(ref["rare_by_k"][name]["types"], ref["rare_by_k"][name]["mean_nll"]))
        out["stream"][name] = np.array([a[t] - r[t] for t in sorted(set(a) & set(r))])
    h = branch["held_out"]
    r = dict(zip(ref["held_out"]["types"], ref["held_out"]["mean_nll"]))
    d = np.array([v - r[t] for t, v in zip(h["types"], h["mean_nll"])])
    s = np.asarray(h["branch_sightings"])
    for name, (lo, hi) in zip(K_NAMES, K_BUCKETS):
        out["held_out"][name] = d[(s >= lo) & (s <= hi)]
    return out


def _held_out_rows(branch: dict, diffs: dict | None, boot) -> tuple[dict, dict]:
    """The held-out endpoint by the branch's sightings of each rare word (:data:`K_BUCKETS`): mean
    over types of the type's mean valid NLL, and the paired difference to the reference branch
    (``diffs``: :func:`paired_differences`; None for the reference itself)."""
    h = branch["held_out"]
    b_of = np.asarray(h["branch_sightings"])
    nll = np.asarray(h["mean_nll"])
    means, deltas = {}, {}
    for name, (lo, hi) in zip(K_NAMES, K_BUCKETS):
        m = (b_of >= lo) & (b_of <= hi)
        means[name] = (*boot(nll[m]), int(m.sum()))
        if diffs is not None:
            deltas[name] = boot(diffs["held_out"][name])
    return means, deltas


def _ci(t) -> str:
    m, lo, hi = t[:3]
    return "–" if math.isnan(m) else f"{m:.2f} [{lo:.2f}, {hi:.2f}]"


def render_page(results: dict) -> str:
    bc = results["config"]
    reference = bc.get("reference", "full")
    trunk = bc.get("trunk", {"softmax": "full"})
    trunk_text = "full softmax" if trunk == {"softmax": "full"} else "`" + ",".join(f"{k}={v}" for k, v in trunk.items()) + "`"
    lines = [f"# Fast binding on {results['name']}", "",
             f"Trunk: {trunk_text}, `{bc['train_args'].get('preset', 'tiny')}` preset, constant lr after warm-up; branches at steps "
             f"{', '.join(map(str, bc['branch_points']))} for {bc['branch_steps']} steps each on identical batches; the first "
             f"{bc['settle']} steps of each branch excluded (settle-in). Rare = fewer than {bc['rare_below']} training occurrences, "
             f"frequent = {bc['frequent_from']} or more. k = sightings in earlier batches. Entries: mean over word types of "
             f"the type's mean training-stream NLL (nats), [bootstrap 95% interval over types, {bc['bootstrap']} resamples]; "
             f"Δ = paired difference to the `{reference}` branch (negative = the variant binds faster).", ""]
    for point in bc["branch_points"]:
        rows = [r for r in results["summary"] if r["point"] == point]
        lines += [f"## Branch point: step {point}", "",
                  "| variant | " + " | ".join(f"k={k}" for k in K_NAMES) + " | frequent | rare mass / share | valid ppl |",
                  "|---|" + "---|" * (len(K_NAMES) + 3)]
        for r in rows:
            cells = [_ci(r["k"][k]) + f" (n={r['k'][k][3]})" for k in K_NAMES]
            lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {_ci(r['frequent'])} | {r['rare_mass']:.3f} / {r['rare_share']:.3f} | {r['valid_ppl']:.1f} |")
        lines += ["", f"Paired difference to {reference} (Δ NLL, nats):", "",
                  "| variant | " + " | ".join(f"k={k}" for k in K_NAMES) + " |", "|---|" + "---|" * len(K_NAMES)]
        for r in rows:
            if r["delta_vs_full"]:
                lines.append(f"| {r['label']} | " + " | ".join(_ci(r["delta_vs_full"][k]) for k in K_NAMES) + " |")
        lines += ["", f"Held out: the valid NLL at the branch end of rare words, by the number of times the branch sighted them "
                  f"(0 = never: only other rows' writes reach them). Mean over types [interval], and Δ to {reference}:", "",
                  "| variant | " + " | ".join(f"sighted {k}" for k in K_NAMES) + " |", "|---|" + "---|" * len(K_NAMES)]
        for r in rows:
            lines.append(f"| {r['label']} | " + " | ".join(_ci(r["held_out"][k]) + f" (n={r['held_out'][k][3]})" for k in K_NAMES) + " |")
        for r in rows:
            if r["held_out_delta"]:
                lines.append(f"| Δ {r['label']} | " + " | ".join(_ci(r["held_out_delta"][k]) for k in K_NAMES) + " |")
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
            res = json.loads(path.read_text())
            if "held_out" in res:
                branches.append(res)
                continue
            log(f"branch {label} from step {point}: scoring its saved end on valid, word by word")
            res.update(held_out_from_saved(bc, point, label, overrides))
        else:
            log(f"branch {label} from step {point}")
            res = run_branch(bc, point, label, overrides)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(res))
        tmp.replace(path)  # atomic: an interrupted branch is redone, a finished one never lost
        branches.append(res)

    results = {"name": name or Path(bc.data).name, "config": bc.__dict__ | {"branch_points": list(bc.branch_points)},
               "command": command, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
               "minutes": sum(b["train_minutes"] for b in branches), "summary": summarise(branches, bc.bootstrap, reference=bc.reference)}
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
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help="LABEL:key=value,... (TrainConfig fields)")
    p.add_argument("--reference", default="full", help="the variant label the paired differences are taken against (default: full)")
    p.add_argument("--train-args", default="preset=tiny seed=1", help="TrainConfig fields as KEY=VALUE pairs for trunk and branches")
    p.add_argument("--trunk", default="softmax=full",
                   help="TrainConfig fields as KEY=VALUE pairs for the trunk only (default: softmax=full; e.g. softmax=hebbian)")
    p.add_argument("--bootstrap", type=int, default=BindingConfig.bootstrap)
    p.add_argument("--eval-tokens", type=int, default=0)
    p.add_argument("--page", help="write the results page here (markdown)")
    args = p.parse_args(argv)
    check_flags(vars(args))
    if args.settle >= args.branch_steps:
        raise LmmemError("--settle must be smaller than --branch-steps")
    if not any(parse_variant(v)[0] == args.reference for v in args.variants):
        raise LmmemError(f"--variants must include {args.reference!r} (--reference: the branch of the paired differences)")
    data = args.data
    if data is None:
        data = str(Path(args.work) / "data")
        if not (Path(data) / "meta.json").is_file():
            write_synthetic_corpus(data, train_tokens=60_000, valid_tokens=6_000, test_tokens=6_000)
    bc = BindingConfig(data=data, work=args.work, branch_points=tuple(args.branch_points), branch_steps=args.branch_steps,
                       settle=args.settle, rare_below=args.rare_below, frequent_from=args.frequent_from, variants=args.variants,
                       train_args=parse_train_args(args.train_args), bootstrap=args.bootstrap,
                       trunk=parse_train_args(args.trunk), reference=args.reference,
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
    sys.exit(run_cli(main))
