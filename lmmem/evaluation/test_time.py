"""Scoring a split with test-time memories: neural cache, MbPA and both, on one pass.

For every position the loop computes ``log p_model(target)``, ``log p_cache(target)`` for each θ
of a grid and ``log p_mbpa(target)``, and mixes them for every λ of a grid::

    p = (1 − λ_m) · [(1 − λ_c) · p_model + λ_c · p_cache] + λ_m · p_mbpa

accumulating per-bucket NLL sums for every (θ, λ_c, λ_m) of the grid (``(nθ, nλc, nλm, buckets)``
float64 numbers — memory independent of the split's length). λ_c = λ_m = 0 is the plain model
*exactly* (the mixture is done with ``logaddexp`` and ``log 0 = −inf``, which leaves the plain
log-probability untouched), λ_m = 0 is the cache alone, λ_c = 0 is MbPA alone. So ``--tune``
costs one pass over the validation split per θ grid, not one per λ.

Streams and batch size
----------------------
The split is cut into ``streams`` contiguous stretches (rows); each is read from its start with a
fresh LSTM state, its own cache and its own MbPA memory. ``batch_size`` rows are processed in
parallel, so ``streams / batch_size`` groups are read one after another (``streams`` must be a
multiple of ``batch_size``; by default ``streams = batch_size``, which is the plain evaluation's
layout). Because the sequences scored depend only on ``streams``, batch 1 and batch 8 with the
same ``streams`` give the same perplexity up to floating-point reassociation. (Plain
``score_stream`` ties the rows to the batch size, so its perplexity changes with it.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from lmmem.data.batching import StreamBatcher
from lmmem.errors import LmmemError
from lmmem.evaluation.perplexity import FrequencyBuckets, PerplexityReport, TokenLogProbs
from lmmem.memories.mbpa import MbPA, MbPAConfig
from lmmem.memories.neural_cache import CacheConfig, NeuralCache
from lmmem.output_layers.base import IGNORE_INDEX, cross_entropy_from_logits

DEFAULT_THETAS = (0.1, 0.3, 1.0)
DEFAULT_LAMBDAS = (0.0, 0.05, 0.1, 0.2, 0.3)


@dataclass
class TestTimeScores:
    """Per-bucket NLL sums ``(nθ, nλc, nλm, buckets)`` and token counts ``(buckets,)``."""

    nll: np.ndarray
    count: np.ndarray
    thetas: list[float]
    cache_lambdas: list[float]
    mbpa_lambdas: list[float]
    seconds: float = 0.0
    memory_bytes: dict = field(default_factory=dict)

    def sums(self, theta: float | None = None, cache_lambda: float = 0.0, mbpa_lambda: float = 0.0) -> np.ndarray:
        i = self.thetas.index(theta) if theta is not None else 0
        return self.nll[i, self.cache_lambdas.index(cache_lambda), self.mbpa_lambdas.index(mbpa_lambda)]

    def report(self, buckets: FrequencyBuckets, **kw) -> PerplexityReport:
        return PerplexityReport.from_sums(self.sums(**kw), self.count, buckets)

    def best(self, *, cache: bool, mbpa: bool) -> dict:
        """(θ, λ_c, λ_m) of the lowest total NLL among the grid points using exactly these memories."""
        total = self.nll.sum(-1)
        best, arg = math.inf, None
        for i, th in enumerate(self.thetas):
            for a, lc in enumerate(self.cache_lambdas):
                for b, lm in enumerate(self.mbpa_lambdas):
                    if (lc > 0) != cache or (lm > 0) != mbpa:
                        continue
                    if total[i, a, b] < best:
                        best, arg = total[i, a, b], dict(theta=th, cache_lambda=lc, mbpa_lambda=lm)
        if arg is None:
            raise LmmemError("the λ grid has no positive value for a requested memory")
        return arg


def _linear_softmax(layer) -> bool:
    """The layer's distribution is softmax(W h + b) computed by the base class's cross-entropy
    (full and Hebbian softmax), so its logits can be shared with MbPA."""
    from lmmem.output_layers.full_softmax import FullSoftmax
    from lmmem.output_layers.hebbian_softmax import HebbianSoftmax

    return type(layer) in (FullSoftmax, HebbianSoftmax)


def _log_mix(lp: torch.Tensor, lam: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """log((1 − λ) e^lp + λ e^lq), exact (= lp) where λ = 0."""
    return torch.logaddexp(torch.log1p(-lam) + lp, torch.log(lam) + lq)


def score_grid(cache, mbpa, thetas=None, cache_lambdas=None, mbpa_lambdas=None) -> tuple[list, list, list]:
    """The (θ, λ_c, λ_m) grid score_test_time scores: λ lists sorted, deduplicated, with 0 (the
    model alone) always in; a memory that is off gets the single value that leaves it out."""
    thetas = list(thetas if thetas is not None else ([cache.theta] if cache else [0.0]))
    cache_lambdas = sorted(set(cache_lambdas if cache_lambdas is not None else [0.0] + ([cache.lam] if cache else [])) | {0.0})
    mbpa_lambdas = sorted(set(mbpa_lambdas if mbpa_lambdas is not None else [0.0] + ([mbpa.lam] if mbpa else [])) | {0.0})
    if not cache:
        thetas, cache_lambdas = thetas[:1], [0.0]
    if not mbpa:
        mbpa_lambdas = [0.0]
    return thetas, cache_lambdas, mbpa_lambdas


@torch.no_grad()
def score_test_time(
    model: torch.nn.Module,
    tokens: np.ndarray,
    *,
    bucket_of: np.ndarray,
    num_buckets: int,
    batch_size: int = 16,
    streams: int | None = None,
    bptt: int = 128,
    device: torch.device | str = "cpu",
    cache: CacheConfig | None = None,
    mbpa: MbPAConfig | None = None,
    thetas=None,
    cache_lambdas=None,
    mbpa_lambdas=None,
    max_tokens: int = 0,
    progress: bool = False,
    desc: str = "eval",
    train_tokens: np.ndarray | None = None,
    on_scores=None,
) -> TestTimeScores:
    """Score ``tokens`` with the plain model, the cache and/or MbPA, for a grid of θ and λ values
    (by default the single values of the configs). Returns per-bucket sums for every grid point.
    The model is left untouched (eval mode during the pass, then its previous mode).
    ``on_scores(positions, log_probs)``: each batch's scored targets, log-probabilities of shape
    ``(nθ, nλc, nλm, targets)`` (the grid), as perplexity.TokenLogProbs records them."""
    import time

    t0 = time.monotonic()
    device = torch.device(device)
    if max_tokens:
        tokens = tokens[: max_tokens + 1]
    streams = streams or batch_size
    if streams % batch_size:
        raise LmmemError(f"--streams ({streams}) must be a multiple of --batch-size ({batch_size})")
    thetas, cache_lambdas, mbpa_lambdas = score_grid(cache, mbpa, thetas, cache_lambdas, mbpa_lambdas)
    lc = torch.tensor(cache_lambdas, dtype=torch.float64, device=device)
    lm = torch.tensor(mbpa_lambdas, dtype=torch.float64, device=device)
    grid = (len(thetas), len(cache_lambdas), len(mbpa_lambdas))
    nll_sum = torch.zeros(*grid, num_buckets, dtype=torch.float64, device=device)
    count = torch.zeros(num_buckets, dtype=torch.float64, device=device)
    bucket_t = torch.as_tensor(bucket_of, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    out = model.output
    dim, dtype = out.weight.shape[1], out.weight.dtype
    mem_bytes = {}
    try:
        prefill = None
        if mbpa is not None and mbpa.train_pairs:
            if train_tokens is None:
                raise LmmemError("MbPA's train_pairs needs the train split's tokens (train_tokens=...)")
            prefill = training_pairs(model, train_tokens, mbpa.train_pairs, bptt=bptt, device=device, with_lse=mbpa.vocab > 0)
        groups = streams // batch_size
        for g in range(groups):
            batcher = StreamBatcher(tokens, streams, bptt, rank=g, world_size=groups, pad=True)
            state = model.init_state(batch_size, device)
            nc = NeuralCache(batch_size, dim, cache.window, device=device, dtype=dtype) if cache else None
            mb = MbPA(batch_size, dim, mbpa, device=device, dtype=dtype) if mbpa else None
            if prefill is not None:
                mb.prefill(*prefill)
            for step in tqdm(range(len(batcher)), desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
                b = batcher.batch(step)
                x = b.inputs.to(device)
                y = b.targets.to(device)
                h, state = model.hidden_states(x, state)
                yf = y.reshape(-1)
                logits = None
                if mb is not None and mbpa.vocab > 0 and _linear_softmax(out):
                    # one V×D product for both the plain score and MbPA's candidate rows
                    logits = out.logits(h.reshape(-1, h.shape[-1]))
                    lp = -cross_entropy_from_logits(logits, yf, "none", IGNORE_INDEX).double()
                else:
                    lp = out.target_log_probs(h.reshape(-1, h.shape[-1]), yf).double()  # (N,)
                N = lp.shape[0]
                if nc is not None:
                    lpc, nonempty = nc.target_log_probs(h, y, thetas)
                    lpc = lpc.reshape(len(thetas), N).double()
                    lpc = torch.where(nonempty.reshape(N), lpc, lp)  # empty cache: p_cache := p_model
                    # (nθ, nλc, N)
                    mixed = _log_mix(lp[None, None], lc[None, :, None], lpc[:, None, :])
                else:
                    mixed = lp[None, None].expand(1, 1, N)
                if mb is not None:
                    lpm = mb.target_log_probs(h, y, out, base_logits=logits,
                                              base_log_probs=lp if logits is not None else None).reshape(N).double()
                    mixed = _log_mix(mixed[:, :, None, :], lm[None, None, :, None], lpm)
                else:
                    mixed = mixed[:, :, None, :]
                valid = yf != IGNORE_INDEX
                bucket = bucket_t[yf.clamp_min(0)][valid]
                nll_sum.index_add_(3, bucket, -mixed[..., valid])
                count.index_add_(0, bucket, torch.ones_like(lp[valid]))
                if on_scores is not None:
                    on_scores(b.target_positions.reshape(-1)[valid.cpu().numpy()], mixed[..., valid])
            if g == 0:
                if nc is not None:
                    mem_bytes["cache"] = nc.memory.nbytes()
                if mb is not None:
                    mem_bytes["mbpa"] = mb.memory.nbytes()
    finally:
        model.train(was_training)
    return TestTimeScores(nll_sum.cpu().numpy(), count.cpu().numpy(), thetas, cache_lambdas, mbpa_lambdas,
                          seconds=time.monotonic() - t0, memory_bytes=mem_bytes)


@torch.no_grad()
def training_pairs(model, tokens: np.ndarray, n: int, *, bptt: int, device, with_lse: bool):
    """The model's (final activation, next word) pairs over the last ``n + 1`` tokens of ``tokens``,
    read as one stream from a fresh state: keys ``(n', D)``, values ``(n',)`` and, with ``with_lse``,
    each key's log-normaliser (``n' = min(n, len(tokens) − 1)``)."""
    tail = torch.as_tensor(np.asarray(tokens[-(n + 1):], dtype=np.int64), device=device)
    state = model.init_state(1, device)
    keys, values, lses = [], [], []
    for start in range(0, tail.numel() - 1, bptt):
        x = tail[start : start + bptt][None]
        y = tail[start + 1 : start + 1 + bptt]
        x = x[:, : y.numel()]
        h, state = model.hidden_states(x, state)
        h = h[0]
        keys.append(h)
        values.append(y)
        if with_lse:
            lses.append(torch.logsumexp(model.output.logits(h).double(), -1))
    return torch.cat(keys), torch.cat(values), (torch.cat(lses) if with_lse else None)


def _tune_scores(model, tokens, *, cache, mbpa, thetas, lambdas, **kw) -> TestTimeScores:
    return score_test_time(model, tokens, cache=cache, mbpa=mbpa, thetas=thetas if cache else None,
                           cache_lambdas=lambdas if cache else None, mbpa_lambdas=lambdas if mbpa else None, **kw)


def evaluate_methods(
    checkpoint,
    *,
    data=None,
    split: str = "test",
    batch_size: int = 16,
    streams: int | None = None,
    bptt: int | None = None,
    buckets: FrequencyBuckets = FrequencyBuckets(),
    device: str = "auto",
    max_tokens: int = 0,
    cache: CacheConfig | None = None,
    mbpa: MbPAConfig | None = None,
    dynamic=None,
    tune: bool = False,
    thetas=DEFAULT_THETAS,
    lambdas=DEFAULT_LAMBDAS,
    progress: bool = False,
    word_probs=None,
) -> tuple[dict, dict]:
    """Every requested method side by side on ``split``: ``({method: PerplexityReport}, meta)``.

    Methods: ``plain``, ``+cache``, ``+mbpa``, ``+cache+mbpa`` (when both are on) and
    ``+dynamic``. With ``tune``, θ, λ_c and λ_m are chosen on the valid split (one pass over it for
    the whole grid), the dynamic learning rate from a grid around ``dynamic.lr`` (one pass each),
    and the requested split is scored with the chosen values. ``word_probs``: a file to write every
    method's per-token log-probabilities to (perplexity.TokenLogProbs), recorded by the same
    passes that produce the reports.
    """
    from dataclasses import asdict, replace
    from pathlib import Path

    from lmmem.data.corpus import PreparedCorpus
    from lmmem.evaluation.dynamic import score_dynamic, tune_dynamic
    from lmmem.checkpoints import check_vocab_matches, data_dir_for, load_checkpoint, model_from_checkpoint
    from lmmem.device import resolve_device

    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint, map_location=dev)
    data_dir = data_dir_for(ckpt, data, checkpoint)
    corpus = PreparedCorpus.open(data_dir)
    check_vocab_matches(ckpt, corpus.fingerprint, data_dir, checkpoint)
    model = model_from_checkpoint(ckpt, dev)
    bptt = bptt or int(ckpt["train_config"]["bptt"])
    bucket_of = buckets.assign(corpus.train_counts())
    if dynamic is not None and streams and streams != batch_size:
        raise LmmemError("--dynamic adapts one copy of the model shared by the rows of a batch, so its result depends on "
                         "--batch-size and cannot follow --streams; drop --streams (or use --batch-size 1, Krause et al.'s setting)")
    common = dict(bucket_of=bucket_of, num_buckets=len(buckets.names), batch_size=batch_size, streams=streams,
                  bptt=bptt, device=dev, max_tokens=max_tokens, progress=progress,
                  train_tokens=corpus.tokens("train") if (mbpa is not None and mbpa.train_pairs) else None)
    meta: dict = {"tuned": None}
    if tune and (cache or mbpa):
        val = _tune_scores(model, corpus.tokens("valid"), cache=cache, mbpa=mbpa, thetas=thetas, lambdas=lambdas,
                           desc="tune (valid)", **common)
        choice = {}
        if cache:
            choice["+cache"] = val.best(cache=True, mbpa=False)
            cache = replace(cache, theta=choice["+cache"]["theta"], lam=choice["+cache"]["cache_lambda"])
        if mbpa:
            choice["+mbpa"] = val.best(cache=False, mbpa=True)
            mbpa = replace(mbpa, lam=choice["+mbpa"]["mbpa_lambda"])
        if cache and mbpa:
            choice["+cache+mbpa"] = val.best(cache=True, mbpa=True)
        meta["tuned"] = {"split": "valid", "thetas": list(thetas), "lambdas": list(lambdas), "choice": choice,
                         "valid_perplexity": {m: val.report(buckets, **c).perplexity for m, c in choice.items()}}
    if tune and dynamic is not None:
        dynamic, grid = tune_dynamic(model, corpus.tokens("valid"), dynamic, batch_size=batch_size, bptt=bptt, device=dev,
                                     train_tokens=corpus.tokens("train") if dynamic.method == "rms" else None,
                                     max_tokens=max_tokens)
        tuned = meta["tuned"] or {"split": "valid", "choice": {}, "valid_perplexity": {}}
        tuned["choice"]["+dynamic"] = {"lr": grid["lr"]}
        tuned["valid_perplexity"]["+dynamic"] = grid["valid_perplexity"][str(grid["lr"])]
        tuned["dynamic_lr_grid"] = grid["valid_perplexity"]
        meta["tuned"] = tuned
    tokens = corpus.tokens(split)
    collector = TokenLogProbs(tokens, max_tokens) if word_probs else None
    reports: dict = {}
    params: dict = {}
    if cache or mbpa:
        tt = cache_choice = mbpa_choice = both_choice = None
        th, lcs, lms = [], [0.0], [0.0]
        cache_choice = dict(theta=cache.theta, cache_lambda=cache.lam, mbpa_lambda=0.0) if cache else None
        mbpa_choice = dict(theta=th[0] if th else None, cache_lambda=0.0, mbpa_lambda=mbpa.lam) if mbpa else None
        if cache and mbpa:
            both_choice = (meta["tuned"] or {}).get("choice", {}).get("+cache+mbpa") or dict(
                theta=cache.theta, cache_lambda=cache.lam, mbpa_lambda=mbpa.lam)
        for c in (cache_choice, mbpa_choice, both_choice):
            if c:
                if c["theta"] is not None:
                    th.append(c["theta"])
                lcs.append(c["cache_lambda"])
                lms.append(c["mbpa_lambda"])
        th = sorted(set(th)) or None
        on_scores = None
        if collector is not None:
            g_th, g_lc, g_lm = score_grid(cache, mbpa, th, lcs, lms)  # the grid the pass below scores

            def grid_index(c):
                return (g_th.index(c["theta"]) if c["theta"] is not None else 0, g_lc.index(c["cache_lambda"]),
                        g_lm.index(c["mbpa_lambda"]))

            picks = {"plain": (0, 0, 0)}  # λ_c = λ_m = 0 sort first
            for m, c in (("+cache", cache_choice), ("+mbpa", mbpa_choice), ("+cache+mbpa", both_choice)):
                if c:
                    picks[m] = grid_index(c)
            hooks = [(collector.hook(m), i) for m, i in picks.items()]

            def on_scores(positions, log_probs):
                for hook, i in hooks:
                    hook(positions, log_probs[i])
        tt = score_test_time(model, tokens, cache=cache, mbpa=mbpa, thetas=th, cache_lambdas=lcs, mbpa_lambdas=lms,
                             desc=split, on_scores=on_scores, **common)
        theta0 = th[0] if th else None
        reports["plain"] = tt.report(buckets, theta=theta0)
        if cache_choice:
            reports["+cache"] = tt.report(buckets, **cache_choice)
            params["+cache"] = {**asdict(cache), "theta": cache_choice["theta"], "lam": cache_choice["cache_lambda"]}
        if mbpa_choice:
            mbpa_choice["theta"] = theta0
            reports["+mbpa"] = tt.report(buckets, **mbpa_choice)
            params["+mbpa"] = asdict(mbpa)
        if both_choice:
            reports["+cache+mbpa"] = tt.report(buckets, **both_choice)
            params["+cache+mbpa"] = {"cache": {**asdict(cache), "theta": both_choice["theta"], "lam": both_choice["cache_lambda"]},
                                     "mbpa": {**asdict(mbpa), "lam": both_choice["mbpa_lambda"]}}
        meta["memory_bytes"] = tt.memory_bytes
        meta["memory_seconds"] = round(tt.seconds, 3)
    else:
        from lmmem.evaluation.perplexity import score_stream

        plain_hook = collector.hook("plain") if collector is not None else None
        if streams and streams != batch_size:
            tt = score_test_time(model, tokens, desc=split,
                                 on_scores=(lambda p, lp: plain_hook(p, lp[0, 0, 0])) if plain_hook else None, **common)
            reports["plain"] = tt.report(buckets)
        else:
            nll, cnt = score_stream(model, tokens, bucket_of=bucket_of, num_buckets=len(buckets.names),
                                    batch_size=batch_size, bptt=bptt, device=dev, max_tokens=max_tokens,
                                    progress=progress, desc=split, on_scores=plain_hook)
            reports["plain"] = PerplexityReport.from_sums(nll, cnt, buckets)
    if dynamic is not None:
        train = corpus.tokens("train") if dynamic.method == "rms" else None
        nll, cnt = score_dynamic(model, tokens, bucket_of=bucket_of, num_buckets=len(buckets.names), cfg=dynamic,
                                 batch_size=batch_size, bptt=bptt, device=dev, train_tokens=train, max_tokens=max_tokens,
                                 on_scores=collector.hook("+dynamic") if collector is not None else None)
        reports["+dynamic"] = PerplexityReport.from_sums(nll, cnt, buckets)
        if not math.isfinite(reports["+dynamic"].perplexity):
            raise LmmemError(f"dynamic evaluation diverged on {split} (perplexity {reports['+dynamic'].perplexity}) at "
                             f"--dynamic-lr {dynamic.lr}; give a smaller one, or --tune to choose it on the valid split")
        params["+dynamic"] = asdict(dynamic)
    meta.update({"checkpoint": str(checkpoint), "data": str(data_dir), "split": split, "step": ckpt["progress"]["step"],
                 "model": ckpt["model_config"], "vocab_fingerprint": corpus.fingerprint, "batch_size": batch_size,
                 "streams": streams or batch_size, "bptt": bptt, "bucket_edges": list(buckets.edges), "device": str(dev),
                 "method_params": params})
    if collector is not None:
        rows = collector.write(word_probs, vocab=corpus.vocab.tokens, train_counts=corpus.train_counts(), buckets=buckets)
        meta["word_probs"] = {"path": str(word_probs), "rows": rows, "columns": list(collector.log_probs)}
    return reports, meta
