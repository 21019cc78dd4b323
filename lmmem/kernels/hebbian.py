"""The Hebbian softmax's bookkeeping on the GPU: the batch statistics (per class present:
occurrences and the sum of the activations that predicted it) and the in-place mixing update of
those classes' output rows. The rule in PyTorch, and its reference, are in
:mod:`lmmem.kernels.hebbian_rule` (``hebbian_mix_``, ``hebbian_update_reference``); the kernels are
in :mod:`lmmem.kernels.triton_kernels`; the layer that uses them is
:class:`lmmem.output_layers.hebbian_softmax.HebbianSoftmax`.

No host sync, no data-dependent shapes: the classes present are found by sorting the ``N``
targets (``torch.sort``) and marking where the sorted id changes, so the statistics live in
buffers of ``N`` slots — slot ``u`` holds the ``u``-th distinct class, the slots after the last
class hold the sentinel id ``V`` (as do ignored positions), and the kernels skip sentinel slots.
``torch.unique`` would need the number of distinct classes on the host (a sync per step; it also
breaks CUDA graphs). Memory: ``N × D`` fp32 for the sums (16 MB at N = 8,192, D = 512), never
``V × D``.

* ``segment_sum_kernel``: grid ``(N slots, ⌈D / BLOCK_D⌉)``; slot ``u`` sums, in sort order, the
  rows of its class — they are contiguous in the sort that finds the classes — in fp32. A segmented
  sum, not a scatter: no atomics, the same bits every run (the previous scatter kernel's fp32
  atomics were not). The slot counts are the segment lengths.
* ``mix_kernel``: one program per slot; reads the class's count ``c`` before the batch,
  ``λ = max(1/(c+1), γ)`` if ``c < T`` else 0, writes ``λ·h̄ + (1−λ)·θ̂`` over the row in place (in the
  weight's dtype, computed in fp32), optionally rescaling ``h̄`` to the row's norm, and adds the
  batch's occurrences to ``c``. Distinct slots hold distinct classes, so no two programs touch one
  row.

Each kernel variant is probed on first use and replaced by its PyTorch statement if it fails
(:mod:`lmmem.kernels.runtime`): :func:`segment_sum_torch`, and ``hebbian_mix_`` on the real slots.
"""

from __future__ import annotations

import math

import torch

from lmmem.kernels.hebbian_rule import hebbian_mix_
from lmmem.kernels.runtime import device_guard, guarded, kernel_ok, require_triton, runtime_kernels
from lmmem.kernels.triton_kernels import MIX_CUDA, MIX_INTERPRETER, SEGMENT_SUM_CUDA, SEGMENT_SUM_INTERPRETER, triton

# Per-slot statistics, one slot per position: ids (S,) int64 — the distinct classes in ascending
# order, then the sentinel V in the unused slots —, counts (S,) int64, sums (S, D) fp32. Compare
# lmmem.kernels.hebbian_rule.ClassStats (distinct classes only, no sentinel).
SlotStats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _segments(targets: torch.Tensor, num_classes: int, ignore_index: int):
    """Sort the targets (ignored → sentinel ``num_classes``): ``(sorted_t, order, seg)`` with
    ``seg[i]`` the slot of sorted position ``i``."""
    t = targets.reshape(-1).to(torch.int64)
    t = torch.where(t == ignore_index, torch.full_like(t, num_classes), t)
    sorted_t, order = torch.sort(t, stable=True)
    starts = torch.ones_like(sorted_t, dtype=torch.bool)
    starts[1:] = sorted_t[1:] != sorted_t[:-1]
    seg = torch.cumsum(starts.to(torch.int64), 0) - 1
    return sorted_t, order, seg


def segment_classes(targets: torch.Tensor, num_classes: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, slot)``: ``ids`` ``(N,)`` the distinct classes in ascending order followed by the
    sentinel ``num_classes``; ``slot`` ``(N,)`` the slot of each position (ignored positions share the
    sentinel's slot). Sort-based, no host sync."""
    sorted_t, order, seg = _segments(targets, num_classes, ignore_index)
    slot = torch.empty_like(seg)
    slot[order] = seg
    ids = torch.full_like(sorted_t, num_classes)
    ids.scatter_(0, seg, sorted_t)  # every position of a segment writes the same class: no conflict
    return ids, slot


def segment_sum_torch(hidden: torch.Tensor, order: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """The PyTorch statement of ``segment_sum_kernel``: ``sums[u] = Σ hidden[order[starts[u]:starts[u+1]]]``
    in fp32 (``(S, D)``, S = ``len(starts) − 1``), deterministic on every device (``segment_reduce``
    sums each segment in order; no scatter atomics)."""
    S = starts.numel() - 1
    lengths = starts[1:] - starts[:-1]
    rows = hidden.index_select(0, order).to(torch.float32)
    if rows.shape[0] == 0:
        return torch.zeros(S, hidden.shape[1], dtype=torch.float32, device=hidden.device)
    return torch.segment_reduce(rows, "sum", lengths=lengths, unsafe=True, initial=0.0)


def _segment_sum_triton(h: torch.Tensor, order: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    S, D = starts.numel() - 1, h.shape[1]
    sums = torch.empty(S, D, dtype=torch.float32, device=h.device)
    cfg = SEGMENT_SUM_CUDA if h.is_cuda else SEGMENT_SUM_INTERPRETER
    bd = min(cfg["BLOCK_D"], triton.next_power_of_2(D))
    with device_guard(h.device):
        runtime_kernels().segment_sum_kernel[(S, triton.cdiv(D, bd))](
            h, order, starts, sums, D, h.stride(0), h.stride(1), BLOCK_D=bd, num_warps=cfg["num_warps"])
    return sums


def _probe_segment_sum(dtype: torch.dtype, device: torch.device) -> None:
    h = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    order = torch.tensor([3, 0, 6, 1, 2, 5, 4], device=device)
    starts = torch.tensor([0, 2, 3, 7, 7], device=device)
    torch.testing.assert_close(_segment_sum_triton(h, order, starts), segment_sum_torch(h, order, starts),
                               rtol=1e-5, atol=1e-5)


def segment_sum(h: torch.Tensor, order: torch.Tensor, starts: torch.Tensor, use_triton: bool) -> torch.Tensor:
    """Triton where asked and healthy, else :func:`segment_sum_torch` (same result)."""
    if use_triton and h.dtype in (torch.float32, torch.bfloat16, torch.float16):
        variant = ("segment_sum", str(h.dtype).removeprefix("torch."), str(h.device))
        if kernel_ok(variant, lambda: _probe_segment_sum(h.dtype, h.device)):
            out: list = []
            if guarded(variant, lambda: out.append(_segment_sum_triton(h, order, starts))):
                return out[0]
    return segment_sum_torch(h, order, starts)


def hebbian_statistics(hidden: torch.Tensor, targets: torch.Tensor, num_classes: int, ignore_index: int,
                       use_triton: bool = True) -> SlotStats:
    """Per-slot ``(ids, counts, fp32 sums)`` of ``hidden`` ``(N, D)`` by class of ``targets`` ``(N,)``.
    Slots past the last class (and the ignored positions' slot) have id ``num_classes``.
    Deterministic: a segmented sum over the sort order (Triton kernel, or PyTorch)."""
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    if use_triton:
        require_triton(h.device)
    N = h.shape[0]
    sorted_t, order, seg = _segments(targets, num_classes, ignore_index)
    ids = torch.full_like(sorted_t, num_classes)
    ids.scatter_(0, seg, sorted_t)
    # slot u's rows are sorted positions [starts[u], starts[u+1]); empty slots have equal bounds
    starts = torch.searchsorted(seg, torch.arange(N + 1, device=h.device, dtype=seg.dtype))
    counts = starts[1:] - starts[:-1]
    sums = segment_sum(h, order, starts, use_triton)
    return ids, counts, sums


def merge_statistics(a: SlotStats, b: SlotStats, num_classes: int) -> SlotStats:
    """Statistics of two micro-batches as one (gradient accumulation), still sync-free: the slots
    of both are re-segmented by class (sentinel slots merge into the sentinel)."""
    ids = torch.cat([a[0], b[0]])
    new_ids, slot = segment_classes(ids, num_classes, ignore_index=num_classes)
    counts = torch.zeros_like(new_ids).index_add_(0, slot, torch.cat([a[1], b[1]]))  # integers: exact
    # fp32 sums by a segmented sum in a fixed order (an index_add_ of floats is atomic on CUDA)
    both = torch.cat([a[2], b[2]]).to(torch.float32)
    order = torch.sort(slot, stable=True)[1]
    starts = torch.searchsorted(slot[order], torch.arange(new_ids.numel() + 1, device=ids.device))
    sums = segment_sum_torch(both, order, starts)
    return new_ids, counts, sums


def _mix_launch(weight, class_counts, ids, n, sums, gamma, smoothing_limit, rescale, block_d=None) -> None:
    V, D = weight.shape
    has_limit = smoothing_limit is not None and not math.isinf(smoothing_limit)
    cfg = MIX_CUDA if weight.is_cuda else MIX_INTERPRETER
    bd = block_d or min(cfg["BLOCK_D_MAX"], triton.next_power_of_2(D))
    with device_guard(weight.device):
        runtime_kernels().mix_kernel[(ids.numel(),)](
            weight, class_counts, ids, n, sums, V, D, weight.stride(0), weight.stride(1),
            float(gamma), float(smoothing_limit) if has_limit else 0.0,
            HAS_LIMIT=has_limit, RESCALE=bool(rescale), BLOCK_D=bd, num_warps=cfg["num_warps"])


def _mix_torch(weight, class_counts, ids, n, sums, gamma, smoothing_limit, rescale) -> None:
    keep = ids < weight.shape[0]  # the sentinel slots (a host sync: this is the fallback path)
    hebbian_mix_(weight, class_counts, ids[keep], n[keep], sums[keep], gamma, smoothing_limit, rescale)


def _probe_mix(dtype, device, smoothing_limit, rescale) -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=g).to(device=device, dtype=dtype)
    counts = torch.tensor([0, 3, 700, 1, 0, 2], device=device)
    ids = torch.tensor([0, 2, 5, 6, 6], device=device)
    n = torch.tensor([2, 1, 3, 1, 0], device=device)
    sums = torch.randn(5, 5, generator=g).to(device)
    w_k, c_k, w_r, c_r = weight.clone(), counts.clone(), weight.clone(), counts.clone()
    _mix_launch(w_k, c_k, ids, n, sums, 0.01, smoothing_limit, rescale)
    _mix_torch(w_r, c_r, ids, n, sums, 0.01, smoothing_limit, rescale)
    assert torch.equal(c_k, c_r), "counts differ from the PyTorch rule"
    torch.testing.assert_close(w_k.float(), w_r.float(), rtol=1e-2, atol=1e-2)


@torch.no_grad()
def hebbian_mix_triton_(weight: torch.Tensor, class_counts: torch.Tensor, ids: torch.Tensor, n: torch.Tensor,
                        sums: torch.Tensor, gamma: float, smoothing_limit: float | None, rescale: bool = False,
                        block_d: int | None = None) -> None:
    """The kernel version of :func:`lmmem.kernels.hebbian_rule.hebbian_mix_`: in place on
    ``weight`` ``(V, D)`` (fp32/bf16/fp16) and ``class_counts`` ``(V,)`` int64, for the slots ``ids``
    (sentinel ``V`` skipped) with occurrences ``n`` and fp32 activation sums ``sums``. A kernel
    variant that fails here (probed on first use) is replaced by ``hebbian_mix_`` with one warning."""
    require_triton(weight.device)
    if class_counts.dtype != torch.int64:
        raise TypeError("class_counts must be int64")
    if ids.numel() == 0:
        return
    sums = sums.to(torch.float32).contiguous()
    ids = ids.to(torch.int64).contiguous()
    n = n.to(torch.int64).contiguous()
    args = (weight, class_counts, ids, n, sums, gamma, smoothing_limit, rescale)
    if weight.dtype in (torch.float32, torch.bfloat16, torch.float16):
        has_limit = smoothing_limit is not None and not math.isinf(smoothing_limit)
        variant = ("hebbian_mix", str(weight.dtype).removeprefix("torch."), "limit" if has_limit else "no-limit",
                   "rescale" if rescale else "no-rescale", str(weight.device))
        if kernel_ok(variant, lambda: _probe_mix(weight.dtype, weight.device, smoothing_limit, rescale)):
            if guarded(variant, lambda: _mix_launch(*args, block_d=block_d)):
                return
    _mix_torch(*args)
