"""KeyValueMemory (Kaiser et al. 2017): lookup, loss, update rule, ages, batching, checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmmem.errors import LmmemError
from lmmem.memories.kv_memory import KeyValueMemory, KVMemoryConfig


def identity_memory(d=4, slots=6, classes=5, k=3, age_noise=0.1, margin=0.1) -> KeyValueMemory:
    """A memory whose controller is the identity, so queries are just the normalised inputs."""
    mem = KeyValueMemory(KVMemoryConfig(d, classes, key_size=d, memory_size=slots, k=k, age_noise=age_noise, margin=margin))
    with torch.no_grad():
        mem.controller.weight.copy_(torch.eye(d))
        mem.controller.bias.zero_()
    return mem


def e(i, d=4):
    return F.one_hot(torch.tensor(i), d).float()


def test_empty_memory_predicts_minus_one_and_defaults():
    mem = KeyValueMemory(KVMemoryConfig(input_size=8, num_classes=3))
    assert (mem.config.k, mem.config.key_size, mem.config.memory_size, mem.config.margin) == (256, 128, 8192, 0.1)
    out = mem(torch.randn(2, 8), update=False)
    assert out.prediction.tolist() == [-1, -1]


def test_prediction_is_value_of_nearest_key():
    mem = identity_memory()
    mem.keys[0], mem.values[0] = e(0), 3
    mem.keys[1], mem.values[1] = e(1), 4
    out = mem(torch.stack([e(1) + 0.1 * e(0), e(0)]), update=False)
    assert out.prediction.tolist() == [4, 3]
    assert torch.allclose(out.query.norm(dim=1), torch.ones(2))


def test_correct_hit_moves_key_towards_query_and_resets_age():
    mem = identity_memory()
    mem.keys[2], mem.values[2] = e(0), 1
    mem.ages[:] = torch.tensor([5, 5, 7, 5, 5, 5])
    x = e(0) + e(1)  # nearest is slot 2, label 1: a hit
    mem(x.unsqueeze(0), torch.tensor([1]))
    q = F.normalize(x, dim=0)
    assert torch.allclose(mem.keys[2], F.normalize(q + e(0), dim=0))
    assert mem.values[2] == 1
    assert mem.ages.tolist() == [6, 6, 0, 6, 6, 6]  # the hit resets, every other slot ages by one
    assert mem.recent_slot[1] == 2


def test_miss_overwrites_oldest_slot():
    mem = identity_memory(age_noise=0.5)  # noise < 1 only breaks ties
    mem.keys[0], mem.values[0] = e(0), 2
    mem.ages[:] = torch.tensor([1, 3, 9, 2, 4, 0])
    x = e(0)  # nearest slot 0 holds 2, label 4: a miss
    mem(x.unsqueeze(0), torch.tensor([4]))
    assert mem.values[2] == 4 and torch.allclose(mem.keys[2], e(0))
    assert mem.values[0] == 2 and torch.allclose(mem.keys[0], e(0))  # the wrong key is left alone
    assert mem.ages.tolist() == [2, 4, 0, 3, 5, 1]
    assert mem.recent_slot[4] == 2


def test_batched_misses_take_distinct_oldest_slots_and_collisions_are_deterministic():
    def run():
        mem = identity_memory(slots=6, age_noise=0.5)
        mem.keys[0], mem.values[0] = e(0), 0
        mem.ages[:] = torch.tensor([0, 10, 9, 8, 1, 2])
        # queries 0 and 1 both hit slot 0 (label 0): only the first writes; queries 2, 3 miss.
        x = torch.stack([e(0) + 0.2 * e(1), e(0) + 0.2 * e(2), e(3), e(3) + e(2)])
        mem(x, torch.tensor([0, 0, 1, 2]))
        return mem

    mem = run()
    q0 = F.normalize(e(0) + 0.2 * e(1), dim=0)
    assert torch.allclose(mem.keys[0], F.normalize(q0 + e(0), dim=0))  # first writer wins
    assert mem.values[1] == 1 and mem.values[2] == 2  # misses: the two oldest, in batch order
    assert mem.ages.tolist() == [0, 0, 0, 9, 2, 3]
    again = run()
    for name in ("keys", "values", "ages", "recent_slot"):
        assert torch.equal(getattr(mem, name), getattr(again, name))


def test_loss_margin_and_fallback_to_recent_slot():
    mem = identity_memory(k=2, margin=0.1)
    mem.keys[0], mem.values[0] = e(0), 1  # correct
    mem.keys[1], mem.values[1] = F.normalize(e(0) + e(1), dim=0), 2  # wrong, very close
    mem.keys[2], mem.values[2] = e(2), 3
    x = (e(0) + 0.5 * e(1)).unsqueeze(0)
    q = F.normalize(x[0], dim=0)
    out = mem(x, torch.tensor([1]), update=False)
    expected = max(0.0, float(q @ mem.keys[1] - q @ mem.keys[0]) + 0.1)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    # Label 3 is not among the k=2 neighbours: the slot last written for 3 stands in as the positive.
    mem.recent_slot[3] = 2
    out = mem(x, torch.tensor([3]), update=False)
    best_wrong = max(float(q @ mem.keys[0]), float(q @ mem.keys[1]))
    assert out.loss.item() == pytest.approx(best_wrong - float(q @ mem.keys[2]) + 0.1, abs=1e-6)


def test_loss_is_differentiable_in_the_controller_only():
    torch.manual_seed(0)
    mem = KeyValueMemory(KVMemoryConfig(6, 4, key_size=5, memory_size=16, k=4))
    with torch.no_grad():
        mem.keys.copy_(F.normalize(torch.randn(16, 5), dim=1))
        mem.values.copy_(torch.arange(16) % 4)
    x = torch.randn(3, 6, requires_grad=True)
    out = mem(x, torch.tensor([0, 1, 2]))  # training mode: updates in place after the loss
    out.loss.backward()
    assert mem.controller.weight.grad is not None and mem.controller.weight.grad.abs().sum() > 0
    assert x.grad is not None
    assert not mem.keys.requires_grad


def test_state_dict_round_trip():
    torch.manual_seed(0)
    cfg = KVMemoryConfig(6, 4, key_size=5, memory_size=16, k=4)
    mem = KeyValueMemory(cfg)
    for _ in range(5):
        mem(torch.randn(4, 6), torch.randint(0, 4, (4,)))
    state = mem.state_dict()
    assert {"keys", "values", "ages", "recent_slot"} <= set(state)
    other = KeyValueMemory(cfg)
    other.load_state_dict(state)
    x = torch.randn(7, 6)
    assert torch.equal(mem(x, update=False).prediction, other(x, update=False).prediction)
    for name in ("keys", "values", "ages", "recent_slot"):
        assert torch.equal(getattr(mem, name), getattr(other, name))


def test_one_shot_recall():
    """Written once, a class is recalled from a perturbed query (the point of the memory)."""
    torch.manual_seed(0)
    mem = identity_memory(d=32, slots=64, classes=20, k=8)
    protos = F.normalize(torch.randn(20, 32), dim=1)
    mem(protos, torch.arange(20))
    assert mem.occupancy() == 20
    pred = mem(protos + 0.1 * torch.randn(20, 32), update=False).prediction
    assert (pred == torch.arange(20)).float().mean() > 0.9


def test_bad_input_raises_lmmem_error():
    mem = identity_memory()
    with pytest.raises(LmmemError, match="shape"):
        mem(torch.randn(2, 3))
    with pytest.raises(LmmemError, match="labels"):
        mem(torch.randn(2, 4), torch.tensor([0, 9]))
    with pytest.raises(LmmemError, match="labels"):
        mem(torch.randn(2, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(LmmemError, match="positive"):
        KVMemoryConfig(4, 0).validate()
    with pytest.raises(LmmemError, match="exceeds"):
        mem(torch.randn(7, 4), torch.zeros(7, dtype=torch.long))
