"""The text an evaluation scores, as the model reads it, with what the sinks need around it.

* :class:`CorpusData`: an lmmem model on a prepared corpus: the split's token ids as they are,
  buckets by the target's vocabulary entry; for a SentencePiece corpus also the per-word numbers
  (lmmem.evaluation.words).
* :class:`TokenizedText`: a model with its own tokenizer (Hugging Face) on a prepared corpus or a
  text source (lmmem.evaluation.text): the documents encoded with the tokenizer, every token
  bucketed by the training count of the whole word it belongs to, per-word numbers from the fast
  tokenizer's offsets, and per-document word and byte counts (lm-evaluation-harness's).

Both give :class:`SplitData` for a split.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lmmem.data.corpus import PreparedCorpus
from lmmem.errors import LmmemError
from lmmem.evaluation.buckets import FrequencyBuckets, PerplexityReport
from lmmem.evaluation.sinks import VocabLabels
from lmmem.evaluation.text import NEWLINE_WORD, TextStream, corpus_documents, corpus_word_counts, encode_documents, word_counts


@dataclass
class SplitData:
    tokens: np.ndarray
    bucket_of_vocab: np.ndarray | None = None
    bucket_of_position: np.ndarray | None = None
    stream: TextStream | None = None  # documents (lm-eval windows, byte counts) of tokenized text
    words: Callable[[np.ndarray], PerplexityReport] | None = None  # token NLLs by position -> per-word report
    labels: Any = None  # rows of --word-probs
    info: dict = field(default_factory=dict)


def _is_sentencepiece(corpus: PreparedCorpus) -> bool:
    tok = corpus.meta.get("tokenizer")
    return isinstance(tok, dict) and tok.get("type") == "sentencepiece"


class CorpusData:
    """An lmmem model's prepared corpus."""

    def __init__(self, corpus: PreparedCorpus, buckets: FrequencyBuckets):
        self.corpus, self.buckets = corpus, buckets

    def describe(self) -> dict:
        return {"data": str(self.corpus.root), "vocab_fingerprint": self.corpus.fingerprint}

    def split(self, name: str, *, max_tokens: int = 0, convention: str = "bptt") -> SplitData:
        tokens = self.corpus.tokens(name)
        if max_tokens:
            tokens = tokens[: max_tokens + 1]
        counts = self.corpus.train_counts()
        data = SplitData(tokens, bucket_of_vocab=self.buckets.assign(counts),
                         labels=VocabLabels(tokens, self.corpus.vocab.tokens, counts, self.buckets))
        if _is_sentencepiece(self.corpus):
            data.words = self._word_report(tokens)
        return data

    def _word_report(self, tokens: np.ndarray):
        """Per-word numbers of a SentencePiece corpus, the words' training counts from its train split
        (or, for text encoded with ``--vocab-from``, from the train split of the corpus it names)."""
        from lmmem.evaluation.words import piece_start_table, word_counts as piece_word_counts, word_report

        corpus = self.corpus
        train_corpus = corpus
        origin = (corpus.meta.get("vocab_from") or {}).get("corpus")
        if "train" not in corpus.splits and origin and (Path(origin) / "meta.json").is_file():
            train_corpus = PreparedCorpus.open(origin)
        if "train" not in train_corpus.splits or train_corpus.fingerprint != corpus.fingerprint:
            return None  # no training words to bucket by: the per-piece numbers only
        pieces, eos = corpus.vocab.tokens, corpus.vocab.eos_id
        train_words = piece_word_counts(train_corpus.tokens("train"), piece_start_table(pieces), eos)
        return lambda token_nll: word_report(token_nll, tokens, pieces, train_words, self.buckets, eos)

    def train_tokens(self) -> np.ndarray:
        return self.corpus.tokens("train")


class HFLabels:
    """Rows of ``--word-probs`` for tokenized text: the token, the word it belongs to (``<eos>``
    for a line break), the word's training count and bucket."""

    def __init__(self, tokenizer, stream: TextStream, word_count: np.ndarray, buckets: FrequencyBuckets):
        self.tokenizer, self.stream, self.count = tokenizer, stream, word_count
        self.bucket_of, self.names = buckets.assign(word_count), buckets.names

    def row(self, i: int) -> dict:
        w = int(self.stream.word_of[i]) if self.stream.word_of is not None else None
        token = self.tokenizer.convert_ids_to_tokens(int(self.stream.ids[i]))
        if w is None:
            return {"token": token}
        word = self.stream.words[w]
        return {"token": token, "word": "<eos>" if word == NEWLINE_WORD else word, "train_count": int(self.count[w]),
                "bucket": self.names[self.bucket_of[w]]}


class TokenizedText:
    """Documents of a prepared corpus or a text source, encoded with a model's tokenizer."""

    def __init__(self, source, tokenizer, buckets: FrequencyBuckets, *, text_column: str = "text", hub_config: str | None = None):
        if tokenizer is None:
            raise LmmemError("this model reads text through its tokenizer, and none was given: save it beside the model "
                             "(tokenizer.save_pretrained(MODEL_FOLDER)) or pass tokenizer=...")
        self.source, self.tokenizer, self.buckets = source, tokenizer, buckets
        self.text_column, self.hub_config = text_column, hub_config
        self._counts: Counter | None = None

    def describe(self) -> dict:
        if isinstance(self.source, PreparedCorpus):
            return {"data": str(self.source.root), "text": "prepared corpus units"}
        return {"data": str(self.source), "text_column": self.text_column, "hub_config": self.hub_config}

    def documents(self, split: str):
        if isinstance(self.source, PreparedCorpus):
            return corpus_documents(self.source, split)
        from lmmem.data.text_reading import iter_documents

        return iter_documents(str(self.source), split, text_column=self.text_column, hub_config=self.hub_config)

    def train_word_counts(self) -> Counter:
        """Whole-word training counts (empty when the source has no train split)."""
        if self._counts is None:
            if isinstance(self.source, PreparedCorpus):
                self._counts = corpus_word_counts(self.source) if "train" in self.source.splits else Counter()
            else:
                try:
                    self._counts = word_counts(self.documents("train"))
                except LmmemError:
                    self._counts = Counter()  # no train split: every word counts 0
        return self._counts

    def split(self, name: str, *, max_tokens: int = 0, convention: str = "bptt") -> SplitData:
        from lmmem.evaluation.hf_adapter import prefix_token_id
        from lmmem.evaluation.words import grouped_word_report

        lm_eval = convention == "lm-eval"
        fast = bool(getattr(self.tokenizer, "is_fast", False))
        stream = encode_documents(self.documents(name), self.tokenizer, words=fast, max_tokens=max_tokens,
                                  special_tokens="lm-eval" if lm_eval else "none",
                                  prefix=prefix_token_id(self.tokenizer) if lm_eval else None)
        if max_tokens and not lm_eval and len(stream.ids) > max_tokens + 1:
            stream = _truncated(stream, max_tokens + 1)
        info = {"documents": stream.documents, "bytes": int(stream.doc_bytes.sum())}
        if not fast:
            return SplitData(stream.ids, bucket_of_vocab=np.zeros(max(self.tokenizer.vocab_size, len(self.tokenizer)), dtype=np.int64),
                             stream=stream, info={**info, "words": "no fast tokenizer: no word-level numbers, one bucket"})
        counts = self.train_word_counts()
        word_count = np.fromiter((counts.get(w, 0) for w in stream.words), dtype=np.int64, count=len(stream.words))
        bucket_of_word = self.buckets.assign(word_count)
        data = SplitData(stream.ids, bucket_of_position=bucket_of_word[stream.word_of], stream=stream,
                         words=lambda nll: grouped_word_report(nll, stream.word_of, word_count, self.buckets),
                         labels=HFLabels(self.tokenizer, stream, word_count, self.buckets), info=info)
        if not counts:
            data.info["buckets"] = "no train split to count words in: every word counts 0"
        return data

    def train_tokens(self) -> np.ndarray:
        return encode_documents(self.documents("train"), self.tokenizer, words=False).ids


def _truncated(stream: TextStream, n: int) -> TextStream:
    """The first ``n`` tokens (documents cut there; their word and byte counts kept whole)."""
    docs = int(np.searchsorted(stream.doc_starts, n, side="left"))
    starts = np.minimum(stream.doc_starts[: docs + 1], n)
    return TextStream(stream.ids[:n], starts, stream.word_of[:n] if stream.word_of is not None else None, stream.words,
                      stream.doc_words[:docs], stream.doc_bytes[:docs])


def lm_eval_numbers(stream: TextStream, log_probs: np.ndarray) -> dict:
    """lm-evaluation-harness's wikitext metrics from per-token log-probabilities (every token of
    the documents scored): ``word_perplexity = exp(−Σ ll / Σ words)``, ``byte_perplexity =
    exp(−Σ ll / Σ bytes)``, ``bits_per_byte = −Σ ll / Σ bytes / ln 2``."""
    total = float(np.sum(log_probs[: stream.doc_starts[-1]]))
    words, nbytes = int(stream.doc_words.sum()), int(stream.doc_bytes.sum())
    return {"documents": stream.documents, "words": words, "bytes": nbytes, "loglikelihood": total,
            "word_perplexity": _exp(-total / words), "byte_perplexity": _exp(-total / nbytes),
            "bits_per_byte": -total / nbytes / math.log(2)}


def byte_numbers(stream: TextStream, log_probs: np.ndarray) -> dict:
    """Bits per byte of the text: the NLL of every scored token over the UTF-8 bytes of the documents."""
    scored = log_probs[~np.isnan(log_probs)]
    total, nbytes = float(scored.sum()), int(stream.doc_bytes.sum())
    return {"bytes": nbytes, "byte_perplexity": _exp(-total / nbytes), "bits_per_byte": -total / nbytes / math.log(2)}


def _exp(x: float) -> float | None:
    return math.exp(x) if x < 700 else None
