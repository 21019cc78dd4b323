"""Model configuration shared by every architecture (saved in checkpoints as a plain dict)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class ModelConfig:
    arch: str = "lstm"  # lstm | transformer
    vocab_size: int = 0
    embed_dim: int = 128
    hidden_dim: int = 256  # LSTM units per layer (Transformer: feed-forward width)
    num_layers: int = 1
    proj_dim: int = 0  # LSTM output projection (LSTMP, cuDNN-supported); 0 = none
    dropout: float = 0.1  # on embeddings and between layers
    output_dropout: float = 0.2  # on the final activations, right before the softmax
    tie_weights: bool = False  # share the embedding matrix with the softmax weight
    num_heads: int = 4  # transformer only
    context: int = 128  # transformer only: longest attention span (= training bptt)
    softmax: str = "full"
    softmax_options: dict = field(default_factory=dict)

    @property
    def output_dim(self) -> int:
        """Width of the final activations fed to the softmax."""
        if self.arch == "lstm":
            return self.proj_dim or self.hidden_dim
        return self.embed_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
