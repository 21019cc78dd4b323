"""lmmem.output_layers.base.target_log_probs_from_logits (the evaluation's log p(target) from full
logits, chunked without autograd) against F.cross_entropy in float64."""

from __future__ import annotations

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
