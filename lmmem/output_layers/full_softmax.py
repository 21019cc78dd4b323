"""The plain full softmax: ``log p(w | h) = log_softmax(W h + b)_w``, trained by gradient only."""

from __future__ import annotations

import torch

from lmmem.output_layers.base import IGNORE_INDEX, OutputLayer, cross_entropy_from_logits


class FullSoftmax(OutputLayer):
    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        return cross_entropy_from_logits(self.logits(hidden), targets, reduction, ignore_index)
