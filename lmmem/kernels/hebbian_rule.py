"""The Hebbian softmax's rule in plain PyTorch: what the kernels of :mod:`lmmem.kernels.hebbian`
compute, and the specification both they and :class:`~lmmem.output_layers.hebbian_softmax.HebbianSoftmax`
are tested against. Pure functions on tensors, no module state.

The rule (Rae et al. 2018, "Fast Parametric Learning with Activation Memorization"), applied right
after ``optimizer.step()`` to each class ``i`` present in the step's batch, with ``n_i`` its
occurrences, ``h̄_i`` the mean of the activations that predicted it, ``θ̂_i`` its row after the
step and ``c_i`` the occurrences seen before this batch::

    λ_i = max(1 / (c_i + 1), γ)   if c_i < T   else 0           (hebbian_lambda)
    θ_i ← λ_i · target_i + (1 − λ_i) · θ̂_i
    c_i ← c_i + n_i

The two rules differ only in ``target_i``: ``"paper"`` writes ``h̄_i`` (optionally rescaled to
``|θ̂_i|``), :func:`hebbian_mix_`; ``"centred"`` writes the centred activation orthogonally to the
running activation mean μ and keeps the row's component along μ, :func:`centred_targets` and
:func:`hebbian_mix_centred_`. Why each, and the conventions, are in
:mod:`lmmem.output_layers.hebbian_softmax`.

* :func:`hebbian_mix_` / :func:`hebbian_mix_centred_` — the vectorised in-place update over the
  ``U`` classes of a batch, O(U·D) (the Triton ``mix_kernel`` and ``centred_mix_kernel`` are their
  fused forms).
* :func:`update_running_statistics_` — the centred rule's running mean μ and row norm, folded in
  before the write (the Triton kernels of :mod:`lmmem.kernels.hebbian_centred` are its fused form).
* :func:`hebbian_update_reference` — the same rule per class, in float64, from the raw batch:
  slow, obvious, the specification.
* :func:`merge_class_statistics` — per-class batch statistics from several sources (gradient
  accumulation's micro-batches, DDP's ranks) as one, deterministically.
"""

from __future__ import annotations

import math

import torch

from lmmem.constants import IGNORE_INDEX

HEBBIAN_RULES = ("paper", "centred")
WRITE_NORMS = ("row", "running", "none")
WRITE_MOMENTUM = ("scale", "keep")
# optimizer state entries that carry earlier gradients into later steps (Adam/AdamW, SGD/RMSprop momentum)
FIRST_MOMENT_STATE = ("exp_avg", "momentum_buffer")

# Per-class statistics of a batch: distinct class ids (U,) int64, their occurrences (U,) int64 and
# activation sums (U, D) (at least fp32). Compare lmmem.kernels.hebbian.SlotStats (one slot per
# position, sentinel ids), which the Triton path records instead.
ClassStats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def hebbian_lambda(counts_before: torch.Tensor, gamma: float, smoothing_limit: float | None, dtype: torch.dtype,
                   later_limit: float | None = None, passes: torch.Tensor | None = None) -> torch.Tensor:
    """``λ = max(1/(c+1), γ)`` where ``c < T``, else 0 (vectorised over classes). With
    ``later_limit`` and ``passes`` (a 0-d tensor: passes over the training data completed), ``T`` is
    ``later_limit`` once ``passes ≥ 1``, chosen on the device (no host sync)."""
    lam = (1.0 / (counts_before.to(dtype) + 1.0)).clamp_min(gamma)
    if later_limit is not None and passes is not None and later_limit != smoothing_limit:
        first = torch.full((), math.inf if smoothing_limit is None else float(smoothing_limit), dtype=torch.float64, device=passes.device)
        limit = torch.where(passes > 0, torch.full_like(first, float(later_limit)), first)  # filled on the device: no copy, no sync
        return torch.where(counts_before < limit.to(counts_before.device), lam, torch.zeros((), dtype=dtype, device=lam.device))
    if smoothing_limit is not None and not math.isinf(smoothing_limit):
        lam = torch.where(counts_before < smoothing_limit, lam, torch.zeros((), dtype=dtype, device=lam.device))
    return lam


@torch.no_grad()
def hebbian_mix_(
    weight: torch.Tensor,
    counts: torch.Tensor,
    ids: torch.Tensor,
    n: torch.Tensor,
    sums: torch.Tensor,
    gamma: float,
    smoothing_limit: float | None,
    rescale: bool = False,
) -> None:
    """Apply the rule in place to ``weight`` (V, D) and ``counts`` (V,) for the distinct classes
    ``ids`` (U,) with occurrences ``n`` (U,) and activation sums ``sums`` (U, D). Vectorised, O(U·D).

    :func:`lmmem.kernels.hebbian.hebbian_mix_triton_` is its fused form; :func:`hebbian_update_reference`
    is its specification."""

    def target_of(rows: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        if rescale:
            return mean * (rows.norm(dim=1, keepdim=True) / mean.norm(dim=1, keepdim=True).clamp_min(1e-12))
        return mean

    _mix_rows_(weight, counts, ids, n, sums, gamma, smoothing_limit, target_of)


def _mix_rows_(weight, counts, ids, n, sums, gamma, smoothing_limit, target_of, lam=None) -> None:
    """The bookkeeping both rules share: mean activations h̄ of the classes present, λ from the
    counts before the batch (or the given per-class ``lam`` (U,)), ``θ ← λ·target_of(θ̂, h̄) + (1−λ)·θ̂``
    written with ``index_copy_``, counts advanced. ``target_of`` is the only thing a rule decides."""
    if ids.numel() == 0:
        return
    ids = ids.to(weight.device)
    n = n.to(device=counts.device, dtype=counts.dtype)
    mix_dtype = torch.promote_types(torch.promote_types(weight.dtype, sums.dtype), torch.float32)
    mean = sums.to(device=weight.device, dtype=mix_dtype) / n.to(device=weight.device, dtype=mix_dtype).unsqueeze(1)
    rows = weight.index_select(0, ids).to(mix_dtype)
    target = target_of(rows, mean)
    if lam is None:
        lam = hebbian_lambda(counts.index_select(0, ids.to(counts.device)).to(weight.device), gamma, smoothing_limit, mix_dtype)
    lam = lam.to(device=weight.device, dtype=mix_dtype).unsqueeze(1)
    # λ·target + (1−λ)·θ̂ (not lerp): exact at λ = 1 (row = target) and λ = 0 (row = θ̂).
    new_rows = lam * target + (1.0 - lam) * rows
    weight.index_copy_(0, ids, new_rows.to(weight.dtype))
    counts.index_add_(0, ids.to(counts.device), n)


def centred_targets(
    rows: torch.Tensor, mean: torch.Tensor, activation_mean: torch.Tensor, write_norm: str, running_norm: torch.Tensor | float | None
) -> torch.Tensor:
    """The rows the ``"centred"`` rule mixes towards (vectorised over the U rows of the batch).

    With ``u = μ/|μ|`` (μ the running mean of the training activations), each row ``θ̂`` keeps its
    own component along ``u`` (where the model keeps its frequency prior) and its orthogonal part is
    replaced by the centred mean activation ``h̄ − μ`` with its ``u`` component removed, scaled to
    ``write_norm``'s norm: ``"row"`` the row's own orthogonal norm, ``"running"`` ``running_norm``,
    ``"none"`` unscaled. ``θ ← λ·target + (1−λ)·θ̂`` then moves only the orthogonal part."""
    mu = activation_mean.to(rows.dtype)
    mu_norm = mu.norm()
    u = mu / mu_norm if float(mu_norm) > 0 else torch.zeros_like(mu)
    along = rows @ u  # (U,)
    row_perp = rows - along.unsqueeze(1) * u
    write = mean - mu
    write = write - (write @ u).unsqueeze(1) * u
    if write_norm != "none":
        norm = row_perp.norm(dim=1, keepdim=True) if write_norm == "row" else torch.as_tensor(running_norm, dtype=rows.dtype, device=rows.device)
        write = write * (norm / write.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return along.unsqueeze(1) * u + write


@torch.no_grad()
def hebbian_mix_centred_(
    weight: torch.Tensor,
    counts: torch.Tensor,
    ids: torch.Tensor,
    n: torch.Tensor,
    sums: torch.Tensor,
    gamma: float,
    smoothing_limit: float | None,
    activation_mean: torch.Tensor,
    write_norm: str = "row",
    running_norm: torch.Tensor | float | None = None,
    lam: torch.Tensor | None = None,
) -> None:
    """:func:`hebbian_mix_` for ``rule="centred"`` (same λ and counts; the row mixes towards
    :func:`centred_targets` instead of ``h̄``). ``lam`` (U,), when given, replaces the λ schedule
    (``gamma`` and ``smoothing_limit`` are then unused). Its fused form, running statistics
    included, is :func:`lmmem.kernels.hebbian_centred.hebbian_centred_update_`."""
    _mix_rows_(weight, counts, ids, n, sums, gamma, smoothing_limit,
               lambda rows, mean: centred_targets(rows, mean, activation_mean.to(weight.device), write_norm, running_norm),
               lam)


@torch.no_grad()
def update_running_statistics_(activation_mean: torch.Tensor, running_row_norm: torch.Tensor, weight: torch.Tensor,
                               ids: torch.Tensor, n: torch.Tensor, sums: torch.Tensor, updates: int,
                               mean_decay: float) -> None:
    """Fold one step's per-class statistics (distinct classes, no sentinel) into the centred rule's
    running mean μ (``activation_mean``) and ``running_row_norm``, in place, before the rows are
    written. Both are the plain mean over the first ``1/(1 − mean_decay)`` updates (no bias towards
    the zero start), then an EMA with ``mean_decay``: rate ``max(1 − mean_decay, 1/(updates + 1))``.
    The row norm is token-weighted over the batch's classes (the rows the gradient trains most),
    measured orthogonally to the *new* μ on ``weight``'s rows (after the optimizer step). In
    float64, rounded to the buffers' dtype; nothing changes when the batch has no token."""
    total = n.sum()
    if int(total) == 0:
        return
    rate = max(1.0 - mean_decay, 1.0 / (updates + 1))
    mu = activation_mean
    batch_mean = sums.to(device=mu.device, dtype=torch.float64).sum(0) / float(total)
    mu.copy_((mu.double() + rate * (batch_mean - mu.double())).to(mu.dtype))
    rows = weight.detach().index_select(0, ids.to(weight.device)).to(torch.float64)
    u = mu.double().to(rows.device)
    u = u / u.norm() if float(u.norm()) > 0 else u
    perp = (rows - (rows @ u).unsqueeze(1) * u).norm(dim=1)
    w = n.to(device=rows.device, dtype=torch.float64)
    batch_norm = (perp * w).sum() / w.sum()
    r = running_row_norm
    r.copy_((r.double() + rate * (batch_norm.to(r.device) - r.double())).to(r.dtype))


@torch.no_grad()
def scale_first_moment_(state: dict, weight_shape: torch.Size, ids: torch.Tensor, factor: torch.Tensor, slots: bool = False) -> None:
    """Multiply the first moment of rows ``ids`` (distinct) in one parameter's optimizer ``state`` by
    ``factor`` (U,): every :data:`FIRST_MOMENT_STATE` entry shaped like the weight (second moments are
    left: they set a step's size, not its direction). ``slots``: Triton statistics, whose sentinel
    slots (ids ≥ V) are skipped by building a (V,) factor vector rather than filtering (no host sync;
    every sentinel lands on the extra entry V with the same value 1, so their order does not matter)."""
    num_classes = weight_shape[0]
    bufs = [b for b in (state.get(k) for k in FIRST_MOMENT_STATE) if isinstance(b, torch.Tensor) and b.shape == weight_shape]
    if not bufs:
        return
    ids = ids.to(bufs[0].device)
    if slots:
        full = torch.ones(num_classes + 1, dtype=factor.dtype, device=bufs[0].device)
        full.index_copy_(0, ids.clamp(max=num_classes), torch.where(ids < num_classes, factor.to(full.device), torch.ones_like(full[:1])))
    for buf in bufs:
        if slots:
            buf.mul_(full[:num_classes].to(buf.dtype).unsqueeze(1))
        else:
            buf.index_copy_(0, ids, buf.index_select(0, ids) * factor.to(device=buf.device, dtype=buf.dtype).unsqueeze(1))


def hebbian_update_reference(
    weight: torch.Tensor,
    counts: torch.Tensor,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    gamma: float = 0.01,
    smoothing_limit: float | None = 500,
    ignore_index: int = IGNORE_INDEX,
    rescale: bool = False,
    rule: str = "paper",
    activation_mean: torch.Tensor | None = None,
    write_norm: str = "row",
    running_norm: float | None = None,
    class_lambda: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain, per-class, float64 statement of the rule (the specification; slow).

    ``weight`` is the output matrix *after* the optimizer step (θ̂), ``counts`` the occurrences seen
    before this batch, ``hidden`` (N, D) / ``targets`` (N,) the whole batch of the step (all
    micro-batches and ranks concatenated). Returns new ``(weight, counts)`` (float64, int64 copies).
    For ``rule="centred"``, ``activation_mean`` is the μ of this step (the layer's running mean
    *after* folding in this batch, see :func:`update_running_statistics_`) and ``running_norm`` the
    norm written when ``write_norm="running"``. ``class_lambda`` (V,), when given, is each class's
    λ in place of the schedule (for a kernel that takes λ as an input)."""
    W = weight.detach().to(torch.float64).clone()
    c = counts.detach().to(torch.int64).clone()
    h = hidden.detach().reshape(-1, hidden.shape[-1]).to(torch.float64)
    t = targets.detach().reshape(-1).tolist()
    positions: dict[int, list[int]] = {}
    for pos, cls in enumerate(t):
        if cls == ignore_index:
            continue
        positions.setdefault(int(cls), []).append(pos)
    for cls, pos in positions.items():
        n_i = len(pos)
        mean = sum(h[p] for p in pos) / n_i
        c_i = int(c[cls])
        limit = math.inf if smoothing_limit is None else smoothing_limit
        lam = max(1.0 / (c_i + 1), gamma) if c_i < limit else 0.0
        if class_lambda is not None:
            lam = float(class_lambda[cls])
        if rule == "centred":
            mu = activation_mean.detach().to(torch.float64)
            u = mu / mu.norm() if float(mu.norm()) > 0 else torch.zeros_like(mu)
            along = float(W[cls] @ u)
            row_perp = W[cls] - along * u
            write = (mean - mu) - float((mean - mu) @ u) * u
            if write_norm == "row":
                write = write * (row_perp.norm() / write.norm().clamp_min(1e-12))
            elif write_norm == "running":
                write = write * (running_norm / write.norm().clamp_min(1e-12))
            mean = along * u + write
        elif rescale:
            mean = mean * (W[cls].norm() / mean.norm().clamp_min(1e-12))
        W[cls] = lam * mean + (1.0 - lam) * W[cls]
        c[cls] = c_i + n_i
    return W, c


def merge_class_statistics(parts: list[ClassStats]) -> ClassStats:
    """Merge statistics sets, each with distinct ids, into one (sorted ids). Deterministic: within a
    part the ids are distinct, so ``index_add_`` never adds twice into a row, and parts are added in
    list order (so every DDP rank computes bit-identical sums)."""
    parts = [p for p in parts if p[0].numel() > 0] or parts[:1]
    if len(parts) == 1:
        return parts[0]
    ids, inverse = torch.unique(torch.cat([p[0] for p in parts]), return_inverse=True)
    dtype = parts[0][2].dtype
    for p in parts[1:]:
        dtype = torch.promote_types(dtype, p[2].dtype)
    counts = torch.zeros(ids.numel(), dtype=torch.int64, device=ids.device)
    sums = torch.zeros(ids.numel(), parts[0][2].shape[1], dtype=dtype, device=ids.device)
    start = 0
    for p_ids, p_n, p_sums in parts:
        inv = inverse[start : start + p_ids.numel()]
        start += p_ids.numel()
        counts.index_add_(0, inv, p_n)
        sums.index_add_(0, inv, p_sums.to(dtype))
    return ids, counts, sums
