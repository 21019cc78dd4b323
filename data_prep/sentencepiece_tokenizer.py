"""``--tokenizer sentencepiece``: a subword vocabulary trained with the ``sentencepiece`` library.

Two passes over the text:

1. *Train* on the train split's units (lines / paragraphs / sentences), streamed to
   ``SentencePieceTrainer`` through ``sentence_iterator``; ``input_sentence_size`` (``--spm-sentences``,
   default 1,000,000) caps how many units SentencePiece samples and keeps in memory, so the
   trainer's memory does not grow with the corpus. The sampling is seeded (``--seed``).
2. *Encode* every split with the model, one batch of units at a time, an ``<eos>`` after each unit.

The model is saved as ``DIR/spm.model``. Piece ids are the model's: ``<eos>`` is 0 and ``<unk>``
is 1 (as for word vocabularies), no BOS/PAD. ``vocab.txt`` lists the pieces **in SentencePiece id
order** (not sorted by count, since the ids must match the model) with each piece's count in the
vocabulary splits.
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path

import numpy as np

from lmmem.data.corpus import TOKEN_DTYPE
from lmmem.data.vocab import EOS, UNK, Vocabulary
from lmmem.errors import DataError

from data_prep.common import ReadContext, TextSource, TokenizerOptions, _bincount_file, _check_nonempty, batched, make_progress


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


def encode_with_sentencepiece(out: Path, source: TextSource, opts: TokenizerOptions, vocab_splits, spm_tmp: Path,
                              tmp_files: dict, workers: int, quiet: bool, fixed=None):
    """Train (or, with ``fixed``, a ``--vocab-from`` VocabSource, reuse) a model and encode every split."""
    prefix = spm_tmp.with_name(".spm.tmp")  # SentencePiece appends .model / .vocab
    if fixed is not None:
        import shutil

        import sentencepiece as spm

        shutil.copyfile(fixed.spm_model, spm_tmp)
        sp = spm.SentencePieceProcessor(model_file=str(spm_tmp))
    else:
        sp = train_model(source, opts, prefix, workers, quiet)
    eos = sp.piece_to_id(EOS)
    n_tokens = {s: 0 for s in source.splits}
    ctx = ReadContext(wanted=frozenset(source.splits))
    ctx.progress = make_progress(source.total_bytes, f"{source.corpus}: encode", quiet)
    files = {s: open(tmp_files[s], "wb") for s in source.splits}
    try:
        for split, text in batched(source.read(ctx)):
            pieces = sp.encode(_units(text, opts.lowercase), num_threads=max(1, workers))
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
    _check_nonempty(source, n_tokens)
    if fixed is not None:
        if [sp.id_to_piece(i) for i in range(sp.get_piece_size())] != fixed.vocab.tokens:
            raise DataError(f"{fixed.spm_model} does not match {fixed.corpus}/vocab.txt; prepare that corpus again")
        return n_tokens, fixed.vocab, ctx, dict(fixed.tokenizer)
    size = sp.get_piece_size()
    counts = np.zeros(size, dtype=np.int64)
    for split in vocab_splits:
        counts += _bincount_file(tmp_files[split], n_tokens[split], size)
    pieces = [sp.id_to_piece(i) for i in range(size)]
    if any("\n" in p for p in pieces):
        raise DataError("a SentencePiece piece contains a line break; prepare the text without control characters")
    vocab = Vocabulary(pieces, counts.tolist())
    meta = {
        "type": "sentencepiece",
        "model": "spm.model",
        "model_type": opts.spm_model_type,
        "vocab_size": size,
        "lowercase": opts.lowercase,
        "input_sentence_size": opts.spm_sentences,
        "vocab_order": "sentencepiece ids (not sorted by count)",
    }
    return n_tokens, vocab, ctx, meta
