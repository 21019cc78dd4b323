"""python -m data_prep: readers, tokenisers, the writer, bad input, and the shared real corpora."""

from __future__ import annotations

import gzip
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lmmem.data.corpus import PreparedCorpus
from lmmem.data.encoding import TokenizerOptions, VocabOptions
from lmmem.data.tokenization import WordTokenizer
from lmmem.data.vocab import EOS, UNK, Vocabulary
from lmmem.data.writer import prepare
from lmmem.errors import DataError

from data_prep.__main__ import main
from data_prep.gigaword import split_by_order
from data_prep.gutenberg import assign_books, book_units
from data_prep.reading import ReadOptions, iter_blocks
from data_prep import wikitext
from conftest import decoded, prep_cli as run_cli

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def needs_shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent (the shared real corpora sit in ../shared/data beside the checkout)")
    return path


# ---------------------------------------------------------------------------------------------
# tokenisers


def test_whitespace_rule_is_line_split_plus_eos():
    text = " = Title = \n \n a b\tc\u00a0d \u3000e\n"
    toks = WordTokenizer("whitespace")(text)
    expected = [w for line in text.splitlines() for w in line.split() + [EOS]]
    assert toks == expected
    assert toks.count(EOS) == 3  # the blank line gets one too


def test_regex_rule_keeps_words_numbers_and_splits_punctuation():
    tok = WordTokenizer("regex")
    assert tok.words("\"Don't,\" said o'clock twenty-one--then... 3.14 or 1,000,000 at 10:30; 1990s!") == [
        '"', "Don't", ",", '"', "said", "o'clock", "twenty-one", "--", "then", "...", "3.14", "or", "1,000,000",
        "at", "10:30", ";", "1990s", "!"]
    assert tok.words("'tis the boys' _word_ caf\u00e9 na\u00efve \u201cq\u201d") == [
        "'", "tis", "the", "boys", "'", "_", "word", "_", "caf\u00e9", "na\u00efve", "\u201c", "q", "\u201d"]
    assert tok("a b\nc\n") == ["a", "b", "\n", "c", "\n"]
    assert WordTokenizer("regex", lowercase=True).words("The Cat") == ["the", "cat"]


def test_unknown_rule_is_refused():
    with pytest.raises(ValueError):
        WordTokenizer("bpe")


# ---------------------------------------------------------------------------------------------
# bounded reading


def test_blocks_end_at_line_breaks_and_normalise_newlines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"\xef\xbb\xbfone\r\ntwo\rthree\nfour")  # BOM, CRLF, CR, no final newline
    text = "".join(t for _, t in iter_blocks(path, ReadOptions()))
    assert text == "one\ntwo\nthree\nfour\n"
    lines = [f"line {i}\n" for i in range(5000)]
    path.write_text("".join(lines))
    blocks = list(iter_blocks(path, ReadOptions(), block_bytes=1000))
    assert len(blocks) > 10 and all(t.endswith("\n") for _, t in blocks)
    assert "".join(t for _, t in blocks) == "".join(lines)
    assert [n for n, _ in blocks][:2] == [1, 1 + blocks[0][1].count("\n")]


def test_gzip_is_recognised_by_content(tmp_path):
    path = tmp_path / "no-suffix"
    path.write_bytes(gzip.compress(b"hello\nworld\n"))
    assert "".join(t for _, t in iter_blocks(path, ReadOptions())) == "hello\nworld\n"


def test_a_huge_line_is_refused_without_reading_it_all(tmp_path, capsys):
    folder = tmp_path / "wt"
    folder.mkdir()
    big = folder / "wiki.train.tokens"
    with open(big, "wb") as f:  # 100 MB with no line break: 4 MB of words, then a sparse tail
        f.write(b"word " * 800_000)
        f.truncate(100_000_000)
    for split in ("valid", "test"):
        (folder / f"wiki.{split}.tokens").write_text(" a b \n")
    with pytest.raises(DataError, match=r"wiki\.train\.tokens:1: line is longer than 1,000,000 bytes.*--max-line-chars"):
        list(iter_blocks(big, ReadOptions()))
    rc, out, err = run_cli(capsys, "wikitext-103", "--source", str(folder), "--out", str(tmp_path / "o"), "--quiet")
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "--max-line-chars" in err


def test_bad_bytes_name_file_and_line_and_the_options(tmp_path, capsys):
    folder = tmp_path / "books"
    folder.mkdir()
    for i in range(3):
        (folder / f"b{i}.txt").write_text("A fine story.\n\nIt ends well.\n")
    (folder / "b1.txt").write_bytes(b"First line.\n\nThe caf\xe9 was shut.\n")  # Latin-1, not UTF-8
    # strict is explicit for Gutenberg (its default reads declared encodings and falls back per line)
    rc, _, err = run_cli(capsys, "gutenberg", "--source", str(folder), "--out", str(tmp_path / "o"), "--quiet",
                         "--encoding-errors", "strict")
    assert rc == 2
    assert "b1.txt:3:" in err and "not valid utf-8" in err and "--encoding-errors" in err and err.count("\n") == 1
    for mode, words in (("fallback", "The caf\u00e9 was"), ("replace", "The caf \ufffd was")):
        out = tmp_path / mode
        rc, _, err = run_cli(capsys, "gutenberg", "--source", str(folder), "--out", str(out), "--quiet",
                             "--encoding-errors", mode, "--min-count", "1", "--vocab-splits", "train,valid,test")
        assert rc == 0, err
        assert words in " ".join(" ".join(decoded(out, s)) for s in ("train", "valid", "test"))


# ---------------------------------------------------------------------------------------------
# WikiText


def reference_wikitext(folder: Path, vocab_splits=("train",)) -> tuple[Vocabulary, dict]:
    """An independent reference: the PyTorch word-LM example's `line.split() + ['<eos>']`."""
    streams = {}
    for split in ("train", "valid", "test"):
        path = folder / f"wiki.{split}.tokens"
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                streams[split] = [w for line in f for w in line.split() + [EOS]]
    counts = Counter(w for s in vocab_splits for w in streams[s])
    return Vocabulary.from_counts(counts), streams


def test_wikitext_matches_the_reference_and_opens(tmp_path, capsys):
    out = tmp_path / "wt"
    rc, stdout, _ = run_cli(capsys, "wikitext-103", "--source", str(FIXTURES / "wikitext"), "--out", str(out))
    assert rc == 0
    vocab, streams = reference_wikitext(FIXTURES / "wikitext")
    corpus = PreparedCorpus.open(out)
    assert corpus.vocab.tokens == vocab.tokens and corpus.vocab.counts == vocab.counts
    for split, words in streams.items():
        assert corpus.tokens(split).tolist() == vocab.encode(words)
        info = corpus.meta["splits"][split]
        assert info["tokens"] == len(words)
        assert info["units"] == words.count(EOS)
    assert corpus.meta["splits"]["train"]["documents"] == 2  # " = Lighthouse keeper = ", " = Tide mill = "
    assert corpus.meta["splits"]["valid"]["oov"] > 0  # "fog", "signal", ... are not train words
    assert corpus.meta["tokenizer"] == {"type": "words", "rule": "whitespace", "lowercase": False}
    assert corpus.meta["format_version"] == 1 and corpus.meta["vocab_splits"] == ["train"]
    assert "vocab size:" in stdout and "valid has" in stdout and "out-of-vocabulary" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.bin", "train.bin", "valid.bin", "vocab.txt"]
    assert (out / "train.bin").stat().st_size == 4 * len(streams["train"])


def test_wikitext_skip_blank_lines(tmp_path):
    src = wikitext.local_source(FIXTURES / "wikitext", ReadOptions(), skip_blank_lines=True)
    prepare(tmp_path, src, TokenizerOptions(), VocabOptions(), quiet=True)
    words = decoded(tmp_path, "train")
    assert f"{EOS} {EOS}" not in " ".join(words)
    lines = [l for l in (FIXTURES / "wikitext" / "wiki.train.tokens").read_text().splitlines() if l.strip()]
    assert words.count(EOS) == len(lines)


def test_wikitext_missing_split_is_a_clear_error_or_allowed(tmp_path, capsys):
    folder = tmp_path / "wt2"
    folder.mkdir()
    for split in ("valid", "test"):
        (folder / f"wiki.{split}.tokens").write_bytes((FIXTURES / "wikitext" / f"wiki.{split}.tokens").read_bytes())
    rc, _, err = run_cli(capsys, "wikitext-103", "--source", str(folder), "--out", str(tmp_path / "o"))
    assert rc == 2 and "wiki.train.tokens" in err and "--allow-missing-splits" in err and err.count("\n") == 1
    rc, out, _ = run_cli(capsys, "wikitext-103", "--source", str(folder), "--out", str(tmp_path / "o"), "--allow-missing-splits")
    assert rc == 0
    corpus = PreparedCorpus.open(tmp_path / "o")
    assert corpus.splits == ["valid", "test"] and corpus.meta["vocab_splits"] == ["valid", "test"]
    vocab, _ = reference_wikitext(folder, ("valid", "test"))
    assert corpus.vocab.tokens == vocab.tokens
    with pytest.raises(DataError, match="no 'train' split"):
        corpus.tokens("train")
    rc, _, err = run_cli(capsys, "wikitext-103", "--source", str(folder), "--out", str(tmp_path / "o2"),
                         "--allow-missing-splits", "--vocab-splits", "train")
    assert rc == 2 and "--vocab-splits" in err


def test_wikitext_train_from_valid_carves_at_an_article(tmp_path):
    src = wikitext.local_source(FIXTURES / "wikitext", ReadOptions(), train_from="valid", holdout_fraction=0.4)
    meta = prepare(tmp_path, src, TokenizerOptions(), VocabOptions(keep_eval_types=True), quiet=True)
    assert list(meta["splits"]) == ["train", "valid", "test"]
    train, valid = " ".join(decoded(tmp_path, "train")), decoded(tmp_path, "valid")
    assert train.startswith(f"{EOS} = Fog signal =") and "pilot" not in train  # train = first article only
    assert valid[:5] == ["=", "Harbour", "pilot", "=", EOS]  # the held-out part starts at a title
    assert meta["splits"]["train"]["from"] == "wiki.valid.tokens"
    assert meta["splits"]["train"]["documents"] == 1 and meta["splits"]["valid"]["documents"] == 1
    assert meta["carved"]["valid_lines"][0] == 7
    vocab = PreparedCorpus.open(tmp_path).vocab
    assert vocab.counts[vocab.ids["Harbour"]] == 0  # --keep-eval-types: an id, with train count 0
    assert meta["splits"]["valid"]["unk"] == 0


def test_output_is_identical_for_any_number_of_workers(tmp_path):
    metas = []
    for w in (1, 2):
        src = wikitext.local_source(FIXTURES / "wikitext", ReadOptions())
        metas.append(prepare(tmp_path / str(w), src, TokenizerOptions(), VocabOptions(), workers=w, quiet=True))
    for name in ("vocab.txt", "train.bin", "valid.bin", "test.bin", "meta.json"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name


def test_rerun_into_the_same_folder_replaces_the_old_preparation(tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(capsys, "wikitext-103", "--source", str(FIXTURES / "wikitext"), "--out", str(out), "--quiet")[0] == 0
    (out / "spm.model").write_text("stale")
    folder = tmp_path / "only-valid-test"
    folder.mkdir()
    for split in ("valid", "test"):
        (folder / f"wiki.{split}.tokens").write_text(" = T = \n x y \n")
    args = ("wikitext-103", "--source", str(folder), "--out", str(out), "--quiet", "--allow-missing-splits")
    rc, _, err = run_cli(capsys, *args)  # another corpus: only on request
    assert rc == 2 and "different prepared corpus" in err and "--overwrite" in err
    assert PreparedCorpus.open(out).splits == ["train", "valid", "test"]
    assert run_cli(capsys, *args, "--overwrite")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.bin", "valid.bin", "vocab.txt"]
    assert PreparedCorpus.open(out).splits == ["valid", "test"]


def test_a_failed_run_leaves_the_previous_corpus_intact(tmp_path, capsys):
    out = tmp_path / "o"
    assert run_cli(capsys, "wikitext-103", "--source", str(FIXTURES / "wikitext"), "--out", str(out), "--quiet")[0] == 0
    bad = tmp_path / "bad"
    bad.mkdir()
    for split in ("train", "valid", "test"):
        (bad / f"wiki.{split}.tokens").write_bytes(b" ok \n \xff \n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, _, err = run_cli(capsys, "wikitext-103", "--source", str(bad), "--out", str(out), "--quiet", "--overwrite")
    assert rc == 2 and "wiki.train.tokens" in err  # the new input fails to decode...
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # ...and the previous corpus is untouched
    assert not list(tmp_path.glob(".o.staging*")) and not list(out.glob(".*tmp*"))
    PreparedCorpus.open(out).tokens("train")


def test_shared_wikitext2_valid_and_test(tmp_path, capsys):
    folder = needs_shared("wikitext-2")
    rc, _, err = run_cli(capsys, "wikitext-103", "--source", str(folder), "--out", str(tmp_path / "a"), "--quiet")
    assert rc == 2 and "wiki.train.tokens" in err
    rc, out, _ = run_cli(capsys, "wikitext-103", "--source", str(folder), "--out", str(tmp_path / "a"), "--allow-missing-splits")
    assert rc == 0
    meta = PreparedCorpus.open(tmp_path / "a").meta
    assert meta["splits"]["valid"]["tokens"] == 217_646 and meta["splits"]["test"]["tokens"] == 245_569  # the published sizes
    assert meta["splits"]["valid"]["oov"] == 0 and meta["splits"]["valid"]["documents"] == 60
    assert "valid has 217,646 tokens" in out
    rc, _, _ = run_cli(capsys, "wikitext-103", "--source", str(folder), "--out", str(tmp_path / "b"), "--quiet", "--train-from", "valid")
    corpus = PreparedCorpus.open(tmp_path / "b")
    assert rc == 0 and corpus.splits == ["train", "valid", "test"]
    assert corpus.meta["splits"]["train"]["tokens"] + corpus.meta["splits"]["valid"]["tokens"] == 217_646


# ---------------------------------------------------------------------------------------------
# Gutenberg

LICENCE_WORDS = ("Gutenberg", "GUTENBERG", "SMALL", "Etext", "etext", "eBook", "EBOOK", "lawyers", "LICENSE", "Produced", "proofread")


def book(name: str, unit: str = "paragraph") -> list[str]:
    text = "".join(book_units(iter_blocks(FIXTURES / "gutenberg" / name, ReadOptions()), unit))
    return text.splitlines()


def test_licence_header_and_footer_are_stripped_and_the_book_kept():
    modern = book("modern-tale.txt")
    assert modern[0] == "A TINY TALE" and modern[-1].endswith("that was the last word of the tale.")
    assert modern[2].startswith("The miller's daughter walked down to the river at dawn, as she did every morning,")
    old = book("old-etext.txt")
    assert old[0] == "SHORT VERSES" and old[-1].endswith("And fill the traveller's empty cup.")
    crlf = book("clockmaker-crlf.txt")
    assert crlf == ["THE CLOCKMAKER",
                    "The clockmaker opened his shop at seven, wound every clock on the wall, and set them all to the church bell.",
                    "At noon a stranger brought in a watch that ran backwards.  The clockmaker looked at it for a long time, and then he smiled."]
    plain = book("no-header.txt")
    assert plain[0] == "THE ORCHARD" and plain[-1] == "She never said which was the best one." and len(plain) == 4
    for lines in (modern, old, crlf, plain):
        assert not any(w in line for line in lines for w in LICENCE_WORDS)


def test_eos_per_line_keeps_every_non_blank_line():
    lines = book("old-etext.txt", unit="line")
    assert lines[:3] == ["SHORT VERSES", "I.  THE LANTERN", "  A lantern swings above the gate,"]
    assert len(lines) == 11 and lines[-1] == "  And fill the traveller's empty cup."


def test_books_are_split_by_a_hash_of_their_name():
    names = [f"book{i}.txt" for i in range(20)]
    a = assign_books(names, 0.1, 0.1)
    assert a == assign_books(list(reversed(names)), 0.1, 0.1)  # independent of listing order
    assert Counter(a.values()) == {"train": 16, "valid": 2, "test": 2}
    assert Counter(assign_books(names[:3], 0.1, 0.1).values()) == {"train": 1, "valid": 1, "test": 1}
    assert Counter(assign_books(names[:5], 0.5, 0.5).values())["train"] == 1


@pytest.mark.parametrize("n, expected", [
    (13, {"test": 1, "valid": 3, "train": 9}),  # the shared folder's size: three valid books, not one
    (8, {"test": 1, "valid": 3, "train": 4}),   # test + valid up to half of the books
    (5, {"test": 1, "valid": 1, "train": 3}),   # no room: the fraction's count
    (3, {"test": 1, "valid": 1, "train": 1}),
    (40, {"test": 4, "valid": 4, "train": 32}),  # the fraction already gives more
])
def test_valid_gets_a_minimum_of_books_within_half_of_the_collection(n, expected):
    names = [f"book{i}.txt" for i in range(n)]
    a = assign_books(names, 0.1, 0.1, min_valid_books=3)
    assert dict(Counter(a.values())) == expected
    old = assign_books(names, 0.1, 0.1)  # min_valid_books=1: the rule before the option
    # the minimum only moves books from train to valid: test and the old valid books stay where they were
    assert all(a[b] == s for b, s in old.items() if s != "train")
    assert "valid" not in assign_books(names, 0.0, 0.1, min_valid_books=3).values()


def test_gutenberg_fixture_end_to_end(tmp_path, capsys):
    out = tmp_path / "g"
    rc, stdout, _ = run_cli(capsys, "gutenberg", "--source", str(FIXTURES / "gutenberg"), "--out", str(out), "--min-count", "2")
    assert rc == 0, stdout
    corpus = PreparedCorpus.open(out)
    meta = corpus.meta
    assert sum(meta["splits"][s]["books"] for s in corpus.splits) == 4
    assert all(meta["splits"][s]["books"] >= 1 for s in ("train", "valid", "test"))
    assert meta["licence_stripped"] == {"headers": 3, "footers": 3}
    assert meta["tokenizer"]["rule"] == "regex" and meta["unit"] == "paragraph"
    train = corpus.vocab.decode(corpus.tokens("train"))
    counts = Counter(train)
    assert all(c >= 2 for t, c in counts.items() if t not in (UNK, EOS))  # --min-count 2
    assert counts[UNK] > 0 and not any(w in train for w in LICENCE_WORDS)


def test_too_few_books_is_a_clear_error(tmp_path, capsys):
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("no-header.txt", "old-etext.txt"):
        (folder / name).write_bytes((FIXTURES / "gutenberg" / name).read_bytes())
    rc, _, err = run_cli(capsys, "gutenberg", "--source", str(folder), "--out", str(tmp_path / "o"))
    assert rc == 2 and "at least 3" in err and "--allow-missing-splits" in err
    rc, _, _ = run_cli(capsys, "gutenberg", "--source", str(folder), "--out", str(tmp_path / "o"), "--quiet",
                       "--allow-missing-splits", "--min-count", "1")
    assert rc == 0 and PreparedCorpus.open(tmp_path / "o").splits == ["train"]


def test_shared_gutenberg(tmp_path, capsys):
    folder = needs_shared("gutenberg")
    out = tmp_path / "g"
    rc, stdout, err = run_cli(capsys, "gutenberg", "--source", str(folder), "--out", str(out), "--encoding-errors", "fallback")
    assert rc == 0, err
    corpus = PreparedCorpus.open(out)
    meta = corpus.meta
    assert sum(meta["splits"][s]["books"] for s in corpus.splits) == 13
    assert meta["licence_stripped"]["headers"] == 13
    for split in corpus.splits:
        words = corpus.vocab.decode(corpus.tokens(split))
        text = " ".join(words)
        assert "Gutenberg" not in text and "SMALL PRINT" not in text and "Etext" not in text
    everything = " ".join(" ".join(decoded(out, s)) for s in corpus.splits)
    # first and last words of books survive (unk-free phrases)
    for phrase in ("Emma Woodhouse , handsome , clever , and rich", "Of Man's first disobedience", "Through Eden took their solitary way"):
        assert phrase in everything
    assert 900_000 < sum(meta["splits"][s]["tokens"] for s in corpus.splits) < 1_200_000
    assert "train has" in stdout


# ---------------------------------------------------------------------------------------------
# GigaWord / news


def test_gigaword_sgml_keeps_stories_joins_paragraphs_and_unescapes(tmp_path, capsys):
    out = tmp_path / "gw"
    rc, _, err = run_cli(capsys, "gigaword", "--source", str(FIXTURES / "gigaword"), "--out", str(out), "--quiet", "--min-count", "1",
                         "--keep-eval-types")
    assert rc == 0, err
    corpus = PreparedCorpus.open(out)
    meta = corpus.meta
    assert meta["input"] == "sgml" and meta["unit"] == "paragraph"
    assert meta["documents_dropped_by_type"] == {"advis": 1, "multi": 1}
    assert [meta["splits"][s]["documents"] for s in ("train", "valid", "test")] == [3, 1, 1]  # 5 stories, by order
    train = " ".join(decoded(out, "train"))
    assert "a union spokesman said ." in train  # a <P> spanning lines is one unit
    assert "Ships & ferries" in train and '" eleven long years "' in train and "< with the tide >" in train
    assert "Advisory" not in train and "Editors" not in train and "Sports" not in train
    assert "Harbour workers end strike" not in train  # headlines only with --headlines
    assert " ".join(decoded(out, "valid")) == "Ferry service between the islands resumed on Wednesday after the storm passed . <eos>"
    assert decoded(out, "test")[:3] == ["A", "harbour", "pilot"]
    rc, _, _ = run_cli(capsys, "gigaword", "--source", str(FIXTURES / "gigaword"), "--out", str(out), "--quiet",
                       "--min-count", "1", "--headlines", "--overwrite")
    assert decoded(out, "train")[:5] == ["Harbour", "workers", "end", "strike", EOS]


def test_news_text_stories_and_entities(tmp_path, capsys):
    out = tmp_path / "n"
    rc, _, err = run_cli(capsys, "gigaword", "--source", str(FIXTURES / "news"), "--out", str(out), "--quiet", "--min-count", "1",
                         "--keep-eval-types")
    assert rc == 0, err
    corpus = PreparedCorpus.open(out)
    assert corpus.meta["input"] == "text" and corpus.meta["unit"] == "line"
    assert [corpus.meta["splits"][s]["documents"] for s in ("train", "valid", "test")] == [2, 1, 1]
    assert decoded(out, "valid")[:3] == ["Caf\u00e9", "owners", "adapt"]
    assert decoded(out, "train").count(EOS) == 7  # one per sentence, none for the blank lines
    assert split_by_order(100, 0.05, 0.1) == (85, 90)


def test_shared_news(tmp_path, capsys):
    folder = needs_shared("news-abc")
    out = tmp_path / "n"
    rc, stdout, err = run_cli(capsys, "gigaword", "--source", str(folder), "--out", str(out), "--encoding-errors", "fallback")
    assert rc == 0, err
    meta = PreparedCorpus.open(out).meta
    assert meta["files"] == 2 and sum(meta["splits"][s]["documents"] for s in ("train", "valid", "test")) > 3000
    assert 700_000 < sum(meta["splits"][s]["tokens"] for s in ("train", "valid", "test")) < 850_000
    assert "Müller" in " ".join(decoded(out, "test")) or "M\u00fcller" in PreparedCorpus.open(out).vocab.ids


# ---------------------------------------------------------------------------------------------
# SentencePiece


def test_sentencepiece_model_vocab_and_round_trip(tmp_path, capsys):
    import sentencepiece as spm

    from lmmem.data.synthetic import SyntheticConfig, generate  # plenty of varied text, offline

    folder = tmp_path / "src"
    folder.mkdir()
    cfg = SyntheticConfig(seed=0, train_tokens=20_000, valid_tokens=2_000, test_tokens=2_000)
    texts: dict[str, list[str]] = {}
    for split, text in generate(cfg):
        texts.setdefault(split, []).append(text)
    for split, parts in texts.items():
        (folder / f"wiki.{split}.tokens").write_text("".join(parts))
    out = tmp_path / "sp"
    rc, _, err = run_cli(capsys, "wikitext-103", "--source", str(folder), "--out", str(out), "--quiet",
                         "--tokenizer", "sentencepiece", "--vocab-size", "300")
    assert rc == 0, err
    corpus = PreparedCorpus.open(out)
    assert corpus.meta["tokenizer"]["type"] == "sentencepiece" and (out / "spm.model").is_file()
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    assert corpus.vocab.tokens == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]  # SP id order
    assert corpus.vocab.tokens[:2] == [EOS, UNK] and len(corpus.vocab) == 300
    ids = corpus.tokens("valid").tolist()
    first = ids[: ids.index(corpus.vocab.eos_id)]
    assert sp.decode(first) == (folder / "wiki.valid.tokens").read_text().splitlines()[0]
    counts = np.bincount(corpus.tokens("train"), minlength=300)
    assert counts.tolist() == corpus.vocab.counts
    rc, _, err = run_cli(capsys, "wikitext-103", "--source", str(folder), "--out", str(out), "--quiet",
                         "--tokenizer", "sentencepiece", "--overwrite")
    assert rc == 2 and "--vocab-size" in err
    rc, _, err = run_cli(capsys, "wikitext-103", "--source", str(folder), "--out", str(out), "--quiet",
                         "--tokenizer", "sentencepiece", "--vocab-size", "100000", "--overwrite")
    assert rc == 2 and "--vocab-size" in err
    assert PreparedCorpus.open(out).meta["tokenizer"]["type"] == "sentencepiece"  # the failed re-run kept the corpus
    rc, _, _ = run_cli(capsys, "wikitext-103", "--source", str(folder), "--out", str(tmp_path / "w"), "--quiet")
    assert rc == 0 and not (tmp_path / "w" / "spm.model").exists()


# ---------------------------------------------------------------------------------------------
# the hub, without the network: datasets.load_dataset is replaced by a fake


class FakeHub:
    def __init__(self, tables):
        self.tables, self.calls = tables, []

    def __call__(self, path, name=None, split=None, streaming=False):
        self.calls.append((path, name, split, streaming))
        if (path, split) not in self.tables:
            raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")
        return iter(self.tables[(path, split)])


def test_hub_sources_stream_the_right_fields(tmp_path, monkeypatch):
    import datasets

    rows = {s: [{"text": ""}, {"text": " = A = \n"}, {"text": f" {s} words here \n"}] for s in ("train", "validation", "test")}
    book_text = "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\nA story.\n\nThe end.\n*** END OF THE PROJECT GUTENBERG EBOOK X ***\n"
    fake = FakeHub({
        **{("Salesforce/wikitext", s): r for s, r in rows.items()},
        **{("deepmind/pg19", s): [{"text": book_text, "short_book_title": "X"}] for s in rows},
        **{("gigaword", s): [{"document": f"the {s} story #", "summary": "s"}] for s in rows},
    })
    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert main(["wikitext-103", "--source", "hub", "--out", str(tmp_path / "w"), "--quiet"]) == 0
    assert ("Salesforce/wikitext", "wikitext-103-v1", "validation", True) in fake.calls
    assert decoded(tmp_path / "w", "valid") == [EOS, "=", "A", "=", EOS, UNK, "words", "here", EOS]
    assert PreparedCorpus.open(tmp_path / "w").meta["source"] == "hub:Salesforce/wikitext/wikitext-103-v1"
    assert main(["gutenberg", "--source", "hub", "--out", str(tmp_path / "g"), "--quiet", "--min-count", "1"]) == 0
    assert decoded(tmp_path / "g", "test") == ["A", "story", ".", EOS, "The", "end", ".", EOS]
    assert main(["gigaword", "--source", "hub", "--out", str(tmp_path / "n"), "--quiet", "--min-count", "1"]) == 0
    assert decoded(tmp_path / "n", "valid") == ["the", UNK, "story", "#", EOS]  # "validation" is no train word
    assert decoded(tmp_path / "n", "train")[0] == "the"


def test_hub_failure_is_a_data_error(tmp_path, monkeypatch, capsys):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", FakeHub({}))
    rc, _, err = run_cli(capsys, "wikitext-103", "--source", "hub:nope/none", "--out", str(tmp_path / "o"), "--quiet")
    assert rc == 2 and "nope/none" in err and "--source" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# bad input and the CLI


@pytest.mark.parametrize("corpus", ["wikitext-103", "gutenberg", "gigaword"])
def test_missing_and_empty_folders(tmp_path, capsys, corpus):
    rc, _, err = run_cli(capsys, corpus, "--source", str(tmp_path / "absent"), "--out", str(tmp_path / "o"))
    assert rc == 2 and "does not exist" in err and "--source" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    rc, _, err = run_cli(capsys, corpus, "--source", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert rc == 2 and "holds no" in err or "holds none" in err
    assert err.count("\n") == 1


def test_empty_text_is_an_error(tmp_path, capsys):
    folder = tmp_path / "blank"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"wiki.{split}.tokens").write_text("")
    rc, _, err = run_cli(capsys, "wikitext-103", "--source", str(folder), "--out", str(tmp_path / "o"))
    assert rc == 2 and "came out empty" in err


def test_unknown_flags_and_bad_values_exit_2(tmp_path, capsys):
    for argv in (["wikitext-103", "--source", "x", "--out", "y", "--frobnicate"],
                 ["gutenberg", "--source", "x", "--out", "y", "--valid-fraction", "1.5"],
                 ["nosuchcorpus"], []):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err  # one line naming the fix, not argparse's usage block
        assert err.startswith("error: ") and err.count("\n") == 1, (argv, err)


@pytest.mark.slow
def test_the_module_cli_exits_2_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "data_prep", "gutenberg", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: corpus folder") and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# streaming: memory does not grow with the corpus


def test_peak_memory_does_not_grow_with_corpus_size(tmp_path, monkeypatch):
    import tracemalloc

    from lmmem.data import id_files

    # Fixed-size pieces everywhere; shrink the id chunks (4M tokens by default) below both sizes
    # here so that the test shows the bound instead of the chunk filling up.
    monkeypatch.setattr(id_files, "ARRAY_CHUNK", 1 << 16)
    rng = np.random.default_rng(0)
    words = np.array([f"w{i}" for i in range(2000)])
    line = lambda: " ".join(words[rng.integers(0, 2000, size=12)]) + " \n"  # noqa: E731
    peaks = []
    for n_lines in (40_000, 160_000):  # ~2.5 MB and ~10 MB of text
        folder = tmp_path / f"c{n_lines}"
        folder.mkdir()
        chunk = "".join(line() for _ in range(10_000))
        with open(folder / "wiki.train.tokens", "w") as f:
            for _ in range(n_lines // 10_000):
                f.write(chunk)
        for split in ("valid", "test"):
            (folder / f"wiki.{split}.tokens").write_text(line())
        tracemalloc.start()
        prepare(tmp_path / f"o{n_lines}", wikitext.local_source(folder, ReadOptions()), TokenizerOptions(), VocabOptions(), quiet=True)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    size_ratio = (tmp_path / "c160000" / "wiki.train.tokens").stat().st_size / (tmp_path / "c40000" / "wiki.train.tokens").stat().st_size
    assert size_ratio > 3.9
    assert peaks[1] < 1.3 * peaks[0], peaks  # 4x the text, about the same peak
    assert peaks[1] < 40e6


def test_text_units_give_back_the_units_as_text(tmp_path, capsys):
    """PreparedCorpus.text_units: what a model with its own tokenizer reads (one string per unit)."""
    from lmmem.data.corpus import PreparedCorpus

    src = tmp_path / "src"
    src.mkdir()
    lines = ["the cat sat .", "a dog ran far", "the cat ran ."] * 5
    for split in ("train", "valid", "test"):
        (src / f"wiki.{split}.tokens").write_text("\n".join(lines) + "\n")
    rc, _, err = run_cli(capsys, "wikitext-103", "--source", str(src), "--out", str(tmp_path / "c"), "--skip-blank-lines")
    assert rc == 0, err
    corpus = PreparedCorpus.open(tmp_path / "c")
    assert list(corpus.text_units("valid", chunk=7)) == lines  # chunk boundaries inside units
