"""Chunked fused linear + cross-entropy: the loss of ``softmax(h Wᵀ + b)`` and its gradients for
``h``, ``W`` and ``b`` without ever holding the ``N × V`` logits.

At WikiText-103 scale (V = 267,735, N = 8,192 tokens a step) the logits are 2.2 billion numbers
(4.4 GB in bf16, 8.8 GB in fp32, and as much again for their gradient). Here they exist one chunk of
rows at a time.

Structure (per chunk of ``C`` rows; ``C`` from V, D and the device's memory, ~2K rows at
WikiText-103 scale on a GPU)::

    z  = h[c] Wᵀ + b                     one matmul (cuBLAS / the CPU BLAS), in the compute dtype
    z ← step(z)                          in place: loss, log-sum-exp, and ∂loss/∂z (fp32 math)
    dh[c]  = z W                         second matmul
    dW    += zᵀ h[c];  db += Σ_rows z    third matmul, into fp32 accumulators

so the work is exactly ``6·N·D·V`` flops, done once, with no atomics and a fixed summation order
(deterministic). The gradients are produced in the forward and the backward only scales them by the
upstream gradient — valid because for ``mean`` and ``sum`` that gradient is one scalar. For
``reduction="none"`` the upstream gradient is a vector only known in the backward, so the forward
keeps ``h, W, b, targets`` (no gradients) and the backward recomputes each chunk's logits, weights
row ``n`` by its upstream gradient and runs the same step (``8·N·D·V``).

``step`` (:mod:`lmmem.kernels.ce_step`, where its formulas are) is a Triton kernel on CUDA and
PyTorch elsewhere, and wherever the kernel failed (see :mod:`lmmem.kernels.runtime`). Ignored
targets (``ignore_index``) contribute 0 to the loss and the gradients; a ``mean`` over a batch with
every target ignored is 0.

Layers (as Liger-Kernel): kernel (``triton_kernels.ce_step_kernel``) → launcher
(:func:`~lmmem.kernels.ce_step.ce_step_triton`; the PyTorch statement
:func:`~lmmem.kernels.ce_step.ce_step_torch` beside it) → the chunk loop
(:func:`chunked_linear_cross_entropy`) → a ``torch.library`` custom op with its autograd formula
(``torch.ops.lmmem.linear_cross_entropy``: ``torch.compile`` keeps it as one node instead of
breaking the graph) → :func:`linear_cross_entropy` (reduction, autocast, options) → the output
layers. :func:`linear_cross_entropy_reference` materialises the logits: the specification the tests
compare against in float64.

Precision: under autocast (CUDA or CPU) the matmuls run in the autocast dtype (``W`` is cast once
per call, as autocast's ``F.linear`` would); otherwise in ``promote(h.dtype, W.dtype)``, so fp32
inputs use TF32 exactly when the user allowed it for PyTorch matmuls (nothing here reads that
setting). Gradients come back in each input's own dtype, ``dW``/``db`` accumulated in fp32.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from lmmem.constants import IGNORE_INDEX
from lmmem.errors import LmmemError
from lmmem.kernels.ce_step import TRITON_DTYPES, RedoChunk, ce_step
from lmmem.kernels.runtime import device_guard, require_triton, triton_usable

_FLOAT = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# -- chunking --------------------------------------------------------------------------------------


CPU_CHUNK_BYTES = 16 << 20  # the CPU chunk's logits where the rows allow (see chunk_rows)
CPU_REUSED_BYTES = 30 << 20  # under glibc's largest mmap threshold (32 MiB): such freed blocks are reused
CPU_MIN_ROWS = 128  # fewer rows made the chunk's matmuls slower (docs/results/linear-cross-entropy.md)


def chunk_rows(N: int, V: int, D: int, device: torch.device, compute_dtype: torch.dtype, use_triton: bool,
               softcap: bool = False) -> int:
    """Rows per chunk. The chunk's logits (plus the fp32 working copy the PyTorch step makes of
    bf16/fp16 logits, and the soft-cap's derivative) get a fixed budget: on CUDA 1 GiB or 1/16 of
    the device's memory, whichever is less (~2K rows at V = 267,735 in bf16: big enough for the
    matmuls to run at full speed).

    On CPU, 16 MiB but at least 128 rows, where that chunk takes at most 30 MiB: the C allocator
    keeps a freed block under 32 MiB (glibc's largest mmap threshold) and hands it out again,
    while a larger block is new pages from the kernel on every call, whose first touch cost more
    than the arithmetic at small vocabularies. Wider rows (V > 61,440 in fp32) get 200 MiB (192 rows
    at V = 267,735), where larger chunks ran faster and the peak above the inputs stays under the
    acceptance bound of 1/8 of eager PyTorch's. (The measurements: docs/results/linear-cross-entropy.md.)

    The size depends on the shape and the device, never on the momentary free memory, so the
    summation order (and the result, bit for bit) is the same every run; it is halved only when
    free memory cannot hold it (and never under ``torch.use_deterministic_algorithms``)."""
    per_row = V * torch.empty((), dtype=compute_dtype).element_size()
    if not use_triton and compute_dtype in (torch.bfloat16, torch.float16):
        per_row += V * 4
    if softcap and not use_triton:
        per_row += V * 4
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        budget = min(1 << 30, total // 16)
        align = 128
    else:
        align = 16
        small = max(CPU_MIN_ROWS, CPU_CHUNK_BYTES // max(per_row, 1) // align * align)
        budget = small * per_row if small * per_row <= CPU_REUSED_BYTES else 200 << 20
    rows = max(align, budget // max(per_row, 1) // align * align)
    if device.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
        free, _ = torch.cuda.mem_get_info(device)
        while rows > align and rows * per_row * 2 > free:
            rows //= 2
    return max(1, min(rows, N))


def _acc_mm_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32 (fp64) and ``a``, ``b`` possibly bf16/fp16: summed in the
    accumulator's precision where the BLAS allows it (CUDA's ``out_dtype``), else the product is
    formed in the operands' dtype (as autocast's own matmul would) and added."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _mm_out_dtype_works(a.dtype, acc.dtype, acc.device):
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
        return
    acc.add_(torch.mm(a, b))


@functools.lru_cache(maxsize=None)
def _mm_out_dtype_works(dtype: torch.dtype, out_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this torch/GPU has ``torch.mm(..., out_dtype=)`` for these dtypes (a cached fact, not a
    kernel of ours: no warning when it is missing, the plain product is the documented fallback)."""
    try:
        x = torch.ones(3, 2, dtype=dtype, device=device)
        r = torch.mm(x, x.t(), out_dtype=out_dtype)
        return r.dtype == out_dtype and float(r[0, 0]) == 2.0
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _check_targets(targets: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """Out-of-range targets would score an arbitrary logit: refuse them as F.cross_entropy does.
    On CUDA the check is asynchronous (no host sync); on CPU it raises at once."""
    bad = ((targets < 0) | (targets >= num_classes)) & (targets != ignore_index)
    if targets.device.type == "cuda":
        torch._assert_async(~bad.any(), "linear_cross_entropy: a target is outside [0, num_classes) and not ignore_index")
    elif bool(bad.any()):
        raise IndexError(f"targets must be in [0, {num_classes}) or ignore_index ({ignore_index}); found {targets[bad][0].item()}")


def chunked_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    row_weight: torch.Tensor | None, *, compute_dtype: torch.dtype, ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float = 0.0,
    needs: tuple[bool, bool, bool] = (False, False, False), chunk_size: int = 0, use_triton: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The chunk loop. Per-row ``loss`` and ``lse`` (fp32; fp64 for fp64), and — where ``needs`` asks
    and ``row_weight`` is given — the gradients of ``Σ_n row_weight[n]·loss[n]``: ``dh`` in
    ``hidden``'s dtype, ``dW`` and ``db`` as fp32 (fp64) accumulators. ``hidden`` ``(N, D)``,
    ``targets`` ``(N,)``. Runs with autocast off: ``compute_dtype`` says what the matmuls use."""
    N, D = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    cd = compute_dtype
    acc_dtype = torch.promote_types(cd, torch.float32)
    grads = row_weight is not None and any(needs)
    need_dh, need_dw, need_db = (needs[0], needs[1], needs[2] and bias is not None) if grads else (False, False, False)
    _check_targets(targets, V, ignore_index)
    loss = torch.empty(N, dtype=acc_dtype, device=device)
    lse = torch.empty(N, dtype=acc_dtype, device=device)
    dh = torch.empty(N, D, dtype=hidden.dtype, device=device) if need_dh else None
    dw = torch.zeros(V, D, dtype=acc_dtype, device=device) if need_dw else None
    db = torch.zeros(V, dtype=acc_dtype, device=device) if need_db else None
    if N == 0:
        return loss, lse, dh, dw, db
    h = hidden.to(cd)
    w = weight.to(cd)
    b = bias.to(cd) if bias is not None else None
    wt = w.t()
    C = chunk_size or chunk_rows(N, V, D, device, cd, use_triton, bool(softcap))
    buf = torch.empty(min(C, N), V, dtype=cd, device=device)  # reused by every chunk: one allocation
    for s in range(0, N, C):
        e = min(s + C, N)
        hc, tc = h[s:e], targets[s:e]
        rw = row_weight[s:e] if grads else None
        z = buf[: e - s]
        for attempt in range(2):
            if b is not None:
                torch.addmm(b, hc, wt, out=z)
            else:
                torch.mm(hc, wt, out=z)
            try:
                l_c, lse_c = ce_step(z, tc, rw, ignore_index, label_smoothing, z_loss, softcap, use_triton and attempt == 0)
                break
            except RedoChunk:
                continue  # the kernel is now marked failed: recompute the logits, step in PyTorch
        loss[s:e] = l_c
        lse[s:e] = lse_c
        if not grads:
            continue
        if need_dh:
            if dh.dtype == cd:
                torch.mm(z, w, out=dh[s:e])
            else:
                dh[s:e] = torch.mm(z, w)
        if need_dw:
            _acc_mm_(dw, z.t(), hc)
        if need_db:
            db.add_(z.sum(dim=0, dtype=acc_dtype))
    return loss, lse, dh, dw, db


# -- torch.library custom ops ----------------------------------------------------------------------

_Tensors5 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _resolve_triton(use_triton: int, device: torch.device, cd: torch.dtype) -> bool:
    """-1: where Triton runs natively (CUDA, not disabled, a dtype it handles); 1: forced; 0: never."""
    if use_triton == 0:
        return False
    if use_triton == 1:
        return cd in TRITON_DTYPES
    return device.type == "cuda" and cd in TRITON_DTYPES and triton_usable(device)


def _row_weights(targets: torch.Tensor, reduction: str, ignore_index: int, dtype: torch.dtype):
    valid = targets != ignore_index
    count = valid.sum().clamp_min(1)
    w = valid.to(dtype)
    return (w / count if reduction == "mean" else w), count


def _grads_or_empty(hidden: torch.Tensor, acc: torch.dtype, dh, dw, db) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A custom op returns tensors, not None: a gradient not asked for is an empty tensor, a distinct
    one each time (a custom op's outputs must not alias each other)."""
    return (dh if dh is not None else hidden.new_empty(0),
            dw if dw is not None else hidden.new_empty(0, dtype=acc),
            db if db is not None else hidden.new_empty(0, dtype=acc))


@torch.library.custom_op("lmmem::linear_cross_entropy", mutates_args=())
def _lce_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
            reduction: str, ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
            compute_dtype: torch.dtype, need_dh: bool, need_dw: bool, need_db: bool, chunk_size: int,
            use_triton: int) -> _Tensors5:
    """(loss — scalar for mean/sum, (N,) for none —, lse (N,), dh, dW, db); the gradients are those
    of the returned loss, computed now (empty tensors where not needed, and always for 'none')."""
    device = hidden.device
    acc = torch.promote_types(compute_dtype, torch.float32)
    needs = (need_dh, need_dw, need_db) if reduction != "none" else (False, False, False)
    row_weight, count = _row_weights(targets, reduction, ignore_index, acc)
    with torch.autocast(device.type, enabled=False), device_guard(device):
        loss, lse, dh, dw, db = chunked_linear_cross_entropy(
            hidden, weight, bias, targets, row_weight if any(needs) else None, compute_dtype=compute_dtype,
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
            needs=needs, chunk_size=chunk_size, use_triton=_resolve_triton(use_triton, device, compute_dtype))
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / count
    return (loss, lse, *_grads_or_empty(hidden, acc, dh, dw, db))


@_lce_op.register_fake
def _lce_fake(hidden, weight, bias, targets, reduction, ignore_index, label_smoothing, z_loss, softcap,
              compute_dtype, need_dh, need_dw, need_db, chunk_size, use_triton):
    N, D = hidden.shape
    V = weight.shape[0]
    acc = torch.promote_types(compute_dtype, torch.float32)
    grads = reduction != "none"
    loss = hidden.new_empty(() if grads else (N,), dtype=acc)
    return (loss, hidden.new_empty(N, dtype=acc),
            hidden.new_empty((N, D) if grads and need_dh else (0,)),
            hidden.new_empty((V, D) if grads and need_dw else (0,), dtype=acc),
            hidden.new_empty((V,) if grads and need_db and bias is not None else (0,), dtype=acc))


@torch.library.custom_op("lmmem::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     targets: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
                     compute_dtype: torch.dtype, need_dh: bool, need_dw: bool, need_db: bool, chunk_size: int,
                     use_triton: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reduction='none': gradients of ``Σ_n grad[n]·loss[n]``, recomputing each chunk's logits."""
    device = hidden.device
    acc = torch.promote_types(compute_dtype, torch.float32)
    with torch.autocast(device.type, enabled=False), device_guard(device):
        _, _, dh, dw, db = chunked_linear_cross_entropy(
            hidden, weight, bias, targets, grad.to(acc), compute_dtype=compute_dtype, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, needs=(need_dh, need_dw, need_db),
            chunk_size=chunk_size, use_triton=_resolve_triton(use_triton, device, compute_dtype))
    return _grads_or_empty(hidden, acc, dh, dw, db)


@_lce_backward_op.register_fake
def _lce_backward_fake(grad, hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, softcap,
                       compute_dtype, need_dh, need_dw, need_db, chunk_size, use_triton):
    N, D = hidden.shape
    V = weight.shape[0]
    acc = torch.promote_types(compute_dtype, torch.float32)
    return (hidden.new_empty((N, D) if need_dh else (0,)), hidden.new_empty((V, D) if need_dw else (0,), dtype=acc),
            hidden.new_empty((V,) if need_db and bias is not None else (0,), dtype=acc))


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, targets, reduction, ignore_index, label_smoothing, z_loss, softcap, compute_dtype,
     need_dh, need_dw, need_db, chunk_size, use_triton) = inputs
    # only the loss is differentiable: without this autograd would hand backward zero-filled
    # gradients for lse, dh, dW and db (a V × D zero tensor at the peak)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    ctx.reduction = reduction
    ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
    ctx.needs = (need_dh, need_dw, need_db and bias is not None)
    if reduction != "none":
        # Eager: hold the gradients as a plain attribute that backward drops, not as saved tensors:
        # a saved tensor keeps a reference, so autograd would copy the fp32 V × D weight gradient
        # into .grad (+0.5 GB at WikiText-103 scale) instead of taking it. Traced (torch.compile),
        # the tensors are fakes and must be saved the regular way.
        ctx.grads_on_ctx = all(type(x) is torch.Tensor for x in output[2:])
        if ctx.grads_on_ctx:
            ctx.grads = list(output[2:])
        else:
            ctx.save_for_backward(*output[2:])
    else:
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.options = (ignore_index, label_smoothing, z_loss, softcap, compute_dtype, need_dh, need_dw, need_db,
                       chunk_size, use_triton)


def _backward(ctx, g_loss, _g_lse, _g_dh, _g_dw, _g_db):
    h_dtype, w_dtype, b_dtype = ctx.dtypes
    need_dh, need_dw, need_db = ctx.needs
    if ctx.reduction == "none":
        hidden, weight, bias, targets = ctx.saved_tensors
        dh, dw, db = torch.ops.lmmem.linear_cross_entropy_backward(g_loss, hidden, weight, bias, targets, *ctx.options)
        return ((dh if need_dh else None), (dw.to(w_dtype) if need_dw else None),
                (db.to(b_dtype) if need_db else None)) + (None,) * 12
    g = g_loss if g_loss.dtype == torch.float64 else g_loss.to(torch.float32)
    if ctx.grads_on_ctx:
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy computes its gradients in the forward and hands them over in the "
                               "first backward; a second backward through the same graph (retain_graph=True) is not "
                               "supported: compute the loss again")
        dh, dw, db = ctx.grads
        ctx.grads = None  # ours are now the only references: scaled in place, taken by autograd without a copy
        scale = lambda x, dtype: x.mul_(g).to(dtype)  # noqa: E731
    else:
        dh, dw, db = ctx.saved_tensors
        scale = lambda x, dtype: (x * g).to(dtype)  # noqa: E731
    return ((scale(dh, h_dtype) if need_dh else None), (scale(dw, w_dtype) if need_dw else None),
            (scale(db, b_dtype) if need_db else None)) + (None,) * 12


_lce_op.register_autograd(_backward, setup_context=_setup_context)


# -- the public function ---------------------------------------------------------------------------


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if device.type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    reduction: str = "mean", ignore_index: int = IGNORE_INDEX, *, label_smoothing: float = 0.0,
    z_loss: float = 0.0, softcap: float | None = None, chunk_size: int | None = None,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), targets)`` without the ``N × V`` logits, on
    any device.

    ``hidden`` ``(..., D)``, ``targets`` (int64 or int32) of the same leading shape, ``weight``
    ``(V, D)``, ``bias`` ``(V,)`` or None. ``reduction`` in {"mean", "sum", "none"} (``none``: one
    value per position, flattened); ``mean`` over all-ignored targets is 0. Options, as in
    ``F.cross_entropy`` / Liger-Kernel: ``label_smoothing`` ε (PyTorch's definition),
    ``z_loss`` λ (adds ``λ·logsumexp²`` per non-ignored row, with its gradient), ``softcap`` c (logits
    become ``c·tanh(z/c)`` before the softmax, as Gemma 2). The loss is fp32 (fp64 for fp64 inputs).
    ``use_triton``: None (default) uses the Triton step on CUDA where it works and PyTorch elsewhere;
    True forces Triton (CPU only under ``TRITON_INTERPRET=1``); False never uses it.
    ``chunk_size``: rows per chunk (default: from V, D and the device, see :func:`chunk_rows`)."""
    return linear_cross_entropy_with_lse(hidden, weight, bias, targets, reduction, ignore_index, label_smoothing=label_smoothing,
                                         z_loss=z_loss, softcap=softcap, chunk_size=chunk_size, use_triton=use_triton)[0]


def linear_cross_entropy_with_lse(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    reduction: str = "mean", ignore_index: int = IGNORE_INDEX, *, label_smoothing: float = 0.0,
    z_loss: float = 0.0, softcap: float | None = None, chunk_size: int | None = None,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`linear_cross_entropy` and the log-sum-exp of every row's (soft-capped) logits,
    ``(N,)``, fp32 (fp64), without gradient: what the kernel computes anyway, for a z-loss term
    reported on its own (:class:`lmmem.kernels.loss.LinearCrossEntropyLoss`)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap}")
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)} (…, D), weight {tuple(weight.shape)} (V, D)")
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    if t.shape[0] != h.shape[0]:
        raise ValueError(f"hidden has {h.shape[0]} positions but targets has {t.shape[0]}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 or int32 class indices, got {t.dtype}: convert with targets.long()")
    devices = {h.device, weight.device, t.device} | ({bias.device} if bias is not None else set())
    if len(devices) != 1:
        raise ValueError(f"hidden, weight, bias and targets must be on one device, got {sorted(map(str, devices))}: "
                         "move them with .to(device)")
    floats = [x.dtype for x in (h, weight, bias) if x is not None]
    if any(dt not in _FLOAT for dt in floats):
        raise TypeError(f"linear_cross_entropy computes in float32/bfloat16/float16/float64, got {floats}: "
                        "cast hidden, weight and bias with .float()")
    compute = torch.promote_types(h.dtype, weight.dtype)
    autocast = _autocast_dtype(h.device)
    if autocast is not None and compute != torch.float64:
        compute = autocast
    if use_triton:
        require_triton(h.device)
        if compute not in TRITON_DTYPES:
            raise LmmemError(f"the Triton step has no {compute} variant; use use_triton=None (the PyTorch step handles it)")
    grad = torch.is_grad_enabled()
    needs = (grad and h.requires_grad, grad and weight.requires_grad, grad and bias is not None and bias.requires_grad)
    loss, lse, _, _, _ = torch.ops.lmmem.linear_cross_entropy(
        h, weight, bias, t, reduction, int(ignore_index), float(label_smoothing), float(z_loss),
        float(softcap or 0.0), compute, *needs, int(chunk_size or 0), -1 if use_triton is None else int(bool(use_triton)))
    return loss, lse


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
    reduction: str = "mean", ignore_index: int = IGNORE_INDEX, *, label_smoothing: float = 0.0,
    z_loss: float = 0.0, softcap: float | None = None,
) -> torch.Tensor:
    """The specification: materialise the logits and use PyTorch's cross-entropy (in the inputs'
    dtype, at least fp32; float64 in the tests). Same conventions as :func:`linear_cross_entropy`."""
    logits = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    t = targets.reshape(-1)
    nll = torch.nn.functional.cross_entropy(logits, t.long(), ignore_index=ignore_index, reduction="none",
                                            label_smoothing=label_smoothing)
    valid = t != ignore_index
    if z_loss:
        nll = nll + z_loss * torch.where(valid, torch.logsumexp(logits, dim=-1) ** 2, torch.zeros_like(nll))
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / valid.sum().clamp_min(1)
