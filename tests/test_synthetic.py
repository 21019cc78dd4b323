"""The embedded synthetic corpus: a valid prepared folder, deterministic, with recurring rare names."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from lmmem.data.corpus import PreparedCorpus
from lmmem.data.synthetic import CUES, SyntheticConfig, generate, write_synthetic_corpus

SMALL = dict(train_tokens=30_000, valid_tokens=4_000, test_tokens=4_000)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return write_synthetic_corpus(tmp_path_factory.mktemp("syn") / "a", seed=3, **SMALL)


def test_writes_a_prepared_corpus_that_opens(small):
    corpus = PreparedCorpus.open(small)
    assert corpus.splits == ["train", "valid", "test"]
    meta = corpus.meta
    assert meta["corpus"] == "synthetic" and meta["seed"] == 3
    assert meta["options"]["train_tokens"] == 30_000
    for split, target in (("train", 30_000), ("valid", 4_000), ("test", 4_000)):
        ids = corpus.tokens(split)
        assert target <= len(ids) < target + 2_000  # whole documents, so a little over
        assert ids.max() < len(corpus.vocab)
        assert meta["splits"][split]["documents"] >= 1
    assert corpus.vocab.tokens[:2] == ["<eos>", "<unk>"]


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(small, tmp_path):
    again = write_synthetic_corpus(tmp_path / "b", seed=3, **SMALL)
    other = write_synthetic_corpus(tmp_path / "c", seed=4, **SMALL)
    names = sorted(p.name for p in small.iterdir())
    assert names == ["meta.json", "test.bin", "train.bin", "valid.bin", "vocab.txt"]
    for name in names:
        assert (small / name).read_bytes() == (again / name).read_bytes(), name
    assert (small / "train.bin").read_bytes() != (other / "train.bin").read_bytes()


def test_text_has_sentences_zipfian_words_and_recurring_rare_names(small):
    corpus = PreparedCorpus.open(small)
    vocab = corpus.vocab
    train = np.asarray(corpus.tokens("train"))
    words = vocab.decode(train[:2000])
    text = " ".join(words)
    assert " . <eos> " in text  # every sentence ends with a period and one <eos>
    assert (train == vocab.eos_id).sum() == (train == vocab.ids["."]).sum()

    counts = np.asarray(vocab.counts)
    ordinary = [i for i, t in enumerate(vocab.tokens) if t.isalpha() and t.islower() and t not in CUES]
    c = np.sort(counts[ordinary])[::-1]
    assert c[0] > 50 * c[len(c) // 2] > 0  # a heavy head and a long tail (Zipf)

    names = np.array([i for i, t in enumerate(vocab.tokens) if t[:1].isupper()])
    name_counts = counts[names]
    assert (name_counts == 0).sum() > 0  # some names occur only in valid/test ...
    assert ((name_counts >= 1) & (name_counts <= 3)).sum() > 0.3 * len(names)  # ... most are rare in train
    # A name after a cue word is usually one already mentioned in the same document:
    # that is what a cache or MbPA can exploit and a plain softmax cannot.
    is_name = np.isin(train, names)
    cue_ids = [vocab.ids[c] for c in CUES if c != "said"]  # "said" also follows a name: "Brenmal said ..."
    after_cue = np.flatnonzero(np.isin(train[:-1], cue_ids)) + 1
    assert is_name[after_cue].mean() > 0.9
    seen_before = [train[i] in set(train[max(0, i - 600):i].tolist()) for i in after_cue[:400]]
    assert np.mean(seen_before) > 0.5


def test_eval_only_words_are_in_the_vocabulary_with_count_zero(small):
    corpus = PreparedCorpus.open(small)
    test = np.asarray(corpus.tokens("test"))
    assert (test == corpus.vocab.unk_id).sum() == 0
    unseen = [i for i in np.unique(test) if corpus.vocab.counts[i] == 0 and i != corpus.vocab.unk_id]
    assert unseen  # names that never occur in train, but have an id
    assert json.loads((small / "meta.json").read_text())["names"]["only_in_valid_or_test"] > 0


def test_default_size_is_quick_and_fits_the_brief(tmp_path):
    t = time.perf_counter()
    root = write_synthetic_corpus(tmp_path / "default")
    elapsed = time.perf_counter() - t
    corpus = PreparedCorpus.open(root)
    assert elapsed < 20  # about 1-2 s on a laptop core
    assert 480_000 <= corpus.meta["splits"]["train"]["tokens"] <= 520_000
    assert 5_000 <= len(corpus.vocab) <= 10_000


def test_generate_is_deterministic_text():
    cfg = SyntheticConfig(seed=1, train_tokens=2_000, valid_tokens=300, test_tokens=300)
    a, b = list(generate(cfg)), list(generate(cfg))
    assert a == b
    assert [s for s, _ in a][-1] == "test" and all(t.endswith(".\n") for _, t in a)


def test_cli_writes_it(tmp_path, capsys):
    from data_prep.__main__ import main

    assert main(["synthetic", "--out", str(tmp_path / "s"), "--seed", "2", "--train-tokens", "5000",
                 "--valid-tokens", "800", "--test-tokens", "800"]) == 0
    assert "train has" in capsys.readouterr().out
    assert PreparedCorpus.open(tmp_path / "s").meta["seed"] == 2
