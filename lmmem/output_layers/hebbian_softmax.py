"""Hebbian softmax (Rae, Dyer, Dayan, Lillicrap, "Fast Parametric Learning with Activation
Memorization", ICML 2018).

A full softmax whose output rows are trained by gradient *and*, right after every optimizer step,
pulled towards the activations that predicted their class, so that a rare word becomes predictable
after one or two sightings instead of hundreds of small gradient steps.

Two rules (``rule=``): ``"paper"``, the paper's rule exactly, and ``"centred"`` (the default, a
variant of ours, not the paper's), which writes the same information without the paper rule's
side effect on language models. Both share the counts, λ schedule, statistics and DDP path below.
The rule maths (vectorised, and the float64 reference the tests hold everything to) is in
:mod:`lmmem.kernels.hebbian_rule`; this module is the layer that records and applies it. What the
rules do to perplexity, binding speed and training stability is measured in
docs/results/hebbian-rules.md (and, for the paper's rule, docs/results/hebbian-softmax.md).

The paper's rule (``rule="paper"``), exactly as implemented
------------------------------------------------------------
For every class ``i`` present (as a non-ignored target) in the batch of the step, let

* ``n_i``  be its number of occurrences in the batch (summed over gradient-accumulation
  micro-batches and, under DDP, over all ranks),
* ``h̄_i`` the mean of the final activations of those occurrences (the vectors fed to the softmax),
* ``θ̂_i`` the output row *after* ``optimizer.step()``,
* ``c_i`` the persistent buffer :attr:`HebbianSoftmax.counts`: the number of training occurrences
  of class ``i`` seen *before* this batch (it starts at 0).

Then::

    λ_i = max(1 / (c_i + 1), γ)   if c_i < T   else 0
    θ_i ← λ_i · h̄_i + (1 − λ_i) · θ̂_i
    c_i ← c_i + n_i

That is the paper's ``λ = max(1/c, γ)`` with ``c = c_i + 1`` (a counter that includes the current
sighting), the convention chosen so that a first sighting gives ``λ = 1`` exactly; the buffer itself
holds the real number of occurrences, starting at 0. Consequences:

* **first sighting** (``c_i = 0``): ``λ = 1``, the row *becomes* ``h̄_i`` exactly (the gradient
  step of that batch is overridden);
* **second sighting**: ``c_i = n`` (the occurrences of the first sighting), so ``λ = 1/(n+1)``;
  after a first sighting of one occurrence, ``λ = 1/2``: the row becomes ``½ h̄ + ½ θ̂``. Sightings
  with one occurrence each give ``λ = 1, 1/2, 1/3, …`` until ``1/(c+1) < γ``, then ``γ``;
* once a class has been seen ``T`` times *before* a batch (``c_i ≥ T``), the rule no longer moves
  its row (``λ = 0``): it is trained by the gradient only, like a plain softmax. ``counts`` keeps
  counting.

Classes never seen are trained by the gradient only, and the bias always is (the rule touches no
bias). With ``rescale=True``, ``h̄_i`` is first scaled to the norm of ``θ̂_i`` (off by default; the
paper does not rescale). The paper's exact γ and T are not known to us; for the paper's rule the
defaults, ``gamma=0.01`` and ``smoothing_limit=500``, are those of a public reimplementation.

The centred rule (``rule="centred"``, the default)
---------------------------------------------------
Why: in a language model the final activations share a large common component μ (their mean), and
the model keeps each word's frequency prior in its row's component along μ. The paper's write
copies h̄'s scale *and* μ into the row, so one write raises the word's logit far more than a
gradient step would, in every context, not only its own: probability mass moves onto rare words
and every frequency bucket gets worse (the controlled study of issue 12, in the results pages).

The rule: μ is a running mean of the training activations (buffer :attr:`activation_mean`: the plain
mean over the first ``1/(1 − mean_decay)`` updates, then an EMA with ``mean_decay``, default 0.99),
``u = μ/|μ|``. For each class in the batch, with the same ``λ`` and counts as above::

    target_i = (θ̂_i·u) u  +  s_i · P(h̄_i − μ)          P = projection orthogonal to u
    θ_i ← λ_i · target_i + (1 − λ_i) · θ̂_i

so the row's component along μ (its frequency prior) is never changed, and its orthogonal part
moves towards the *centred* mean activation. ``s_i`` sets the written part's norm (``write_norm``):
``"running"`` (the default) a running, token-weighted mean of the norm of the rows' orthogonal
parts over each batch's rows (buffer :attr:`running_row_norm`: the typical row the gradient trains,
frequent words weighing most), ``"row"`` the norm of the row's own orthogonal part (a rare word's
row is small, so its write is weak), ``"none"`` unscaled. ``rescale`` belongs to the paper's rule
only.

When it writes: until a class has been seen ``T`` times (``smoothing_limit``, default 100 for the
centred rule: where λ = 1/(c+1) reaches γ, so a row's write is the running mean of its first
contexts; rows still mixed at λ = γ after the gradient had trained them made later passes over the
data worse, see :data:`DEFAULT_SMOOTHING_LIMIT`), and from the ``start_step``-th update on
(default 50 for the centred rule, 0 for the paper's), because writes during a from-scratch model's
first steps, while its activations are still changing fast, raise its training loss; before that, counts and running statistics advance but no
row is written. The running statistics are computed from the all-rank statistics, so DDP replicas
stay identical; they and :attr:`updates` are persistent buffers (a checkpoint resumes exactly;
checkpoints from before these buffers existed load with them fresh).

Later passes
------------
Writes continue in every pass while a row's count is below ``T``. In later passes they lower valid
perplexity; on text the model has not read, the rare words they write become more predictable and
other rare words less (docs/results/binding-wikitext-2-later-passes-held-out.md).
``later_limit`` (off by default; a variant of ours) replaces ``T`` from the second pass over the
training data on, e.g. 5: a row seen 5 or more times is then trained by the gradient only. Lower
limits take less from the unwritten words but cost valid perplexity
(docs/results/binding-wikitext-2-later-pass-limit.md), so the default keeps ``T`` in every pass.
The layer learns of passes from :meth:`start_pass` (lmmem's trainer and
:class:`lmmem.hf.HebbianSoftmaxCallback` call it at every epoch start).

Which activations, and the rest
-------------------------------
The ``hidden`` given to :meth:`HebbianSoftmax.loss` (in lmmem's models after output dropout), as the
paper mixes in; recorded only when ``self.training`` and gradients are enabled (evaluation,
``torch.no_grad()`` and :meth:`target_log_probs` never record). How the statistics are recorded
and applied, the backends, DDP (every rank applies the whole global batch's statistics), tied
embeddings, autocast and ``torch.compile``: docs/hebbian.md, "Implementation notes". A training
loop of one's own calls ``layer.attach_to_optimizer(opt)`` once (the Hugging Face Trainer:
``lmmem.hf.HebbianSoftmaxCallback``).

The optimizer's momentum
------------------------
With ``write_momentum="scale"`` (centred rule only; a variant of ours) a write of row ``i`` at rate
``λ_i`` also multiplies the optimizer's first moment of that row (Adam's ``exp_avg``, SGD's
``momentum_buffer``) by ``1 − λ_i``: that momentum sums gradients taken on the part of the row the
write replaced (under Adam, for a rare word, full-size steps away from every context), and kept, it
undoes the write over the next ~1/(1 − β₁) steps. ``"keep"`` (and the paper's rule) leave the
optimizer as it is. The optimizer comes from its post-step hook (:meth:`attach_to_optimizer`),
lmmem's trainer, :class:`lmmem.hf.HebbianSoftmaxCallback` or ``on_optimizer_step(optimizer)``;
without it (or with a sharded optimizer's state) rows keep their momentum and the layer warns once.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from lmmem.constants import IGNORE_INDEX
from lmmem.kernels.hebbian import SlotStats, hebbian_mix_triton_, hebbian_statistics, merge_statistics
from lmmem.kernels.hebbian_centred import hebbian_centred_update_
from lmmem.kernels.hebbian_rule import (
    HEBBIAN_RULES,
    WRITE_MOMENTUM,
    WRITE_NORMS,
    ClassStats,
    hebbian_lambda,
    hebbian_mix_,
    hebbian_update_reference,
    merge_class_statistics,
    scale_first_moment_,
    update_running_statistics_,
)
from lmmem.output_layers.base import OutputLayer, unwrap_optimizer
from lmmem.output_layers.hebbian_distributed import all_gather_class_statistics, distributed_sync_active

# hebbian_lambda and hebbian_update_reference live in lmmem.kernels.hebbian_rule; importable from here too
__all__ = ["DEFAULT_LATER_LIMIT", "DEFAULT_SMOOTHING_LIMIT", "DEFAULT_START_STEP", "DEFAULT_WRITE_MOMENTUM", "FORGOTTEN_UPDATE_MESSAGE", "HebbianSoftmax",
           "MissingHebbianUpdateWarning", "hebbian_lambda", "hebbian_update_reference"]


class MissingHebbianUpdateWarning(UserWarning):
    """Statistics were recorded, then the optimizer stepped without the Hebbian update."""


FORGOTTEN_UPDATE_MESSAGE = (
    "HebbianSoftmax recorded statistics, then the optimizer stepped without applying the Hebbian update: "
    "the layer is training as a plain softmax (counts stay 0). Attach it once: layer.attach_to_optimizer(optimizer) "
    "(Accelerate-wrapped optimizers and LR schedulers are unwrapped); with the Hugging Face Trainer pass "
    "callbacks=[lmmem.hf.HebbianSoftmaxCallback()]; or call layer.on_optimizer_step() after every step."
)


# The centred rule writes from the 51st update on (the tiny preset's lr warm-up length): writes during
# a from-scratch model's first steps raise its training loss (docs/results/hebbian-rules.md,
# "From-scratch guard"; tests/test_hebbian_rules.py checks it).
DEFAULT_START_STEP = 50
# T when not given, by rule. Centred: 100, where λ = 1/(c+1) reaches γ = 0.01 (a row's write is the
# running mean of its first 100 contexts); T = 500 made later passes worse (long-training-wikitext-2.md).
DEFAULT_SMOOTHING_LIMIT = {"centred": 100, "paper": 500}
# The T from the second pass over the training data on; None: T in every pass (the module docstring,
# "Later passes": the lower limits tried cost valid perplexity).
DEFAULT_LATER_LIMIT = {"centred": None, "paper": None}
# What a centred write does to the optimizer's momentum of the rows it writes (the module docstring,
# "The optimizer's momentum").
DEFAULT_WRITE_MOMENTUM = {"centred": "scale", "paper": "keep"}
MOMENTUM_UNSEEN_MESSAGE = (
    "HebbianSoftmax(write_momentum='scale') cannot see the optimizer's state of its weight, so the written rows keep their "
    "momentum: pass the optimizer (layer.on_optimizer_step(optimizer), or layer.attach_to_optimizer(optimizer) once), or "
    "write_momentum='keep' to silence this")


class HebbianSoftmax(OutputLayer):
    """Full softmax with the Hebbian row update of Rae et al. (2018); see the module docstring for
    the exact rule and conventions.

    Args:
        in_features, num_classes, bias: as :class:`~lmmem.output_layers.full_softmax.FullSoftmax`.
        gamma: the floor γ of the mixing rate λ (default 0.01, from a public reimplementation).
        smoothing_limit: T; a class seen ``T`` or more times before a batch is no longer moved by
            the rule. Default ``-1``: the rule's (:data:`DEFAULT_SMOOTHING_LIMIT`: 100 for
            ``"centred"``, where λ reaches γ; 500 for ``"paper"``, from the same source as γ).
            ``None`` or ``inf``: never stop.
        rescale: scale ``h̄_i`` to the norm of the row before mixing (default off).
        sync_distributed: under DDP, all-gather the batch statistics so replicas stay identical
            (default on; off only makes sense if each rank's model is meant to diverge).
        backend: "auto" (default: the fused loss on any device; Triton kernels for CUDA tensors), "torch"
            or "triton" (on CPU only under ``TRITON_INTERPRET=1``). With Triton, the loss is the fused
            linear cross-entropy (no ``N × V`` logits), the statistics come from a segmented-sum kernel into
            ``N``-slot buffers (no ``torch.unique``, no host sync) and the update is in-place kernels
            over the rows of the batch's classes; see :mod:`lmmem.kernels.hebbian` and
            :mod:`lmmem.kernels.hebbian_centred`.
        rule: ``"centred"`` (default; ours: writes h̄ − μ orthogonally to the running activation mean
            μ, keeping the row's component along μ) or ``"paper"`` (Rae et al.'s exact rule). Both
            have Triton update kernels.
        write_norm: centred rule: norm of the written part, ``"running"`` (default), ``"row"`` or
            ``"none"`` (see the module docstring).
        mean_decay: centred rule: EMA decay of μ and of the running row norm (default 0.99).
        start_step: updates before the rule writes rows (counts and running statistics advance
            meanwhile); default ``None``: 50 for ``"centred"``, 0 for ``"paper"``.
        write_momentum: centred rule: what a write does to the optimizer's momentum of the row
            (Adam's ``exp_avg``, SGD's ``momentum_buffer``): ``"scale"`` multiplies it by ``1 − λ``,
            ``"keep"`` leaves it (see the module docstring, "The optimizer's momentum"). Default
            ``None``: the rule's (:data:`DEFAULT_WRITE_MOMENTUM`).
        later_limit: centred rule: the smoothing limit from the second pass over the training data
            on (a variant of ours; see the module docstring, "Later passes"; the pass comes from
            :meth:`start_pass`). Default ``-1``: the rule's (:data:`DEFAULT_LATER_LIMIT`: None);
            ``None``: ``smoothing_limit`` in every pass (the paper's rule always).
    """

    counts: torch.Tensor
    activation_mean: torch.Tensor
    running_row_norm: torch.Tensor
    updates: torch.Tensor
    # Warn once when a training forward finds statistics from before an optimizer step (see
    # _check_forgotten_update). Set to False on an instance to silence it.
    check_forgotten_update: bool = True
    _forgotten_warned = False
    _stats_weight_version = 0
    _backward_seen = False

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        gamma: float = 0.01,
        smoothing_limit: float | None = -1,
        bias: bool = True,
        rescale: bool = False,
        sync_distributed: bool = True,
        backend: str = "auto",
        rule: str = "centred",
        write_norm: str = "running",
        mean_decay: float = 0.99,
        start_step: int | None = None,
        write_momentum: str | None = None,
        later_limit: float | None = -1,
    ):
        if rule not in HEBBIAN_RULES:
            raise ValueError(f"rule must be one of {', '.join(HEBBIAN_RULES)}, got {rule!r}")
        if start_step is None:  # the paper's rule starts at once (bit-for-bit the paper's); see DEFAULT_START_STEP
            start_step = DEFAULT_START_STEP if rule == "centred" else 0
        if smoothing_limit == -1:
            smoothing_limit = DEFAULT_SMOOTHING_LIMIT[rule]
        if write_norm not in WRITE_NORMS:
            raise ValueError(f"write_norm must be one of {', '.join(WRITE_NORMS)}, got {write_norm!r}")
        if rescale and rule != "paper":
            raise ValueError("rescale applies to rule='paper' only; the centred rule sets the written norm with write_norm")
        if not 0.0 <= float(mean_decay) < 1.0:
            raise ValueError(f"mean_decay must be in [0, 1), got {mean_decay}")
        if int(start_step) < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if write_momentum is None:
            write_momentum = DEFAULT_WRITE_MOMENTUM[rule]
        if write_momentum not in WRITE_MOMENTUM:
            raise ValueError(f"write_momentum must be one of {', '.join(WRITE_MOMENTUM)}, got {write_momentum!r}")
        if write_momentum != "keep" and rule != "centred":
            raise ValueError("write_momentum applies to rule='centred' only; the paper's rule leaves the optimizer as it is (write_momentum='keep')")
        if later_limit == -1:
            later_limit = DEFAULT_LATER_LIMIT[rule]
        if later_limit is not None and (rule != "centred" or later_limit < 0):
            raise ValueError(f"later_limit is >= 0, -1 (the rule's default) or None, and applies to rule='centred' only; got {later_limit}")
        if not 0.0 <= float(gamma) <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        if smoothing_limit is not None and smoothing_limit < 0:
            raise ValueError(f"smoothing_limit must be >= 0, -1 (the rule's default) or None, got {smoothing_limit}")
        super().__init__(in_features, num_classes, bias=bias, backend=backend)
        self.gamma = float(gamma)
        self.smoothing_limit = smoothing_limit
        self.rescale = bool(rescale)
        self.sync_distributed = bool(sync_distributed)
        self.rule = rule
        self.write_norm = write_norm
        self.mean_decay = float(mean_decay)
        self.start_step = int(start_step)
        self.write_momentum = write_momentum
        self.later_limit = later_limit
        self._optimizer = None  # a weakref to the optimizer attach_to_optimizer was given
        self._momentum_warned = False
        self.process_group = None  # None: the default group
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.int64), persistent=True)
        # State of the centred rule (kept, and saved, under every rule so that a checkpoint resumes
        # exactly and a run can switch rule): the running mean μ of the training activations, the
        # running token-weighted norm of the rows' parts orthogonal to μ, and the number of updates.
        self.register_buffer("activation_mean", torch.zeros(in_features), persistent=True)
        self.register_buffer("running_row_norm", torch.zeros(()), persistent=True)
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64), persistent=True)
        # Passes over the training data completed before the current one (set by start_pass): which of
        # smoothing_limit and later_limit is in effect, read on the device (no host sync).
        self.register_buffer("passes", torch.zeros((), dtype=torch.int64), persistent=True)
        # this rank's statistics since the last update: per class (PyTorch path) or per slot (Triton path)
        self._stats: ClassStats | SlotStats | None = None

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "counts"):
            self.counts.zero_()
            self.activation_mean.zero_()
            self.running_row_norm.zero_()
            self.updates.zero_()
            self.passes.zero_()
            self._stats = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the centred rule existed have no state for it: start it fresh.
        for name in ("activation_mean", "running_row_norm", "updates"):
            state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())
        state_dict.setdefault(prefix + "passes", self.passes.detach().clone())  # saved before later_limit existed
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, bias={self.bias is not None}, "
            f"gamma={self.gamma}, smoothing_limit={self.smoothing_limit}, rule={self.rule!r}, "
            + (f"rescale={self.rescale}" if self.rule == "paper" else
               f"write_norm={self.write_norm!r}, mean_decay={self.mean_decay}, start_step={self.start_step}, "
               f"write_momentum={self.write_momentum!r}, later_limit={self.later_limit}")
        )

    # -- distribution -----------------------------------------------------------------------------
    def _nll(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str, ignore_index: int) -> torch.Tensor:
        return self.cross_entropy(hidden, targets, reduction, ignore_index)

    def target_log_probs(self, hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        # An evaluation API: never records statistics, even in training mode.
        return -self._nll(hidden, targets, "none", ignore_index).view(targets.shape)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "mean", ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self._record(hidden, targets, ignore_index)
        return self._nll(hidden, targets, reduction, ignore_index)

    # -- statistics -------------------------------------------------------------------------------
    def _watch_weight_gradient(self) -> None:
        """Note every gradient accumulated into the weight (for :meth:`_check_forgotten_update`). Where
        a framework keeps gradients elsewhere (DeepSpeed, FSDP), the hook never fires: no false alarm."""
        w = self.weight
        watched = getattr(self, "_watched_weight", None)  # a weakref: a Parameter attribute would become a parameter
        if (watched is not None and watched() is w) or not w.requires_grad:
            return

        def seen(param: torch.Tensor) -> None:
            if param is self.weight:
                self._backward_seen = True

        w.register_post_accumulate_grad_hook(seen)
        self._watched_weight = weakref.ref(w)

    def _check_forgotten_update(self) -> None:
        """Called by a training forward that finds statistics pending. Gradient accumulation records
        several forwards before one step, so pending statistics alone are fine; they are stale when
        the optimizer has stepped since they were recorded, seen as (a) an in-place change of the
        weight (its version counter; fused optimizers do not bump it) or (b) a gradient accumulated
        into the weight, then gone again (``zero_grad()``). A heuristic: it misses a fused optimizer
        used with ``zero_grad(set_to_none=False)``."""
        w = self.weight
        stepped = w._version != self._stats_weight_version or (self._backward_seen and w.requires_grad and w.grad is None)
        if stepped and self.check_forgotten_update and not self._forgotten_warned:
            self._forgotten_warned = True
            warnings.warn(FORGOTTEN_UPDATE_MESSAGE, MissingHebbianUpdateWarning, stacklevel=4)

    @torch.compiler.disable
    @torch.no_grad()
    def _record(self, hidden: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> None:
        if self._stats is None:
            self._stats_weight_version = self.weight._version
            self._backward_seen = False
        else:
            self._check_forgotten_update()
        self._watch_weight_gradient()
        h = hidden.detach().reshape(-1, hidden.shape[-1])
        t = targets.detach().reshape(-1).to(torch.int64)
        if t.numel() != h.shape[0]:
            raise ValueError(f"hidden has {h.shape[0]} positions but targets has {t.numel()}")
        if self.uses_triton(h):
            new = hebbian_statistics(h, t, self.num_classes, ignore_index)
            self._stats = new if self._stats is None else merge_statistics(self._stats, new, self.num_classes)
            return
        # Ignored positions go to the sentinel class `num_classes` (dropped when the stats are read)
        # instead of being filtered by a boolean mask (one host sync fewer).
        t = torch.where(t == ignore_index, torch.full_like(t, self.num_classes), t)
        ids, inverse, n = torch.unique(t, return_inverse=True, return_counts=True)
        dtype = torch.promote_types(h.dtype, torch.float32)
        sums = torch.zeros(ids.numel(), h.shape[1], dtype=dtype, device=h.device)
        sums.index_add_(0, inverse, h.to(dtype))
        new = (ids, n, sums)
        self._stats = new if self._stats is None else merge_class_statistics([self._stats, new])

    def pending_statistics(self) -> ClassStats | None:
        """This rank's recorded ``(ids, counts, activation sums)`` since the last update (ignored
        positions excluded), or None. For inspection and tests."""
        if self._stats is None:
            return None
        ids, n, sums = self._stats
        keep = ids < self.num_classes
        return ids[keep], n[keep], sums[keep]

    def clear_statistics(self) -> None:
        self._stats = None

    # -- the update -------------------------------------------------------------------------------
    @torch.no_grad()
    def hebbian_update_(self, optimizer=None) -> None:
        """Apply the rule with the statistics recorded since the last call (after ``optimizer.step()``),
        then clear them. A no-op when nothing is pending (except that under DDP every rank takes part
        in the all-gather, so no rank can hang waiting for another)."""
        triton = self.uses_triton(self.weight)
        if distributed_sync_active(self.sync_distributed, self.process_group):
            stats = all_gather_class_statistics(self.pending_statistics(),  # without the ignore sentinel
                                                self.in_features, self.weight.device, self.process_group)
        elif triton:
            stats = self._stats  # the kernels skip the sentinel slots themselves: no filtering, no host sync
        else:
            stats = self.pending_statistics()
        self._stats = None
        if stats is None:
            return
        if self.rule == "centred":
            self._centred_update_(stats, triton, optimizer)
            return
        # (start_step == 0 is decided without reading `updates`: the Triton path stays free of host syncs)
        write = self.start_step == 0 or int(self.updates) >= self.start_step
        self.updates += 1
        if not write:  # warm-up: the counts advance, no row is written
            ids, n = stats[0], stats[1]
            keep = ids < self.num_classes  # Triton statistics carry sentinel slots
            self.counts.index_add_(0, ids[keep].to(self.counts.device), n[keep].to(self.counts.dtype))
            return
        mix = hebbian_mix_triton_ if triton else hebbian_mix_
        mix(self.weight.data, self.counts, *stats, self.gamma, self.smoothing_limit, self.rescale)

    def _centred_update_(self, stats: ClassStats | SlotStats, triton: bool, optimizer=None) -> None:
        """The centred rule's step: running statistics, then (from ``start_step`` on) the write and,
        with ``write_momentum="scale"``, the written rows' momentum scaled by ``1 − λ``, then
        ``updates += 1``; the four Triton kernels or their PyTorch statement
        (:mod:`lmmem.kernels.hebbian_centred`). The Triton path reads ``updates`` on the device only."""
        ids, n, sums = stats
        mix_dtype = torch.promote_types(torch.promote_types(self.weight.dtype, sums.dtype), torch.float32)
        lam = self.mixing_rates(ids, mix_dtype)
        if self.write_momentum == "scale":
            # λ of the rows this step writes (0 before start_step), read before the write advances the counts
            writing = (self.updates >= self.start_step).to(lam.dtype)
            self._scale_momentum_(optimizer, ids, 1.0 - lam * writing, slots=triton)
        hebbian_centred_update_(self.weight.data, self.counts, ids, n, sums, lam, self.activation_mean,
                                self.running_row_norm, self.updates, self.start_step, self.mean_decay,
                                self.write_norm, use_triton=triton)
        self.updates += 1

    def _scale_momentum_(self, optimizer, ids: torch.Tensor, factor: torch.Tensor, slots: bool = False) -> None:
        """:func:`~lmmem.kernels.hebbian_rule.scale_first_moment_` on the state the optimizer keeps for
        the weight (given, or the one :meth:`attach_to_optimizer` saw); warns once when there is none."""
        optimizer = optimizer if optimizer is not None else (self._optimizer() if self._optimizer is not None else None)
        state = None if optimizer is None else optimizer.state.get(self.weight)
        if not state:
            if not self._momentum_warned:
                self._momentum_warned = True
                warnings.warn(MOMENTUM_UNSEEN_MESSAGE, stacklevel=4)
            return
        scale_first_moment_(state, self.weight.shape, ids, factor, slots)

    def attach_to_optimizer(self, optimizer):
        handle = super().attach_to_optimizer(optimizer)
        self._optimizer = weakref.ref(unwrap_optimizer(optimizer))
        return handle

    def mixing_rates(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The centred rule's λ for the statistics slots ``ids`` (sentinel ids allowed; their λ is never
        used), from the counts *before* this batch: ``max(1/(c+1), γ)`` while ``c < T``, else 0
        (:func:`~lmmem.kernels.hebbian_rule.hebbian_lambda`), with ``T = later_limit`` once
        :attr:`passes` ≥ 1. Vectorised, no host sync; the kernels take it as an input, so a different
        schedule is a change here only."""
        safe = ids.clamp(max=self.num_classes - 1).to(self.counts.device)
        return hebbian_lambda(self.counts.index_select(0, safe), self.gamma, self.smoothing_limit, dtype,
                              self.later_limit, self.passes)

    def start_pass(self, completed: int) -> None:
        """Tell the rule that a pass over the training data begins, after ``completed`` whole passes
        (0 for the first). lmmem's trainer and :class:`lmmem.hf.HebbianSoftmaxCallback` call it at
        every epoch start, a resumed run included; a loop of one's own calls it likewise. Without it,
        the rule stays in its first-pass schedule (``smoothing_limit``)."""
        self.passes.fill_(int(completed))

    @torch.no_grad()
    def update_running_statistics_(self, ids: torch.Tensor, n: torch.Tensor, sums: torch.Tensor) -> None:
        """Fold one step's (all-rank, per-class) statistics into ``activation_mean`` (μ) and
        ``running_row_norm``, as the update does before writing the rows
        (:func:`~lmmem.kernels.hebbian_rule.update_running_statistics_`); does not advance ``updates``."""
        update_running_statistics_(self.activation_mean, self.running_row_norm, self.weight, ids, n, sums,
                                   int(self.updates), self.mean_decay)

    def on_optimizer_step(self, optimizer=None) -> None:
        self.hebbian_update_(optimizer)
