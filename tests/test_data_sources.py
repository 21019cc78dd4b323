"""Reading real-world input: Gutenberg books in the encodings their headers declare, any Hugging
Face text dataset (hub or local parquet / JSON lines / text), and other text encoded with a
trained model's own vocabulary (``--vocab-from``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmmem.data.corpus import PreparedCorpus
from lmmem.data.vocab import EOS, UNK

from data_prep.__main__ import main
from conftest import SHARED_DATA, decoded, prep_cli as run_cli

FIXTURES = Path(__file__).resolve().parent / "fixtures"


# ---------------------------------------------------------------------------------------------
# Gutenberg encodings

HEADER = ("The Project Gutenberg EBook of {title}\n\nTitle: {title}\n\n{declaration}"
          "*** START OF THE PROJECT GUTENBERG EBOOK {title} ***\n\n\n")
FOOTER = "\n\n*** END OF THE PROJECT GUTENBERG EBOOK {title} ***\n"


def book(title: str, body: str, declaration: str | None) -> str:
    decl = f"Character set encoding: {declaration}\n\n" if declaration else ""
    return HEADER.format(title=title, declaration=decl) + body + FOOTER.format(title=title)


def latin1_library(folder: Path) -> Path:
    """Three books: Latin-1 declaring it, Latin-1 declaring nothing, plain ASCII declaring ASCII."""
    folder.mkdir()
    body = "The caf\u00e9 was near the \u00e9glise.\n\nNa\u00efve words, caf\u00e9 again.\n\nA plain line.\n"
    (folder / "declared.txt").write_bytes(book("Declared", body, "ISO-8859-1").encode("latin-1"))
    (folder / "undeclared.txt").write_bytes(book("Undeclared", body, None).encode("latin-1"))
    (folder / "ascii.txt").write_bytes(book("Ascii", "Plain words only.\n\nMore plain words, caf.\n", "ASCII").encode("ascii"))
    return folder


def test_gutenberg_reads_declared_encodings_and_falls_back_per_line(tmp_path, capsys):
    src = latin1_library(tmp_path / "books")
    out = tmp_path / "g"
    rc, stdout, err = run_cli(capsys, "gutenberg", "--source", str(src), "--out", str(out), "--min-count", "1",
                              "--vocab-splits", "train,valid,test")
    assert rc == 0, err
    corpus = PreparedCorpus.open(out)
    words = set(corpus.vocab.tokens)
    assert {"caf\u00e9", "\u00e9glise", "Na\u00efve"} <= words  # read correctly both ways, not mojibake
    assert not any("\u00c3" in w or "\ufffd" in w for w in words)
    dec = corpus.meta["decoding"]
    assert dec["encoding"] == "auto" and dec["errors"] == "fallback"
    books = dec["books"]
    n_lines = {name: (src / name).read_bytes().count(b"\n") for name in ("declared.txt", "undeclared.txt", "ascii.txt")}
    assert books["declared.txt"] == {"declared": "ISO-8859-1", "read_as": "iso8859-1",
                                     "lines": {"iso8859-1": n_lines["declared.txt"]}}
    # no declaration: UTF-8, and the two lines with a Latin-1 byte each fall back to Windows-1252
    assert books["undeclared.txt"] == {"declared": None, "read_as": "utf-8",
                                       "lines": {"utf-8": n_lines["undeclared.txt"] - 2, "cp1252 (fallback)": 2}}
    assert books["ascii.txt"] == {"declared": "ASCII", "read_as": "utf-8", "lines": {"utf-8": n_lines["ascii.txt"]}}
    assert dec["lines"] == {"utf-8": n_lines["undeclared.txt"] - 2 + n_lines["ascii.txt"],
                            "iso8859-1": n_lines["declared.txt"], "cp1252 (fallback)": 2}
    assert "undeclared.txt (no declaration, read as utf-8): " in stdout and "2 cp1252 (fallback)" in stdout
    assert "declared.txt (declares 'ISO-8859-1', read as iso8859-1)" in stdout

    # strict stays available, explicitly: the undeclared Latin-1 book stops it with a one-line error
    rc, _, err = run_cli(capsys, "gutenberg", "--source", str(src), "--out", str(tmp_path / "s"), "--encoding-errors", "strict")
    assert rc == 2 and "undeclared.txt:" in err and "not valid utf-8" in err and err.count("\n") == 1
    # an explicit --encoding reads every book with it, headers ignored
    rc, _, err = run_cli(capsys, "gutenberg", "--source", str(src), "--out", str(tmp_path / "l"), "--encoding", "latin-1",
                         "--encoding-errors", "strict", "--quiet", "--min-count", "1")
    assert rc == 0, err
    assert PreparedCorpus.open(tmp_path / "l").meta["decoding"]["lines"] == {"latin-1": sum(n_lines.values())}


def test_wikitext_stays_strict_by_default(tmp_path, capsys):
    src = tmp_path / "wt"
    src.mkdir()
    for split in ("train", "valid", "test"):
        (src / f"wiki.{split}.tokens").write_bytes(" = T = \n caf\u00e9 \n".encode("latin-1"))
    rc, _, err = run_cli(capsys, "wikitext-103", "--source", str(src), "--out", str(tmp_path / "o"))
    assert rc == 2 and "not valid utf-8" in err


def test_shared_gutenberg_works_without_flags(tmp_path, capsys):
    folder = SHARED_DATA / "gutenberg"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (the shared real corpora sit in ../shared/data beside the checkout)")
    rc, stdout, err = run_cli(capsys, "gutenberg", "--source", str(folder), "--out", str(tmp_path / "g"))
    assert rc == 0, err
    dec = PreparedCorpus.open(tmp_path / "g").meta["decoding"]
    # two books declare ASCII; chesterton-ball.txt and shakespeare-caesar.txt each have 2 non-UTF-8 lines
    assert dec["books"]["chesterton-ball.txt"]["lines"]["cp1252 (fallback)"] == 2
    assert dec["books"]["shakespeare-caesar.txt"]["lines"]["cp1252 (fallback)"] == 2
    assert dec["books"]["chesterton-brown.txt"]["declared"] == "ASCII"
    assert "decoded lines:" in stdout
    # three valid books by default (one play alone made a noisy valid split); the test book is unchanged
    splits = PreparedCorpus.open(tmp_path / "g").meta["splits"]
    assert splits["valid"]["book_names"] == ["austen-persuasion.txt", "chesterton-ball.txt", "shakespeare-macbeth.txt"]
    assert splits["test"]["book_names"] == ["chesterton-brown.txt"] and splits["train"]["books"] == 9
    rc, _, err = run_cli(capsys, "gutenberg", "--source", str(folder), "--out", str(tmp_path / "one"), "--min-valid-books", "1")
    assert rc == 0, err  # the rule before the option: Macbeth alone
    assert PreparedCorpus.open(tmp_path / "one").meta["splits"]["valid"]["book_names"] == ["shakespeare-macbeth.txt"]


# ---------------------------------------------------------------------------------------------
# any text: local parquet / JSON lines / text, and hub datasets

TRAIN_ROWS = ["The cat sat on the mat.\nThe dog sat too.", "A cat and a dog.", "The mat was red."]
VALID_ROWS = ["The red cat.", "A dog sat."]
TEST_ROWS = ["The zebra sat.", "A cat."]


def write_rows(path: Path, rows: list[str], column: str = "body") -> Path:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({column: rows, "id": list(range(len(rows)))}), path)
    else:
        path.write_text("".join(json.dumps({column: r, "id": i}) + "\n" for i, r in enumerate(rows)), encoding="utf-8")
    return path


def expected_words(rows: list[str]) -> list[str]:
    from lmmem.data.tokenization import WordTokenizer

    return WordTokenizer("regex")("".join(r + "\n" for r in rows))


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_local_dataset_folder_with_a_text_column(tmp_path, capsys, suffix):
    src = tmp_path / "ds"
    (src / "data").mkdir(parents=True)
    write_rows(src / "data" / f"train-00000-of-00001{suffix}", TRAIN_ROWS)
    write_rows(src / "data" / f"validation-00000-of-00001{suffix}", VALID_ROWS)
    write_rows(src / "data" / f"test-00000-of-00001{suffix}", TEST_ROWS)
    out = tmp_path / "o"
    # the default column `text` is not there: one line naming the columns there are, not a KeyError
    rc, _, err = run_cli(capsys, "text", "--source", str(src), "--out", str(out))
    assert rc == 2 and "no column 'text'" in err and "body, id" in err and "--text-column" in err and err.count("\n") == 1
    rc, stdout, err = run_cli(capsys, "text", "--source", str(src), "--out", str(out), "--text-column", "body", "--min-count", "1")
    assert rc == 0, err
    corpus = PreparedCorpus.open(out)
    assert corpus.splits == ["train", "valid", "test"]
    for split, rows in (("train", TRAIN_ROWS), ("valid", VALID_ROWS), ("test", TEST_ROWS)):
        want = [EOS if w == "\n" else w if w in corpus.vocab else UNK for w in expected_words(rows)]
        assert decoded(out, split) == want
    assert corpus.meta["splits"]["train"]["documents"] == 3  # rows
    assert "zebra" not in corpus.vocab and corpus.meta["splits"]["test"]["oov"] == 1


def test_single_file_and_train_only_datasets(tmp_path, capsys):
    src = tmp_path / "only-train"
    src.mkdir()
    write_rows(src / "train.jsonl", TRAIN_ROWS, column="text")
    rc, _, err = run_cli(capsys, "text", "--source", str(src), "--out", str(tmp_path / "o"))
    assert rc == 2 and "no valid, test file(s)" in err and "--allow-missing-splits" in err
    rc, _, err = run_cli(capsys, "text", "--source", str(src), "--out", str(tmp_path / "o"), "--allow-missing-splits",
                         "--min-count", "1", "--quiet")
    assert rc == 0, err
    assert PreparedCorpus.open(tmp_path / "o").splits == ["train"]
    # one plain text file: one split (train by default), its non-blank lines the units
    txt = tmp_path / "notes.txt"
    txt.write_text("The cat sat.\n\n  \nThe dog sat.\n", encoding="utf-8")
    rc, _, err = run_cli(capsys, "text", "--source", str(txt), "--out", str(tmp_path / "t"), "--min-count", "1", "--quiet")
    assert rc == 0, err
    assert decoded(tmp_path / "t", "train") == ["The", "cat", "sat", ".", EOS, "The", "dog", "sat", ".", EOS]
    rc, _, _ = run_cli(capsys, "text", "--source", str(txt), "--out", str(tmp_path / "t2"), "--as-split", "test",
                       "--min-count", "1", "--quiet")
    assert rc == 0 and PreparedCorpus.open(tmp_path / "t2").splits == ["test"]


class FakeHubDict:
    """Stands in for datasets.load_dataset(NAME, streaming=True): a dict of split -> rows."""

    def __init__(self, tables: dict):
        self.tables = tables
        self.calls = []

    def __call__(self, path, name=None, split=None, streaming=False, **kw):
        self.calls.append((path, name, split, streaming))
        if path not in self.tables:
            raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")
        return self.tables[path]


def test_hub_dataset_with_a_text_column_and_missing_splits(tmp_path, capsys, monkeypatch):
    import datasets

    fake = FakeHubDict({
        "someone/stories": {"train": [{"story": r} for r in TRAIN_ROWS], "validation": [{"story": r} for r in VALID_ROWS],
                            "test": [{"story": r} for r in TEST_ROWS]},
        "someone/train-only": {"train": [{"text": r} for r in TRAIN_ROWS], "extra": []},
    })
    monkeypatch.setattr(datasets, "load_dataset", fake)
    out = tmp_path / "h"
    rc, _, err = run_cli(capsys, "text", "--source", "hub:someone/stories", "--out", str(out), "--quiet")
    assert rc == 2 and "no column 'text'" in err and "story" in err
    rc, _, err = run_cli(capsys, "text", "--source", "hub:someone/stories", "--out", str(out), "--quiet",
                         "--text-column", "story", "--min-count", "1")
    assert rc == 0, err
    assert fake.calls[-1] == ("someone/stories", None, None, True)  # the real load_dataset path, streamed
    meta = PreparedCorpus.open(out).meta
    assert meta["source"] == "hub:someone/stories" and meta["splits"]["valid"]["from"] == "validation"
    assert decoded(out, "valid") == ["The", "red", "cat", ".", EOS, "A", "dog", "sat", ".", EOS]
    rc, _, err = run_cli(capsys, "text", "--source", "hub:someone/train-only", "--out", str(tmp_path / "t"), "--quiet")
    assert rc == 2 and "no valid, test split" in err and "train, extra" in err and "--allow-missing-splits" in err
    rc, _, err = run_cli(capsys, "text", "--source", "hub:someone/train-only", "--out", str(tmp_path / "t"), "--quiet",
                         "--allow-missing-splits", "--min-count", "1")
    assert rc == 0 and PreparedCorpus.open(tmp_path / "t").splits == ["train"]
    rc, _, err = run_cli(capsys, "text", "--source", "hub:nobody/none", "--out", str(tmp_path / "n"), "--quiet")
    assert rc == 2 and "nobody/none" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# --vocab-from: other text in a trained model's own vocabulary


def test_vocab_from_a_prepared_corpus_encodes_with_its_ids_and_counts_unknown_words(tmp_path, capsys):
    src = tmp_path / "a"
    src.mkdir()
    (src / "train.txt").write_text("\n".join(TRAIN_ROWS) + "\n", encoding="utf-8")
    (src / "valid.txt").write_text("\n".join(VALID_ROWS) + "\n", encoding="utf-8")
    (src / "test.txt").write_text("\n".join(TEST_ROWS) + "\n", encoding="utf-8")
    a = tmp_path / "prep-a"
    assert main(["text", "--source", str(src), "--out", str(a), "--min-count", "2", "--lowercase", "--quiet"]) == 0
    other = tmp_path / "other.txt"
    other.write_text("The zebra and the cat sat.\nA zebra!\n", encoding="utf-8")
    b = tmp_path / "prep-b"
    rc, stdout, err = run_cli(capsys, "text", "--source", str(other), "--out", str(b), "--vocab-from", str(a))
    assert rc == 0, err
    va, cb = PreparedCorpus.open(a), PreparedCorpus.open(b)
    assert cb.fingerprint == va.fingerprint and cb.vocab.counts == va.vocab.counts  # training counts kept for buckets
    assert cb.splits == ["test"]  # a single file becomes the test split with --vocab-from
    from lmmem.data.tokenization import WordTokenizer

    words = WordTokenizer("regex", lowercase=True)(other.read_text())  # the source's rule and case
    want = [va.vocab.ids.get("<eos>" if w == "\n" else w, va.vocab.unk_id) for w in words]
    assert cb.tokens("test").tolist() == want
    unknown = [w for w in words if w != "\n" and w not in va.vocab]
    assert cb.meta["splits"]["test"]["oov"] == len(unknown) == cb.meta["unknown_words"]["tokens"]
    assert cb.meta["unknown_words"]["types"] == len(set(unknown))
    assert cb.meta["unknown_words"]["most_common"][0] == ["zebra", 2]
    assert cb.meta["vocab_from"] == {"corpus": str(a), "fingerprint": va.fingerprint}
    assert "unknown words: " in stdout and "zebra (2)" in stdout
    # options that would build another vocabulary are refused, naming them
    rc, _, err = run_cli(capsys, "text", "--source", str(other), "--out", str(tmp_path / "x"), "--vocab-from", str(a),
                         "--min-count", "1")
    assert rc == 2 and "drop --min-count" in err
    rc, _, err = run_cli(capsys, "text", "--source", str(other), "--out", str(tmp_path / "x"), "--vocab-from", str(tmp_path))
    assert rc == 2 and "neither best.pt/last.pt nor meta.json" in err


def test_vocab_from_a_sentencepiece_corpus(tmp_path, capsys):
    import sentencepiece as spm

    src = tmp_path / "a"
    src.mkdir()
    lines = [f"the {w} sat on the mat number {i}" for i, w in enumerate(["cat", "dog", "bird", "fish"] * 30)]
    for split in ("train", "valid", "test"):
        (src / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    a = tmp_path / "prep-a"
    assert main(["text", "--source", str(src), "--out", str(a), "--tokenizer", "sentencepiece", "--vocab-size", "40",
                 "--quiet"]) == 0
    other = tmp_path / "other.txt"
    other.write_text("the dog sat on a big mat\n", encoding="utf-8")
    b = tmp_path / "prep-b"
    assert main(["text", "--source", str(other), "--out", str(b), "--vocab-from", str(a), "--quiet"]) == 0
    cb = PreparedCorpus.open(b)
    assert cb.fingerprint == PreparedCorpus.open(a).fingerprint
    assert (b / "spm.model").read_bytes() == (a / "spm.model").read_bytes()
    sp = spm.SentencePieceProcessor(model_file=str(a / "spm.model"))
    assert cb.tokens("test").tolist() == sp.encode("the dog sat on a big mat") + [0]


@pytest.mark.slow
def test_vocab_from_a_run_end_to_end_through_the_clis(tmp_path):
    """Train a tiny model on one corpus, encode other text with --vocab-from RUN, evaluate it."""
    from conftest import run_script

    src = tmp_path / "a"
    src.mkdir()
    words = "the cat dog sat on mat red a and was".split()
    import random

    rng = random.Random(0)
    for split, n in (("train", 400), ("valid", 60), ("test", 60)):
        (src / f"{split}.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(n)) + "\n")
    a, run, b = tmp_path / "prep-a", tmp_path / "run", tmp_path / "prep-b"
    run_script("-m", "data_prep", "text", "--source", str(src), "--out", str(a), "--quiet", check=True)
    run_script("train.py", "--data", str(a), "--out", str(run), "--preset", "tiny", "--max-steps", "4", "--batch-size", "4",
               "--bptt", "10", "--eval-interval", "0", "--no-progress", check=True)
    other = tmp_path / "other.txt"
    other.write_text("the zebra sat on the mat\na cat and a lion\n")
    proc = run_script("-m", "data_prep", "text", "--source", str(other), "--out", str(b), "--vocab-from", str(run), check=True)
    assert "unknown words: 2 tokens of 2 types" in proc.stdout
    assert PreparedCorpus.open(b).meta["vocab_from"]["checkpoint"] == str(run / "best.pt")
    proc = run_script("evaluate.py", str(run / "best.pt"), "--data", str(b), "--split", "test", "--json", str(tmp_path / "e.json"),
                      check=True)
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["tokens"] == 13 - 1 and result["perplexity"] > 1  # 11 words + 2 <eos>; the first token is context only
    # without --vocab-from the other vocabulary is refused, and the message names the way out
    run_script("-m", "data_prep", "text", "--source", str(other), "--out", str(tmp_path / "c"), "--min-count", "1", "--quiet",
               check=True)
    proc = run_script("evaluate.py", str(run / "best.pt"), "--data", str(tmp_path / "c"))
    assert proc.returncode == 2 and "--vocab-from" in proc.stderr


def test_corpus_subcommands_name_a_missing_hub_column(tmp_path, capsys, monkeypatch):
    import datasets

    def fake(path, name=None, split=None, streaming=False, **kw):
        return iter([{"content": "a b c"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    for corpus in ("wikitext-103", "gutenberg", "gigaword"):
        rc, _, err = run_cli(capsys, corpus, "--source", "hub:someone/other", "--out", str(tmp_path / corpus), "--quiet")
        assert rc == 2 and "no column" in err and "content" in err and "data_prep text --source hub:someone/other" in err


def test_wikitext_hub_dataset_with_only_a_train_split(tmp_path, capsys, monkeypatch):
    import datasets

    rows = [{"text": " = A = \n"}, {"text": " a b c \n"}]

    def fake(path, name=None, split=None, streaming=False, **kw):
        if path != "someone/wiki-train-only":
            raise FileNotFoundError(path)
        if split is None:
            return {"train": rows}
        if split != "train":
            raise ValueError(f'Bad split: {split}. Available splits: ["train"]')
        return iter(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    argv = ["wikitext-103", "--source", "hub:someone/wiki-train-only", "--out", str(tmp_path / "w"), "--quiet"]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and "validation" in err and err.count("\n") == 1
    rc, _, err = run_cli(capsys, *argv, "--allow-missing-splits")
    assert rc == 0, err
    assert PreparedCorpus.open(tmp_path / "w").splits == ["train"]
    assert decoded(tmp_path / "w", "train") == ["=", "A", "=", EOS, "a", "b", "c", EOS]
