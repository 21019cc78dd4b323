"""Any Hugging Face causal LM as an engine adapter (lmmem.evaluation.adapters).

The hidden state the memories use is the *input of the output embedding*: a forward hook on
``model.get_output_embeddings()`` captures it during the model's own forward, for every
architecture alike (no per-model table of layer names). The log-probabilities come from the
model's own logits. A probe at first use checks that the hook fired once with a
``(batch, positions, hidden size)`` input and that the logits are the head's function of it
(``head(hidden)``, nothing after the head: no soft-capping or scaling); where they are not, the
plain score and dynamic evaluation still work and the memories (which key on that hidden state,
and MbPA, which adapts the head) are refused with the reason. The hook is registered only for
the duration of each forward, so the model is left as it was given.
"""

from __future__ import annotations

import copy
import hashlib

import torch

from lmmem.errors import LmmemError
from lmmem.evaluation.adapters import Adapter, Forward, Head
from lmmem.output_layers.base import target_log_probs_from_logits

SEQLEN_CONFIG_ATTRS = ("n_positions", "max_position_embeddings", "n_ctx")  # the context length, in lm-eval's order


def max_positions(config) -> int | None:
    cfg = getattr(config, "text_config", None) or config
    for attr in SEQLEN_CONFIG_ATTRS:
        value = getattr(cfg, attr, None)
        if value is not None:
            return int(value)
    return None


class HFAdapter(Adapter):
    kind = "hf"

    def __init__(self, model: torch.nn.Module, tokenizer=None):
        self.model, self.tokenizer = model, tokenizer
        self.max_positions = max_positions(getattr(model, "config", None))
        self._problem: str | None | bool = False  # False: not probed yet

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _head_module(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def head(self) -> Head:
        h = self._head_module()
        return Head(h.weight, getattr(h, "bias", None))

    def _call(self, inputs: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, int]:
        captured: list[torch.Tensor] = []

        def hook(_module, args, _output):
            captured.append(args[0] if args else None)

        handle = self._head_module().register_forward_hook(hook)
        try:
            out = self.model(input_ids=inputs, use_cache=False, return_dict=True)
        finally:
            handle.remove()
        return (captured[0] if len(captured) == 1 else None), out.logits, len(captured)

    def forward(self, inputs, state=None) -> Forward:
        hidden, logits, _ = self._call(inputs)
        return Forward(hidden, logits, None)

    def hidden_problem(self) -> str | None:
        if self._problem is False:
            self._problem = self._probe()
        return self._problem

    def linear_head(self) -> str | None:
        return self.hidden_problem()

    @torch.no_grad()
    def _probe(self) -> str | None:
        name = type(self.model).__name__
        was_training = self.model.training
        self.model.eval()
        try:
            ids = torch.arange(5, device=self.device).remainder(self.vocab_size)[None]
            hidden, logits, calls = self._call(ids)
        finally:
            self.model.train(was_training)
        if calls != 1 or hidden is None or hidden.dim() != 3 or hidden.shape[-1] != self.dim:
            return (f"{name}'s output embedding (get_output_embeddings()) was called {calls} time(s) in a forward, not once "
                    "with the final hidden states; the cache, MbPA and kNN-LM need those states: evaluate it without them")
        expected = self.head().logits(hidden)
        if logits.shape != expected.shape or not torch.allclose(logits.float(), expected.float(), rtol=1e-4, atol=1e-4):
            return (f"{name}'s logits are not its output layer applied to the final hidden states (the model transforms them "
                    "after the head, e.g. soft-capping or scaling), so the cache, MbPA and kNN-LM, which use those states and "
                    "that layer, would not match its distribution: evaluate it without them")
        return None

    def target_log_probs(self, fwd: Forward, targets, want_logits: bool = False):
        logits = fwd.logits.reshape(-1, fwd.logits.shape[-1])
        return target_log_probs_from_logits(logits, targets), (logits if want_logits else None)

    def copy(self) -> "HFAdapter":
        other = HFAdapter(copy.deepcopy(self.model).eval(), self.tokenizer)
        other._problem = self._problem
        return other

    def describe(self) -> dict:
        cfg = getattr(self.model, "config", None)
        return {"kind": "hf", "class": type(self.model).__name__, "model_type": getattr(cfg, "model_type", None),
                "parameters": sum(p.numel() for p in self.model.parameters()), "max_positions": self.max_positions}


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of a tokenizer's full definition (the fast tokenizer's JSON, else its vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def prefix_token_id(tokenizer) -> int:
    """lm-evaluation-harness's prefix token for rolling loglikelihoods: BOS, else EOS."""
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise LmmemError("the tokenizer has neither a BOS nor an EOS token, which --window lm-eval puts before each document")
