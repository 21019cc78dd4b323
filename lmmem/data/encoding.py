"""The tokenizer interface of the corpus writer: options, and what an encoder hands back.

An *encoder* turns a :class:`~lmmem.data.text_source.TextSource` into token ids, one temp id file
per split in the staging folder (:func:`lmmem.data.id_files.tmp_path`), and decides the
vocabulary. Two exist, chosen by ``TokenizerOptions.kind``:

* ``words`` (:func:`lmmem.data.word_encoding.encode_words`): a word vocabulary built from counts
  in one pass over the text, with provisional ids remapped afterwards;
* ``sentencepiece`` (:func:`lmmem.data.sentencepiece_encoding.encode_sentencepiece`): a subword
  model trained with the ``sentencepiece`` library, whose ids are final.

Each is a function ``encode(out, source, tokenizer, vocab, vocab_splits, workers, quiet) ->``
:class:`EncodedSplits`; the writer (:mod:`lmmem.data.writer`) does the rest the same way for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmmem.data.text_source import ReadContext, TextSource
from lmmem.data.vocab import Vocabulary
from lmmem.errors import DataError


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
    rule: str = "whitespace"  # words: "whitespace" or "regex" (see lmmem.data.tokenization)
    lowercase: bool = False
    vocab_size: int | None = None  # sentencepiece
    spm_model_type: str = "unigram"
    spm_sentences: int = 1_000_000  # SentencePiece input_sentence_size: units sampled for training
    seed: int = 0


@dataclass
class EncodedSplits:
    """What an encoder leaves for the writer: every split's ids in its temp file, and the rest."""

    n_tokens: dict[str, int]  # ids written to each split's temp file
    vocab: Vocabulary
    perm: np.ndarray | None  # provisional id -> final id; None when the ids are final already
    ctx: ReadContext  # documents and meta.json fields the reader reported
    tokenizer: dict  # meta.json "tokenizer"
    files: dict[str, Path] = field(default_factory=dict)  # more files to move into the corpus: {name: temp path}


def check_nonempty(source: TextSource, n_tokens: dict) -> None:
    for split in source.splits:
        if n_tokens[split] == 0:
            raise DataError(
                f"the '{split}' split of {source.source} came out empty (no text after reading); "
                "check --source and the split options, or pass --allow-missing-splits to leave it out"
            )
