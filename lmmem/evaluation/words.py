"""Word-level perplexity for subword (SentencePiece) vocabularies.

A model over SentencePiece pieces is scored per piece; to compare it with word-level models, and
to bucket it by *word* frequency as Rae et al. (2018) do, its numbers are also given per word:

* A word is a piece that starts with SentencePiece's word-boundary marker ``▁`` (U+2581), with the
  pieces without the marker that follow it; ``<eos>`` is a word of its own (as in word-level
  vocabularies), and the first piece of a unit starts a word whatever it looks like.
  SentencePiece puts ``▁`` where the text had a space, so these are *whitespace-delimited* words:
  punctuation written against a word is part of it (``▁Emma`` ``,`` is the word ``Emma,``), unlike
  the regex rule of the word-level corpora, which makes the comma a token of its own. Word counts
  and perplexities of the two kinds of corpora are therefore close but not identical units.
* ``log p(word)`` is the sum of its pieces' log-probabilities (the chain rule: exact, not an
  approximation). Word perplexity is ``exp(−Σ_words log p(word) / number of words)``; since every
  scored piece belongs to exactly one word, the total NLL is the same as the piece-level one and
  only the count it is divided by changes.
* A word is counted only if all its pieces were scored (the stream's first token is context only,
  so a word it begins is left out, as is one cut by ``--max-tokens``).
* Frequency buckets use the word's count in the training split (the same segmentation of the
  train pieces); a word never seen in training counts 0.

Memory: one float64 per token of the split for the per-piece NLLs, and a table of the training
words (bytes of their piece ids) with their counts.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from lmmem.data.vocab import EOS
from lmmem.evaluation.buckets import FrequencyBuckets, PerplexityReport

WORD_BOUNDARY = "\u2581"  # SentencePiece's marker of a piece that begins a word


def word_starts(tokens: np.ndarray, starts_word: np.ndarray, eos_id: int | None) -> np.ndarray:
    """Whether each token begins a word: its piece carries ``▁``, it is ``<eos>``, or it follows one."""
    tokens = np.asarray(tokens)
    start = starts_word[tokens].copy()
    if len(start):
        start[0] = True
    if eos_id is not None and len(tokens) > 1:
        start[1:] |= tokens[:-1] == eos_id
    return start


def piece_start_table(pieces: list[str]) -> np.ndarray:
    """Per vocabulary entry: does a piece with this id begin a word by itself (``▁…`` or ``<eos>``)."""
    return np.fromiter((p.startswith(WORD_BOUNDARY) or p == EOS for p in pieces), dtype=bool, count=len(pieces))


def word_counts(tokens: np.ndarray, starts_word: np.ndarray, eos_id: int | None) -> Counter:
    """Training count of every word (keyed by the bytes of its piece ids)."""
    ids = np.ascontiguousarray(tokens, dtype="<u4")
    bounds = np.flatnonzero(word_starts(ids, starts_word, eos_id))
    ends = np.append(bounds[1:], len(ids))
    raw = ids.tobytes()
    return Counter(raw[4 * a : 4 * e] for a, e in zip(bounds.tolist(), ends.tolist()))


def word_report(token_nll: np.ndarray, tokens: np.ndarray, pieces: list[str], train_words: Counter,
                buckets: FrequencyBuckets, eos_id: int | None) -> PerplexityReport:
    """Per-word perplexity, overall and by the word's training count, from per-piece NLLs
    (``token_nll[i]`` = −log p(token i | tokens before it), NaN where token i was not scored)."""
    ids = np.ascontiguousarray(tokens, dtype="<u4")
    bounds = np.flatnonzero(word_starts(ids, piece_start_table(pieces), eos_id))
    ends = np.append(bounds[1:], len(ids))
    nll = np.add.reduceat(np.asarray(token_nll, dtype=np.float64), bounds) if len(bounds) else np.zeros(0)
    scored = ~np.isnan(nll)  # NaN: a piece of the word was not scored
    raw = ids.tobytes()
    counts = np.fromiter((train_words.get(raw[4 * a : 4 * e], 0) for a, e in zip(bounds[scored].tolist(), ends[scored].tolist())),
                         dtype=np.int64, count=int(scored.sum()))
    bucket = buckets.assign(counts)
    k = len(buckets.names)
    sums = np.bincount(bucket, weights=nll[scored], minlength=k)
    n = np.bincount(bucket, minlength=k).astype(np.float64)
    return PerplexityReport.from_sums(sums, n, buckets)


def grouped_word_report(token_nll: np.ndarray, word_of: np.ndarray, word_count: np.ndarray,
                        buckets: FrequencyBuckets) -> PerplexityReport:
    """Per-word perplexity when the word of every token is known (``word_of[i]``, non-decreasing:
    a tokenizer's tokens mapped to the whitespace words of the text, lmmem.evaluation.text) and
    each word's training count (``word_count[w]``). A word's NLL is the sum of its tokens'; a word
    with a token not scored (NaN) is left out."""
    word_of = np.asarray(word_of)
    if not len(word_of):
        return PerplexityReport.from_sums(np.zeros(len(buckets.names)), np.zeros(len(buckets.names)), buckets)
    bounds = np.flatnonzero(np.r_[True, word_of[1:] != word_of[:-1]])
    nll = np.add.reduceat(np.asarray(token_nll, dtype=np.float64), bounds)
    scored = ~np.isnan(nll)
    bucket = buckets.assign(np.asarray(word_count)[word_of[bounds][scored]])
    k = len(buckets.names)
    sums = np.bincount(bucket, weights=nll[scored], minlength=k)
    n = np.bincount(bucket, minlength=k).astype(np.float64)
    return PerplexityReport.from_sums(sums, n, buckets)
