"""LSTM language model: embedding → dropout → LSTM stack (optionally projected) → dropout → softmax.

``nn.LSTM`` runs on cuDNN on GPU, including the projected variant (``proj_size``), which is the
architecture of the paper's WikiText-103 baseline: one layer of 2048 units projected to 512, with
512-d embeddings tied to the softmax.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lmmem.errors import LmmemError
from lmmem.models.config import ModelConfig
from lmmem.output_layers import build_output_layer
from lmmem.output_layers.base import IGNORE_INDEX

LSTMState = tuple[torch.Tensor, torch.Tensor]

# On CPU, oneDNN has no projected LSTM and PyTorch says so on every call; the fallback is correct.
warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")


class LSTMLanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise LmmemError("the model needs a vocabulary: vocab_size must be positive")
        if cfg.proj_dim and cfg.proj_dim >= cfg.hidden_dim:
            raise LmmemError(f"--proj-dim ({cfg.proj_dim}) must be smaller than --hidden-dim ({cfg.hidden_dim}), or 0 for none")
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(
            cfg.embed_dim,
            cfg.hidden_dim,
            num_layers=cfg.num_layers,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
            proj_size=cfg.proj_dim,
            batch_first=True,
        )
        self.output_dropout = nn.Dropout(cfg.output_dropout)
        self.output = build_output_layer(cfg.softmax, cfg.output_dim, cfg.vocab_size, **cfg.softmax_options)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        if cfg.tie_weights:
            if cfg.output_dim != cfg.embed_dim:
                raise LmmemError(
                    f"--tie-weights needs the softmax input ({cfg.output_dim}) to equal --embed-dim ({cfg.embed_dim}); "
                    "set --proj-dim to the embedding size"
                )
            self.output.weight = self.embedding.weight

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> LSTMState:
        out = self.cfg.proj_dim or self.cfg.hidden_dim
        dtype = self.embedding.weight.dtype
        h = torch.zeros(self.cfg.num_layers, batch_size, out, device=device, dtype=dtype)
        c = torch.zeros(self.cfg.num_layers, batch_size, self.cfg.hidden_dim, device=device, dtype=dtype)
        return h, c

    @staticmethod
    def detach_state(state: LSTMState | None) -> LSTMState | None:
        return None if state is None else tuple(s.detach() for s in state)

    def hidden_states(self, inputs: torch.Tensor, state: LSTMState | None = None) -> tuple[torch.Tensor, LSTMState]:
        """Final activations ``(B, T, output_dim)`` (the softmax's input, after output dropout)."""
        x = self.input_dropout(self.embedding(inputs))
        y, state = self.lstm(x, state)
        return self.output_dropout(y), state

    def forward(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        state: LSTMState | None = None,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor, LSTMState]:
        """Training entry point: the loss of ``targets`` (``(B, T)``, IGNORE_INDEX to skip) and the
        new state. The loss is computed inside forward so that DDP sees every parameter used."""
        h, state = self.hidden_states(inputs, state)
        # through the module call (its forward is loss), so that forward hooks on the output layer see
        # the activations it scores (lmmem.experiments.binding measures with one)
        loss = self.output(h.reshape(-1, h.shape[-1]), targets.reshape(-1), reduction=reduction, ignore_index=IGNORE_INDEX)
        return loss, state
