"""Language models. Every architecture exposes the same three methods:

* ``forward(inputs, targets, state) -> (loss, state)`` for training,
* ``hidden_states(inputs, state) -> (final activations, state)`` for evaluation and memories,
* ``init_state(batch_size, device)`` / ``detach_state(state)`` for truncated BPTT,

and its softmax as ``model.output`` (an :class:`lmmem.output_layers.OutputLayer`).
"""

from __future__ import annotations

from torch import nn

from lmmem.errors import LmmemError
from lmmem.models.config import ModelConfig
from lmmem.models.lstm import LSTMLanguageModel
from lmmem.models.transformer import TransformerLanguageModel

ARCHITECTURES: dict[str, type[nn.Module]] = {"lstm": LSTMLanguageModel, "transformer": TransformerLanguageModel}


def build_model(cfg: ModelConfig) -> nn.Module:
    try:
        cls = ARCHITECTURES[cfg.arch]
    except KeyError:
        raise LmmemError(f"unknown --arch {cfg.arch!r}; choose one of: {', '.join(sorted(ARCHITECTURES))}") from None
    return cls(cfg)


__all__ = ["ARCHITECTURES", "LSTMLanguageModel", "ModelConfig", "TransformerLanguageModel", "build_model"]
