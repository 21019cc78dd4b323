"""Sliding-window evaluation of the Transformer: score_stream's row-wise ``context`` (issue 15
item 6) and evaluate.py's ``--context C`` (Hugging Face's strided windows, lmmem.evaluation.windows)
give every token at least C tokens of context, checked against a brute-force scorer that runs the
model once per token on an explicit prefix window."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_script
from lmmem.cli import run_cli
from lmmem.evaluation import evaluate
from lmmem.evaluation.cli import main
from lmmem.data.batching import StreamBatcher
from lmmem.errors import LmmemError
from lmmem.evaluation import score_stream
from lmmem.models import ModelConfig, build_model
from lmmem.output_layers.base import IGNORE_INDEX
from test_evaluate_methods import _checkpoint

V, L = 23, 9  # vocabulary, the model's context (positions)


def _transformer():
    torch.manual_seed(3)
    return build_model(ModelConfig(arch="transformer", vocab_size=V, embed_dim=8, hidden_dim=16, num_layers=2, num_heads=2,
                                   context=L, tie_weights=False, proj_dim=0)).double().eval()


@torch.no_grad()
def brute_force(model, tokens, t: int, k: int) -> float:
    """log p(tokens[t]) from the k tokens before its input plus the input: tokens[t-1-k : t]."""
    x = torch.as_tensor(tokens[max(0, t - 1 - k) : t].astype(np.int64))[None]
    h, _ = model.hidden_states(x)
    return float(torch.log_softmax(model.output.logits(h[0, -1:]), -1)[0, tokens[t]])


def per_token(model, tokens, *, batch_size, bptt, context):
    out = np.full(len(tokens), np.nan)

    def hook(positions, lp):
        assert np.isnan(out[positions]).all()  # each position scored once
        out[positions] = lp.numpy()

    nll, cnt = score_stream(model, tokens, bucket_of=np.zeros(V, dtype=np.int64), num_buckets=1, batch_size=batch_size,
                            bptt=bptt, context=context, on_scores=hook)
    assert cnt[0] == len(tokens) - 1 and nll[0] == pytest.approx(-np.nansum(out), rel=1e-12)
    return out


@pytest.mark.parametrize("batch_size", [1, 3])
def test_stride_one_is_the_full_prefix_window_of_every_token(batch_size):
    """C = L − 1: each token is scored from the L tokens before it (all it has, at the start)."""
    model = _transformer()
    tokens = np.random.default_rng(0).integers(0, V, size=61).astype("<u4")
    got = per_token(model, tokens, batch_size=batch_size, bptt=1, context=L - 1)
    ref = np.array([np.nan] + [brute_force(model, tokens, t, L - 1) for t in range(1, len(tokens))])
    np.testing.assert_allclose(got[1:], ref[1:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch_size,context,stride", [(1, 3, 5), (4, 5, 2), (2, 1, 7), (3, 6, 3)])
def test_every_token_gets_at_least_context_tokens(batch_size, context, stride):
    """Each score equals the brute-force score with *some* context k in [C, C + stride − 1] (or
    the whole prefix for the first tokens of the split) — never less than C."""
    model = _transformer()
    tokens = np.random.default_rng(1).integers(0, V, size=50).astype("<u4")
    got = per_token(model, tokens, batch_size=batch_size, bptt=stride, context=context)
    for t in range(1, len(tokens)):
        if t - 1 <= context:
            assert got[t] == pytest.approx(brute_force(model, tokens, t, t - 1), abs=1e-12)
            continue
        options = [brute_force(model, tokens, t, k) for k in range(context, context + stride)]
        assert min(abs(got[t] - o) for o in options) < 1e-12, t


def test_the_batcher_layout():
    b = StreamBatcher(np.arange(40, dtype="<u4"), 3, 4, pad=True, context=5).batch(1)
    # 39 positions in 3 rows of 13; row 1 scores its columns 4..7 (positions 17..20): inputs start 5 earlier
    assert b.inputs.shape == (3, 9)
    assert b.inputs[1].tolist() == list(range(12, 21))
    assert b.targets[1].tolist() == [IGNORE_INDEX] * 5 + list(range(18, 22))
    assert b.target_positions[1].tolist() == [-1] * 5 + list(range(18, 22))
    # row 0, step 1: fewer than 5 tokens before column 4: the window starts at the stream's start
    assert b.inputs[0].tolist() == list(range(0, 9)) and b.target_positions[0].tolist() == [-1] * 4 + list(range(5, 9)) + [-1]


def test_lstm_refuses_context():
    torch.manual_seed(0)
    lstm = build_model(ModelConfig(arch="lstm", vocab_size=V, embed_dim=8, hidden_dim=12, proj_dim=0, tie_weights=False))
    with pytest.raises(LmmemError, match="for the Transformer"):
        score_stream(lstm, np.arange(30, dtype="<u4") % V, bucket_of=np.zeros(V, dtype=np.int64), num_buckets=1,
                     batch_size=2, bptt=4, context=2)


@pytest.mark.parametrize("batch_size,window,context", [(1, 6, 3), (3, 7, 5), (2, 5, 0), (4, 9, 8)])
def test_hf_strided_windows_give_every_token_its_context(batch_size, window, context):
    """evaluate's sliding windows: the targets of the first window see every token before them; each
    later target at least context + 1 tokens (its input and C before), at most the window."""
    from lmmem.evaluation.adapters import LmmemAdapter
    from lmmem.evaluation.engine import run_pass
    from lmmem.evaluation.methods import MemorySet
    from lmmem.evaluation.sinks import GridSums, TokenColumns
    from lmmem.evaluation.windows import SlidingWindows

    model = _transformer()
    tokens = np.random.default_rng(2).integers(0, V, size=47).astype("<u4")
    groups = SlidingWindows(tokens, window=window, context=context, batch_size=batch_size).groups()
    cols = TokenColumns(len(tokens), {"plain": 0})
    run_pass(LmmemAdapter(model), groups, MemorySet([]), GridSums(1, 1, device="cpu", bucket_of_vocab=np.zeros(V, dtype=np.int64)),
             columns=cols)
    got = cols.columns["plain"]
    assert np.isnan(got[0]) and not np.isnan(got[1:]).any()
    stride = window - context
    for t in range(1, len(tokens)):
        if t <= window:  # the first window: its whole prefix
            assert got[t] == pytest.approx(brute_force(model, tokens, t, t - 1), abs=1e-12)
            continue
        begin = ((t - window - 1) // stride + 1) * stride  # HF: the first window whose end passes t
        assert got[t] == pytest.approx(brute_force(model, tokens, t, t - 1 - begin), abs=1e-12), t
        assert t - begin >= context + 1


def test_cli_errors_name_the_context_flag(small_corpus, tmp_path, capsys):
    ckpt = _checkpoint(small_corpus, tmp_path / "t.pt", arch="transformer")  # context 16
    assert run_cli(main, [str(ckpt), "--bptt", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--context C" in err and "--bptt 16 or less" in err
    assert run_cli(main, [str(ckpt), "--context", "16"]) == 2
    assert "between 0 and the window − 1 = 15" in capsys.readouterr().err
    lstm = _checkpoint(small_corpus, tmp_path / "l.pt", arch="lstm")
    assert run_cli(main, [str(lstm), "--context", "4"]) == 2
    assert "use --window bptt" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_context_flag(small_corpus, tmp_path):
    ckpt = _checkpoint(small_corpus, tmp_path / "t.pt", arch="transformer")
    slid = run_script("evaluate.py", str(ckpt), "--max-tokens", "200", "--context", "8", "--cache", "--json", str(tmp_path / "e.json"),
                      check=True)
    assert "window: sliding, 16 inputs, context 8 (stride 8; HF max_length 17)" in slid.stdout
    got = json.loads((tmp_path / "e.json").read_text())
    ref = evaluate(ckpt, max_tokens=200, device="cpu", context=8, progress=False)
    assert got["window"]["context"] == 8 and got["perplexity"] == pytest.approx(ref.plain.perplexity, rel=1e-6)
    assert "+cache" in got["methods"]
    assert ref.plain.perplexity != pytest.approx(evaluate(ckpt, max_tokens=200, device="cpu", progress=False).plain.perplexity)
