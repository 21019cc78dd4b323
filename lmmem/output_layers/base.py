"""The output-layer interface every softmax in lmmem implements.

A language model produces final activations ``hidden`` (the vectors fed to the softmax, shape
``(..., in_features)``); an output layer turns them into a distribution over ``num_classes`` words.
Training needs only :meth:`loss`; evaluation needs :meth:`target_log_probs` (bucketed perplexity,
the neural cache, MbPA) and sometimes :meth:`log_probs` (the full distribution).

Two hooks make room for layers whose parameters also move by a rule other than the gradient, as the
Hebbian softmax does (Rae et al. 2018):

* the forward pass in training mode may record statistics of ``(hidden, targets)``;
* :meth:`on_optimizer_step` is called right after every ``optimizer.step()``. The trainer calls it
  explicitly; users wiring the layer into their own loop can call :meth:`attach_to_optimizer` once,
  which registers it as a post-step hook so it can never be forgotten.

``weight`` has shape ``(num_classes, in_features)`` (like ``nn.Linear``), so it can be tied to an
``nn.Embedding`` of the same shape by assigning the same ``nn.Parameter``.

Backends
--------
The training loss and :meth:`target_log_probs` of the linear softmaxes go through
:meth:`OutputLayer.cross_entropy`. ``backend="auto"`` (the default) and ``"triton"`` use the chunked
fused linear cross-entropy of :mod:`lmmem.kernels.linear_cross_entropy` (never more than one chunk
of the ``N × V`` logits, on any device, any float dtype): ``auto`` runs its in-place step as a
Triton kernel on CUDA (falling back to PyTorch, with one warning, wherever a kernel variant fails)
and in PyTorch elsewhere; ``triton`` forces the Triton kernels (on CPU tensors only under the
interpreter, ``TRITON_INTERPRET=1``). ``"torch"`` is the plain reference: ``F.linear`` then
``F.cross_entropy``, materialising the logits. The Hebbian statistics follow the same choice
(:meth:`uses_triton`). The backend is a run-time choice, not part of the model: a plain attribute
(``layer.backend = "torch"``), not saved in checkpoints. ``LMMEM_TRITON=0`` switches Triton off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmmem.constants import IGNORE_INDEX
from lmmem.errors import LmmemError
from lmmem.kernels import row_lse
from lmmem.kernels.linear_cross_entropy import linear_cross_entropy
from lmmem.kernels.runtime import triton_usable

__all__ = ["BACKENDS", "IGNORE_INDEX", "OutputLayer", "cross_entropy_from_logits", "target_log_probs_from_logits",
           "unwrap_optimizer", "upcast"]

BACKENDS = ("auto", "torch", "triton")


class OutputLayer(nn.Module):
    in_features: int
    num_classes: int
    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self, in_features: int, num_classes: int, bias: bool = True, backend: str = "auto"):
        super().__init__()
        if in_features <= 0 or num_classes <= 0:
            raise ValueError(f"in_features and num_classes must be positive, got {in_features}, {num_classes}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.bias = nn.Parameter(torch.empty(num_classes)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default would scale rows by 1/sqrt(in_features); LMs with large vocabularies
        # train better from small uniform rows and a zero bias (as in the PyTorch word LM example).
        nn.init.uniform_(self.weight, -0.1, 0.1)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {value!r}")
        self._backend = value

    def uses_triton(self, hidden: torch.Tensor) -> bool:
        """Whether the Triton kernels (loss step, Hebbian statistics and update) are asked for with
        these activations: forced by ``backend="triton"``, or ``auto`` on CUDA with triton usable
        (installed, ``LMMEM_TRITON`` not 0) and a dtype the kernels handle. A kernel variant that
        fails here still falls back to PyTorch (see :mod:`lmmem.kernels.runtime`)."""
        if self._backend == "torch":
            return False
        if self._backend == "triton":
            return True
        supported = (torch.float32, torch.bfloat16, torch.float16)
        return (hidden.is_cuda and self.weight.is_cuda and hidden.dtype in supported
                and self.weight.dtype in supported and triton_usable(hidden.device))

    def cross_entropy(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                      ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """Cross-entropy of ``softmax(W h + b)`` (at least fp32; ``none``: flattened, one value per
        position), by the backend chosen above. Records nothing; subclasses' :meth:`loss` adds that."""
        if self._backend == "torch":
            return cross_entropy_from_logits(self.logits(hidden), targets, reduction, ignore_index)
        return linear_cross_entropy(hidden, self.weight, self.bias, targets, reduction, ignore_index,
                                    use_triton=True if self._backend == "triton" else None)

    # -- distribution -----------------------------------------------------------------------------
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight, self.bias)

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full log-distribution ``(..., num_classes)``, at least float32 (even under bf16 autocast)."""
        return torch.log_softmax(upcast(self.logits(hidden)), dim=-1)

    def target_log_probs(self, hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """log p(target | hidden) per position (at least float32), shape of ``targets``; 0 where ignored."""
        nll = self.loss(hidden, targets, reduction="none", ignore_index=ignore_index)
        return -nll.view(targets.shape)

    # -- training ---------------------------------------------------------------------------------
    def loss(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        reduction: str = "mean",
        ignore_index: int = IGNORE_INDEX,
    ) -> torch.Tensor:
        """Cross-entropy of ``targets`` under the layer; ``reduction`` in {"mean", "sum", "none"}.

        ``mean`` divides by the number of non-ignored targets and is 0 (not NaN) when all are ignored.
        """
        raise NotImplementedError

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        return self.loss(hidden, targets, reduction=reduction, ignore_index=ignore_index)

    def on_optimizer_step(self, optimizer=None) -> None:
        """Called after every optimizer step, with the optimizer that stepped when the caller has it
        (a rule that adjusts the optimizer's state for the rows it writes needs it). Plain softmax
        layers do nothing here."""

    def start_pass(self, completed: int) -> None:
        """Called when a pass over the training data begins, after ``completed`` whole passes (a
        rule whose schedule follows passes needs it). Plain softmax layers do nothing here."""

    def attach_to_optimizer(self, optimizer):
        """Run :meth:`on_optimizer_step` after every ``optimizer.step()``; returns the hook handle.

        ``optimizer`` may be a wrapper (Accelerate's ``AcceleratedOptimizer``, an LR scheduler, other
        wrappers that keep the real optimizer as ``.optimizer``): the hook goes on the innermost
        ``torch.optim.Optimizer``, whose ``step()`` every wrapper ends in (see :func:`unwrap_optimizer`)."""
        inner = unwrap_optimizer(optimizer)
        return inner.register_step_post_hook(lambda opt, *_: self.on_optimizer_step(opt))


# Attribute names under which optimizer wrappers keep the optimizer they wrap: Accelerate's
# AcceleratedOptimizer and torch LR schedulers (.optimizer), Lightning (._optimizer), ZeroRedundancyOptimizer
# (.optim), SAM-style wrappers (.base_optimizer).
_WRAPPED_OPTIMIZER_ATTRS = ("optimizer", "_optimizer", "optim", "base_optimizer")


def unwrap_optimizer(optimizer):
    """The innermost ``torch.optim.Optimizer`` behind ``optimizer``.

    A wrapper can subclass ``Optimizer`` without running its ``__init__`` (AcceleratedOptimizer
    does), so its own ``register_step_post_hook`` fails; hooks on the inner optimizer run whenever the
    wrapper really steps (and not when it skips a step, e.g. during gradient accumulation or after an
    fp16 overflow, which is what the Hebbian update needs)."""
    seen = {id(optimizer)}
    current = optimizer
    while True:
        # follow anything optimizer-like (wrappers of wrappers): an Optimizer, or an object with step()
        inner = next((getattr(current, a) for a in _WRAPPED_OPTIMIZER_ATTRS
                      if isinstance(getattr(current, a, None), torch.optim.Optimizer)
                      or callable(getattr(getattr(current, a, None), "step", None))), None)
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        current = inner
    if not (isinstance(current, torch.optim.Optimizer) and hasattr(current, "_optimizer_step_post_hooks")):
        raise LmmemError(
            f"cannot find the torch.optim.Optimizer inside {type(optimizer).__name__} to attach the output layer to; "
            "call layer.on_optimizer_step() right after every optimizer step yourself (with the Hugging Face Trainer: "
            "callbacks=[lmmem.hf.HebbianSoftmaxCallback()])")
    return current


def upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 → fp32 for the softmax; fp32 and fp64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def cross_entropy_from_logits(logits: torch.Tensor, targets: torch.Tensor, reduction: str, ignore_index: int) -> torch.Tensor:
    """F.cross_entropy in float32, with ``mean`` over an all-ignored batch giving 0 instead of NaN
    (no host sync: the count is clamped on the device)."""
    flat_t = targets.reshape(-1)
    nll = F.cross_entropy(upcast(logits.reshape(-1, logits.shape[-1])), flat_t, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return nll
    total = nll.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (flat_t != ignore_index).sum().clamp_min(1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# one chunk's (rows, V) buffer: 1 MB in fp32, so that it stays in a core's L2 cache through the
# chunk's passes (subtract, exp, sum); 16 MB chunks went to memory and back each time
# (docs/results/knn-lm.md, "Restricted MbPA as one native op per query")
LSE_CHUNK_ELEMENTS = 1 << 18


def target_log_probs_from_logits(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``log p(target)`` ``(N,)`` from ``logits`` ``(N, V)``: ``−F.cross_entropy`` (at least float32,
    0 where ignored), differentiable where autograd records.

    Without autograd it runs over chunks of rows in one reused buffer: ``logit[target] − (m +
    log Σ exp(logit − m))``, ``m`` the row's maximum. Why: F.cross_entropy writes the whole ``(N, V)``
    log-softmax, and at evaluation sizes (4,096 × 50,257 logits: 823 MB) the allocator hands out
    fresh pages for it on every batch, whose first touch costs more than the arithmetic. On a CPU in
    float32 one native op (:mod:`lmmem.kernels.row_lse`) computes the same normalisers reading each
    row once; this loop is its statement and runs wherever it does not.

    ``bias`` ``(V,)``, without autograd only: a linear head's bias that the caller's product left
    out, added to ``logits`` (2-D, rows of unit stride) in place first, in the same pass; the logits
    are then the head's. A product that adds the bias itself (``addmm``) first copies it into the
    whole output: one more pass over the table."""
    if torch.is_grad_enabled() and logits.requires_grad:
        if bias is not None:
            raise ValueError("a bias is added to the logits in place: not while autograd records them")
        return -cross_entropy_from_logits(logits, targets, "none", ignore_index)
    if bias is not None and (logits.dim() != 2 or logits.stride(-1) != 1):
        raise ValueError(f"a bias is added to the logits in place: they must be (N, V) with rows of unit stride, "
                         f"got shape {tuple(logits.shape)} and strides {logits.stride()}")
    x = logits.reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    dt = torch.promote_types(x.dtype, torch.float32)
    native = _native_row_lse(x, bias)
    if native is not None:
        lse = native(x, bias if bias is not None else x.new_empty(0))
    else:
        rows = max(1, LSE_CHUNK_ELEMENTS // max(x.shape[1], 1))
        lse = torch.empty(x.shape[0], dtype=dt, device=x.device)
        buf = torch.empty((min(rows, x.shape[0]), x.shape[1]), dtype=dt, device=x.device)
        for i in range(0, x.shape[0], rows):
            chunk = x[i:i + rows]
            if bias is not None:
                chunk.add_(bias)
            m = chunk.amax(-1, keepdim=True).to(dt)
            m = m.masked_fill_(~torch.isfinite(m), 0.0)  # all -inf (or an inf) row: as torch.logsumexp
            b = torch.sub(chunk, m, out=buf[:chunk.shape[0]]).exp_()
            lse[i:i + rows] = m[:, 0] + b.sum(-1).log_()
    picked = x.gather(1, t.clamp_min(0)[:, None])[:, 0].to(dt)
    return torch.where(t != ignore_index, picked - lse, torch.zeros((), dtype=dt, device=x.device))


def _native_row_lse(x: torch.Tensor, bias: torch.Tensor | None):
    """The native row normaliser where it runs these inputs as they are (fp32 on a CPU, rows of
    unit stride), else None."""
    f32 = torch.float32
    if (x.device.type != "cpu" or x.dtype != f32 or x.stride(-1) != 1 or x.numel() == 0
            or (bias is not None and (bias.dtype != f32 or bias.device.type != "cpu" or not bias.is_contiguous()))):
        return None
    return row_lse.row_lse_op()
