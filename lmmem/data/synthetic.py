"""The embedded synthetic corpus: English-like text with the rare-event structure lmmem is about.

``train.py`` with no ``--data`` trains on this, offline, on a fresh machine. It is generated from a
seed (numpy ``Generator``), in about a second, and written through the corpus writer
(:mod:`lmmem.data.writer`, the one ``python -m data_prep`` uses), so it is an ordinary
prepared-corpus folder (``vocab.txt``, ``{train,valid,test}.bin``, ``meta.json``).
The same seed and sizes give byte-identical files.

What a model can learn from it, and what only a memory can:

* **Zipfian vocabulary.** A few thousand pseudo-words built from syllables (``brea``, ``stoun``,
  ``flimeth``); shorter words are more frequent, unigram probabilities follow a Zipf-Mandelbrot law.
* **Local structure.** Each word has four preferred successors (themselves Zipf-drawn); about half
  of the words follow the previous word that way. Sentences end with ``.`` and one ``<eos>``.
* **Topics.** Every document has a topic that boosts a set of otherwise mid-to-rare words.
* **Recurring rare names.** A pool of capitalised names with a long-tailed popularity across
  documents. Each document introduces a few names that then recur within it after cue words
  (``said Brenmal``, ``told Brenmal``) or before ``said`` at the start of a sentence. Which name
  follows a cue is predictable only from the document so far: most names are rare in train (seen
  in one or two documents), and some occur only in valid/test. That is the case for Hebbian
  softmax (rare words learned fast), the neural cache and MbPA (words seen a few tokens ago).

The vocabulary is closed over the generated text: words that occur only in valid/test are in the
vocabulary with training count 0 (``--keep-eval-types``), as in WikiText every test word has an
entry; so a memory can predict a name it has only seen earlier in the same test document.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lmmem.data.encoding import TokenizerOptions, VocabOptions
from lmmem.data.text_source import ReadContext, TextSource
from lmmem.data.writer import prepare
from lmmem.errors import DataError

ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z",
          "bl", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "pl", "pr", "sh", "sk", "sl", "sp", "st", "th", "tr")
VOWELS = ("a", "e", "i", "o", "u", "ai", "au", "ea", "ee", "ie", "oa", "oo", "ou")
CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "d", "k", "nd", "nt", "st", "rn", "ng", "th", "sh")
CUES = ("said", "told", "asked", "met", "thanked", "followed")  # a name comes next
SAID = "said"
PERIOD = "."


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int = 0
    train_tokens: int = 500_000
    valid_tokens: int = 50_000
    test_tokens: int = 50_000
    words: int = 4_000  # common pseudo-words
    names: int = 20_000  # name pool
    topics: int = 60
    topic_words: int = 80  # words a topic boosts
    zipf_exponent: float = 1.07
    zipf_offset: float = 2.7
    name_offset: float = 20.0  # name popularity ~ 1 / (rank + offset): a long tail, no dominant head
    successors: int = 4
    p_successor: float = 0.5
    p_topic: float = 0.15
    p_name: float = 0.45  # per sentence: one name mention
    mean_sentence_words: float = 9.0
    mean_document_sentences: float = 22.0


def _make_words(rng: np.random.Generator, n: int, syllables: tuple[int, ...], p_syllables, capitalise: bool,
                taken: set[str]) -> list[str]:
    """``n`` distinct syllable words, ordered by generation (shorter first when sorted later)."""
    out: list[str] = []
    seen = set(taken)
    while len(out) < n:
        m = 2 * (n - len(out)) + 64
        k = rng.choice(syllables, size=m, p=p_syllables)
        on = rng.integers(len(ONSETS), size=(m, 3))
        vo = rng.integers(len(VOWELS), size=(m, 3))
        co = rng.integers(len(CODAS), size=(m, 3))
        for i in range(m):
            w = "".join(ONSETS[on[i, j]] + VOWELS[vo[i, j]] + CODAS[co[i, j]] for j in range(k[i]))
            if capitalise:
                w = w.capitalize()
            if w not in seen:
                seen.add(w)
                out.append(w)
                if len(out) == n:
                    break
    return out


class _Language:
    """The lexicon and the fixed tables of the generator."""

    def __init__(self, cfg: SyntheticConfig, rng: np.random.Generator):
        words = _make_words(rng, cfg.words, (1, 2, 3), [0.35, 0.45, 0.2], False, set(CUES) | {PERIOD})
        words.sort(key=len)  # stable: short words get the frequent ranks, as in natural language
        names = _make_words(rng, cfg.names, (2, 3), [0.6, 0.4], True, set())
        self.n_words = cfg.words
        self.cue0 = cfg.words  # ids: words, cues, period, names
        self.period = self.cue0 + len(CUES)
        self.said = self.cue0 + CUES.index(SAID)
        self.name0 = self.period + 1
        self.lexicon = np.array(words + list(CUES) + [PERIOD] + names, dtype=object)
        ranks = np.arange(cfg.words, dtype=np.float64)
        p = 1.0 / (ranks + cfg.zipf_offset) ** cfg.zipf_exponent
        self.p_word = p / p.sum()
        self.successor = rng.choice(cfg.words, size=(cfg.words, cfg.successors), p=self.p_word)
        sp = 1.0 / np.arange(1, cfg.successors + 1)
        self.p_successor_rank = sp / sp.sum()
        self.topic = np.stack([rng.choice(np.arange(50, cfg.words), size=cfg.topic_words, replace=False)
                               for _ in range(cfg.topics)])
        pn = 1.0 / (np.arange(cfg.names) + cfg.name_offset)
        self.p_name = pn / pn.sum()


def _document(cfg: SyntheticConfig, lang: _Language, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(token ids with a period closing each sentence, ids of the names it uses)."""
    n_sent = 3 + rng.poisson(cfg.mean_document_sentences - 3)
    lens = 3 + rng.poisson(cfg.mean_sentence_words - 3, size=n_sent)
    starts = np.cumsum(lens) - lens
    n = int(lens.sum())
    topic = lang.topic[rng.integers(len(lang.topic))]

    # 0: a Zipf word, 1: a preferred successor of the previous word, 2: a topic word.
    mode = rng.choice(3, size=n, p=[1.0 - cfg.p_successor - cfg.p_topic, cfg.p_successor, cfg.p_topic])
    mode[starts] = np.where(mode[starts] == 1, 0, mode[starts])  # sentences start afresh
    ids = np.where(mode == 2, topic[rng.integers(len(topic), size=n)], rng.choice(lang.n_words, size=n, p=lang.p_word))
    which = rng.choice(cfg.successors, size=n, p=lang.p_successor_rank)
    # Successor chains, resolved one chain depth per vectorised step.
    pending = np.flatnonzero(mode == 1)
    resolved = mode != 1
    while pending.size:
        ready = pending[resolved[pending - 1]]
        ids[ready] = lang.successor[ids[ready - 1], which[ready]]
        resolved[ready] = True
        pending = pending[~resolved[pending]]

    # Names: a few per document, popular ones shared across documents, the first one mentioned most.
    k = int(rng.integers(2, 6))
    cast = rng.choice(len(lang.p_name), size=k, replace=False, p=lang.p_name)
    p_cast = 1.0 / np.arange(1, k + 1)
    mentions = np.flatnonzero(rng.random(n_sent) < cfg.p_name)
    who = lang.name0 + cast[rng.choice(k, size=len(mentions), p=p_cast / p_cast.sum())]
    subject = rng.random(len(mentions)) < 0.3  # "Name said ..." at the start, else "... cue Name ..."
    s = starts[mentions[subject]]
    ids[s], ids[s + 1] = who[subject], lang.said
    m = mentions[~subject]
    pos = starts[m] + (rng.random(len(m)) * (lens[m] - 1)).astype(np.int64)
    ids[pos], ids[pos + 1] = lang.cue0 + rng.integers(len(CUES), size=len(m)), who[~subject]
    return np.insert(ids, np.cumsum(lens), lang.period), cast + lang.name0


def generate(cfg: SyntheticConfig, stats: dict | None = None) -> Iterator[tuple[str, str]]:
    """(split, one document's text, a sentence per line) for train, then valid, then test."""
    rng = np.random.default_rng(cfg.seed)
    lang = _Language(cfg, rng)
    seen: dict[str, set] = {}
    for split, target in (("train", cfg.train_tokens), ("valid", cfg.valid_tokens), ("test", cfg.test_tokens)):
        made = 0
        names = seen.setdefault(split, set())
        while made < target:
            ids, cast = _document(cfg, lang, rng)
            names.update(cast.tolist())
            made += len(ids) + int((ids == lang.period).sum())  # words and periods, plus one <eos> a sentence
            text = " ".join(lang.lexicon[ids].tolist()).replace(" . ", " .\n")
            yield split, text + "\n"
    if stats is not None:
        train = seen.get("train", set())
        stats["names"] = {
            "pool": cfg.names,
            "in_train": len(train),
            "only_in_valid_or_test": len((seen.get("valid", set()) | seen.get("test", set())) - train),
        }


def default_dir() -> Path:
    """Where ``train.py`` without ``--data`` keeps the embedded corpus: ``$LMMEM_CACHE/synthetic-default``
    (default ``~/.cache/lmmem``)."""
    cache = Path(os.environ.get("LMMEM_CACHE", Path.home() / ".cache" / "lmmem"))
    return cache / "synthetic-default"


def write_synthetic_corpus(out_dir: str | Path, seed: int = 0, train_tokens: int = 500_000, valid_tokens: int = 50_000,
                           test_tokens: int = 50_000, *, quiet: bool = True, overwrite: bool = False, locked: bool = False,
                           **overrides) -> Path:
    """Generate the corpus and write it as a prepared folder (through the corpus writer, the
    same as for real corpora); returns ``out_dir``. ``overrides`` set other SyntheticConfig fields;
    ``overwrite`` and ``locked`` are :func:`lmmem.data.writer.prepare`'s."""
    cfg = SyntheticConfig(seed=seed, train_tokens=train_tokens, valid_tokens=valid_tokens, test_tokens=test_tokens, **overrides)
    for name in ("train_tokens", "valid_tokens", "test_tokens"):
        if getattr(cfg, name) < 1:
            raise DataError(f"--{name.replace('_', '-')} must be at least 1")

    def read(ctx: ReadContext):
        stats: dict = {}
        for split, text in generate(cfg, stats):
            ctx.documents[split] += 1
            yield split, text
        ctx.info.update(stats)

    source = TextSource(
        corpus="synthetic", source="lmmem.data.synthetic (embedded generator)", splits=("train", "valid", "test"),
        read=read, unit="sentence",
        info={"generator": "Zipfian pseudo-words, successor and topic structure, recurring rare names; see lmmem/data/synthetic.py",
              "seed": cfg.seed},
    )
    prepare(out_dir, source, TokenizerOptions(kind="words", rule="whitespace"),
            VocabOptions(min_count=1, keep_eval_types=True), options=asdict(cfg), workers=1, quiet=quiet,
            overwrite=overwrite, locked=locked)
    return Path(out_dir)
