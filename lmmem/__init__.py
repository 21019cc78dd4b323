"""lmmem: word-level language modelling with memory-augmented softmax layers.

Layout (one package per part of the architecture):

* ``lmmem.data``           vocabularies, prepared corpora, BPTT batching, the embedded synthetic corpus
* ``lmmem.models``         LSTM (and Transformer) language models behind one interface
* ``lmmem.output_layers``  softmax layers: full, Hebbian (Rae et al. 2018)
* ``lmmem.kernels``        Triton kernels for the output layers
* ``lmmem.memories``       test-time and rare-event memories
* ``lmmem.training``       config, training loop, checkpoints, torch.distributed
* ``lmmem.evaluation``     perplexity bucketed by training frequency, reports
"""

from lmmem.errors import LmmemError
from lmmem.models import LSTMLanguageModel, ModelConfig, build_model
from lmmem.output_layers import FullSoftmax, OutputLayer, build_output_layer

__version__ = "0.1.0"

__all__ = ["FullSoftmax", "LSTMLanguageModel", "LmmemError", "ModelConfig", "OutputLayer", "build_model", "build_output_layer"]
