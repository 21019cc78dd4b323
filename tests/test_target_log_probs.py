"""lmmem.output_layers.base.target_log_probs_from_logits (the evaluation's log p(target) from full
logits, chunked without autograd) against F.cross_entropy in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lmmem.output_layers import base
from lmmem.output_layers.base import IGNORE_INDEX, target_log_probs_from_logits


@pytest.mark.parametrize("chunk", [1 << 22, 7 * 13, 13])  # one chunk; chunks of 7 rows; chunks of one row
def test_equals_cross_entropy(monkeypatch, chunk):
    """Odd shapes, repeated and ignored targets, large offsets (the row maximum matters), a row with
    -inf entries, chunk boundaries inside the batch."""
    monkeypatch.setattr(base, "LSE_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(chunk)
    logits = 5 * torch.randn(37, 13, generator=g, dtype=torch.float64) + 300 * torch.randn(37, 1, generator=g, dtype=torch.float64)
    logits[4, :6] = float("-inf")
    targets = torch.randint(0, 13, (37,), generator=g)
    targets[[0, 9, 10, 36]] = IGNORE_INDEX
    targets[4] = 7
    targets[11:15] = 3
    want = -F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    got = target_log_probs_from_logits(logits, targets)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (got[[0, 9, 10, 36]] == 0).all()


def test_low_precision_and_autograd():
    """bf16 logits give float32 log-probabilities (as F.cross_entropy on upcast logits); with autograd
    recording it is F.cross_entropy itself, and the gradient flows."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 21, generator=g)
    targets = torch.randint(0, 21, (9,), generator=g)
    got = target_log_probs_from_logits(logits.bfloat16(), targets)
    want = -F.cross_entropy(logits.bfloat16().float(), targets, reduction="none")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    leaf = logits.clone().requires_grad_(True)
    lp = target_log_probs_from_logits(leaf, targets)
    lp.sum().backward()
    torch.testing.assert_close(leaf.grad, torch.nn.functional.one_hot(targets, 21) - torch.softmax(logits, -1))


def _native_row_lse_or_skip():
    from lmmem.kernels import row_lse

    op = row_lse.row_lse_op()
    if op is None:
        import shutil

        assert shutil.which("c++") is None and shutil.which("g++") is None, \
            "a C++ toolchain is present, so the native row normaliser must build and pass its probe"
        pytest.skip("no C++ toolchain: the torch statement runs")
    return op


def _torch_statement(monkeypatch, logits, targets, bias=None):
    with monkeypatch.context() as m:
        m.setattr(base, "_native_row_lse", lambda x, b: None)
        return target_log_probs_from_logits(logits, targets, bias=bias)


@pytest.mark.parametrize("N,V", [(1, 13), (37, 1001), (9, 30011), (5, 16)])
def test_the_native_row_normaliser_equals_its_torch_statement(monkeypatch, N, V):
    """On a CPU in float32 the normalisers come from the native op (lmmem/kernels/row_lse.cpp):
    against the chunked torch loop, and both against float64, with and without a bias added in
    place (then the logits equal logits + bias, bit for bit). Widths that are and are not a multiple
    of 16, large offsets, rows with -inf entries, a row of -inf (-inf, as torch), a row with +inf
    (+inf) and with a NaN (NaN), rows of a wider table, two threads as one."""
    op = _native_row_lse_or_skip()
    g = torch.Generator().manual_seed(N * V)
    wide = 5 * torch.randn(N, V + 7, generator=g) + 30 * torch.randn(N, 1, generator=g)
    logits = wide[:, :V]  # rows of stride V + 7
    if N > 4:
        logits[1, : V // 2] = float("-inf")
        logits[2] = float("-inf")
        logits[3, 5] = float("inf")
        logits[4, 7] = float("nan")
    targets = torch.randint(0, V, (N,), generator=g)
    targets[0] = IGNORE_INDEX
    bias = torch.randn(V, generator=g)
    assert base._native_row_lse(logits, bias) is op
    for b in (None, bias):
        mine, theirs = wide.clone()[:, :V], wide.clone()[:, :V]  # rows of the wider table's stride
        got = target_log_probs_from_logits(mine, targets, bias=b)
        want = _torch_statement(monkeypatch, theirs, targets, bias=b)
        same = dict(rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(mine, theirs, **same)
        torch.testing.assert_close(mine, logits + b if b is not None else logits, **same)
        z = logits.double() + (b.double() if b is not None else 0)
        exact = -F.cross_entropy(z, targets, ignore_index=IGNORE_INDEX, reduction="none")
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-5, equal_nan=True)
        finite = torch.ones(N, dtype=torch.bool)
        finite[2:5] = N <= 4  # the rows of -inf, +inf and NaN: as the torch statement, above
        torch.testing.assert_close(got.double()[finite], exact[finite], rtol=2e-6, atol=2e-5)
        if N > 4:  # the normalisers themselves: -inf for the row of -inf, +inf, NaN
            lse = op(logits.clone(), logits.new_empty(0))
            assert lse[2] == float("-inf") and lse[3] == float("inf") and lse[4].isnan() and lse[[0, 1]].isfinite().all()
    one = op(logits.clone(), bias)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # rows split between threads
        torch.testing.assert_close(op(logits.clone(), bias), one, rtol=0, atol=0, equal_nan=True)
    finally:
        torch.set_num_threads(threads)


def test_a_bias_is_refused_where_it_cannot_be_added_in_place():
    logits = torch.randn(4, 6)
    with pytest.raises(ValueError, match="rows of unit stride"):
        target_log_probs_from_logits(logits.t(), torch.zeros(6, dtype=torch.long), bias=torch.zeros(4))
    with pytest.raises(ValueError, match="autograd"):
        target_log_probs_from_logits(logits.requires_grad_(True), torch.zeros(4, dtype=torch.long), bias=torch.zeros(6))


def test_a_native_row_normaliser_that_fails_its_probe_warns_once_and_torch_runs(monkeypatch):
    import warnings

    from lmmem.kernels import row_lse

    _native_row_lse_or_skip()

    def wrong(op):
        raise RuntimeError("its result on a probe problem differs")
    monkeypatch.setattr(row_lse, "_probe", wrong)
    row_lse.row_lse_op.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="the native log-normaliser of the logits is not used here .*differs"):
            assert row_lse.row_lse_op() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            lp = target_log_probs_from_logits(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))  # no second warning
        torch.testing.assert_close(lp, torch.full((2,), -math.log(5)))
    finally:
        row_lse.row_lse_op.cache_clear()
