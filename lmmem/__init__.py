"""lmmem: word-level language modelling with memory-augmented softmax layers.

Layout (one package per part of the architecture; docs/architecture.md has the layers and what
each may import):

* ``lmmem.data``           vocabularies, prepared corpora (reader and writer), BPTT batching, the embedded synthetic corpus
* ``lmmem.kernels``        Triton kernels for the output layers, with their plain-PyTorch statements
* ``lmmem.output_layers``  softmax layers: full, Hebbian (Rae et al. 2018)
* ``lmmem.models``         LSTM and Transformer language models behind one interface
* ``lmmem.memories``       test-time and rare-event memories
* ``lmmem.checkpoints``    the one loader and writer of checkpoints, run folders and exports
* ``lmmem.hf``             the layers as the head of Hugging Face models
* ``lmmem.evaluation``     perplexity bucketed by training frequency, test-time memories, reports
* ``lmmem.training``       config, the training loop and its step hook, run folders, torch.distributed
* ``lmmem.experiments``    runners that write the docs/results pages
"""

from lmmem.errors import LmmemError

__version__ = "0.1.0"

# Public names are imported on first use (PEP 562), so that torch-free parts such as
# `python -m data_prep` and lmmem.data.vocab start without paying for `import torch`.
_LAZY = {
    "FullSoftmax": "lmmem.output_layers",
    "HebbianSoftmax": "lmmem.output_layers",
    "OutputLayer": "lmmem.output_layers",
    "build_output_layer": "lmmem.output_layers",
    "LSTMLanguageModel": "lmmem.models",
    "ModelConfig": "lmmem.models",
    "build_model": "lmmem.models",
    # the fused loss on its own, for models that keep their own output matrix (imports triton on use)
    "linear_cross_entropy": "lmmem.kernels.linear_cross_entropy",
    # the same as a loss object with its options fixed (Liger-Kernel's loss API)
    "LinearCrossEntropyLoss": "lmmem.kernels.loss",
    "LinearCrossEntropyOutput": "lmmem.kernels.loss",
}


__all__ = ["LmmemError", *_LAZY]


def __dir__() -> list[str]:
    # the lazily exported names show in dir() and completion before their first use
    return sorted(set(globals()) | set(_LAZY))


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmmem' has no attribute {name!r}")
