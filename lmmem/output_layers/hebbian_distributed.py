"""The Hebbian softmax under DDP: every replica applies the update of the whole global batch.

Each rank records statistics of its own share of the batch. If each applied only those, the
replicas' output rows (and ``counts``) would drift apart — DDP keeps parameters equal by averaging
gradients, and the Hebbian write is not a gradient. So before the update every rank all-gathers
every rank's per-class ``(ids, counts, sums)`` and merges them in rank order: all replicas compute
bit-identical statistics, apply the same write and stay identical. A rank with nothing recorded
still takes part (with empty statistics), so no rank waits forever for another.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lmmem.kernels.hebbian_rule import ClassStats, merge_class_statistics


def distributed_sync_active(sync_distributed: bool, group=None) -> bool:
    """Whether the update must be synchronised: asked for, and ``torch.distributed`` initialised
    with more than one process in ``group`` (None: the default group)."""
    return sync_distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_gather_class_statistics(stats: ClassStats | None, in_features: int, device: torch.device,
                                group=None) -> ClassStats | None:
    """Every rank's per-class statistics (``None``: this rank recorded nothing), merged in rank
    order into the global batch's (``None`` if no rank recorded anything). A collective: every rank
    of ``group`` must call it at the same point.

    Ranks differ in their number of classes ``U``, so one small all-gather first exchanges each
    rank's ``U`` and whether its sums are fp64 (all ranks must send one dtype: the widest wins);
    then ids and counts travel as one ``(2, max U)`` int64 tensor and the sums as one
    ``(max U, D)`` tensor, padded, and each rank's part is cut back to its own ``U``."""
    world = dist.get_world_size(group)
    if stats is None:
        stats = (
            torch.zeros(0, dtype=torch.int64, device=device),
            torch.zeros(0, dtype=torch.int64, device=device),
            torch.zeros(0, in_features, dtype=torch.float32, device=device),
        )
    ids, n, sums = stats
    meta = torch.tensor([ids.numel(), int(sums.dtype == torch.float64)], dtype=torch.int64, device=device)
    all_meta = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(all_meta, meta, group=group)
    meta_l = torch.stack(all_meta).tolist()
    sizes_l = [m[0] for m in meta_l]
    max_u = max(sizes_l)
    if max_u == 0:
        return None
    dtype = torch.float64 if any(m[1] for m in meta_l) else torch.float32
    ints = torch.zeros(2, max_u, dtype=torch.int64, device=device)
    ints[0, : ids.numel()] = ids
    ints[1, : ids.numel()] = n
    fl = torch.zeros(max_u, in_features, dtype=dtype, device=device)
    fl[: ids.numel()] = sums.to(dtype)
    all_ints = [torch.empty_like(ints) for _ in range(world)]
    all_fl = [torch.empty_like(fl) for _ in range(world)]
    dist.all_gather(all_ints, ints, group=group)
    dist.all_gather(all_fl, fl, group=group)
    parts = [(all_ints[r][0, :u], all_ints[r][1, :u], all_fl[r][:u]) for r, u in enumerate(sizes_l)]
    return merge_class_statistics(parts)
