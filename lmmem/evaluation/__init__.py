"""Evaluation: perplexity overall and by training-frequency bucket, tables, JSON and charts."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmmem.data.corpus import PreparedCorpus
from lmmem.errors import LmmemError
from lmmem.evaluation.perplexity import (
    DEFAULT_BUCKET_EDGES, FrequencyBuckets, PerplexityReport, TokenLogProbs, autocast_context, score_stream,
)
from lmmem.evaluation.report import format_table, plot_bucketed_perplexity, write_json
from lmmem.evaluation.test_time import TestTimeScores, evaluate_methods, score_test_time
from lmmem.evaluation.dynamic import DynamicConfig, score_dynamic
from lmmem.checkpoints import check_vocab_matches, data_dir_for, load_checkpoint, model_from_checkpoint
from lmmem.device import resolve_device


@dataclass
class EvalResult:
    report: PerplexityReport
    meta: dict
    words: PerplexityReport | None = None  # per word, for a SentencePiece corpus (lmmem.evaluation.words)

    def to_dict(self) -> dict:
        out = {**self.meta, **self.report.to_dict()}
        if self.words is not None:
            out["words"] = self.words.to_dict()
        return out


def _nll_into(token_nll: np.ndarray | None):
    """An ``on_scores`` hook storing each scored target's NLL at its position (None: no hook)."""
    if token_nll is None:
        return None

    def on_scores(positions: np.ndarray, log_probs) -> None:
        token_nll[positions] = -log_probs.detach().double().cpu().numpy()

    return on_scores


def _hooks(*hooks):
    """One ``on_scores`` hook calling each given one (None entries skipped)."""
    live = [h for h in hooks if h is not None]
    if not live:
        return None
    return live[0] if len(live) == 1 else (lambda positions, log_probs: [h(positions, log_probs) for h in live] and None)


def _word_level(corpus: PreparedCorpus, tokens, token_nll, buckets: FrequencyBuckets) -> PerplexityReport | None:
    """Per-word numbers of a SentencePiece corpus, the words' training counts from its train split
    (or, for text encoded with ``--vocab-from``, from the train split of the corpus it names)."""
    from lmmem.evaluation.words import piece_start_table, word_counts, word_report

    train_corpus = corpus
    origin = (corpus.meta.get("vocab_from") or {}).get("corpus")
    if "train" not in corpus.splits and origin and (Path(origin) / "meta.json").is_file():
        train_corpus = PreparedCorpus.open(origin)
    if "train" not in train_corpus.splits or train_corpus.fingerprint != corpus.fingerprint:
        return None  # no training words to bucket by: the per-piece numbers only
    pieces = corpus.vocab.tokens
    train_words = word_counts(train_corpus.tokens("train"), piece_start_table(pieces), corpus.vocab.eos_id)
    return word_report(token_nll, tokens, pieces, train_words, buckets, corpus.vocab.eos_id)


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data: str | Path | None = None,
    split: str = "test",
    batch_size: int = 16,
    bptt: int | None = None,
    buckets: FrequencyBuckets = FrequencyBuckets(),
    device: str = "auto",
    max_tokens: int = 0,
    progress: bool = False,
    context: int = 0,
    word_probs: str | Path | None = None,
) -> EvalResult:
    """Perplexity of a trained checkpoint on a split of a prepared corpus (the corpus it was
    trained on by default), overall and by the target's training frequency.

    ``context`` C > 0: sliding-window scoring of a Transformer (score_stream); windows of ``bptt``
    inputs advance by ``bptt − C``. ``word_probs``: also write every scored token's
    log-probability to this file (TokenLogProbs.write)."""
    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint, map_location=dev)
    data_dir = data_dir_for(ckpt, data, checkpoint)
    corpus = PreparedCorpus.open(data_dir)
    check_vocab_matches(ckpt, corpus.fingerprint, data_dir, checkpoint)
    tokens = corpus.tokens(split)
    model = model_from_checkpoint(ckpt, dev)
    bptt = bptt or int(ckpt["train_config"]["bptt"])
    stride = bptt
    if context:
        if not 0 < context < bptt:
            raise LmmemError(f"--context {context} must be between 1 and --bptt − 1 = {bptt - 1} (each window of --bptt {bptt} "
                             f"inputs scores bptt − context new tokens); raise --bptt (at most the model's context) or lower --context")
        stride = bptt - context
    collector = TokenLogProbs(tokens, max_tokens) if word_probs else None
    t0 = time.monotonic()
    tok = corpus.meta.get("tokenizer")
    subword = isinstance(tok, dict) and tok.get("type") == "sentencepiece"
    token_nll = np.full(len(tokens), np.nan) if subword else None  # per piece, for the word-level numbers
    nll, cnt = score_stream(
        model, tokens, bucket_of=buckets.assign(corpus.train_counts()), num_buckets=len(buckets.names),
        batch_size=batch_size, bptt=stride, device=dev, max_tokens=max_tokens, progress=progress, desc=f"{split}",
        context=context, on_scores=_hooks(collector.hook("plain") if collector else None, _nll_into(token_nll)),
    )
    report = PerplexityReport.from_sums(nll, cnt, buckets)
    words = _word_level(corpus, tokens, token_nll, buckets) if subword else None
    meta = {
        "checkpoint": str(checkpoint),
        "data": str(data_dir),
        "split": split,
        "step": ckpt["progress"]["step"],
        "model": ckpt["model_config"],
        "vocab_fingerprint": corpus.fingerprint,
        "batch_size": batch_size,
        "bptt": bptt,
        "context": context,
        "bucket_edges": list(buckets.edges),
        "device": str(dev),
        "seconds": round(time.monotonic() - t0, 3),
    }
    if collector is not None:
        rows = collector.write(word_probs, vocab=corpus.vocab.tokens, train_counts=corpus.train_counts(), buckets=buckets)
        meta["word_probs"] = {"path": str(word_probs), "rows": rows, "columns": list(collector.log_probs)}
    return EvalResult(report, meta, words)


__all__ = [
    "DEFAULT_BUCKET_EDGES", "DynamicConfig", "EvalResult", "FrequencyBuckets", "PerplexityReport", "TokenLogProbs", "evaluate_checkpoint",
    "TestTimeScores", "autocast_context", "evaluate_methods", "format_table", "plot_bucketed_perplexity", "score_dynamic", "score_stream",
    "score_test_time", "write_json",
]
