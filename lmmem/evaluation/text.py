"""Text for a model with its own tokenizer: documents → one token stream, with the words and bytes
behind it.

Documents come from a prepared corpus (:meth:`PreparedCorpus.text_units`: each unit, a line or
paragraph, is one document, its tokens joined by spaces and ``<unk>`` kept, followed by a line
break) or from a text source (lmmem.data.text_reading: each row's units). So a Hugging Face model
and an lmmem model score exactly the same text, and the whitespace words of that text are the
prepared corpus's word tokens: their word-level numbers compare directly.

*Words* are the text's whitespace-separated runs plus every line break (the unit's end: the
``<eos>`` token of a prepared corpus). A token belongs to the first word that ends after the
token's first character: the word it starts in, or, for a token of spaces only (or a special
token with an empty span), the next word — as SentencePiece attaches the space to the word after
it. This needs the fast tokenizer's offsets. A word that got no token of its own (a tokenizer that
merges across a space) is not counted. The training count of a word is its count in the train
split's text, the line break's the number of training units.

lm-evaluation-harness counts per document ``len(re.split(r"\\s+", doc))`` words and
``len(doc.encode("utf-8"))`` bytes (its wikitext task): :class:`TextStream` keeps both per
document for the ``lm-eval`` convention's ``word_perplexity``, ``byte_perplexity`` and
``bits_per_byte``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from lmmem.errors import LmmemError

WORD_RE = re.compile(r"[^\s]+|\n")
NEWLINE_WORD = "\n"
ENCODE_BATCH = 512  # documents per tokenizer call


@dataclass
class TextStream:
    ids: np.ndarray  # (n,) int64 token ids, documents one after another
    doc_starts: np.ndarray  # (documents + 1,) stream index of each document's first token, then n
    word_of: np.ndarray | None  # (n,) index into ``words`` of the word each token belongs to
    words: list[str] | None  # every word of the text, in order
    doc_words: np.ndarray  # (documents,) lm-eval's word count
    doc_bytes: np.ndarray  # (documents,) UTF-8 bytes

    @property
    def documents(self) -> int:
        return len(self.doc_starts) - 1


def lm_eval_special_tokens(tokenizer, doc: str, prefix: int) -> bool:
    """lm-evaluation-harness's ``tok_encode`` for a rolling loglikelihood: the tokenizer's own
    special tokens, unless the document already starts with the prefix token's text."""
    text = tokenizer.decode(prefix)
    return not (text and doc.startswith(text))


def encode_documents(documents: Iterable[str], tokenizer, *, words: bool = True, max_tokens: int = 0,
                     special_tokens: str = "none", prefix: int | None = None) -> TextStream:
    """Tokenize every document (``special_tokens="none"``: none added; ``"lm-eval"``: as
    lm-evaluation-harness does) into one stream. ``words``: map tokens to words (fast tokenizer
    offsets). ``max_tokens``: stop after the document that reaches ``max_tokens + 1`` tokens."""
    if words and not getattr(tokenizer, "is_fast", False):
        raise LmmemError(f"{type(tokenizer).__name__} is not a fast tokenizer: the word-level numbers need its offsets; "
                         "load the model's tokenizer with use_fast=True (AutoTokenizer's default)")
    ids, starts, word_of, word_list, doc_words, doc_bytes = [], [0], [], [], [], []
    total = 0
    for batch in _batches(documents, ENCODE_BATCH):
        flags = [special_tokens == "lm-eval" and lm_eval_special_tokens(tokenizer, d, prefix) for d in batch]
        encoded = _encode(tokenizer, batch, flags, offsets=words)
        for doc, (doc_ids, offsets) in zip(batch, encoded):
            ids.append(np.asarray(doc_ids, dtype=np.int64))
            total += len(doc_ids)
            starts.append(total)
            doc_words.append(len(re.split(r"\s+", doc)))
            doc_bytes.append(len(doc.encode("utf-8")))
            if words:
                word_of.append(_words_of_tokens(doc, offsets, word_list))
            if max_tokens and total >= max_tokens + 1:
                break
        if max_tokens and total >= max_tokens + 1:
            break
    if not total:
        raise LmmemError("the text has no tokens to score")
    return TextStream(np.concatenate(ids), np.asarray(starts, dtype=np.int64),
                      np.concatenate(word_of) if words else None, word_list if words else None,
                      np.asarray(doc_words, dtype=np.int64), np.asarray(doc_bytes, dtype=np.int64))


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _encode(tokenizer, docs: list[str], specials: list[bool], *, offsets: bool) -> list[tuple[list[int], list]]:
    out: list = [None] * len(docs)
    for flag in (False, True):
        idx = [i for i, s in enumerate(specials) if s == flag]
        if not idx:
            continue
        enc = tokenizer([docs[i] for i in idx], add_special_tokens=flag, return_offsets_mapping=offsets,
                        return_attention_mask=False)
        for j, i in enumerate(idx):
            out[i] = (enc["input_ids"][j], enc["offset_mapping"][j] if offsets else None)
    return out


def _words_of_tokens(doc: str, offsets, word_list: list[str]) -> np.ndarray:
    """Global word index of each token of ``doc`` (appending the document's words to ``word_list``)."""
    spans = [(m.end(), m.group()) for m in WORD_RE.finditer(doc)]
    base = len(word_list)
    word_list.extend(w for _, w in spans)
    if not spans:
        return np.full(len(offsets), max(base - 1, 0), dtype=np.int64)
    ends = np.asarray([e for e, _ in spans], dtype=np.int64)
    starts = np.asarray([a for a, _ in offsets], dtype=np.int64) if len(offsets) else np.zeros(0, dtype=np.int64)
    local = np.minimum(np.searchsorted(ends, starts, side="right"), len(spans) - 1)
    return base + local


def word_counts(documents: Iterable[str]) -> Counter:
    """Training count of every word of the documents (a line break counts as the word ``\\n``)."""
    counts: Counter = Counter()
    for doc in documents:
        counts.update(WORD_RE.findall(doc))
    return counts


def corpus_documents(corpus, split: str) -> Iterator[str]:
    """A prepared corpus's split as documents: one unit (its tokens as text) plus a line break each."""
    for unit in corpus.text_units(split):
        yield unit + "\n"


def corpus_word_counts(corpus) -> Counter:
    """Training counts of the corpus's words as text: the vocabulary's own counts for a word
    vocabulary (its tokens are the whitespace words of the text), else counted from the train text."""
    tok = corpus.meta.get("tokenizer")
    if isinstance(tok, dict) and tok.get("type") == "sentencepiece":
        return word_counts(corpus_documents(corpus, "train"))
    counts = Counter(dict(zip(corpus.vocab.tokens, map(int, corpus.vocab.counts))))
    eos = corpus.vocab.tokens[corpus.vocab.eos_id] if corpus.vocab.eos_id is not None else None
    if eos is not None:
        counts[NEWLINE_WORD] = counts.pop(eos)
    return counts
