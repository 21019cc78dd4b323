"""lmmem's softmax layers in Hugging Face transformers models (the optional ``lmmem[hf]`` extra).

    from lmmem.hf import apply_hebbian_softmax
    apply_hebbian_softmax(model)            # any *ForCausalLM with a linear head: GPT-2, Llama, ...

* :func:`apply_hebbian_softmax` / :func:`apply_fused_softmax`: replace the output head in place
  (weights kept, ties kept); training with ``labels`` goes through the layer's fused loss, logits and
  ``generate()`` are unchanged, ``resize_token_embeddings`` keeps the head and its state
  (:mod:`lmmem.hf.patch`, :mod:`lmmem.hf.resize`). Only the model given changes: it gets its own
  copy of its config.
* :class:`HebbianSoftmaxCallback` (``transformers.Trainer``) or :func:`attach_to_optimizer` (your
  own loop, wrapped optimizers included): the Hebbian update after every optimizer step.
* :func:`from_pretrained`: load a model saved with ``save_pretrained`` with its head and ``counts``.

``import lmmem`` never imports transformers; only this subpackage does.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    from lmmem.errors import LmmemError

    raise LmmemError("lmmem.hf needs the optional Hugging Face extra: pip install 'lmmem[hf]' "
                     "(transformers, accelerate, safetensors)") from e

from lmmem.hf.callback import HebbianSoftmaxCallback, attach_to_optimizer, output_layers
from lmmem.hf.heads import FusedLMHead, HebbianLMHead
from lmmem.hf.patch import apply_fused_softmax, apply_hebbian_softmax, from_pretrained, lmmem_head, load_head_state

__all__ = [
    "FusedLMHead", "HebbianLMHead", "HebbianSoftmaxCallback", "apply_fused_softmax", "apply_hebbian_softmax",
    "attach_to_optimizer", "from_pretrained", "lmmem_head", "load_head_state", "output_layers",
]
