"""Output layers (softmaxes) behind one interface, see :mod:`lmmem.output_layers.base`.

``build_output_layer(name, ...)`` maps the ``--softmax`` flag to a class; new layers register in
``OUTPUT_LAYERS``.
"""

from __future__ import annotations

from lmmem.constants import IGNORE_INDEX
from lmmem.errors import LmmemError
from lmmem.output_layers.base import OutputLayer
from lmmem.output_layers.full_softmax import FullSoftmax
from lmmem.output_layers.hebbian_softmax import HebbianSoftmax

OUTPUT_LAYERS: dict[str, type[OutputLayer]] = {"full": FullSoftmax, "hebbian": HebbianSoftmax}


def build_output_layer(name: str, in_features: int, num_classes: int, **options) -> OutputLayer:
    try:
        cls = OUTPUT_LAYERS[name]
    except KeyError:
        raise LmmemError(f"unknown softmax {name!r}; choose one of: {', '.join(sorted(OUTPUT_LAYERS))}") from None
    return cls(in_features, num_classes, **options)


__all__ = ["IGNORE_INDEX", "OUTPUT_LAYERS", "FullSoftmax", "HebbianSoftmax", "OutputLayer", "build_output_layer"]
