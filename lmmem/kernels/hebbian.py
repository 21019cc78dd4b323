"""Triton kernels for the Hebbian softmax's bookkeeping: the batch statistics (per class present:
occurrences and the sum of the activations that predicted it) and the in-place mixing update of
those classes' output rows. The rule and its reference are in
:mod:`lmmem.output_layers.hebbian_softmax` (``hebbian_update_reference``, ``hebbian_mix_``).

No host sync, no data-dependent shapes: the classes present are found by sorting the ``N``
targets (``torch.sort``) and marking where the sorted id changes, so the statistics live in
buffers of ``N`` slots — slot ``u`` holds the ``u``-th distinct class, the slots after the last
class hold the sentinel id ``V`` (as do ignored positions), and the kernels skip sentinel slots.
``torch.unique`` would need the number of distinct classes on the host (a sync per step; it also
breaks CUDA graphs). Memory: ``N × D`` fp32 for the sums (16 MB at N = 8,192, D = 512), never
``V × D``.

* ``_statistics_kernel``: grid ``(⌈N / BLOCK_N⌉, ⌈D / BLOCK_D⌉)``; adds each row of ``hidden`` into
  its slot's fp32 sum with atomics (the slot counts are one ``index_add_`` of N ones).
* ``_mix_kernel``: one program per slot; reads the class's count ``c`` before the batch,
  ``λ = max(1/(c+1), γ)`` if ``c < T`` else 0, writes ``λ·h̄ + (1−λ)·θ̂`` over the row in place (in the
  weight's dtype, computed in fp32), optionally rescaling ``h̄`` to the row's norm, and adds the
  batch's occurrences to ``c``. Distinct slots hold distinct classes, so no two programs touch one
  row.
"""

from __future__ import annotations

import math

import torch

from lmmem.kernels.runtime import launch, require_triton, tl, triton

Stats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # ids (S,) int64 with sentinel V, counts (S,) int64, sums (S, D) fp32

if triton is not None:

    @triton.jit
    def _statistics_kernel(h_ptr, slot_ptr, sums_ptr, N, D, stride_hn, stride_hd,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_d = tl.program_id(1)
        rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_n = rows < N
        mask_d = offs_d < D
        slot = tl.load(slot_ptr + rows, mask=mask_n, other=0)
        h = tl.load(h_ptr + rows[:, None] * stride_hn + offs_d[None, :] * stride_hd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        tl.atomic_add(sums_ptr + slot[:, None] * D + offs_d[None, :], h, mask=mask_n[:, None] & mask_d[None, :])

    @triton.jit
    def _mix_kernel(w_ptr, class_counts_ptr, ids_ptr, n_ptr, sums_ptr, V, D, stride_wv, stride_wd,
                    gamma, limit, HAS_LIMIT: tl.constexpr, RESCALE: tl.constexpr, BLOCK_D: tl.constexpr):
        slot = tl.program_id(0).to(tl.int64)
        cls = tl.load(ids_ptr + slot)
        if cls < V:
            n = tl.load(n_ptr + slot)
            c = tl.load(class_counts_ptr + cls)
            lam = tl.maximum(1.0 / (c.to(tl.float32) + 1.0), gamma)
            if HAS_LIMIT:
                lam = tl.where(c.to(tl.float32) < limit, lam, 0.0)
            inv_n = 1.0 / n.to(tl.float32)
            scale = 1.0
            if RESCALE:
                row_sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
                mean_sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    offs = d0 + tl.arange(0, BLOCK_D)
                    m = offs < D
                    row = tl.load(w_ptr + cls * stride_wv + offs * stride_wd, mask=m, other=0.0).to(tl.float32)
                    mean = tl.load(sums_ptr + slot * D + offs, mask=m, other=0.0) * inv_n
                    row_sq += row * row
                    mean_sq += mean * mean
                scale = tl.sqrt(tl.sum(row_sq, axis=0)) / tl.maximum(tl.sqrt(tl.sum(mean_sq, axis=0)), 1e-12)
            for d0 in range(0, D, BLOCK_D):
                offs = d0 + tl.arange(0, BLOCK_D)
                m = offs < D
                ptrs = w_ptr + cls * stride_wv + offs * stride_wd
                row = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)
                mean = tl.load(sums_ptr + slot * D + offs, mask=m, other=0.0) * inv_n * scale
                # λ·h̄ + (1−λ)·θ̂, exact at λ = 1 and λ = 0 (as the reference)
                tl.store(ptrs, (lam * mean + (1.0 - lam) * row).to(w_ptr.dtype.element_ty), mask=m)
            tl.store(class_counts_ptr + cls, c + n)


def segment_classes(targets: torch.Tensor, num_classes: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, slot)``: ``ids`` ``(N,)`` the distinct classes in ascending order followed by the
    sentinel ``num_classes``; ``slot`` ``(N,)`` the slot of each position (ignored positions share the
    sentinel's slot). Sort-based, no host sync."""
    t = targets.reshape(-1).to(torch.int64)
    t = torch.where(t == ignore_index, torch.full_like(t, num_classes), t)
    sorted_t, order = torch.sort(t)
    starts = torch.ones_like(sorted_t, dtype=torch.bool)
    starts[1:] = sorted_t[1:] != sorted_t[:-1]
    seg = torch.cumsum(starts.to(torch.int64), 0) - 1
    slot = torch.empty_like(seg)
    slot[order] = seg
    ids = torch.full_like(t, num_classes)
    ids.scatter_(0, seg, sorted_t)  # every position of a segment writes the same class: no conflict
    return ids, slot


def hebbian_statistics(hidden: torch.Tensor, targets: torch.Tensor, num_classes: int, ignore_index: int,
                       block_n: int | None = None, block_d: int | None = None) -> Stats:
    """Per-slot ``(ids, counts, fp32 sums)`` of ``hidden`` ``(N, D)`` by class of ``targets`` ``(N,)``.
    Slots past the last class (and the ignored positions' slot) have id ``num_classes``."""
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    require_triton(h.device)
    N, D = h.shape
    ids, slot = segment_classes(targets, num_classes, ignore_index)
    sums = torch.zeros(N, D, dtype=torch.float32, device=h.device)
    # occurrences per slot: N integer adds, exact and deterministic in torch
    counts = torch.zeros(N, dtype=torch.int64, device=h.device).index_add_(0, slot, torch.ones_like(slot))
    if N:
        cuda = h.device.type == "cuda"
        bn = block_n or (64 if cuda else 16)
        bd = block_d or (min(128, triton.next_power_of_2(D)) if cuda else 16)
        launch(_statistics_kernel, (triton.cdiv(N, bn), triton.cdiv(D, bd)),
            h, slot, sums, N, D, h.stride(0), h.stride(1), BLOCK_N=bn, BLOCK_D=bd, num_warps=4 if cuda else 1)
    return ids, counts, sums


def merge_statistics(a: Stats, b: Stats, num_classes: int) -> Stats:
    """Statistics of two micro-batches as one (gradient accumulation), still sync-free: the slots
    of both are re-segmented by class (sentinel slots merge into the sentinel)."""
    ids = torch.cat([a[0], b[0]])
    new_ids, slot = segment_classes(ids, num_classes, ignore_index=num_classes)
    counts = torch.zeros_like(new_ids).index_add_(0, slot, torch.cat([a[1], b[1]]))
    sums = torch.zeros(new_ids.numel(), a[2].shape[1], dtype=torch.float32, device=ids.device)
    sums.index_add_(0, slot, torch.cat([a[2], b[2]]).to(torch.float32))
    return new_ids, counts, sums


@torch.no_grad()
def hebbian_mix_triton_(weight: torch.Tensor, class_counts: torch.Tensor, ids: torch.Tensor, n: torch.Tensor,
                        sums: torch.Tensor, gamma: float, smoothing_limit: float | None, rescale: bool = False,
                        block_d: int | None = None) -> None:
    """The kernel version of :func:`lmmem.output_layers.hebbian_softmax.hebbian_mix_`: in place on
    ``weight`` ``(V, D)`` (fp32/bf16/fp16) and ``class_counts`` ``(V,)`` int64, for the slots ``ids``
    (sentinel ``V`` skipped) with occurrences ``n`` and fp32 activation sums ``sums``."""
    require_triton(weight.device)
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"the Triton Hebbian update handles fp32/bf16/fp16 weights, not {weight.dtype}; use backend='torch'")
    if class_counts.dtype != torch.int64:
        raise TypeError("class_counts must be int64")
    S = ids.numel()
    if S == 0:
        return
    V, D = weight.shape
    sums = sums.to(torch.float32).contiguous()
    ids = ids.to(torch.int64).contiguous()
    n = n.to(torch.int64).contiguous()
    has_limit = smoothing_limit is not None and not math.isinf(smoothing_limit)
    cuda = weight.device.type == "cuda"
    bd = block_d or (min(1024, triton.next_power_of_2(D)) if cuda else 16)
    launch(
        _mix_kernel, (S,),
        weight, class_counts, ids, n, sums, V, D, weight.stride(0), weight.stride(1),
        float(gamma), float(smoothing_limit) if has_limit else 0.0,
        HAS_LIMIT=has_limit, RESCALE=bool(rescale), BLOCK_D=bd, num_warps=4 if cuda else 1,
    )
