"""One evaluation: a model, a split of some text, the methods side by side, every number named.

    from lmmem.evaluation import evaluate, Methods
    result = evaluate("runs/gut/best.pt", methods=Methods(cache=CacheConfig()), tune=True)
    result = evaluate(hf_model, tokenizer=tok, data="data/gut", split="test", window="sliding", context=512)

:class:`Evaluation` holds the model and the text (loaded once); :meth:`Evaluation.run` tunes on the
valid split where asked (one pass per grid: every λ, θ, kNN k and temperature of a pass comes from
the same per-token probabilities; one pass per dynamic learning rate) and then scores the requested
split once: one *static* pass (the model, and each memory alone and all together) and, with dynamic
evaluation, one *dynamic* pass (alone and with all the memories). Every pass is the engine's
(lmmem.evaluation.engine.run_pass) with a progress bar (plain lines with position, total and time
left when the output is not a terminal).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace

import numpy as np

from lmmem.errors import LmmemError
from lmmem.evaluation.buckets import FrequencyBuckets
from lmmem.evaluation.config import EvalConfig, KNNSpec, Methods, TuneGrid
from lmmem.evaluation.dynamic import gradient_statistics
from lmmem.evaluation.engine import DynamicRun, run_pass, training_pairs
from lmmem.evaluation.hf_adapter import prefix_token_id
from lmmem.evaluation.knn import open_datastore
from lmmem.evaluation.methods import CacheMemory, KNNMemory, KNNVariants, MbPAMemory, MemorySet
from lmmem.evaluation.results import EvaluationResult, MethodReport, Row, assemble
from lmmem.evaluation.sinks import GridSums, TokenColumns
from lmmem.evaluation.sources import LoadedModel, load_model, open_data, training_bptt
from lmmem.evaluation.tuning import choose, untuned_rows
from lmmem.evaluation.windows import BpttWindows, LmEvalWindows, SlidingWindows, total_steps
from lmmem.progress import Progress


class Evaluation:
    """A loaded model and the text it is scored on. :meth:`header` says what will be scored;
    :meth:`run` scores it."""

    def __init__(self, model, *, tokenizer=None, data=None, config: EvalConfig | None = None, progress: bool = True, log=None):
        self.config = config or EvalConfig()
        try:
            self.buckets = FrequencyBuckets.parse(self.config.buckets)
        except ValueError as e:
            raise LmmemError(str(e)) from None
        self.loaded: LoadedModel = load_model(model, tokenizer=tokenizer, device=self.config.device)
        self.adapter = self.loaded.adapter
        self.source = open_data(self.loaded, data, self.buckets, text_column=self.config.text_column,
                                hub_config=self.config.hub_config)
        self.window = self.config.resolved_window()
        self._check_window()
        self.bptt = self._bptt()
        self.progress, self.log = progress, log or (lambda line: print(line, flush=True))
        self.data = self.source.split(self.config.split, max_tokens=self.config.max_tokens, convention=self.window)
        self._cache: dict = {}

    # -- what is scored --------------------------------------------------------------------------
    def _check_window(self) -> None:
        a = self.adapter
        if self.window != "bptt" and a.carries_state:
            raise LmmemError(f"--window {self.window} restarts the model in every window, but this LSTM carries its state from "
                             "chunk to chunk (every token already sees its row's whole past): use --window bptt")
        if self.window == "lm-eval" and a.kind == "lmmem":
            raise LmmemError("--window lm-eval scores documents of text encoded by the model's tokenizer; an lmmem model reads "
                             "a prepared token stream: use --window bptt or --window sliding")

    def _bptt(self) -> int:
        bptt = self.config.bptt or training_bptt(self.loaded) or self.adapter.max_positions
        if bptt is None:
            raise LmmemError("give --bptt: the model states no context length")
        limit = self.adapter.max_positions
        if limit is not None and bptt > limit:
            raise LmmemError(f"--bptt {bptt} is longer than the model's context ({limit} positions): give --bptt {limit} or "
                             f"less, and --context C to score every token with at least C tokens before it (a sliding window)")
        return bptt

    def windows(self, data, *, segment: int | None = None, streams: int | None = None):
        c = self.config
        if self.window == "bptt":
            return BpttWindows(data.tokens, batch_size=c.batch_size, bptt=segment or self.bptt, streams=streams or c.streams)
        if self.window == "sliding":
            return SlidingWindows(data.tokens, window=self.bptt, context=c.context, batch_size=c.batch_size, streams=c.streams or 1)
        return LmEvalWindows(data.tokens, data.stream.doc_starts, window=self.bptt, prefix_token=prefix_token_id(self.loaded.tokenizer),
                             batch_size=c.batch_size, streams=c.streams or 1)

    def header(self) -> str:
        d = self.describe_window()
        return f"{self.loaded.name} on {self.source.describe()['data']} [{self.config.split}], {len(self.data.tokens) - 1:,} " \
               f"tokens; window: {d}"

    def describe_window(self) -> str:
        w = self.windows(self.data).describe()
        if w["convention"] == "bptt":
            return f"bptt {w['bptt']}, {w['streams']} stream{'s' if w['streams'] > 1 else ''}"
        if w["convention"] == "sliding":
            return f"sliding, {w['window']} inputs, context {w['context']} (stride {w['stride']}; HF max_length {w['max_length']})"
        return f"lm-eval rolling, max_length {w['max_length']}, per document"

    # -- running ---------------------------------------------------------------------------------
    def run(self, methods: Methods | None = None, *, tune: TuneGrid | None = None, word_probs=None) -> EvaluationResult:
        """Score the split with every requested method (tuned on valid first with ``tune`` or
        ``config.tune``); ``word_probs``: also write every method's per-token log-probabilities there."""
        methods = methods or Methods()
        t0 = time.monotonic()
        self._check_methods(methods)
        knn = self._open_datastore(methods.knn) if methods.knn is not None else None
        grid = tune or (TuneGrid() if self.config.tune else None)
        if grid is not None and not methods.any:
            raise LmmemError("--tune needs --cache, --mbpa, --knn and/or --dynamic")
        note = None
        if knn is not None:  # a k above every calibrated one: say so before the (long) scoring
            note = knn.datastore.calibration_note(max([knn.config.k, *((grid.knn_ks if grid else None) or ())]))
            if note:
                self.log(note)
        tuned, rows = (choose(self, methods, knn, grid) if grid is not None else (None, untuned_rows(methods, knn)))
        reports, meta = self._score(methods, knn, rows, tuned, word_probs)
        if knn is not None:
            store, cfg = knn.datastore, knn.config
            meta["datastore"] = {"path": str(store.path), "count": store.size, "index": store.index_type,
                                 "search": store.describe_search(self.adapter.device, distances=cfg.distances,
                                                                 nprobe=cfg.nprobe, k=cfg.k)}
            if note:
                meta["datastore"]["calibration_note"] = note
        meta["seconds"] = round(time.monotonic() - t0, 3)
        return EvaluationResult(reports, meta, name=self._display_name())

    def _check_methods(self, m: Methods) -> None:
        c = self.config
        if m.dynamic is not None and self.window == "bptt" and c.streams and c.streams != c.batch_size:
            raise LmmemError("--dynamic adapts one copy of the model shared by the rows of a batch, so its result depends on "
                             "--batch-size and cannot follow --streams; drop --streams (or use --batch-size 1, Krause et al.'s setting)")
        if m.mbpa is not None and self.adapter.linear_head() is not None:
            raise LmmemError(f"--mbpa adapts a linear softmax, and {self.adapter.linear_head()}")
        if m.memories and self.adapter.hidden_problem():
            raise LmmemError(self.adapter.hidden_problem())

    def _open_datastore(self, spec: KNNSpec):
        return open_datastore(self, spec)

    def _display_name(self) -> str:
        info = self.loaded.info.get("model")
        if isinstance(info, dict) and "arch" in info:
            return f"{info['arch']} + {info['softmax']} softmax"
        return self.loaded.info.get("class") or self.loaded.name

    # -- passes ----------------------------------------------------------------------------------
    def split_data(self, split: str):
        if split == self.config.split:
            return self.data
        if split not in self._cache:
            self._cache[split] = self.source.split(split, max_tokens=self.config.max_tokens, convention=self.window)
        return self._cache[split]

    def train_tokens(self) -> np.ndarray:
        if "train_tokens" not in self._cache:
            self._cache["train_tokens"] = self.source.train_tokens()
        return self._cache["train_tokens"]

    def gradient_statistics(self, cfg) -> dict | None:
        if cfg.method != "rms":
            return None
        key = ("stats", cfg.segment, cfg.stat_batches)
        if key not in self._cache:
            self._cache[key] = gradient_statistics(self.adapter, self.train_tokens(), batch_size=self.config.batch_size,
                                                   bptt=cfg.segment or self.bptt, batches=cfg.stat_batches)
        return self._cache[key]

    def memory_set(self, methods: Methods, knn, *, thetas=(), cache_lambdas=(), mbpa_lambdas=(), knn_variants=None,
                   knn_lambdas=()) -> MemorySet:
        mems = []
        if methods.cache is not None:
            mems.append(CacheMemory(methods.cache, thetas or [methods.cache.theta], cache_lambdas))
        if methods.mbpa is not None:
            mems.append(MbPAMemory(methods.mbpa, mbpa_lambdas, prefill=self._prefill(methods.mbpa)))
        if knn is not None:
            cfg = knn.config
            mems.append(KNNMemory(knn.datastore, knn_variants or KNNVariants([cfg.k], [cfg.temperature]), knn_lambdas,
                                  distances=cfg.distances, nprobe=cfg.nprobe, rerank=getattr(cfg, "rerank", None)))
        return MemorySet(mems)

    def _prefill(self, cfg):
        if not cfg.train_pairs:
            return None
        key = ("prefill", cfg.train_pairs, cfg.vocab > 0)
        if key not in self._cache:
            self._cache[key] = training_pairs(self.adapter, self.train_tokens(), cfg.train_pairs, bptt=self.bptt,
                                              with_lse=cfg.vocab > 0)
        return self._cache[key]

    def run_pass(self, split: str, memories: MemorySet, *, desc: str, dynamic: DynamicRun | None = None,
                 columns: dict[str, int] | None = None):
        data = self.split_data(split)
        segment = dynamic.cfg.segment if dynamic is not None and self.window == "bptt" else None
        groups = self.windows(data, segment=segment).groups()
        sums = GridSums(memories.grid.size, len(self.buckets.names), device=self.adapter.device,
                        bucket_of_vocab=data.bucket_of_vocab, bucket_of_position=data.bucket_of_position)
        cols = TokenColumns(len(data.tokens), columns) if columns else None
        with Progress(total_steps(groups), desc, unit="batches", enabled=self.progress) as bar:
            result = run_pass(self.adapter, groups, memories, sums, columns=cols, dynamic=dynamic, progress=bar, on_note=self.log)
        return result

    # -- the reported split ------------------------------------------------------------------------
    def _score(self, methods: Methods, knn, rows: list[Row], tuned: dict | None, word_probs):
        want_columns = word_probs is not None or self.data.words is not None or self.data.stream is not None
        reports: dict[str, MethodReport] = {}
        columns: dict[str, np.ndarray] = {}
        meta: dict = {"tuned": tuned}
        for dynamic in (False, True):
            part = [r for r in rows if r.dynamic == dynamic]
            if not part:
                continue
            mem = self._report_memories(methods, knn, [r for r in part if r.point])
            points = {r.name: mem.grid.index(**r.point) for r in part}
            run = None
            if dynamic:
                cfg = replace(methods.dynamic, lr=(tuned or {}).get("choice", {}).get("+dynamic", {}).get("lr", methods.dynamic.lr))
                run = DynamicRun(cfg, self.gradient_statistics(cfg), hint=tuned is None)
            desc = f"{self.config.split}{' +dynamic' if dynamic else ''}"
            result = self.run_pass(self.config.split, mem, desc=desc, dynamic=run, columns=points if want_columns else None)
            scored = {name: result.sums.report(self.buckets, p) for name, p in points.items()}
            # a loss that stays finite but grows past e^709 per token is a divergence too: its perplexity overflows
            if result.diverged or (dynamic and not all(_finite(rep) for rep in scored.values())):
                if tuned is None:  # the user's learning rate: say which flag to change
                    raise LmmemError(f"dynamic evaluation diverged on {self.config.split} at --dynamic-lr {run.cfg.lr:g}; give a "
                                     "smaller one or a larger --dynamic-eps, or --tune to choose it on the valid split")
                # chosen on valid: that it diverges here is a result; the other methods' are kept
                names = [r.name for r in part]
                self.log(f"dynamic evaluation diverged on {self.config.split} at the learning rate chosen on valid "
                         f"({run.cfg.lr:g}): {', '.join(names)} left out of the results. A valid split much shorter than "
                         f"{self.config.split} can hide it; a larger --dynamic-eps steadies the rarely-trained weights "
                         "(docs/results/dynamic-evaluation.md, 'Divergence on long test splits')")
                meta["diverged"] = {"split": self.config.split, "dynamic_lr": run.cfg.lr, "methods": names}
                continue
            for r in part:
                reports[r.name] = MethodReport(scored[r.name],
                                               params=_params(methods, knn, r, run.cfg if run else None))
                if result.columns is not None:
                    columns[r.name] = result.columns.columns[r.name]
            meta.setdefault("memory_bytes", {}).update(result.memory_bytes)
            meta.setdefault("pass_seconds", {})[desc] = round(result.seconds, 3)
            meta.setdefault("notes", []).extend(result.notes)
            # said once: not again where the pass's own hint said it on the first batches
            note = _dynamic_worse_note(reports, self.config.split, run.cfg.lr, tuned is not None) if dynamic else None
            if note and not result.notes:
                self.log(note)
                meta["notes"].append(note)
        meta.update(assemble(self, reports, columns, word_probs))
        return reports, meta

    def _report_memories(self, methods: Methods, knn, rows: list[Row]) -> MemorySet:
        vals = lambda key: [r.point[key] for r in rows if key in r.point]  # noqa: E731
        pairs = vals("knn")
        variants = KNNVariants(sorted({k for k, _ in pairs}), sorted({t for _, t in pairs})) if pairs else None
        return self.memory_set(methods, knn, thetas=sorted(set(vals("theta"))), cache_lambdas=vals("cache_lambda"),
                               mbpa_lambdas=vals("mbpa_lambda"), knn_variants=variants, knn_lambdas=vals("knn_lambda"))


def _finite(report) -> bool:
    return math.isfinite(report.perplexity) and all(b.perplexity is None or math.isfinite(b.perplexity) for b in report.buckets)


def _dynamic_worse_note(reports: dict, split: str, lr: float, tuned: bool) -> str | None:
    """One line where dynamic evaluation ended worse than the model alone without diverging (the
    same instability as a divergence, stopped short of a non-finite loss), else None."""
    plain, dyn = reports.get("plain"), reports.get("+dynamic")
    if plain is None or dyn is None or not dyn.report.perplexity > plain.report.perplexity:
        return None
    worse = 100 * (dyn.report.perplexity / plain.report.perplexity - 1)
    why = (f"at the learning rate chosen on valid ({lr:g}): a valid split much shorter than {split} can hide that it is "
           "too large" if tuned else f"at --dynamic-lr {lr:g}: give a smaller one")
    return (f"dynamic evaluation ended {worse:.1f}% worse than the model alone on {split} without diverging, {why}; a "
            "larger --dynamic-eps steadies the rarely-trained weights (docs/results/dynamic-evaluation.md, 'Divergence on "
            "long test splits')")


def _params(methods: Methods, knn, row: Row, dynamic_cfg) -> dict:
    """The settings behind one row of the table (the grid values it was scored with)."""
    p = row.point
    out: dict = {}
    if p.get("cache_lambda"):
        out["cache"] = {**asdict(methods.cache), "theta": p["theta"], "lam": p["cache_lambda"]}
    if p.get("mbpa_lambda"):
        out["mbpa"] = {**asdict(methods.mbpa), "lam": p["mbpa_lambda"]}
    if p.get("knn_lambda"):
        k, t = p["knn"]
        out["knn"] = {**asdict(knn.config), "k": k, "temperature": t, "lam": p["knn_lambda"]}
    if row.dynamic:
        out["dynamic"] = asdict(dynamic_cfg)
    return out


def evaluate(model, *, tokenizer=None, data=None, methods: Methods | None = None, tune: bool | TuneGrid = False,
             word_probs=None, progress: bool = True, log=None, **config) -> EvaluationResult:
    """Evaluate ``model`` in one call: an lmmem model or Hugging Face causal LM object (with its
    ``tokenizer``), or a path (lmmem checkpoint, run or export folder; Hugging Face folder).
    ``data``: a prepared corpus folder (default for lmmem checkpoints: the one they were trained on)
    or a text source (``.txt``/``.jsonl``/``.parquet`` file, folder by split, ``hub:NAME``).
    ``config``: :class:`EvalConfig` fields (``split``, ``window``, ``context``, ``batch_size``, ...)."""
    cfg = EvalConfig(**config, tune=bool(tune))
    ev = Evaluation(model, tokenizer=tokenizer, data=data, config=cfg, progress=progress, log=log)
    return ev.run(methods, tune=tune if isinstance(tune, TuneGrid) else None, word_probs=word_probs)


__all__ = ["EvalConfig", "Evaluation", "KNNSpec", "Methods", "TuneGrid", "evaluate"]
