"""The in-place step of the chunked linear cross-entropy (:mod:`lmmem.kernels.linear_cross_entropy`):
one chunk of logits in, each row's loss and log-sum-exp out, and the logits overwritten by the
(row-weighted) gradient of the loss with respect to them.

For a row with target ``t`` (after the optional soft-cap ``z ← c·tanh(z/c)``)::

    loss = lse − (1−ε)·z_t − ε·mean_v z_v + λ·lse²        (label smoothing ε, z-loss λ)
    ∂loss/∂z_v = p_v·(1 + 2λ·lse) − (1−ε)·1[v = t] − ε/V   (× (1 − (z_v/c)²) with the soft-cap)

in fp32 whatever the logits' dtype (fp64 for fp64 inputs), folding the target's −1 in before the
result is rounded to the logits' dtype (rounding ``p`` first would lose it for a confident
prediction). Ignored targets (``ignore_index``) contribute 0 to the loss and the gradient.

Layers (as Liger-Kernel): the kernel (:func:`lmmem.kernels.triton_kernels.ce_step_kernel`, one
program per row) → its launcher :func:`ce_step_triton`, with the PyTorch statement
:func:`ce_step_torch` beside it → :func:`ce_step`, which takes the kernel where it is asked for and
healthy and the PyTorch statement everywhere else (probe on first use, fall back on any failure:
:mod:`lmmem.kernels.runtime`).
"""

from __future__ import annotations

import torch

from lmmem.constants import IGNORE_INDEX
from lmmem.kernels.runtime import device_guard, guarded, kernel_ok, runtime_kernels
from lmmem.kernels.triton_kernels import CE_STEP_CUDA, CE_STEP_INTERPRETER, triton

TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the kernel's logit dtypes


# -- the PyTorch statement -------------------------------------------------------------------------


def ce_step_torch(z: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor | None, ignore_index: int,
                  smoothing: float = 0.0, z_loss: float = 0.0, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and log-sum-exp of the logits ``z`` ``(C, V)`` (at least fp32). With
    ``row_weight`` ``(C,)``, ``z`` is overwritten by ``row_weight[r] · ∂loss_r/∂z`` (0 for ignored
    rows); without, ``z`` is used as scratch. The formulas are in the module docstring."""
    C, V = z.shape
    cd = torch.promote_types(z.dtype, torch.float32)
    x = z if z.dtype == cd else z.to(cd)  # fp32 math: in place for fp32 logits, one chunk copy for bf16
    valid = targets != ignore_index
    t = torch.where(valid, targets, torch.zeros_like(targets)).to(torch.int64).unsqueeze(1)
    if softcap:
        x.div_(softcap).tanh_()
        deriv = 1.0 - x * x if row_weight is not None else None  # 1 − tanh², needed after x is overwritten
        x.mul_(softcap)
    z_t = x.gather(1, t).squeeze(1)
    z_mean = x.mean(dim=1) if smoothing else None
    # in place (torch.logsumexp would allocate a chunk-sized temporary for z − max)
    m = x.amax(dim=1, keepdim=True)
    x.sub_(m).exp_()
    s = x.sum(dim=1, keepdim=True)
    lse = (m + s.log()).squeeze(1)
    loss = lse - (1.0 - smoothing) * z_t + z_loss * lse * lse
    if smoothing:
        loss = loss - smoothing * z_mean
    loss = torch.where(valid, loss, torch.zeros((), dtype=cd, device=z.device))
    if row_weight is not None:
        w = torch.where(valid, row_weight.to(cd), torch.zeros((), dtype=cd, device=z.device))
        a = w * (1.0 + 2.0 * z_loss * lse)  # the row's factor on p
        x.mul_((a / s.squeeze(1)).unsqueeze(1))  # x held exp(z − max): one pass gives a·p
        if smoothing:
            x.sub_((w * (smoothing / V)).unsqueeze(1))
        x.scatter_add_(1, t, (-(1.0 - smoothing) * w).unsqueeze(1))  # the −1, before any rounding
        if softcap:
            x.mul_(deriv)
        if x is not z:
            z.copy_(x)
    return loss, lse


# -- the Triton launcher --------------------------------------------------------------------------


def ce_step_triton(z: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor | None, ignore_index: int,
                   smoothing: float = 0.0, z_loss: float = 0.0, softcap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ce_step_torch` by ``ce_step_kernel`` (fp32 loss and lse; ``z`` fp32/bf16/fp16,
    rows contiguous). Raises whatever Triton raises; callers go through :func:`ce_step`."""
    C, V = z.shape
    assert z.stride(1) == 1, "the step kernel reads rows of contiguous logits"
    loss = torch.empty(C, dtype=torch.float32, device=z.device)
    lse = torch.empty(C, dtype=torch.float32, device=z.device)
    if C == 0:
        return loss, lse
    cfg = CE_STEP_CUDA if z.is_cuda else CE_STEP_INTERPRETER
    block_v = min(cfg["BLOCK_V"], triton.next_power_of_2(V))
    w = row_weight.to(torch.float32).contiguous() if row_weight is not None else loss
    with device_guard(z.device):
        runtime_kernels().ce_step_kernel[(C,)](
            z, z.stride(0), targets.contiguous(), w, loss, lse, V, ignore_index,
            float(smoothing), float(z_loss), float(softcap) if softcap else 1.0,
            HAS_GRAD=row_weight is not None, SOFTCAP=bool(softcap), BLOCK_V=block_v, num_warps=cfg["num_warps"])
    return loss, lse


def _step_variant(z: torch.Tensor, targets: torch.Tensor, softcap: float) -> tuple:
    return ("ce_step", str(z.dtype).removeprefix("torch."), str(targets.dtype).removeprefix("torch."),
            "softcap" if softcap else "no-softcap", str(z.device))


def _probe_step(dtype: torch.dtype, tdtype: torch.dtype, softcap: float, device: torch.device) -> None:
    """Compile and run the step variant both ways (loss only; loss + gradient) on a 5 × 37 problem
    and compare with :func:`ce_step_torch`: a kernel that compiles but computes wrongly fails too."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(5, 37, generator=g) * 3).to(device=device, dtype=dtype)
    t = torch.tensor([3, 36, IGNORE_INDEX, 0, 3], dtype=tdtype, device=device)
    w = torch.rand(5, generator=g).to(device)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype != torch.float32 else {"rtol": 1e-4, "atol": 1e-5}
    opts = (IGNORE_INDEX, 0.1, 1e-3, softcap)
    want_loss, want_lse = ce_step_torch(z.float().clone(), t, None, *opts)
    got_loss, got_lse = ce_step_triton(z.clone(), t, None, *opts)
    torch.testing.assert_close(got_loss.float(), want_loss, **tol)
    torch.testing.assert_close(got_lse.float(), want_lse, **tol)
    want_g = z.float().clone()
    ce_step_torch(want_g, t, w, *opts)
    got_g = z.clone()
    got_loss, _ = ce_step_triton(got_g, t, w, *opts)
    torch.testing.assert_close(got_loss.float(), want_loss, **tol)
    torch.testing.assert_close(got_g.float(), want_g, **tol)


def ce_step(z, targets, row_weight, ignore_index, smoothing, z_loss, softcap, use_triton: bool):
    """The step by Triton where asked and healthy, else by PyTorch. A launch that fails after the
    probe passed raises :class:`RedoChunk`: it may have written into ``z``, so the caller recomputes
    the chunk's logits and steps again (the variant is now marked failed: PyTorch runs)."""
    if use_triton and z.dtype in TRITON_DTYPES:
        variant = _step_variant(z, targets, softcap)
        if kernel_ok(variant, lambda: _probe_step(z.dtype, targets.dtype, softcap, z.device)):
            out: list = []
            if guarded(variant, lambda: out.extend(ce_step_triton(z, targets, row_weight, ignore_index,
                                                                  smoothing, z_loss, softcap))):
                return out[0], out[1]
            raise RedoChunk()  # the launch may have written into z before failing
    return ce_step_torch(z, targets, row_weight, ignore_index, smoothing, z_loss, softcap)


class RedoChunk(Exception):
    """A launch failed after it may have written into the chunk's logits: recompute the chunk."""
