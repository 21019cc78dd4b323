"""Key-value memory for rare events (Kaiser, Nachum, Roy, Bengio, "Learning to Remember Rare
Events", ICLR 2017).

A life-long memory module that can sit on top of any network. It holds ``memory_size`` slots, each a
unit-norm key (``key_size``), an integer value (a class label, ``-1`` = empty) and an age.

Lookup
------
The network output ``x`` goes through a trainable projection (the *controller*, ``nn.Linear``) and is
L2-normalised: ``q = normalise(W x)``. The ``k`` nearest keys by cosine similarity (``q · K_i``, keys
being unit-norm) are found; the prediction is the value of the nearest key. Only that nearest-neighbour
*search* (``topk``) is non-differentiable: the similarities of the k retrieved keys are recomputed
from a gathered copy of those keys, so the loss is differentiable in ``q`` (and hence in ``W`` and the
network), while the keys themselves are buffers moved only by the update rule.

Memory loss (the paper's eq. 2)
-------------------------------
``loss = max(0, s(q, K_neg) − s(q, K_pos) + α)`` with ``α = 0.1`` by default, where ``K_pos`` is the
most similar of the k retrieved keys whose value is the label and ``K_neg`` the most similar one whose
value is not. When no retrieved key holds the label, the slot *last written* for that label stands in
for ``K_pos`` (``recent_slot``; as in the public TensorFlow code, which keeps ``recent_idx`` per label;
for a label never written that is slot 0, i.e. an arbitrary key). When all k retrieved keys are correct
there is no wrong key to push away and the loss of that query is 0.

Update (the paper's section 3)
------------------------------
After the lookup, for each query with its label:

* if the nearest key's value is the label, that key becomes ``normalise(q + K)`` and its age is reset;
* otherwise ``(q, label)`` overwrites the *oldest* slot (ages plus uniform noise in ``[0, age_noise)``
  decide, so that among equally old slots one is picked at random), age reset to 0;
* every other slot ages by one per update call (one call = one training step).

Batches are vectorised. The incorrect queries of a batch take *distinct* oldest slots (the ``B``
largest noisy ages, as the public code's ``top_k(age, batch_size)``). When several queries of one
batch would write the same slot (two correct queries sharing a nearest key, or a correct query whose
nearest key is also among the oldest being overwritten), the *first* of them in batch order writes and
the others do not: an integer ``scatter_reduce(amin)`` over the batch index decides, so the result is
deterministic on every device (no float ``index_add_`` whose order would vary on GPU).

State: keys, values, ages and ``recent_slot`` are persistent buffers, saved and restored with the
``state_dict`` (the memory is never reset during training). The age-noise generator is seeded from the
config and is *not* checkpointed (it only breaks ties among equally old slots).

Defaults follow the public code (``tensorflow/models/research/learning_to_remember_rare_events``):
``k = 256``, ``key_size = 128``, ``memory_size = 8192``, ``α = 0.1``, ``age_noise = 8``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmmem.errors import LmmemError


@dataclass(frozen=True)
class KVMemoryConfig:
    input_size: int  # features of the network output fed to the controller
    num_classes: int  # labels are 0 .. num_classes-1 (sizes the per-label "last written slot" table)
    key_size: int = 128
    memory_size: int = 8192
    k: int = 256  # neighbours retrieved for the loss
    margin: float = 0.1  # α
    age_noise: float = 8.0  # uniform noise added to ages when choosing the oldest slot
    seed: int = 0  # for the age noise only

    def validate(self) -> None:
        for name in ("input_size", "num_classes", "key_size", "memory_size", "k"):
            if getattr(self, name) <= 0:
                raise LmmemError(f"KVMemoryConfig.{name} must be positive, got {getattr(self, name)}")
        if self.age_noise < 0:
            raise LmmemError(f"KVMemoryConfig.age_noise must be >= 0, got {self.age_noise}")


@dataclass
class MemoryOutput:
    prediction: torch.Tensor  # (B,) value of the nearest key (-1 where the memory is empty)
    loss: torch.Tensor  # scalar mean memory loss (0 when no labels were given)
    query: torch.Tensor  # (B, key_size) the normalised query (differentiable)
    nearest_similarity: torch.Tensor  # (B,) cosine similarity of the nearest key
    per_query_loss: torch.Tensor | None = None  # (B,)


class KeyValueMemory(nn.Module):
    """Life-long key-value memory. ``forward(x, labels)`` looks up, computes the loss and (in training
    mode, with labels) updates the memory; ``labels=None`` or ``update=False`` only looks up."""

    def __init__(self, config: KVMemoryConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.controller = nn.Linear(config.input_size, config.key_size)  # the query projection
        self.register_buffer("keys", torch.zeros(config.memory_size, config.key_size))
        self.register_buffer("values", torch.full((config.memory_size,), -1, dtype=torch.long))
        self.register_buffer("ages", torch.zeros(config.memory_size, dtype=torch.long))
        self.register_buffer("recent_slot", torch.zeros(config.num_classes, dtype=torch.long))
        self._noise = torch.Generator().manual_seed(config.seed)  # per module, CPU; not checkpointed

    def extra_repr(self) -> str:
        c = self.config
        return f"memory_size={c.memory_size}, key_size={c.key_size}, k={c.k}, margin={c.margin}"

    # -- lookup -----------------------------------------------------------------------------------
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised query ``normalise(W x)``."""
        if x.dim() != 2 or x.shape[1] != self.config.input_size:
            raise LmmemError(f"KeyValueMemory expects inputs of shape (batch, {self.config.input_size}), got {tuple(x.shape)}")
        return F.normalize(self.controller(x), dim=-1)

    def _check_labels(self, labels: torch.Tensor, batch: int) -> torch.Tensor:
        if labels.shape != (batch,) or labels.dtype not in (torch.int64, torch.int32):
            raise LmmemError(f"labels must be an integer tensor of shape ({batch},), got {labels.dtype} {tuple(labels.shape)}")
        if batch and (int(labels.min()) < 0 or int(labels.max()) >= self.config.num_classes):
            raise LmmemError(f"labels must lie in [0, {self.config.num_classes}); got min {int(labels.min())}, max {int(labels.max())}")
        return labels.long()

    def lookup(self, q: torch.Tensor, labels: torch.Tensor | None = None) -> tuple[MemoryOutput, torch.Tensor]:
        """Nearest neighbours of the normalised queries ``q`` and the loss; returns the output and the
        index of the nearest slot per query (for the update)."""
        k = min(self.config.k, self.config.memory_size)
        with torch.no_grad():  # the non-differentiable part: the search
            idx = torch.topk(q.detach() @ self.keys.T, k, dim=1).indices  # (B, k), sorted
        sims = torch.einsum("bd,bkd->bk", q, self.keys[idx])  # gathered copy: differentiable in q only
        nearest = idx[:, 0]
        prediction = self.values[nearest]
        per_query = None
        loss = q.new_zeros(())
        if labels is not None:
            correct = self.values[idx] == labels.unsqueeze(1)  # (B, k)
            neg_inf = torch.finfo(sims.dtype).min
            pos = sims.masked_fill(~correct, neg_inf).max(dim=1).values
            # No correct key among the k: the slot last written for the label stands in.
            fallback = (q * self.keys[self.recent_slot[labels]]).sum(-1)
            pos = torch.where(correct.any(dim=1), pos, fallback)
            has_neg = (~correct).any(dim=1)
            neg = sims.masked_fill(correct, neg_inf).max(dim=1).values
            per_query = torch.where(has_neg, F.relu(neg - pos + self.config.margin), torch.zeros_like(pos))
            loss = per_query.mean() if per_query.numel() else loss
        out = MemoryOutput(prediction=prediction, loss=loss, query=q, nearest_similarity=sims[:, 0], per_query_loss=per_query)
        return out, nearest

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None, update: bool | None = None) -> MemoryOutput:
        q = self.query(x)
        if labels is not None:
            labels = self._check_labels(labels, q.shape[0])
        out, nearest = self.lookup(q, labels)
        if update is None:
            update = self.training
        if update and labels is not None:
            self.update_(q.detach(), labels, nearest)
        return out

    # -- write ------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_(self, q: torch.Tensor, labels: torch.Tensor, nearest: torch.Tensor | None = None) -> None:
        """Apply the update rule for normalised queries ``q`` (B, key_size) with ``labels`` (B,)."""
        B = q.shape[0]
        if B == 0:
            return
        if B > self.config.memory_size:
            raise LmmemError(f"batch of {B} queries exceeds the memory's {self.config.memory_size} slots")
        if nearest is None:
            nearest = torch.argmax(q @ self.keys.T, dim=1)
        hit = self.values[nearest] == labels
        # The B oldest slots (noisy ages, distinct), handed out to the misses in batch order.
        noise = torch.rand(self.config.memory_size, generator=self._noise) * self.config.age_noise
        oldest = torch.topk(self.ages.float() + noise.to(self.ages.device), B).indices
        miss_rank = torch.cumsum((~hit).long(), 0) - 1
        slots = torch.where(hit, nearest, oldest[miss_rank.clamp_min(0)])
        # One writer per slot: the first query in batch order (integer amin: deterministic anywhere).
        order = torch.arange(B, device=q.device)
        first = torch.full((self.config.memory_size,), B, dtype=torch.long, device=q.device)
        first.scatter_reduce_(0, slots, order, reduce="amin")
        win = first[slots] == order
        slots, q, labels, hit = slots[win], q[win], labels[win], hit[win]
        new_keys = torch.where(hit.unsqueeze(1), F.normalize(q + self.keys[slots], dim=-1), q)
        self.ages += 1
        self.keys[slots] = new_keys.to(self.keys.dtype)
        self.values[slots] = labels
        self.ages[slots] = 0
        # Per label, the last writer in batch order is its "recent" slot (integer amax: deterministic).
        pos = torch.arange(slots.numel(), device=q.device)
        last = torch.full((self.config.num_classes,), -1, dtype=torch.long, device=q.device)
        last.scatter_reduce_(0, labels, pos, reduce="amax")
        written = last >= 0
        self.recent_slot[written] = slots[last[written]]

    def occupancy(self) -> int:
        return int((self.values >= 0).sum())
