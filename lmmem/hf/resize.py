"""``resize_token_embeddings`` on a model whose head is an lmmem layer.

transformers resizes the output head only if it is an ``nn.Linear`` (an untied model fails with
"Old language model head … is not an instance of Linear"), and knows nothing of the layer's state:
the Hebbian ``counts`` would stay at the old vocabulary size. The patched model's
``resize_token_embeddings`` therefore runs transformers' own resize on an ``nn.Linear`` *view* of
the head (the same weight and bias parameters), so new rows are initialised exactly as transformers
initialises them for a stock model (``mean_resizing``, ``pad_to_multiple_of``, ties and the bias
padding included), then moves the resized parameters back into the same head object and resizes its
per-class state: old classes keep their counts, new ones start at 0 (never seen). State that is not
per class (the centred rule's running mean and norm, the update count) is kept as it is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from lmmem.errors import LmmemError
from lmmem.output_layers.base import OutputLayer


def per_class_buffers(layer: OutputLayer) -> list[str]:
    """Names of ``layer``'s buffers with one entry per class along dim 0 (found by building the layer
    class on the meta device with two vocabulary sizes, so new per-class state is found without a list)."""
    with torch.device("meta"):
        a = dict(type(layer)(layer.in_features, 2, bias=False).named_buffers(recurse=False))
        b = dict(type(layer)(layer.in_features, 3, bias=False).named_buffers(recurse=False))
    return [name for name in a if a[name].shape != b[name].shape]


@torch.no_grad()
def resize_layer_(layer: OutputLayer, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
    """Make ``layer`` use ``weight`` (``(V', D)``) and ``bias`` and resize its per-class buffers to
    ``V'``: the first ``min(V, V')`` entries kept, added ones zero."""
    if weight.shape[1] != layer.in_features:
        raise LmmemError(f"the resized head has {weight.shape[1]} input features, the lmmem layer {layer.in_features}")
    new_n = weight.shape[0]
    for name in per_class_buffers(layer):
        old = getattr(layer, name)
        new = torch.zeros((new_n, *old.shape[1:]), dtype=old.dtype, device=old.device)
        keep = min(new_n, old.shape[0])
        new[:keep] = old[:keep]
        setattr(layer, name, new)
    layer.weight = weight
    layer.bias = bias
    layer.num_classes = new_n


def linear_view(layer: OutputLayer) -> nn.Linear:
    """An ``nn.Linear`` holding ``layer``'s own weight and bias parameters (no copy)."""
    with torch.device("meta"):
        view = nn.Linear(layer.in_features, layer.num_classes, bias=layer.bias is not None)
    view.weight = layer.weight
    view.bias = layer.bias
    return view


def wrap_resize(model: nn.Module, layer: OutputLayer, put_head: Callable[[nn.Module], None]) -> Callable[[], None]:
    """Install the instance-level ``resize_token_embeddings`` described above on ``model``;
    ``put_head(module)`` puts a module where the head lives. Returns a function that uninstalls it."""
    original = model.resize_token_embeddings

    @functools.wraps(original)
    def resize_token_embeddings(*args, **kwargs):
        if getattr(layer, "_stats", None) is not None:
            raise LmmemError("resize_token_embeddings was called between a training forward and its optimizer step (the "
                             "head holds that forward's statistics); resize before training or right after a step")
        put_head(linear_view(layer))
        try:
            result = original(*args, **kwargs)
            resized = model.get_output_embeddings()
            resize_layer_(layer, resized.weight, resized.bias)
        finally:
            put_head(layer)
        return result

    return install_method(model, "resize_token_embeddings", resize_token_embeddings)


def install_method(model: nn.Module, name: str, fn: Callable) -> Callable[[], None]:
    """Set ``model.<name> = fn`` on the instance (not the class, so other models are untouched);
    returns a function that puts back what the instance had: its own earlier attribute, or none."""
    had_own = name in vars(model)
    previous = vars(model).get(name)
    setattr(model, name, fn)

    def uninstall() -> None:
        if had_own:
            setattr(model, name, previous)
        else:
            delattr(model, name)

    return uninstall
