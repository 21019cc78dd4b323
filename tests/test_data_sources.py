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
from conftest import SHARED_DATA

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def decoded(root: Path, split: str) -> list[str]:
    corpus = PreparedCorpus.open(root)
    return corpus.vocab.decode(corpus.tokens(split))


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
