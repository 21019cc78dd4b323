"""The one writer of prepared-corpus folders (the layout is defined in :mod:`lmmem.data.corpus`).

    prepare(out, source, TokenizerOptions(...), VocabOptions(...), options=...)

A reader turns its input into a :class:`~lmmem.data.text_source.TextSource`; an encoder
(:mod:`lmmem.data.encoding`: a word vocabulary or SentencePiece) writes every split's ids and
decides the vocabulary; this module finishes the ids (:mod:`lmmem.data.id_files`), writes
``vocab.txt`` and, last, ``meta.json``, all in a staging folder that is swapped in only when
complete (:mod:`lmmem.data.corpus_folder`). ``python -m data_prep`` (the readers and the CLI) and
the embedded synthetic corpus (:mod:`lmmem.data.synthetic`) both write through :func:`prepare`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lmmem.data.corpus import META_FORMAT_VERSION, SPLITS
from lmmem.data.corpus_folder import (
    LEGACY_TEMP_PATTERNS, check_output_folder, check_source_overlap, corpus_lock, staging_name,
)
from lmmem.data.encoding import EncodedSplits, TokenizerOptions, VocabOptions
from lmmem.data.id_files import finish_split, tmp_path
from lmmem.data.sentencepiece_encoding import TEMP_FILES as SPM_TEMP_FILES
from lmmem.data.sentencepiece_encoding import encode_sentencepiece
from lmmem.data.summary import print_summary
from lmmem.data.text_source import TextSource
from lmmem.data.vocab import EOS
from lmmem.data.word_encoding import encode_words
from lmmem.errors import DataError
from lmmem.jsonio import dumps
from lmmem.safety import check_writable_folder, is_inside, recover_swap, remove_stale_temp_files, swap_in_folder

ENCODERS = {"words": encode_words, "sentencepiece": encode_sentencepiece}


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
            meta = write_corpus(staging, source, tokenizer, vocab_opts, options, workers, quiet)
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


def write_corpus(out: Path, source: TextSource, tokenizer: TokenizerOptions, vocab_opts: VocabOptions,
                 options: dict | None, workers: int, quiet: bool) -> dict:
    """Write a complete corpus into the (empty, staging) folder ``out``."""
    encode = ENCODERS.get(tokenizer.kind)
    if encode is None:
        raise DataError(f"unknown --tokenizer {tokenizer.kind!r}; choose {' or '.join(ENCODERS)}")
    vocab_splits = resolve_vocab_splits(source, vocab_opts)
    try:
        enc = encode(out, source, tokenizer, vocab_opts, vocab_splits, workers, quiet)
        splits_meta = {split: _finish(out, split, enc, source, quiet) for split in source.splits}
        for split in source.splits:
            tmp_path(out, split).replace(out / f"{split}.bin")
        enc.vocab.save(out / "vocab.txt")
        for name, tmp in enc.files.items():
            tmp.replace(out / name)
        meta = {
            "format_version": META_FORMAT_VERSION,
            "corpus": source.corpus,
            "source": source.source,
            "tokenizer": enc.tokenizer,
            "unit": source.unit,
            "eos": f"one {EOS} after every {source.unit}",
            "options": options or {},
            "vocab_size": len(enc.vocab),
            "vocab_fingerprint": enc.vocab.fingerprint,
            "vocab_splits": list(vocab_splits),
            "specials": list(enc.vocab.specials),
            **({"vocab_from": vocab_opts.fixed.describe()} if vocab_opts.fixed is not None else {}),
            "splits": splits_meta,
            **source.info,
            **enc.ctx.info,
            "created_by": "python -m data_prep",
        }
        _write_json_atomic(out / "meta.json", meta)
    finally:
        for p in [*(tmp_path(out, s) for s in source.splits), *(out / n for n in SPM_TEMP_FILES)]:
            p.unlink(missing_ok=True)
    return meta


def _finish(out: Path, split: str, enc: EncodedSplits, source: TextSource, quiet: bool) -> dict:
    """Final ids of one split, and its meta.json entry."""
    stats = finish_split(tmp_path(out, split), enc.n_tokens[split], enc.perm, enc.vocab, quiet, f"{split}: ids")
    n = enc.n_tokens[split]
    info = {
        "file": f"{split}.bin",
        "tokens": n,
        "unk": stats["unk"],
        "unk_rate": round(stats["unk"] / n, 6) if n else 0.0,
    }
    if enc.perm is not None:
        info["oov"] = stats["oov"]
        info["oov_rate"] = round(stats["oov"] / n, 6) if n else 0.0
    info["units"] = stats["units"]
    if enc.ctx.documents.get(split):
        info["documents"] = enc.ctx.documents[split]
    info.update(source.split_info.get(split, {}))
    info.update(enc.ctx.split_info.get(split, {}))
    return info


def resolve_vocab_splits(source: TextSource, vocab: VocabOptions) -> tuple[str, ...]:
    """The splits whose counts make the vocabulary (none when it is given: ``--vocab-from``)."""
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


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(obj, what=f"the metadata for {path}", indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
