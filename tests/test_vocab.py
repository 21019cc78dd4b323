"""lmmem.data.vocab.Vocabulary: order, counts, <unk> accounting, the vocab.txt format, fingerprint."""

from __future__ import annotations

import pytest

from lmmem.data.vocab import EOS, UNK, Vocabulary
from lmmem.errors import DataError


def test_from_counts_orders_specials_then_count_then_token():
    counts = {"the": 5, "cat": 2, "bat": 2, "a": 5, EOS: 3, "zebra": 9}
    v = Vocabulary.from_counts(counts)
    assert v.tokens == [EOS, UNK, "zebra", "a", "the", "bat", "cat"]  # ties broken by the string
    assert v.counts == [3, 0, 9, 5, 5, 2, 2]
    assert v.eos_id == 0 and v.unk_id == 1
    assert v.ids["a"] == 3 and len(v) == 7


def test_min_count_and_max_size_move_counts_to_unk():
    counts = {"a": 10, "b": 5, "c": 2, "d": 1, UNK: 4}
    v = Vocabulary.from_counts(counts, min_count=2)
    assert v.tokens == [EOS, UNK, "a", "b", "c"]
    assert v.counts[v.unk_id] == 4 + 1  # the literal <unk>s plus the dropped "d"
    v = Vocabulary.from_counts(counts, max_size=4)
    assert v.tokens == [EOS, UNK, "a", "b"]
    assert v.counts[v.unk_id] == 4 + 2 + 1
    assert sum(v.counts) == sum(counts.values())  # nothing is lost


def test_max_size_must_leave_room_for_words():
    with pytest.raises(DataError, match="max-vocab"):
        Vocabulary.from_counts({"a": 1}, max_size=2)


def test_encode_maps_unknown_words_to_unk_and_decode_inverts():
    v = Vocabulary.from_counts({"a": 3, "b": 1})
    ids = v.encode(["a", "b", "zzz", EOS])
    assert ids == [v.ids["a"], v.ids["b"], v.unk_id, v.eos_id]
    assert v.decode(ids) == ["a", "b", UNK, EOS]


def test_save_load_round_trip_keeps_order_counts_and_fingerprint(tmp_path):
    v = Vocabulary.from_counts({"naïve": 4, "tab\tinside": 2, "x": 1, "日本": 3})
    path = tmp_path / "vocab.txt"
    v.save(path)
    w = Vocabulary.load(path)
    assert w.tokens == v.tokens and w.counts == v.counts
    assert w.fingerprint == v.fingerprint
    first = path.read_text(encoding="utf-8").splitlines()[:2]
    assert first == [f"{EOS}\t0", f"{UNK}\t0"]
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_fingerprint_depends_on_tokens_not_counts():
    a = Vocabulary([EOS, UNK, "x", "y"], [1, 0, 5, 3])
    b = Vocabulary([EOS, UNK, "x", "y"], [9, 9, 9, 9])
    c = Vocabulary([EOS, UNK, "y", "x"], [1, 0, 5, 3])
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert len(a.fingerprint) == 16


def test_duplicate_tokens_are_refused():
    with pytest.raises(DataError, match="twice"):
        Vocabulary([EOS, UNK, "x", "x"], [0, 0, 1, 1])


@pytest.mark.parametrize("content, match", [
    ("", "empty"),
    ("<eos>\t1\nno tab here\n", "token<TAB>count"),
    ("<eos>\tmany\n", "token<TAB>count"),
])
def test_load_rejects_malformed_files_with_a_fix(tmp_path, content, match):
    path = tmp_path / "vocab.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=match) as e:
        Vocabulary.load(path)
    assert "data_prep" in str(e.value)


def test_load_missing_file_says_how_to_prepare(tmp_path):
    with pytest.raises(DataError, match="python -m data_prep"):
        Vocabulary.load(tmp_path / "nope.txt")
