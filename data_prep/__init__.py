"""Corpus preparation for lmmem: ``python -m data_prep <corpus> --source ... --out DIR``.

Each corpus module (``wikitext``, ``gutenberg``, ``gigaword``, ``synthetic``) turns its input into
a :class:`~data_prep.common.TextSource`; :func:`data_prep.common.prepare` is the one writer of the
prepared-corpus folder that ``lmmem.data.PreparedCorpus`` opens.
"""

from data_prep.common import TextSource, TokenizerOptions, VocabOptions, prepare
from data_prep.reading import ReadOptions
from data_prep.tokenization import WordTokenizer

__all__ = ["ReadOptions", "TextSource", "TokenizerOptions", "VocabOptions", "WordTokenizer", "prepare"]
