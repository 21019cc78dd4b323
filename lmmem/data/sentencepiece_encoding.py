"""The ``sentencepiece`` encoder: a subword vocabulary trained with the ``sentencepiece`` library.

Two passes over the text:

1. *Train* on the train split's units (lines / paragraphs / sentences), streamed to
   ``SentencePieceTrainer`` through ``sentence_iterator``; ``input_sentence_size`` (``--spm-sentences``,
   default 1,000,000) caps how many units SentencePiece samples and keeps in memory, so the
   trainer's memory does not grow with the corpus. The sampling is seeded (``--seed``).
2. *Encode* every split with the model, one batch of units at a time, an ``<eos>`` after each unit.

The model is saved as ``DIR/spm.model``. Piece ids are the model's: ``<eos>`` is 0 and ``<unk>``
is 1 (as for word vocabularies), no BOS/PAD. ``vocab.txt`` lists the pieces **in SentencePiece id
order** (not sorted by count, since the ids must match the model) with each piece's count in the
vocabulary splits. ``sentencepiece`` is imported when this encoder runs, not before.
"""

from __future__ import annotations

import shutil
from itertools import chain
from pathlib import Path

import numpy as np

from lmmem.data.corpus import TOKEN_DTYPE
from lmmem.data.encoding import EncodedSplits, TokenizerOptions, VocabOptions, check_nonempty
from lmmem.data.id_files import bincount_file, tmp_path
from lmmem.data.text_source import ReadContext, TextSource, make_progress
from lmmem.data.vocab import EOS, UNK, Vocabulary
from lmmem.data.word_encoding import batched
from lmmem.errors import DataError

MODEL_TMP = ".spm.tmp.model"  # in the staging folder; SentencePiece also writes .spm.tmp.vocab beside it
TEMP_FILES = (MODEL_TMP, ".spm.tmp.vocab")


def _units(text: str, lowercase: bool) -> list[str]:
    if lowercase:
        text = text.lower()
    units = text.split("\n")
    units.pop()  # text ends with a line break: the last piece is empty
    return units


def train_model(source: TextSource, opts: TokenizerOptions, model_prefix: Path, workers: int, quiet: bool):
    import sentencepiece as spm

    if not opts.vocab_size:
        raise DataError("--tokenizer sentencepiece needs --vocab-size N (e.g. --vocab-size 32000)")
    ctx = ReadContext(wanted=frozenset({"train"}) if "train" in source.splits else frozenset(source.splits[:1]))
    ctx.progress = make_progress(source.total_bytes, f"{source.corpus}: sentencepiece training text", quiet)
    train_split = next(iter(ctx.wanted))

    failures: list[BaseException] = []

    def sentences():
        # An exception inside the iterator would reach us as SentencePiece's RuntimeError text;
        # keep it and re-raise it as it was (a DataError naming the file and the fix).
        try:
            for split, text in source.read(ctx):
                if split == train_split:
                    yield from (u for u in _units(text, opts.lowercase) if u and not u.isspace())
        except Exception as e:  # noqa: BLE001 - re-raised below
            failures.append(e)

    spm.set_random_generator_seed(opts.seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            minloglevel=2,  # SentencePiece's own progress log is long; errors still raise
            model_prefix=str(model_prefix),
            vocab_size=opts.vocab_size,
            model_type=opts.spm_model_type,
            input_sentence_size=opts.spm_sentences,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 16,
            num_threads=max(1, workers),
            eos_id=0,
            unk_id=1,
            bos_id=-1,
            pad_id=-1,
            eos_piece=EOS,
            unk_piece=UNK,
        )
    except RuntimeError as e:
        if failures:
            raise failures[0] from None
        msg = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        raise DataError(f"SentencePiece training failed ({msg}); try a smaller --vocab-size or more text") from None
    finally:
        if ctx.progress is not None:
            ctx.progress.close()
    if failures:
        raise failures[0]
    return spm.SentencePieceProcessor(model_file=str(model_prefix) + ".model")


def encode_sentencepiece(out: Path, source: TextSource, opts: TokenizerOptions, vocab_opts: VocabOptions,
                         vocab_splits: tuple[str, ...], workers: int, quiet: bool) -> EncodedSplits:
    """Train (or, with ``vocab_opts.fixed``, a ``--vocab-from`` VocabSource, reuse) a model and
    encode every split into its temp file; the ids are final."""
    import sentencepiece as spm

    if vocab_opts.min_count != 1 or vocab_opts.max_vocab is not None:
        raise DataError("--min-count and --max-vocab apply to word vocabularies; with SentencePiece set --vocab-size")
    fixed = vocab_opts.fixed
    model_tmp = out / MODEL_TMP
    if fixed is not None:
        shutil.copyfile(fixed.spm_model, model_tmp)
        sp = spm.SentencePieceProcessor(model_file=str(model_tmp))
    else:
        sp = train_model(source, opts, model_tmp.with_suffix(""), workers, quiet)  # SentencePiece appends .model / .vocab
    ctx = ReadContext(wanted=frozenset(source.splits))
    n_tokens = _encode_splits(out, source, sp, opts.lowercase, ctx, workers, quiet)
    if fixed is not None:
        if [sp.id_to_piece(i) for i in range(sp.get_piece_size())] != fixed.vocab.tokens:
            raise DataError(f"{fixed.spm_model} does not match {fixed.corpus}/vocab.txt; prepare that corpus again")
        return EncodedSplits(n_tokens, fixed.vocab, None, ctx, dict(fixed.tokenizer), {"spm.model": model_tmp})
    size = sp.get_piece_size()
    counts = np.zeros(size, dtype=np.int64)
    for split in vocab_splits:
        counts += bincount_file(tmp_path(out, split), n_tokens[split], size)
    pieces = [sp.id_to_piece(i) for i in range(size)]
    if any("\n" in p for p in pieces):
        raise DataError("a SentencePiece piece contains a line break; prepare the text without control characters")
    meta = {
        "type": "sentencepiece",
        "model": "spm.model",
        "model_type": opts.spm_model_type,
        "vocab_size": size,
        "lowercase": opts.lowercase,
        "input_sentence_size": opts.spm_sentences,
        "vocab_order": "sentencepiece ids (not sorted by count)",
    }
    return EncodedSplits(n_tokens, Vocabulary(pieces, counts.tolist()), None, ctx, meta, {"spm.model": model_tmp})


def _encode_splits(out: Path, source: TextSource, sp, lowercase: bool, ctx: ReadContext, workers: int, quiet: bool) -> dict[str, int]:
    eos = sp.piece_to_id(EOS)
    n_tokens = {s: 0 for s in source.splits}
    ctx.progress = make_progress(source.total_bytes, f"{source.corpus}: encode", quiet)
    files = {s: open(tmp_path(out, s), "wb") for s in source.splits}
    try:
        for split, text in batched(source.read(ctx)):
            pieces = sp.encode(_units(text, lowercase), num_threads=max(1, workers))
            lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
            flat = np.fromiter(chain.from_iterable(pieces), dtype=TOKEN_DTYPE, count=int(lengths.sum()))
            ids = np.insert(flat, np.cumsum(lengths), eos)  # an <eos> after every unit
            ids.astype(TOKEN_DTYPE).tofile(files[split])
            n_tokens[split] += len(ids)
    finally:
        for f in files.values():
            f.close()
        if ctx.progress is not None:
            ctx.progress.close()
    check_nonempty(source, n_tokens)
    return n_tokens

