"""The one writer of prepared-corpus folders (the layout is defined in ``lmmem.data.corpus``).

A corpus reader (``wikitext``, ``gutenberg``, ``gigaword``, the synthetic generator) only turns
its input into a :class:`TextSource`: a stream of ``(split, text)`` pairs whose text holds one
unit (line, paragraph, sentence) per line. Everything else happens here, once for all corpora.

Word vocabularies take a single pass over the text, in bounded memory:

1. *Encode with provisional ids.* Each ~1 MiB batch of text is tokenised and every token is
   mapped to a provisional id (its type's first-seen rank) with one C-level dict lookup per token;
   the ids go straight to ``.{split}.bin.tmp`` as uint32. Only the type table is kept in memory
   (it grows with the number of distinct types, never with the number of tokens). With
   ``--workers N`` the batches are tokenised in N processes, each with its own type table whose
   ids the main process translates with one numpy gather per batch.
2. *Count.* ``np.bincount`` over the vocabulary splits' provisional ids, in fixed-size chunks.
3. *Build the vocabulary* with :meth:`Vocabulary.from_counts` (``--min-count``, ``--max-vocab``).
4. *Remap in place.* A provisional-id -> final-id table turns each temp file into its final ids
   (rare and unseen types -> ``<unk>``), 4M tokens at a time, counting ``<unk>`` and
   out-of-vocabulary tokens on the way; the file is then renamed to ``{split}.bin``.

Memory stays bounded (about 80 MB above the interpreter for a 400 MB WikiText-format file,
against 5.5 GB for the naive read-all / split / Counter / list-of-ids script) and, from about
100 MB of text on, it is 2.5-3.5x faster than that script, one core each (see
``benchmarks/bench_data_prep.py``; on a few MB both take a fraction of a second and fixed costs
dominate). Because the final ids depend only on the counts (ties broken by the token string),
the output is byte-identical for any ``--workers``.

SentencePiece (``--tokenizer sentencepiece``) takes two passes instead: train the model on the
train split, then encode every split with it (see ``data_prep.sentencepiece_tokenizer``).

Nothing lost (see ``lmmem.safety``): the corpus is built in a staging folder beside ``--out``
(``.NAME.staging``, same file system) and swapped in only once complete, so a failed, interrupted
or killed preparation leaves the previous corpus as it was; the old one is deleted after the swap.
A lock (``.NAME.lock`` beside ``--out``) makes a second preparation into the same ``--out`` exit 2
naming the first one's PID. A different corpus (other corpus, source or options in its meta.json)
is replaced only with ``--overwrite``; a folder holding anything but corpus files never is; an
``--out`` inside ``--source`` (or the reverse) is refused. A start removes what a killed run left.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import queue
import shutil
import sys
import threading
import traceback
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmmem.data.corpus import META_FORMAT_VERSION, SPLITS, TOKEN_DTYPE
from lmmem.data.vocab import EOS, UNK, Vocabulary
from lmmem.errors import DataError
from lmmem.safety import (
    FolderLock, check_writable_folder, is_inside, recover_swap, remove_stale_temp_files, swap_in_folder,
)
from lmmem.jsonio import dumps

from data_prep.tokenization import EOS_TEXT, WordTokenizer

BATCH_CHARS = 1 << 20  # text handed to a tokeniser at once
assert array("I").itemsize == 4, "array('I') must be 32-bit for the uint32 token files"
ARRAY_CHUNK = 1 << 22  # tokens per numpy chunk in the count and remap passes (16 MiB of uint32)
TMP_SUFFIX = ".bin.tmp"


# ---------------------------------------------------------------------------------------------
# what readers hand to the writer


@dataclass
class ReadContext:
    """Passed to a reader's ``read``; the reader fills ``documents`` and ``info`` as it goes."""

    wanted: frozenset[str]  # splits the writer wants this pass (a reader may skip the others)
    progress: Any = None  # a tqdm bar counting bytes read, or None
    documents: Counter = field(default_factory=Counter)
    info: dict = field(default_factory=dict)  # extra top-level meta.json fields found while reading
    split_info: dict = field(default_factory=dict)  # extra per-split meta.json fields


@dataclass
class TextSource:
    corpus: str  # meta.json "corpus"
    source: str  # meta.json "source": folder or hub dataset
    splits: tuple[str, ...]  # the splits this source will produce, in SPLITS order
    read: Callable[[ReadContext], Iterator[tuple[str, str]]]  # yields (split, text, one unit per line)
    unit: str  # what one <eos> ends: "line", "paragraph", "sentence", ...
    total_bytes: int | None = None  # for the progress bar
    info: dict = field(default_factory=dict)  # static extra meta.json fields
    split_info: dict = field(default_factory=dict)  # static extra per-split fields, {split: {...}}


@dataclass
class VocabOptions:
    min_count: int = 1
    max_vocab: int | None = None
    vocab_splits: tuple[str, ...] | None = None  # None: train, or every split written when train is absent
    keep_eval_types: bool = False  # types seen only outside the vocabulary splits join it with count 0
    fixed: Any = None  # a data_prep.vocab_from.VocabSource: encode with its vocabulary instead of building one


@dataclass
class TokenizerOptions:
    kind: str = "words"  # "words" or "sentencepiece"
    rule: str = "whitespace"  # words: "whitespace" or "regex" (see data_prep.tokenization)
    lowercase: bool = False
    vocab_size: int | None = None  # sentencepiece
    spm_model_type: str = "unigram"
    spm_sentences: int = 1_000_000  # SentencePiece input_sentence_size: units sampled for training
    seed: int = 0


# ---------------------------------------------------------------------------------------------
# provisional ids


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


# ---------------------------------------------------------------------------------------------
# the writer


def check_split_coverage(produced, *, valid_fraction: float, test_fraction: float, allow_missing: bool,
                         what: str, unit: str, advice: str) -> None:
    """Refuse (unless --allow-missing-splits) a source too small to fill every split it was asked for.
    ``what`` describes the source ("FOLDER has N book(s)"), ``unit`` how it is split ("to split by
    book into"), ``advice`` what to add ("add books")."""
    expected = [s for s, f in (("train", 1.0), ("valid", valid_fraction), ("test", test_fraction)) if f > 0]
    if any(s not in produced for s in expected) and not allow_missing:
        raise DataError(
            f"{what}, too few {unit} {', '.join(expected)} (at least 3 are needed); "
            f"{advice}, or pass --allow-missing-splits to write only " + ", ".join(produced)
        )


def make_progress(total: int | None, desc: str, quiet: bool, unit: str = "B"):
    """A tqdm bar on stderr when it is a terminal, else None (logs and CI stay clean)."""
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    class Bar(tqdm):
        # No monitor thread: it is not needed here, and a live thread would make the tokeniser
        # workers fall back from fork to the much slower spawn.
        monitor_interval = 0

    return Bar(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr, dynamic_ncols=True)


def _resolve_vocab_splits(source: TextSource, vocab: VocabOptions) -> tuple[str, ...]:
    if vocab.fixed is not None:
        return ()  # the vocabulary is given: no split counts towards it
    if vocab.vocab_splits:
        missing = [s for s in vocab.vocab_splits if s not in source.splits]
        if missing:
            raise DataError(
                f"--vocab-splits names {','.join(missing)}, which this preparation does not write "
                f"(it writes {','.join(source.splits)}); choose among those"
            )
        return tuple(s for s in SPLITS if s in vocab.vocab_splits)
    if "train" in source.splits:
        return ("train",)
    return tuple(source.splits)


def _tmp_path(out: Path, split: str) -> Path:
    return out / f".{split}{TMP_SUFFIX}"


def _read_chunks(f, n_tokens: int) -> Iterator[np.ndarray]:
    """The uint32 ids of an open file, ``ARRAY_CHUNK`` at a time. Plain reads, not a memmap:
    mapped pages count as resident memory, and a memmap of a 4-billion-token file would make the
    process look (and, under memory pressure, behave) like it held the whole file."""
    left = n_tokens
    while left > 0:
        chunk = np.fromfile(f, dtype=TOKEN_DTYPE, count=min(ARRAY_CHUNK, left))
        if len(chunk) == 0:
            raise RuntimeError(f"{f.name} ended {left} tokens early")
        left -= len(chunk)
        yield chunk


def _bincount_file(path: Path, n_tokens: int, minlength: int) -> np.ndarray:
    total = np.zeros(minlength, dtype=np.int64)
    with open(path, "rb") as f:
        for chunk in _read_chunks(f, n_tokens):
            total += np.bincount(chunk, minlength=minlength)
    return total


def _finish_split(path: Path, n_tokens: int, perm: np.ndarray | None, vocab: Vocabulary, quiet: bool, desc: str) -> dict:
    """Remap provisional ids in place (``perm``; None when ids are final already) and count."""
    stats = {"unk": 0, "oov": 0, "units": 0}
    unk, eos = vocab.unk_id, vocab.eos_id
    bar = make_progress(n_tokens, desc, quiet, unit="tok")
    with open(path, "r+b" if perm is not None else "rb") as f:
        pos = 0
        for prov in _read_chunks(f, n_tokens):
            ids = perm[prov] if perm is not None else prov
            is_unk = ids == unk
            stats["unk"] += int(is_unk.sum())
            if perm is not None:
                # out-of-vocabulary: mapped to <unk> although the text did not say <unk> (id 1)
                stats["oov"] += int((is_unk & (prov != 1)).sum())
                f.seek(pos)
                ids.tofile(f)
            pos += prov.nbytes
            f.seek(pos)
            stats["units"] += int((ids == eos).sum())
            if bar is not None:
                bar.update(len(prov))
    if bar is not None:
        bar.close()
    return stats


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(obj, what=f"the metadata for {path}", indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# the output folder: lock, checks, staging

# Names a prepared corpus folder may hold (older versions also left these temp files in it).
CORPUS_FILES = ("meta.json", "vocab.txt", "spm.model", *(f"{s}.bin" for s in SPLITS))
LEGACY_TEMP_PATTERNS = (f".*{TMP_SUFFIX}", ".spm.tmp.*", "*.json.tmp", "vocab.txt.tmp")


def corpus_lock(out: Path, *, wait: bool = False) -> FolderLock:
    """The lock of corpus folder ``out``; its file sits beside ``out`` because ``out`` itself is swapped."""
    out = Path(out)
    return FolderLock(out.parent / f".{out.name}.lock", f"corpus folder {out}", wait=wait)


def staging_name(out: Path) -> Path:
    return out.with_name(f".{out.name}.staging")


def _identity(meta: dict) -> tuple:
    return meta.get("corpus"), meta.get("source"), meta.get("options")


def check_source_overlap(out: Path, source: TextSource) -> None:
    """Refuse an --out inside --source (a re-run would read its own output as text) or around it."""
    src = Path(source.source)
    if not source.source.startswith("hub") and src.exists() and (is_inside(out, src) or is_inside(src, out)):
        raise DataError(
            f"--out {out} and --source {source.source} overlap: the output would be read as input (or the input replaced); "
            "choose an --out outside the source folder"
        )


def check_output_folder(out: Path, source: TextSource, options: dict, *, overwrite: bool) -> None:
    """Refuse an --out that would lose something: holding files that are not a corpus, or holding a
    different corpus without --overwrite. Call it holding the corpus lock."""
    if not out.is_dir():
        return
    foreign = sorted(p.name for p in out.iterdir() if p.name not in CORPUS_FILES)
    if foreign:
        raise DataError(
            f"--out {out} holds files that are not part of a prepared corpus ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}); they would be lost: choose a new or empty folder"
        )
    meta_path = out / "meta.json"
    if not meta_path.is_file() or overwrite:
        return  # nothing there, or leftovers of an unfinished preparation, or replacing on request
    try:
        old = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = {}
    new = {"corpus": source.corpus, "source": source.source, "options": options or {}}
    if not isinstance(old, dict) or _identity(old) != _identity(new):
        what = f"{old.get('corpus')} from {old.get('source')}" if isinstance(old, dict) else "another corpus"
        raise DataError(
            f"--out {out} holds a different prepared corpus ({what}, or other options); "
            "choose another --out, or pass --overwrite to replace it"
        )


def prepare(
    out_dir: str | Path,
    source: TextSource,
    tokenizer: TokenizerOptions,
    vocab_opts: VocabOptions,
    *,
    options: dict | None = None,
    workers: int = 1,
    quiet: bool = False,
    overwrite: bool = False,
    locked: bool = False,
) -> dict:
    """Write ``out_dir`` (vocab.txt, {split}.bin, meta.json[, spm.model]) and return the meta.
    ``overwrite``: replace a different corpus there; ``locked``: the caller holds :func:`corpus_lock`."""
    final = Path(out_dir)
    if final.is_symlink():  # swap the folder it points to, not the link
        final = final.resolve()
    if final.exists() and not final.is_dir():
        raise DataError(f"--out {final} is a file; pass a folder to write the prepared corpus into")
    check_writable_folder(final)
    if is_inside(Path.cwd(), final):  # the finished corpus is swapped in by renaming folders
        raise DataError(f"--out {out_dir} is the current folder (or holds it); give a folder of its own, e.g. --out data/NAME")
    check_source_overlap(final, source)
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = None if locked else corpus_lock(final)
    try:
        recover_swap(final)  # a swap cut short by a crash: the previous corpus goes back first
        remove_stale_temp_files(final.parent, (staging_name(final).name,))
        remove_stale_temp_files(final, LEGACY_TEMP_PATTERNS)
        check_output_folder(final, source, options or {}, overwrite=overwrite)
        staging = staging_name(final)
        staging.mkdir()
        try:
            meta = _write_corpus(staging, source, tokenizer, vocab_opts, options, workers, quiet)
            swap_in_folder(staging, final)
        except OSError as e:
            if e.filename is None:  # a failed write (a full disk) names no file: name the folder
                raise OSError(e.errno, e.strerror, str(final)) from None
            raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    finally:
        if lock is not None:
            lock.release()
    if not quiet:
        print_summary(final, meta)
    return meta


def _write_corpus(out: Path, source: TextSource, tokenizer: TokenizerOptions, vocab_opts: VocabOptions,
                  options: dict | None, workers: int, quiet: bool) -> dict:
    """Write a complete corpus into the (empty, staging) folder ``out``."""
    vocab_splits = _resolve_vocab_splits(source, vocab_opts)
    tmp_files = {s: _tmp_path(out, s) for s in source.splits}
    spm_tmp = out / ".spm.tmp.model"
    ctx = ReadContext(wanted=frozenset(source.splits))
    try:
        if tokenizer.kind == "words":
            n_tokens, vocab, perm = _encode_words(out, source, tokenizer, vocab_opts, vocab_splits, ctx, workers, quiet)
            tok_meta = WordTokenizer(tokenizer.rule, tokenizer.lowercase).describe()
        elif tokenizer.kind == "sentencepiece":
            from data_prep import sentencepiece_tokenizer as spt

            if vocab_opts.min_count != 1 or vocab_opts.max_vocab is not None:
                raise DataError("--min-count and --max-vocab apply to word vocabularies; with SentencePiece set --vocab-size")
            n_tokens, vocab, ctx, tok_meta = spt.encode_with_sentencepiece(
                out, source, tokenizer, vocab_splits, spm_tmp, tmp_files, workers, quiet, fixed=vocab_opts.fixed
            )
            perm = None
        else:
            raise DataError(f"unknown --tokenizer {tokenizer.kind!r}; choose words or sentencepiece")

        splits_meta = {}
        for split in source.splits:
            stats = _finish_split(tmp_files[split], n_tokens[split], perm, vocab, quiet, f"{split}: ids")
            n = n_tokens[split]
            info = {
                "file": f"{split}.bin",
                "tokens": n,
                "unk": stats["unk"],
                "unk_rate": round(stats["unk"] / n, 6) if n else 0.0,
            }
            if perm is not None:
                info["oov"] = stats["oov"]
                info["oov_rate"] = round(stats["oov"] / n, 6) if n else 0.0
            info["units"] = stats["units"]
            if ctx.documents.get(split):
                info["documents"] = ctx.documents[split]
            info.update(source.split_info.get(split, {}))
            info.update(ctx.split_info.get(split, {}))
            splits_meta[split] = info

        for split in source.splits:
            tmp_files[split].replace(out / f"{split}.bin")
        vocab.save(out / "vocab.txt")
        if tokenizer.kind == "sentencepiece":
            spm_tmp.replace(out / "spm.model")

        meta = {
            "format_version": META_FORMAT_VERSION,
            "corpus": source.corpus,
            "source": source.source,
            "tokenizer": tok_meta,
            "unit": source.unit,
            "eos": f"one {EOS} after every {source.unit}",
            "options": options or {},
            "vocab_size": len(vocab),
            "vocab_fingerprint": vocab.fingerprint,
            "vocab_splits": list(vocab_splits),
            "specials": list(vocab.specials),
            **({"vocab_from": vocab_opts.fixed.describe()} if vocab_opts.fixed is not None else {}),
            "splits": splits_meta,
            **source.info,
            **ctx.info,
            "created_by": "python -m data_prep",
        }
        _write_json_atomic(out / "meta.json", meta)
    finally:
        for p in [*tmp_files.values(), spm_tmp, out / ".spm.tmp.vocab"]:
            p.unlink(missing_ok=True)
    return meta


def _encode_words(out, source, tokenizer, vocab_opts, vocab_splits, ctx, workers, quiet):
    word_tok = WordTokenizer(tokenizer.rule, tokenizer.lowercase)
    encoder = WordEncoder(word_tok, workers)
    n_tokens = {s: 0 for s in source.splits}
    files = {s: open(_tmp_path(out, s), "wb") for s in source.splits}
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
    _check_nonempty(source, n_tokens)

    types = encoder.types
    if vocab_opts.fixed is not None:
        return n_tokens, *_fixed_vocab(out, source, types, n_tokens, vocab_opts.fixed.vocab, ctx)
    counts = np.zeros(len(types), dtype=np.int64)
    for split in vocab_splits:
        counts += _bincount_file(_tmp_path(out, split), n_tokens[split], len(types))
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
    return n_tokens, vocab, perm


def _fixed_vocab(out, source, types, n_tokens, vocab: Vocabulary, ctx, most_common: int = 50):
    """``--vocab-from``: every seen type maps to its id in the given vocabulary or to ``<unk>``;
    the unknown types and their counts (all splits) go to meta.json's ``unknown_words``."""
    unk = vocab.unk_id
    if unk is None:
        raise DataError("the --vocab-from vocabulary has no <unk> entry, so unknown words cannot be encoded")
    perm = np.fromiter((vocab.ids.get(t, unk) for t in types), dtype=np.uint32, count=len(types))
    counts = np.zeros(len(types), dtype=np.int64)
    for split in source.splits:
        counts += _bincount_file(_tmp_path(out, split), n_tokens[split], len(types))
    unknown = np.flatnonzero((perm == unk) & (counts > 0))
    unknown = unknown[unknown != 1]  # the text's own <unk> (provisional id 1) is not an unknown word
    order = unknown[np.lexsort((unknown, -counts[unknown]))][:most_common]
    ctx.info["unknown_words"] = {"types": int(len(unknown)), "tokens": int(counts[unknown].sum()),
                                 "most_common": [[types[i], int(counts[i])] for i in order]}
    return vocab, perm


def _check_nonempty(source: TextSource, n_tokens: dict) -> None:
    for split in source.splits:
        if n_tokens[split] == 0:
            raise DataError(
                f"the '{split}' split of {source.source} came out empty (no text after reading); "
                "check --source and the split options, or pass --allow-missing-splits to leave it out"
            )


def print_summary(out: Path, meta: dict) -> None:
    """Counts in the style of nanoGPT's prepare.py, one line per split."""
    tok = meta["tokenizer"]
    how = f"{tok['type']}/{tok.get('rule', tok.get('model_type', ''))}"
    opts = meta.get("options", {})
    detail = f"min count {opts['min_count']}" if "min_count" in opts and tok["type"] == "words" else ""
    if opts.get("max_vocab"):
        detail += f", max {opts['max_vocab']:,}"
    print(f"prepared {meta['corpus']} from {meta['source']} -> {out}")
    if meta.get("vocab_from"):
        vf = meta["vocab_from"]
        print(f"vocab size: {meta['vocab_size']:,} ({how}), the vocabulary of {vf.get('checkpoint', vf['corpus'])} "
              f"(fingerprint {vf['fingerprint']}); one {EOS} per {meta['unit']}")
    else:
        print(
            f"vocab size: {meta['vocab_size']:,} ({how}; from {'+'.join(meta['vocab_splits'])}"
            f"{'; ' + detail if detail else ''}); one {EOS} per {meta['unit']}"
        )
    for split, info in meta["splits"].items():
        docs = info.get("documents")
        extra = f" in {docs:,} document{'s' if docs != 1 else ''}" if docs else ""
        line = f"{split} has {info['tokens']:,} tokens{extra}; {UNK} {100 * info['unk_rate']:.2f}%"
        if "oov_rate" in info:
            line += f" (out-of-vocabulary {100 * info['oov_rate']:.2f}%)"
        print(line)
    if meta.get("unknown_words"):
        from data_prep.vocab_from import describe_unknown

        print(describe_unknown(meta["unknown_words"]))
    if meta.get("decoding"):
        from data_prep.reading import describe_decoding

        print("\n".join(describe_decoding(meta["decoding"])))
