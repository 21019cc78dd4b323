"""The log-normaliser of every row of a table of logits on a CPU as one C++ op (``row_lse.cpp``),
with a linear head's bias added in the same pass.

Why native: the evaluation's memories need log p(target) from full logits (MbPA reads every row;
a Hugging Face model returns them). Its torch statement, the chunked loop of
:func:`lmmem.output_layers.base.target_log_probs_from_logits`, passes over every chunk five times
(maximum, subtract, exponentiate, sum, log), and a bias copied into the product's output is one
more pass over the whole table. The op reads each row from memory once. (Measured:
docs/results/knn-lm.md.)

Built into the native IVF scan's extension (:mod:`lmmem.kernels.ivf_scan`: one build, the same
cache folder, lock and ``LMMEM_NATIVE=0`` switch), and probed against float64 ``logsumexp`` before
first use; where it does not build or its probe fails, the torch statement runs (one warning)."""

from __future__ import annotations

import functools

import torch

from lmmem.kernels import ivf_scan


def _probe(op) -> None:
    g = torch.Generator().manual_seed(0)
    z = 4 * torch.randn(5, 1001, generator=g)
    z[1] += 80.0  # the maximum matters
    z[2, :500] = float("-inf")
    z[3] = float("-inf")  # a row of -inf: -inf, as torch.logsumexp
    b = torch.randn(1001, generator=g)
    got_z = z.clone()
    got = op(got_z, b)
    want = torch.logsumexp(z.double() + b.double(), -1)
    if not torch.equal(got_z, z + b):
        raise RuntimeError("it did not add the bias to the logits as torch does")
    if not (torch.allclose(got.double(), want, rtol=1e-6, atol=1e-5) and got[3] == float("-inf")):
        raise RuntimeError(f"its result on a probe problem differs from logsumexp by {(got.double() - want).abs().max():.3g}")


@functools.lru_cache(maxsize=None)  # a fact about this process's machine, as the native scan's verdict
def row_lse_op():
    """``torch.ops.lmmem_rows.row_lse`` (``(z (N, V) fp32 rows of unit stride, bias (V,) fp32 or
    empty) -> (N,) fp32``, the bias added to ``z`` in place) where it builds and passes its probe;
    else None."""
    if ivf_scan.native_scan_op() is None:  # not built here (its warning said why) or switched off
        return None
    return ivf_scan.verified(torch.ops.lmmem_rows.row_lse, _probe, "the native log-normaliser of the logits",
                             "their torch statement runs instead (the same normalisers to fp32 rounding, slower)")
