"""Corpus preparation for lmmem: ``python -m data_prep <corpus> --source ... --out DIR``.

Each corpus module (``wikitext``, ``gutenberg``, ``gigaword``, ``text``, ``synthetic``) turns its
input into a :class:`~lmmem.data.text_source.TextSource`; :func:`lmmem.data.writer.prepare` is the
one writer of the prepared-corpus folder that ``lmmem.data.PreparedCorpus`` opens. This package
holds the corpus readers and the CLI; it imports lmmem, lmmem never imports it.
"""

from lmmem.data.encoding import TokenizerOptions, VocabOptions
from lmmem.data.text_source import TextSource
from lmmem.data.tokenization import WordTokenizer
from lmmem.data.writer import prepare

from data_prep.reading import ReadOptions

__all__ = ["ReadOptions", "TextSource", "TokenizerOptions", "VocabOptions", "WordTokenizer", "prepare"]
