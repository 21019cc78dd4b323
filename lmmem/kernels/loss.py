"""The fused linear + cross-entropy as a loss object, the way Liger-Kernel's
``LigerFusedLinearCrossEntropyLoss`` offers it: the options are fixed when the loss is built, the
output matrix comes with each call.

    loss_fn = LinearCrossEntropyLoss(ignore_index=-100, label_smoothing=0.1, z_loss=1e-4, softcap=30.0)
    loss = loss_fn(lm_head.weight, hidden, labels, lm_head.bias)   # Liger's argument order

It is the top layer over :func:`~lmmem.kernels.linear_cross_entropy.linear_cross_entropy` (chunked:
the ``N × V`` logits are never held; the Triton step on CUDA), with no parameters or state of its
own, so one object can serve several heads. Liger's ``lse_square_scale`` is ``z_loss`` here.

``return_z_loss=True`` returns a :class:`LinearCrossEntropyOutput` whose ``loss`` is the training
loss (z-loss included, as without the flag) and whose ``z_loss`` is the z-loss term alone
(``z_loss · logsumexp²`` per non-ignored row, reduced like the loss), detached: it is for logging,
as in Liger, and is read from the log-sum-exp the kernel computes anyway (no second pass). Its
log-sum-exp is that of the (soft-capped) logits, the one the loss uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmmem.constants import IGNORE_INDEX
from lmmem.kernels.linear_cross_entropy import linear_cross_entropy_with_lse

REDUCTIONS = ("mean", "sum", "none")


@dataclass
class LinearCrossEntropyOutput:
    """What :class:`LinearCrossEntropyLoss` returns with ``return_z_loss=True``."""

    loss: torch.Tensor  # the training loss, z-loss term included
    z_loss: torch.Tensor  # the z-loss term alone, reduced like ``loss``, without gradient


class LinearCrossEntropyLoss(nn.Module):
    """``cross_entropy(hidden @ weight.T + bias, targets)`` with the options of
    :func:`~lmmem.kernels.linear_cross_entropy.linear_cross_entropy` fixed at construction.

    Args:
        ignore_index: targets equal to it contribute nothing (a ``mean`` over all-ignored targets is 0).
        label_smoothing: ε in [0, 1], PyTorch's definition.
        z_loss: λ ≥ 0; adds ``λ·logsumexp²`` per non-ignored row, with its gradient (Liger's ``lse_square_scale``).
        softcap: c > 0 or None; the logits become ``c·tanh(z/c)`` before the softmax (Gemma 2).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (one value per position, flattened).
        return_z_loss: also return the z-loss term alone (see the module docstring).
        chunk_size, use_triton: as :func:`~lmmem.kernels.linear_cross_entropy.linear_cross_entropy`.

    ``forward(weight, hidden, targets, bias=None)``: ``weight`` ``(V, D)``, ``hidden`` ``(..., D)``,
    ``targets`` of ``hidden``'s leading shape, ``bias`` ``(V,)`` or None.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 softcap: float | None = None, reduction: str = "mean", return_z_loss: bool = False,
                 chunk_size: int | None = None, use_triton: bool | None = None):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        if not z_loss >= 0.0:
            raise ValueError(f"z_loss must be >= 0, got {z_loss}")
        if softcap is not None and not softcap > 0:
            raise ValueError(f"softcap must be a positive number or None, got {softcap}")
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)
        self.z_loss = float(z_loss)
        self.softcap = softcap
        self.reduction = reduction
        self.return_z_loss = bool(return_z_loss)
        self.chunk_size = chunk_size
        self.use_triton = use_triton

    def forward(self, weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor | LinearCrossEntropyOutput:
        loss, lse = linear_cross_entropy_with_lse(
            hidden, weight, bias, targets, self.reduction, self.ignore_index, label_smoothing=self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, chunk_size=self.chunk_size, use_triton=self.use_triton)
        if not self.return_z_loss:
            return loss
        return LinearCrossEntropyOutput(loss, self._z_term(lse, targets.reshape(-1), loss.dtype))

    @torch.no_grad()
    def _z_term(self, lse: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        valid = targets != self.ignore_index
        per_row = torch.where(valid, self.z_loss * lse.to(dtype) ** 2, torch.zeros((), dtype=dtype, device=lse.device))
        if self.reduction == "none":
            return per_row
        total = per_row.sum()
        return total if self.reduction == "sum" else total / valid.sum().clamp_min(1)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, reduction={self.reduction!r}, return_z_loss={self.return_z_loss}")
