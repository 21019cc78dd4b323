"""``--vocab-from RUN_OR_CORPUS``: encode text with a trained model's own vocabulary and tokeniser.

A model can only be scored on text written in its own ids. ``--vocab-from`` takes the vocabulary
(``vocab.txt``, with its *training* counts, so that evaluate.py's frequency buckets stay those of
the model's training data), the word rule and case handling, or the SentencePiece model, from

* a checkpoint (``best.pt`` / ``last.pt``) or a run folder holding one: the prepared corpus it was
  trained on (its ``train_config.data``), checked against the checkpoint's vocabulary fingerprint;
* a prepared corpus folder (``meta.json`` + ``vocab.txt``).

Words outside that vocabulary become ``<unk>``; they are counted per split (``oov``) and the
distinct unknown words with the most frequent of them are recorded in ``meta.json``
(``unknown_words``) and printed. The output has the same vocabulary fingerprint as the model, so
``python evaluate.py RUN/best.pt --data OUT`` scores it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmmem.data.corpus import PreparedCorpus
from lmmem.data.vocab import Vocabulary
from lmmem.errors import CheckpointError, DataError

# Options that define a vocabulary or tokeniser: --vocab-from supplies them, so they must not be set.
CONFLICTS = (("min_count", "--min-count"), ("max_vocab", "--max-vocab"), ("vocab_splits", "--vocab-splits"),
             ("keep_eval_types", "--keep-eval-types"), ("lowercase", "--lowercase"), ("vocab_size", "--vocab-size"))


@dataclass
class VocabSource:
    corpus: Path  # the prepared corpus the vocabulary comes from
    vocab: Vocabulary
    tokenizer: dict  # that corpus's meta.json "tokenizer"
    checkpoint: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def spm_model(self) -> Path | None:
        return self.corpus / self.tokenizer.get("model", "spm.model") if self.tokenizer.get("type") == "sentencepiece" else None

    def describe(self) -> dict:
        # absolute: evaluate.py reads the words' training counts from this corpus, from any folder
        out = {"corpus": str(self.corpus.resolve()), "fingerprint": self.vocab.fingerprint}
        if self.checkpoint is not None:
            out["checkpoint"] = str(self.checkpoint)
        return out


def load_vocab_source(spec: str | Path) -> VocabSource:
    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(f"--vocab-from {path} does not exist; pass a checkpoint, a run folder or a prepared corpus folder")
    checkpoint = None
    if path.is_dir() and (path / "meta.json").is_file():
        corpus_dir = path
    else:
        # imported here, not at the top: it imports torch, which preparing a corpus otherwise never needs
        from lmmem.checkpoints import checkpoint_in, data_dir_for, load_checkpoint

        checkpoint = path if path.is_file() else checkpoint_in(path)
        if checkpoint is None:
            raise DataError(f"--vocab-from {path} holds neither best.pt/last.pt nor meta.json; pass a checkpoint, a run "
                            "folder or a prepared corpus folder")
        ckpt = load_checkpoint(checkpoint, map_location="cpu")
        try:
            corpus_dir = data_dir_for(ckpt, None, checkpoint)
        except CheckpointError:
            corpus_dir = None
        if corpus_dir is None or not (corpus_dir / "meta.json").is_file():
            data = (ckpt.get("train_config") or {}).get("data")
            raise DataError(f"{checkpoint} was trained on {data!r}, which is not a prepared corpus here; pass that corpus "
                            "folder (or a copy of it) with --vocab-from")
    corpus = PreparedCorpus.open(corpus_dir)
    if checkpoint is not None and ckpt.get("vocab_fingerprint") != corpus.fingerprint:
        raise DataError(f"{checkpoint} was trained with vocabulary {ckpt.get('vocab_fingerprint')} but {corpus_dir} now has "
                        f"{corpus.fingerprint}: it was prepared again since; pass a corpus with the model's vocabulary")
    tok = corpus.meta.get("tokenizer")
    if not isinstance(tok, dict) or tok.get("type") not in ("words", "sentencepiece"):
        raise DataError(f"{corpus_dir}/meta.json does not say how its text was tokenised (tokenizer {tok!r}); "
                        "prepare it again with `python -m data_prep`")
    source = VocabSource(corpus_dir, corpus.vocab, tok, checkpoint)
    if source.spm_model is not None and not source.spm_model.is_file():
        raise DataError(f"{source.spm_model} is missing; the SentencePiece vocabulary of {corpus_dir} needs it")
    return source


def check_no_conflicts(args, source: VocabSource) -> None:
    given = [flag for key, flag in CONFLICTS if getattr(args, key, None)]
    if getattr(args, "tokenizer", "words") != "words":
        given.append("--tokenizer")
    if given:
        raise DataError(f"--vocab-from takes the vocabulary and the tokeniser from {source.corpus}; drop {', '.join(given)}")
