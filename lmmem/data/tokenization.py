"""Word tokenisers for the word-vocabulary pipeline (the corpus writer, lmmem.data.writer).

A corpus reader hands the writer *normalised text*: one unit (a WikiText line, a Gutenberg
paragraph, a news sentence, a GigaWord ``<P>``) per line. A tokeniser turns such text into a flat
token list in which every line break becomes the end-of-unit token, so that one ``<eos>``
follows every unit.

Two rules:

``whitespace``
    Split on whitespace, nothing else (the official WikiText tokenisation is already applied
    to the text, ``<unk>`` included). This is exactly ``line.split() + ["<eos>"]`` per line, as
    in the PyTorch word-language-model example and Transformer-XL.

``regex`` (untokenised text: Gutenberg, news, GigaWord), tried left to right at each position:

    1. a number with internal separators: ``3.14``, ``1,000,000``, ``10:30``;
    2. a word: a run of letters and digits (any script), keeping internal apostrophes and
       hyphens: ``don't``, ``o'clock``, ``twenty-one``, ``pleas'd``, ``1990s``;
    3. a run of two or more hyphens (the plain-text em dash ``--``) or dots (``...``);
    4. any other non-space character on its own: ``, . ; : ! ? " ' ( ) [ ] _ & $ %`` ...

    A leading or trailing apostrophe is punctuation (``'tis`` -> ``'`` ``tis``; ``boys'`` ->
    ``boys`` ``'``). Case is kept unless ``--lowercase`` is given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EOS_TEXT = "<eos>"  # what the whitespace rule turns a line break into

WORD_RE = re.compile(
    r"""
      \n                               # end of a unit: becomes <eos>
    | \d+(?:[.,:]\d+)+                 # numbers with internal separators
    | [^\W_]+(?:['\u2019\-][^\W_]+)*   # words, internal apostrophes and hyphens kept
    | -{2,} | \.{2,}                   # dash runs and ellipses
    | \S                               # any other character on its own
    """,
    re.VERBOSE,
)

RULES = ("whitespace", "regex")


@dataclass(frozen=True)
class WordTokenizer:
    """Picklable (it is sent to worker processes); ``__call__`` returns the token list of ``text``
    with an end-of-unit token (``"<eos>"`` or ``"\\n"``) at the end of every unit."""

    rule: str = "whitespace"
    lowercase: bool = False

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown tokenisation rule {self.rule!r}; choose one of {RULES}")

    def __call__(self, text: str) -> list[str]:
        if self.lowercase:
            text = text.lower()
        if self.rule == "whitespace":
            # C-level replace and split: the fastest correct way to put <eos> after every line.
            # (Splitting the UTF-8 bytes is faster, but bytes.split misses Unicode spaces that
            # str.split knows, and checking for them costs what it saves.)
            return text.replace("\n", " " + EOS_TEXT + " ").split()
        return WORD_RE.findall(text)

    def describe(self) -> dict:
        return {"type": "words", "rule": self.rule, "lowercase": self.lowercase}

    def words(self, text: str) -> list[str]:
        """The tokens of ``text`` without end-of-unit markers (for tests and examples)."""
        return [t for t in self(text) if t not in ("\n", EOS_TEXT)]
