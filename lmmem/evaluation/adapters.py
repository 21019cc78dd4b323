"""Model adapters: one interface over lmmem's models and any Hugging Face causal LM.

The engine needs, for a batch of inputs, the *hidden states* — the input of the output layer, the
vector the neural cache, MbPA and kNN-LM use as key and query — and the log-probability of each
target. An adapter gives both, plus what dynamic evaluation needs (a copy of the model whose
parameters it may change, the training loss for the gradient statistics) and what MbPA needs (the
output layer's ``weight``/``bias`` when the distribution is ``softmax(W h + b)``).

* :class:`LmmemAdapter`: ``model.hidden_states`` and ``model.output`` (the lmmem output layer), the
  same calls the evaluation made before the engine, so the numbers are unchanged.
* :class:`lmmem.evaluation.hf_adapter.HFAdapter`: a forward hook on ``get_output_embeddings()``
  captures its input; no table of architectures.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from lmmem.output_layers.base import IGNORE_INDEX, target_log_probs_from_logits
from lmmem.output_layers.full_softmax import FullSoftmax
from lmmem.output_layers.hebbian_softmax import HebbianSoftmax


@dataclass
class Forward:
    hidden: torch.Tensor  # (B, T, D): the output layer's input
    logits: torch.Tensor | None  # (B, T, V) when the model computes them anyway (HF), else None
    state: Any


class Head:
    """The linear output layer seen by MbPA: ``weight`` (V, D), ``bias`` (V,) or None, ``logits``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.weight, self.bias)


class Adapter:
    """What the engine uses; subclasses fill it in."""

    kind = "model"
    model: torch.nn.Module
    carries_state = False  # an LSTM: the state of a row flows from one chunk to the next
    max_positions: int | None = None  # inputs one forward may take (None: no limit)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.head().weight.dtype

    @property
    def vocab_size(self) -> int:
        return self.head().weight.shape[0]

    @property
    def dim(self) -> int:
        return self.head().weight.shape[1]

    def init_state(self, rows: int):
        return None

    def detach_state(self, state):
        return state

    def forward(self, inputs: torch.Tensor, state=None) -> Forward:
        raise NotImplementedError

    def head(self) -> Head:
        raise NotImplementedError

    def linear_head(self) -> str | None:
        """None when the distribution is ``softmax(head.weight h + head.bias)``, else the reason not."""
        return None

    def hidden_problem(self) -> str | None:
        """None when :meth:`forward`'s ``hidden`` is the output layer's input, else the reason not."""
        return None

    def target_log_probs(self, fwd: Forward, targets: torch.Tensor, want_logits: bool = False):
        """``(log p(target) (N,) (0 where ignored, at least fp32, differentiable), logits (N, V) or None)``."""
        raise NotImplementedError

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor, state=None):
        """Mean training loss of a batch and the new state (dynamic evaluation's gradient statistics)."""
        fwd = self.forward(inputs, state)
        lp, _ = self.target_log_probs(fwd, targets.reshape(-1))
        valid = targets.reshape(-1) != IGNORE_INDEX
        return -lp[valid].sum() / valid.sum().clamp_min(1), fwd.state

    def copy(self) -> "Adapter":
        """An adapter over a deep copy of the model (dynamic evaluation changes its parameters)."""
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind}

    def fingerprint(self) -> str:
        """SHA-256 of every parameter (name, dtype, shape, bytes): a datastore's keys belong to these weights."""
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            h = hashlib.sha256()
            for name, p in sorted(self.model.state_dict().items()):
                if not torch.is_tensor(p) or name.endswith("counts"):  # Hebbian counts do not change the keys
                    continue
                t = p.detach().cpu().contiguous()
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            cached = self._fingerprint = h.hexdigest()[:32]
        return cached


class LmmemAdapter(Adapter):
    """An lmmem LSTM or Transformer (``hidden_states`` + an lmmem output layer)."""

    kind = "lmmem"

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.carries_state = model.init_state(1, "cpu") is not None
        cfg = getattr(model, "cfg", None)
        self.max_positions = None if self.carries_state else getattr(cfg, "context", None)
        self._logits_buffer: torch.Tensor | None = None  # see _linear_logits

    def head(self):
        return self.model.output

    def linear_head(self) -> str | None:
        if type(self.model.output) in (FullSoftmax, HebbianSoftmax):
            return None
        return f"the output layer {type(self.model.output).__name__} is not a linear softmax"

    def init_state(self, rows: int):
        return self.model.init_state(rows, self.device)

    def detach_state(self, state):
        return self.model.detach_state(state)

    def forward(self, inputs, state=None) -> Forward:
        h, state = self.model.hidden_states(inputs, state)
        return Forward(h, None, state)

    def target_log_probs(self, fwd: Forward, targets, want_logits: bool = False):
        out = self.model.output
        h = fwd.hidden.reshape(-1, fwd.hidden.shape[-1])
        if want_logits and self.linear_head() is None:
            # one V × D product for both the plain score and MbPA's candidate rows
            logits, bias = self._linear_logits(h)
            return target_log_probs_from_logits(logits, targets, bias=bias), logits
        return out.target_log_probs(h, targets), None

    def _linear_logits(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The linear head's logits ``(N, V)``, and its bias where they do not hold it yet (it is
        added in place as their normalisers are computed: :func:`target_log_probs_from_logits`;
        with it they equal ``head.logits``). Without autograd they are written into one buffer that
        the next call overwrites: a fresh ``(N, V)`` tensor is new pages from the kernel on every
        batch (67 MB for a tiny LSTM's), whose first touch costs time the product does not. So
        logits returned by :meth:`target_log_probs` are valid until its next call (the engine's
        memories use them within the batch)."""
        out = self.model.output
        W, b = out.weight, out.bias
        if torch.is_grad_enabled() or h.dtype != W.dtype or (b is not None and b.dtype != W.dtype):
            return out.logits(h), None
        n, V = h.shape[0], W.shape[0]
        buf = self._logits_buffer
        if buf is None or buf.shape[0] < n or buf.shape[1] != V or buf.dtype != W.dtype or buf.device != W.device:
            buf = self._logits_buffer = torch.empty(n, V, dtype=W.dtype, device=W.device)
        return torch.mm(h, W.t(), out=buf[:n]), b

    def loss(self, inputs, targets, state=None):
        return self.model(inputs, targets, state)  # the model's own training loss (its mean)

    def copy(self) -> "LmmemAdapter":
        return LmmemAdapter(copy.deepcopy(self.model).eval())

    def describe(self) -> dict:
        cfg = getattr(self.model, "cfg", None)
        return {"kind": "lmmem", "model": cfg.to_dict() if cfg is not None else type(self.model).__name__}
