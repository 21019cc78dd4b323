"""MbPA's restricted variant as one C++ op on a CPU (``mbpa_adapt.cpp``): each query from its
products with the memory to its adapted score, and the candidate selection (the top-n of each
query's logits) alone.

Why native: per query the restricted adaptation works on a ``(|C|, K)`` table (~160 × 32 floats)
for a few steps. Run as batched tensor operations over a group of queries, each step is ~10 passes
through memory (amax, softmax, log, exp, sigmoid, scatter, add ...), and choosing the neighbours and
building the candidates, their logits and the final score is ~50 more; those passes, not the
arithmetic, made cache + MbPA 2.2–3.5× the plain evaluation of the tiny models. The op runs each
query start to end on its own table.

The op is built into the native IVF scan's extension (:mod:`lmmem.kernels.ivf_scan`: one build,
once per machine, the same cache folder, lock and ``LMMEM_NATIVE=0`` switch). Its statement in
torch, which it must match and which runs wherever it does not, is
:func:`lmmem.memories.mbpa.select_neighbours` then
:func:`lmmem.memories.mbpa_restricted.restricted_target_log_probs`; the probes and the choice live
there (this layer does not import the memories)."""

from __future__ import annotations

import torch

from lmmem.kernels import ivf_scan


def restricted_score_op():
    """``torch.ops.lmmem_mbpa.restricted_score`` where the native extension builds, else None."""
    if ivf_scan.native_scan_op() is None:  # not built here (its warning said why) or switched off
        return None
    return torch.ops.lmmem_mbpa.restricted_score


def top_n_op():
    """``torch.ops.lmmem_mbpa.top_n`` where the native extension builds, else None."""
    if ivf_scan.native_scan_op() is None:
        return None
    return torch.ops.lmmem_mbpa.top_n
