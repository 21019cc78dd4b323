"""Word vocabularies in a single pass over the text, in bounded memory (the ``words`` encoder).

1. *Encode with provisional ids.* Each ~1 MiB batch of text is tokenised and every token is
   mapped to a provisional id (its type's first-seen rank) with one C-level dict lookup per token;
   the ids go straight to ``.{split}.bin.tmp`` as uint32. Only the type table is kept in memory
   (it grows with the number of distinct types, never with the number of tokens). With
   ``--workers N`` the batches are tokenised in N processes, each with its own type table whose
   ids the main process translates with one numpy gather per batch.
2. *Count.* ``np.bincount`` over the vocabulary splits' provisional ids, in fixed-size chunks.
3. *Build the vocabulary* with :meth:`Vocabulary.from_counts` (``--min-count``, ``--max-vocab``),
   or take a given one (``--vocab-from``).
4. The writer then remaps each temp file in place (:func:`lmmem.data.id_files.finish_split`) with
   the provisional-id -> final-id table returned here (rare and unseen types -> ``<unk>``).

Because the final ids depend only on the counts (ties broken by the token string), the output is
byte-identical for any ``--workers``. Memory and speed against a naive script:
docs/results/data-prep.md (``benchmarks/bench_data_prep.py``).
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import traceback
from array import array
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from lmmem.data.encoding import EncodedSplits, TokenizerOptions, VocabOptions, check_nonempty
from lmmem.data.id_files import bincount_file, tmp_path
from lmmem.data.text_source import ReadContext, TextSource, make_progress
from lmmem.data.tokenization import EOS_TEXT, WordTokenizer
from lmmem.data.vocab import EOS, UNK, Vocabulary
from lmmem.errors import DataError

BATCH_CHARS = 1 << 20  # text handed to a tokeniser at once


class TypeIndex(dict):
    """token -> provisional id, in first-seen order; a new token gets the next id on lookup.

    ``<eos>`` is 0 and ``<unk>`` is 1 from the start, and the tokenisers' end-of-unit tokens are
    aliases of ``<eos>``, so that ``map(index.__getitem__, tokens)`` is the whole encoder.
    """

    def __init__(self):
        super().__init__({EOS: 0, UNK: 1, "\n": 0, EOS_TEXT: 0})
        self.types: list[str] = [EOS, UNK]

    def __missing__(self, token: str) -> int:
        i = len(self.types)
        self.types.append(token)
        self[token] = i
        return i


class _LocalEncoder:
    def __init__(self, tokenizer: WordTokenizer, index: TypeIndex | None = None):
        self.tokenizer = tokenizer
        self.index = index if index is not None else TypeIndex()
        self.reported = len(self.index.types)

    def encode(self, text: str) -> tuple[np.ndarray, list[str]]:
        tokens = self.tokenizer(text)
        # array('I', map(...)) is the fastest way from a token list to a uint32 buffer (one C
        # loop, no intermediate list), ~20% faster than np.fromiter here.
        ids = np.frombuffer(array("I", map(self.index.__getitem__, tokens)), dtype=np.uint32)
        new = self.index.types[self.reported:]
        self.reported = len(self.index.types)
        return ids, new


def _worker_main(tokenizer: WordTokenizer, inbox, outbox) -> None:
    encoder = _LocalEncoder(tokenizer)  # this process's own type table, kept across batches
    try:
        while (text := inbox.get()) is not None:
            outbox.put(encoder.encode(text))
    except BaseException:  # report instead of dying silently; the parent raises it
        outbox.put(traceback.format_exc())


class _GrowArray:
    """A uint32 array with amortised O(1) append (a worker's local -> global id table)."""

    def __init__(self, initial):
        self.data = np.asarray(initial, dtype=np.uint32).copy()
        self.n = len(self.data)

    def extend(self, values: list[int]) -> None:
        need = self.n + len(values)
        if need > len(self.data):
            grown = np.empty(max(need, 2 * len(self.data)), dtype=np.uint32)
            grown[: self.n] = self.data[: self.n]
            self.data = grown
        self.data[self.n:need] = values
        self.n = need

    def view(self) -> np.ndarray:
        return self.data[: self.n]


class WordEncoder:
    """Maps text batches to global provisional ids, in submission order, with 0 or N workers."""

    def __init__(self, tokenizer: WordTokenizer, workers: int = 1):
        self.index = TypeIndex()
        self.workers = max(1, int(workers))
        self.procs: list = []
        if self.workers == 1:
            self.local = _LocalEncoder(tokenizer, self.index)
            return
        # fork is fastest, but only safe while this process has a single thread.
        method = "fork" if threading.active_count() == 1 and "fork" in mp.get_all_start_methods() else "spawn"
        ctx = mp.get_context(method)
        self.inboxes = [ctx.Queue() for _ in range(self.workers)]
        self.outboxes = [ctx.Queue() for _ in range(self.workers)]
        self.maps = [_GrowArray([0, 1]) for _ in range(self.workers)]
        for w in range(self.workers):
            p = ctx.Process(target=_worker_main, args=(tokenizer, self.inboxes[w], self.outboxes[w]), daemon=True)
            p.start()
            self.procs.append(p)

    @property
    def types(self) -> list[str]:
        """Every type seen, in provisional-id order."""
        return self.index.types

    def encode(self, items: Iterable[tuple[str, str]]) -> Iterator[tuple[str, np.ndarray]]:
        if not self.procs:
            for split, text in items:
                yield split, self.local.encode(text)[0]
            return
        inflight: deque[tuple[int, str]] = deque()
        turn = 0
        for split, text in items:
            if len(inflight) >= 2 * self.workers:  # bound the text and ids in flight
                yield self._collect(*inflight.popleft())
            w = turn % self.workers
            turn += 1
            self.inboxes[w].put(text)
            inflight.append((w, split))
        while inflight:
            yield self._collect(*inflight.popleft())

    def _collect(self, w: int, split: str) -> tuple[str, np.ndarray]:
        while True:
            try:
                msg = self.outboxes[w].get(timeout=1.0)
                break
            except queue.Empty:
                if not self.procs[w].is_alive():
                    raise DataError(
                        f"tokeniser worker {w} exited with code {self.procs[w].exitcode} (out of memory?); retry with --workers 1"
                    ) from None
        if isinstance(msg, str):
            raise RuntimeError(f"tokeniser worker {w} failed:\n{msg}")
        local_ids, new_types = msg
        table = self.maps[w]
        if new_types:
            # Each worker reports its new types in its own first-seen order, and a worker's
            # results come back in the order it produced them, so this stays consistent.
            table.extend([self.index[t] for t in new_types])
        return split, table.view()[local_ids]

    def close(self, ok: bool = True) -> None:
        for w, p in enumerate(self.procs):
            if ok:
                self.inboxes[w].put(None)
        for p in self.procs:
            if ok:
                p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join()
        for q in getattr(self, "inboxes", []) + getattr(self, "outboxes", []):
            q.cancel_join_thread()
            q.close()
        self.procs = []


def batched(items: Iterable[tuple[str, str]], batch_chars: int = BATCH_CHARS) -> Iterator[tuple[str, str]]:
    """Join the readers' (split, text) pieces into ~``batch_chars`` batches per split, keeping
    each split's order (small pieces, e.g. one GigaWord story, would cost a round trip each)."""
    parts: dict[str, list[str]] = {}
    sizes: Counter = Counter()
    for split, text in items:
        if not text:
            continue
        if len(text) >= batch_chars // 2 and not parts.get(split):
            yield split, text
            continue
        parts.setdefault(split, []).append(text)
        sizes[split] += len(text)
        if sizes[split] >= batch_chars:
            yield split, "".join(parts.pop(split))
            sizes[split] = 0
    for split, pieces in parts.items():
        if pieces:
            yield split, "".join(pieces)


def encode_words(out: Path, source: TextSource, tokenizer: TokenizerOptions, vocab_opts: VocabOptions,
                 vocab_splits: tuple[str, ...], workers: int, quiet: bool) -> EncodedSplits:
    """Every split's provisional ids into its temp file, then the vocabulary (built from the counts
    of ``vocab_splits``, or ``vocab_opts.fixed``'s) and the provisional -> final id table."""
    word_tok = WordTokenizer(tokenizer.rule, tokenizer.lowercase)
    ctx = ReadContext(wanted=frozenset(source.splits))
    n_tokens, types = _write_provisional_ids(out, source, word_tok, ctx, workers, quiet)
    if vocab_opts.fixed is not None:
        vocab, perm = _fixed_vocab(out, source, types, n_tokens, vocab_opts.fixed.vocab, ctx)
    else:
        vocab, perm = _counted_vocab(out, types, n_tokens, vocab_opts, vocab_splits)
    return EncodedSplits(n_tokens, vocab, perm, ctx, word_tok.describe())


def _write_provisional_ids(out: Path, source: TextSource, word_tok: WordTokenizer, ctx: ReadContext, workers: int,
                           quiet: bool) -> tuple[dict[str, int], list[str]]:
    encoder = WordEncoder(word_tok, workers)
    n_tokens = {s: 0 for s in source.splits}
    files = {s: open(tmp_path(out, s), "wb") for s in source.splits}
    ctx.progress = make_progress(source.total_bytes, f"{source.corpus}: read+encode", quiet)
    ok = False
    try:
        for split, ids in encoder.encode(batched(source.read(ctx))):
            if split not in files:
                raise RuntimeError(f"reader produced split {split!r} not announced in {source.splits}")
            ids.tofile(files[split])
            n_tokens[split] += len(ids)
        ok = True
    finally:
        encoder.close(ok)
        for f in files.values():
            f.close()
        if ctx.progress is not None:
            ctx.progress.close()
    check_nonempty(source, n_tokens)
    return n_tokens, encoder.types


def _counted_vocab(out: Path, types: list[str], n_tokens: dict, vocab_opts: VocabOptions,
                   vocab_splits: tuple[str, ...]) -> tuple[Vocabulary, np.ndarray]:
    counts = np.zeros(len(types), dtype=np.int64)
    for split in vocab_splits:
        counts += bincount_file(tmp_path(out, split), n_tokens[split], len(types))
    nonzero = np.flatnonzero(counts)
    vocab = Vocabulary.from_counts(
        {types[i]: int(counts[i]) for i in nonzero}, min_count=vocab_opts.min_count, max_size=vocab_opts.max_vocab
    )
    if vocab_opts.keep_eval_types:
        extra = sorted(t for i, t in enumerate(types) if counts[i] == 0 and t not in vocab.ids)
        vocab = Vocabulary(vocab.tokens + extra, vocab.counts + [0] * len(extra))
    if len(vocab) <= len(vocab.specials):
        raise DataError(
            f"the vocabulary has only the special tokens (min count {vocab_opts.min_count}); lower --min-count or add text"
        )
    unk = vocab.unk_id
    perm = np.fromiter((vocab.ids.get(t, unk) for t in types), dtype=np.uint32, count=len(types))
    return vocab, perm


def _fixed_vocab(out, source, types, n_tokens, vocab: Vocabulary, ctx, most_common: int = 50):
    """``--vocab-from``: every seen type maps to its id in the given vocabulary or to ``<unk>``;
    the unknown types and their counts (all splits) go to meta.json's ``unknown_words``."""
    unk = vocab.unk_id
    if unk is None:
        raise DataError("the --vocab-from vocabulary has no <unk> entry, so unknown words cannot be encoded")
    perm = np.fromiter((vocab.ids.get(t, unk) for t in types), dtype=np.uint32, count=len(types))
    counts = np.zeros(len(types), dtype=np.int64)
    for split in source.splits:
        counts += bincount_file(tmp_path(out, split), n_tokens[split], len(types))
    unknown = np.flatnonzero((perm == unk) & (counts > 0))
    unknown = unknown[unknown != 1]  # the text's own <unk> (provisional id 1) is not an unknown word
    order = unknown[np.lexsort((unknown, -counts[unknown]))][:most_common]
    ctx.info["unknown_words"] = {"types": int(len(unknown)), "tokens": int(counts[unknown].sum()),
                                 "most_common": [[types[i], int(counts[i])] for i in order]}
    return vocab, perm
