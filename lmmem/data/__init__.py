"""Data: vocabularies, prepared-corpus folders, BPTT batching and the embedded synthetic corpus."""

from lmmem.data.corpus import PreparedCorpus
from lmmem.data.vocab import EOS, UNK, Vocabulary

__all__ = ["EOS", "UNK", "PreparedCorpus", "Vocabulary"]
