"""lmmem softmax layers as the output head of a Hugging Face causal LM.

A head here is an lmmem output layer (:class:`~lmmem.output_layers.HebbianSoftmax` or
:class:`~lmmem.output_layers.FullSoftmax`) that also behaves as the ``nn.Linear`` it replaces:
``head(hidden)`` returns the logits, so the model's own ``forward`` and ``generate()`` work unchanged.
For the training loss, :mod:`lmmem.hf.patch` runs the model's own forward with the head in
*capture* mode (``head(hidden)`` returns ``hidden`` itself) and hands the activations to the layer's
fused ``loss``, so no ``N × V`` logits are formed by the model (whether the layer forms them depends on
its backend: the Triton kernel on CUDA never does, the PyTorch backend does).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from lmmem.output_layers import FullSoftmax, HebbianSoftmax, OutputLayer
from lmmem.output_layers.base import IGNORE_INDEX


class _CausalLMHead:
    """Mixed into an :class:`OutputLayer`: ``forward(hidden)`` gives logits (or, while capturing, the
    activations); ``forward(hidden, targets)`` keeps the layer's own meaning (the loss)."""

    _capturing = False

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean",
                ignore_index: int = IGNORE_INDEX, **loss_options) -> torch.Tensor:
        if targets is not None:
            return self.loss(hidden, targets, reduction=reduction, ignore_index=ignore_index, **loss_options)
        if self._capturing:
            return hidden
        return self.logits(hidden)

    @contextmanager
    def capturing(self):
        """Within the block, calling the head returns its input (the activations), not logits."""
        self._capturing = True
        try:
            yield self
        finally:
            self._capturing = False


class HebbianLMHead(_CausalLMHead, HebbianSoftmax):
    """:class:`HebbianSoftmax` usable as a Hugging Face ``lm_head``."""


class FusedLMHead(_CausalLMHead, FullSoftmax):
    """:class:`FullSoftmax` (the fused linear + cross-entropy loss) usable as a Hugging Face ``lm_head``."""


HEADS: dict[str, type[OutputLayer]] = {"hebbian": HebbianLMHead, "full": FusedLMHead}


def head_kind(head: torch.nn.Module) -> str | None:
    for kind, cls in HEADS.items():
        if isinstance(head, cls):
            return kind
    return None
