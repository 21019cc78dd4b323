"""The centred rule's step on the GPU: the running statistics and the write, in four Triton kernels,
without a host sync and without atomics. The rule and why it is the default are in
:mod:`lmmem.output_layers.hebbian_softmax`; its PyTorch statement, :func:`hebbian_centred_update_torch_`,
is beside the launcher here, and :func:`~lmmem.kernels.hebbian_rule.hebbian_update_reference` is
the float64 specification both are tested against.

The step, for the per-slot statistics of one optimizer step (ids, occurrences ``n``, fp32 activation
sums; sentinel slots, id ``V``, are skipped), ``k`` the updates so far and ``r = max(1 − β, 1/(k+1))``
(a plain mean over the first ``1/(1 − β)`` updates, then an EMA with decay β)::

    μ ← μ + r·(Σ_s sums_s / Σ_s n_s − μ)                       centred_mean_kernel
    u = μ/|μ| (0 while μ = 0);  a_s = θ̂_s·u,  p_s = |θ̂_s − a_s·u|   centred_row_kernel
    ρ ← ρ + r·(Σ_s n_s·p_s / Σ_s n_s − ρ)                       centred_norm_kernel
    w_s = P(h̄_s − μ) = (h̄_s − μ) − ((h̄_s − μ)·u)·u               centred_mix_kernel
    θ_s ← λ_s·(a_s·u + scale_s·w_s) + (1 − λ_s)·θ̂_s,  c_s += n_s

with ``scale_s`` = ``p_s/|w_s|`` (``write_norm="row"``), ``ρ/|w_s|`` (``"running"``) or 1
(``"none"``). μ and ρ are left as they are by a batch without a real token. ``θ̂`` are the rows
after the optimizer step, so the norm is measured on the rows the gradient has just trained,
orthogonally to the *new* μ — exactly as the PyTorch path does.

Why four kernels, in this order: each line needs the whole of the one before it (``u`` needs all of
the new μ; the write needs ρ, which sums over every slot), and a grid-wide barrier inside one
kernel would need a cooperative launch or atomics. The two reductions read the slots in a fixed
order (tiles, then one tree sum), so the same batch gives the same bits on every run. The
per-slot kernels touch one row each: distinct slots hold distinct classes. Temporaries are ``O(N)``
(``a``, ``p``) and ``O(D)`` (the new μ): never ``V × D``.

λ is an *input* (one value per slot, computed in PyTorch from the counts before the batch by the
layer), so the schedule can change without touching a kernel; a slot with λ = 0 (a saturated row)
is not written at all, so its row keeps the optimizer's bits. During the warm-up (``k <
start_step``) no row is written while the counts and statistics advance; ``k`` is read on the
device, so the layer never reads ``updates`` on the host.

The new μ and ρ are written to scratch tensors and copied into the buffers only after all four
launches succeeded: a variant that fails to compile half-way leaves the state as it was, and the
PyTorch statement then does the whole step (:mod:`lmmem.kernels.runtime`: probed on first use,
one warning, PyTorch path for the rest of the process).
"""

from __future__ import annotations

import torch

from lmmem.kernels.hebbian_rule import hebbian_mix_centred_, update_running_statistics_
from lmmem.kernels.runtime import device_guard, guarded, kernel_ok, require_triton, runtime_kernels
from lmmem.kernels.triton_kernels import CENTRED_CUDA, CENTRED_INTERPRETER, CENTRED_WRITE_NORMS, triton

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.no_grad()
def hebbian_centred_update_torch_(weight, counts, ids, n, sums, lam, activation_mean, running_row_norm,
                                  updates: int, start_step: int, mean_decay: float, write_norm: str) -> None:
    """The PyTorch statement of the step (the fallback and the probes' yardstick): sentinel slots
    dropped (a host sync), :func:`~lmmem.kernels.hebbian_rule.update_running_statistics_`, then,
    from the ``start_step``-th update on, :func:`~lmmem.kernels.hebbian_rule.hebbian_mix_centred_`
    with the given λ; before it, only the counts advance."""
    keep = ids < weight.shape[0]
    ids, n, sums, lam = ids[keep], n[keep], sums[keep], lam[keep]
    update_running_statistics_(activation_mean, running_row_norm, weight, ids, n, sums, updates, mean_decay)
    if start_step == 0 or updates >= start_step:
        hebbian_mix_centred_(weight, counts, ids, n, sums, 0.0, None, activation_mean, write_norm, running_row_norm,
                             lam=lam)
    else:
        counts.index_add_(0, ids.to(counts.device), n.to(counts.dtype))


def _centred_launch(weight, counts, ids, n, sums, lam, mu, rho, updates, start_step, mean_decay, write_norm,
                    block_d=None) -> None:
    V, D = weight.shape
    S = ids.numel()
    cfg = CENTRED_CUDA if weight.is_cuda else CENTRED_INTERPRETER
    bd = block_d or min(cfg["BLOCK_D_MAX"], triton.next_power_of_2(D))
    bd_red = min(cfg["BLOCK_D"], triton.next_power_of_2(D))
    min_rate = float(1.0 - mean_decay)
    mu_new, rho_new = torch.empty_like(mu), torch.empty_like(rho)
    along = torch.empty(S, dtype=torch.float32, device=weight.device)
    perp = torch.empty(S, dtype=torch.float32, device=weight.device)
    K = runtime_kernels()
    warps = cfg["num_warps"]
    with device_guard(weight.device):
        K.centred_mean_kernel[(triton.cdiv(D, bd_red),)](ids, n, sums, mu, mu_new, updates, S, V, D, min_rate,
                                                         BLOCK_S=cfg["BLOCK_S"], BLOCK_D=bd_red, num_warps=warps)
        K.centred_row_kernel[(S,)](weight, ids, mu_new, along, perp, V, D, weight.stride(0), weight.stride(1),
                                   BLOCK_D=bd, num_warps=warps)
        K.centred_norm_kernel[(1,)](ids, n, perp, rho, rho_new, updates, S, V, min_rate,
                                    BLOCK_S=cfg["BLOCK_S"], num_warps=warps)
        K.centred_mix_kernel[(S,)](weight, counts, ids, n, sums, lam, mu_new, rho_new, along, perp, updates,
                                   int(start_step), V, D, weight.stride(0), weight.stride(1),
                                   WRITE_NORM=CENTRED_WRITE_NORMS[write_norm], BLOCK_D=bd, num_warps=warps)
    mu.copy_(mu_new)
    rho.copy_(rho_new)


def _probe_centred(w_dtype, state_dtype, device, write_norm) -> None:
    """Two steps on a tiny problem (a warm-up step at k = 0, μ = 0, then a write with a sentinel
    slot, a saturated row and a first sighting), against the PyTorch statement."""
    g = torch.Generator().manual_seed(0)
    V, D = 6, 5
    weight = torch.randn(V, D, generator=g).to(device=device, dtype=w_dtype)
    counts = torch.tensor([0, 3, 700, 1, 0, 2], device=device)
    ids = torch.tensor([0, 2, 5, 6, 6], device=device)
    n = torch.tensor([2, 1, 3, 4, 0], device=device)
    lam = torch.tensor([1.0, 0.0, 1 / 3, 0.5, 0.5], device=device)
    state = [weight, counts, torch.zeros(D, dtype=state_dtype, device=device), torch.zeros((), dtype=state_dtype, device=device)]
    ref = [x.clone() for x in state]
    for k in range(2):
        sums = (torch.randn(5, D, generator=g) + 1.0).to(device)
        updates = torch.tensor(k, device=device)
        _centred_launch(*state[:2], ids, n, sums, lam, *state[2:], updates, 1, 0.5, write_norm)
        hebbian_centred_update_torch_(*ref[:2], ids, n, sums, lam, *ref[2:], k, 1, 0.5, write_norm)
    assert torch.equal(state[1], ref[1]), "counts differ from the PyTorch rule"
    for got, want in zip(state[:1] + state[2:], ref[:1] + ref[2:]):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


@torch.no_grad()
def hebbian_centred_update_(weight: torch.Tensor, counts: torch.Tensor, ids: torch.Tensor, n: torch.Tensor,
                            sums: torch.Tensor, lam: torch.Tensor, activation_mean: torch.Tensor,
                            running_row_norm: torch.Tensor, updates: torch.Tensor, start_step: int,
                            mean_decay: float, write_norm: str, use_triton: bool = True,
                            block_d: int | None = None) -> None:
    """One step of the centred rule, in place on ``weight`` ``(V, D)``, ``counts`` ``(V,)`` int64 and
    the running state (``activation_mean`` ``(D,)``, ``running_row_norm`` ``()``), for the slots
    ``ids``/``n``/``sums`` (sentinel ``V`` skipped) with the mixing rates ``lam`` (one per slot).
    ``updates`` (a 0-d int64 tensor, the updates before this one) is read, not advanced: the caller
    counts. With ``use_triton``, the four kernels, no host sync (a variant that fails is replaced by
    :func:`hebbian_centred_update_torch_` with one warning); otherwise that PyTorch statement."""
    if use_triton:
        require_triton(weight.device)
    if counts.dtype != torch.int64:
        raise TypeError("counts must be int64")
    ok_dtypes = (weight.dtype in _KERNEL_DTYPES and activation_mean.dtype in _KERNEL_DTYPES
                 and running_row_norm.dtype == activation_mean.dtype)
    if use_triton and ok_dtypes and ids.numel() > 0:
        args = (weight, counts, ids.to(torch.int64).contiguous(), n.to(torch.int64).contiguous(),
                sums.to(torch.float32).contiguous(), lam.to(device=weight.device, dtype=torch.float32).contiguous(),
                activation_mean, running_row_norm, updates, start_step, mean_decay, write_norm)
        variant = ("hebbian_centred", str(weight.dtype).removeprefix("torch."),
                   str(activation_mean.dtype).removeprefix("torch."), write_norm, str(weight.device))
        probe = (lambda: _probe_centred(weight.dtype, activation_mean.dtype, weight.device, write_norm))
        if kernel_ok(variant, probe) and guarded(variant, lambda: _centred_launch(*args, block_d=block_d)):
            return
    hebbian_centred_update_torch_(weight, counts, ids, n, sums, lam, activation_mean, running_row_norm,
                                  int(updates), start_step, mean_decay, write_norm)
