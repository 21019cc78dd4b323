"""Decoder-only Transformer language model with the same interface as the LSTM model.

token embedding + learned position embedding → dropout → ``num_layers`` pre-LayerNorm blocks
(causal self-attention through ``F.scaled_dot_product_attention(is_causal=True)``, then a GELU
feed-forward of width ``hidden_dim``) → final LayerNorm → output dropout → softmax.

``ModelConfig`` fields: ``embed_dim`` is d_model, ``hidden_dim`` the feed-forward width,
``num_heads`` the attention heads (must divide ``embed_dim``), ``context`` the number of learned
positions (the longest input), ``dropout`` on embeddings, attention weights and residual branches,
``output_dropout`` on the final activations, ``tie_weights`` shares the embedding with the softmax
(always possible: the softmax input is ``embed_dim`` wide).

There is no recurrent state: every window is read on its own (positions restart at 0), so
``init_state`` returns None and ``forward``/``hidden_states`` accept and return ``state`` only to
match the LSTM's signature; the trainer's truncated-BPTT loop works unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmmem.errors import LmmemError
from lmmem.models.config import ModelConfig
from lmmem.output_layers import build_output_layer
from lmmem.output_layers.base import IGNORE_INDEX


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, num_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, d_model))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x)))
        return x + self.dropout(self.ffn(self.ln2(x)))


class TransformerLanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise LmmemError("the model needs a vocabulary: vocab_size must be positive")
        if cfg.num_heads <= 0 or cfg.embed_dim % cfg.num_heads:
            raise LmmemError(f"--embed-dim ({cfg.embed_dim}) must be a multiple of --num-heads ({cfg.num_heads})")
        if cfg.context <= 0:
            raise LmmemError(f"--context must be positive, got {cfg.context}")
        if cfg.num_layers <= 0:
            raise LmmemError(f"--num-layers must be positive, got {cfg.num_layers}")
        self.cfg = cfg
        d = cfg.embed_dim
        self.embedding = nn.Embedding(cfg.vocab_size, d)
        self.position = nn.Embedding(cfg.context, d)
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg.hidden_dim, cfg.dropout) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(d)
        self.output_dropout = nn.Dropout(cfg.output_dropout)
        self.output = build_output_layer(cfg.softmax, cfg.output_dim, cfg.vocab_size, **cfg.softmax_options)
        self._init_weights()
        if cfg.tie_weights:
            self.output.weight = self.embedding.weight

    def _init_weights(self) -> None:
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.normal_(self.position.weight, std=0.02)
        for block in self.blocks:
            for lin in (block.attn.qkv, block.ffn[0]):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            # residual projections scaled down with depth (GPT-2)
            for lin in (block.attn.proj, block.ffn[2]):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * self.cfg.num_layers))
                nn.init.zeros_(lin.bias)

    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> None:
        return None

    @staticmethod
    def detach_state(state: None) -> None:
        return None

    def hidden_states(self, inputs: torch.Tensor, state: None = None) -> tuple[torch.Tensor, None]:
        """Final activations ``(B, T, embed_dim)`` (the softmax's input, after output dropout)."""
        T = inputs.shape[1]
        if T > self.cfg.context:
            raise LmmemError(f"input of {T} positions is longer than the Transformer's context ({self.cfg.context} positions, its "
                             f"training --bptt); evaluate with --bptt {self.cfg.context} or less, and --context C to score "
                             f"every token with at least C tokens before it (a sliding window)")
        pos = torch.arange(T, device=inputs.device)
        x = self.input_dropout(self.embedding(inputs) + self.position(pos))
        for block in self.blocks:
            x = block(x)
        return self.output_dropout(self.final_norm(x)), None

    def forward(
        self,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        state: None = None,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor, None]:
        """The loss of ``targets`` (``(B, T)``, IGNORE_INDEX to skip); ``state`` is ignored (None)."""
        h, _ = self.hidden_states(inputs)
        # through the module call (its forward is loss), so that forward hooks on the output layer see
        # the activations it scores (lmmem.experiments.binding measures with one)
        loss = self.output(h.reshape(-1, h.shape[-1]), targets.reshape(-1), reduction=reduction, ignore_index=IGNORE_INDEX)
        return loss, None
