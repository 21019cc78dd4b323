"""The neural cache's scores as one C++ op on a CPU (``cache_log_probs`` in ``mbpa_adapt.cpp``,
which shares MbPA's vectorised exponential): per query one pass over its stored pairs for each θ,
instead of the torch statement's ~8 batched passes over the whole chunk (scale, mask, softmax,
mask, sum, log), which on small models cost as much as the model's own scoring.

Built into the native IVF scan's extension (:mod:`lmmem.kernels.ivf_scan`: one build, once per
machine, the same ``LMMEM_NATIVE=0`` switch). Its torch statement, which it must match to fp32
rounding and which runs wherever it does not, is
:meth:`lmmem.memories.neural_cache.NeuralCache.target_log_probs`; the probe and the choice live
there (this layer does not import the memories)."""

from __future__ import annotations

import torch

from lmmem.kernels import ivf_scan


def cache_log_probs_op():
    """``torch.ops.lmmem_cache.cache_log_probs`` where the native extension builds, else None."""
    if ivf_scan.native_scan_op() is None:  # not built here (its warning said why) or switched off
        return None
    return torch.ops.lmmem_cache.cache_log_probs
