"""Word-level numbers for SentencePiece models: a word's log-probability is the sum of its pieces',
words begin at SentencePiece's ▁ marker (and <eos>), buckets by the word's training count."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from lmmem.evaluation import FrequencyBuckets
from lmmem.evaluation.words import piece_start_table, word_counts, word_report

PIECES = ["<eos>", "<unk>", "\u2581the", "\u2581c", "at", "s", "\u2581dog", "\u2581", "3", "\u2581a"]


def reference(token_nll, tokens, train, buckets_edges):
    """Plain Python, float64, strings: split the piece stream into words by hand."""
    def words_of(ids):
        out, cur = [], None  # cur = [start, end)
        for i, t in enumerate(ids):
            p = PIECES[t]
            if cur is None or p.startswith("\u2581") or p == "<eos>" or PIECES[ids[i - 1]] == "<eos>":
                if cur is not None:
                    out.append(cur)
                cur = [i, i + 1]
            else:
                cur[1] = i + 1
        out.append(cur)
        return out

    train_counts = Counter("".join(PIECES[t] for t in train[a:b]) for a, b in words_of(train))
    sums, counts = {}, {}
    for a, b in words_of(tokens):
        vals = [token_nll[i] for i in range(a, b)]
        if any(math.isnan(v) for v in vals):
            continue
        c = train_counts.get("".join(PIECES[t] for t in tokens[a:b]), 0)
        bucket = next((i for i, e in enumerate(buckets_edges) if c >= e), len(buckets_edges))
        sums[bucket] = sums.get(bucket, 0.0) + sum(vals)
        counts[bucket] = counts.get(bucket, 0) + 1
    return sums, counts


def write_text_source(src, *, seed: int, test_lines: int, words_per_line: int):
    """A folder of train/valid/test .txt files of random lines over a small fixed word list (for
    SentencePiece corpora whose word boundaries the tests check)."""
    src.mkdir()
    rng = np.random.default_rng(seed)
    words = "the cat sat on a mat with another catty dog and dogs sitting".split()
    for split, n in (("train", 300), ("valid", 30), ("test", test_lines)):
        (src / f"{split}.txt").write_text("\n".join(" ".join(rng.choice(words, words_per_line)) for _ in range(n)) + "\n")
    return src


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_word_report_matches_a_float64_hand_computation(seed):
    rng = np.random.default_rng(seed)
    # words as piece sequences (one segmentation per word, as SentencePiece gives), <eos> between units
    vocab_words = [[2], [3, 4], [3, 4, 5], [6], [6, 5], [7, 8], [9], [3, 1]]
    def stream(n_units, weights):
        ids = []
        for _ in range(n_units):
            for _ in range(rng.integers(1, 7)):
                ids += vocab_words[rng.choice(len(vocab_words), p=weights)]
            ids.append(0)
        return np.array(ids, dtype=np.uint32)

    train = stream(400, np.array([30, 20, 5, 10, 2, 1, 9, 0], dtype=float) / 77)  # "▁c<unk>" never in train
    test = stream(40, np.full(len(vocab_words), 1 / len(vocab_words)))
    token_nll = rng.exponential(2.0, size=len(test))
    token_nll[0] = np.nan  # the first token is context only
    cut = len(test) - 2
    token_nll[cut:] = np.nan  # --max-tokens: the tail is not scored
    edges = (50, 10, 3)
    buckets = FrequencyBuckets(edges)
    report = word_report(token_nll, test, PIECES, word_counts(train, piece_start_table(PIECES), 0), buckets, 0)
    sums, counts = reference(token_nll, test.tolist(), train.tolist(), edges)
    total = sum(counts.values())
    assert report.tokens == total
    assert report.loss == pytest.approx(sum(sums.values()) / total, rel=1e-12)
    for i, b in enumerate(report.buckets):
        assert b.tokens == counts.get(i, 0)
        if counts.get(i):
            assert b.loss == pytest.approx(sums[i] / counts[i], rel=1e-12)
    assert sum(b.tokens for b in report.buckets if b.min_count >= 3) > 0 and report.buckets[-1].tokens > 0  # seen and unseen words


def test_word_level_of_a_sentencepiece_checkpoint(tmp_path, one_thread):
    """evaluate on a SentencePiece corpus: word perplexity from the model's own piece
    log-probabilities (total NLL unchanged, divided by the number of words)."""
    import torch

    from data_prep.__main__ import main as prep
    from lmmem.data.corpus import PreparedCorpus
    from lmmem.evaluation import evaluate
    from lmmem.evaluation.words import word_starts
    from lmmem.models import ModelConfig, build_model
    from lmmem.checkpoints import save_checkpoint

    src = write_text_source(tmp_path / "src", seed=0, test_lines=40, words_per_line=7)
    data = tmp_path / "spm"
    assert prep(["text", "--source", str(src), "--out", str(data), "--tokenizer", "sentencepiece", "--vocab-size", "28",
                 "--quiet"]) == 0
    corpus = PreparedCorpus.open(data)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=len(corpus.vocab), embed_dim=8, hidden_dim=12, proj_dim=8, tie_weights=True)
    save_checkpoint({"model_config": cfg.to_dict(), "model": build_model(cfg).state_dict(), "progress": {"step": 0},
                     "train_config": {"data": str(data), "bptt": 10}, "vocab_fingerprint": corpus.fingerprint}, tmp_path / "m.pt")
    result = evaluate(tmp_path / "m.pt", split="test", batch_size=3, device="cpu", progress=False)
    res = result.reports["plain"]
    tokens = corpus.tokens("test")
    starts = word_starts(tokens, piece_start_table(corpus.vocab.tokens), corpus.vocab.eos_id)
    # every unit is "w w w w w w w <eos>": 8 words a line, the first word's pieces (token 0 is context) left out
    first_word_pieces = int(np.argmax(starts[1:])) + 1
    assert res.words.tokens == 40 * 8 - 1
    assert res.words.tokens == int(starts.sum()) - 1
    piece_nll = res.report.loss * res.report.tokens
    # the per-piece NLLs in stream order (the same scoring pass, recorded per position)
    from lmmem.evaluation import score_stream
    from lmmem.checkpoints import load_checkpoint, model_from_checkpoint

    per_token = np.full(len(tokens), np.nan)
    score_stream(model_from_checkpoint(load_checkpoint(tmp_path / "m.pt")), tokens, bucket_of=np.zeros(len(corpus.vocab), dtype=np.int64),
                 num_buckets=1, batch_size=3, bptt=10,
                 on_scores=lambda pos, lp: per_token.__setitem__(pos, -lp.double().numpy()))
    assert np.isnan(per_token[0]) and not np.isnan(per_token[1:]).any()
    assert np.nansum(per_token) == pytest.approx(piece_nll, rel=1e-12)
    # the words hold every scored piece but those of the first word (whose first piece is context only)
    assert res.words.loss * res.words.tokens == pytest.approx(per_token[first_word_pieces:].sum(), rel=1e-12)
    assert res.words.perplexity > res.report.perplexity  # several pieces a word
    assert sum(b.tokens for b in res.words.buckets) == res.words.tokens
    assert res.words.buckets[0].name == ">10K" and "words" in result.to_dict()["methods"]["plain"]
    # text encoded with --vocab-from has no train split: the words' counts come from the corpus it names
    (tmp_path / "other.txt").write_text("the dog sat on another mat\nthe catty dogs\n")
    assert prep(["text", "--source", str(tmp_path / "other.txt"), "--out", str(tmp_path / "other"), "--vocab-from",
                 str(tmp_path / "m.pt"), "--quiet"]) == 0
    other = evaluate(tmp_path / "m.pt", data=tmp_path / "other", split="test", batch_size=1, device="cpu",
                     progress=False).reports["plain"]
    assert other.words.tokens == 6 + 1 + 3 + 1 - 1 and other.words.buckets[-1].tokens == 0  # every word seen in train


@pytest.mark.slow
def test_evaluate_cli_prints_and_writes_word_level_numbers(tmp_path):
    from conftest import run_script

    src = write_text_source(tmp_path / "src", seed=1, test_lines=30, words_per_line=6)
    data, run = tmp_path / "spm", tmp_path / "run"
    run_script("-m", "data_prep", "text", "--source", str(src), "--out", str(data), "--tokenizer", "sentencepiece",
               "--vocab-size", "28", "--quiet", check=True)
    run_script("train.py", "--data", str(data), "--out", str(run), "--preset", "tiny", "--max-steps", "3", "--batch-size", "4",
               "--bptt", "10", "--eval-interval", "0", "--no-progress", check=True)
    proc = run_script("evaluate.py", str(run / "best.pt"), "--split", "test", "--json", str(tmp_path / "e.json"), check=True)
    assert "per word (the sum of its tokens' log-probabilities" in proc.stdout
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["words"]["tokens"] == 30 * 7 - 1 and result["words"]["perplexity"] > result["perplexity"]
