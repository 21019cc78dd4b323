"""The plain full softmax: ``log p(w | h) = log_softmax(W h + b)_w``, trained by gradient only."""

from __future__ import annotations

import torch

from lmmem.output_layers.base import IGNORE_INDEX, OutputLayer


class FullSoftmax(OutputLayer):
    """``backend``: "auto" (chunked fused loss on any device, Triton step on CUDA), "torch" (materialised
    logits, the reference) or "triton"; see :mod:`lmmem.output_layers.base`."""

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        return self.cross_entropy(hidden, targets, reduction, ignore_index)
