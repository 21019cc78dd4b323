"""Hebbian softmax under DDP: two gloo processes on CPU against one process with the same global batch.

With the statistics all-gathered (the default) both replicas end bit-identical to each other and equal
(to rounding) to the single-process run, Hebbian rows and counts included; with the sync disabled the
replicas' Hebbian rows diverge, which shows the sync is what keeps them together.
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from lmmem.models import ModelConfig, build_model
from lmmem.output_layers.base import IGNORE_INDEX

WORLD = 2
STEPS = 4
ROWS, BPTT, VOCAB = 4, 6, 37  # global batch: 4 rows, 2 per rank


def make_cfg(rule: str = "paper") -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB,
        embed_dim=8,
        hidden_dim=12,
        proj_dim=8,
        dropout=0.0,
        output_dropout=0.0,
        tie_weights=True,
        softmax="hebbian",
        # the centred rule from its 2nd update on: its warm-up and running statistics under DDP too
        softmax_options={"gamma": 0.2, "smoothing_limit": 3, "rule": rule, "start_step": 0 if rule == "paper" else 1},
    )


def train(model, steps, rows: slice, loss_scale: float, lr: float = 0.3) -> dict:
    """SGD on ``loss_scale * (sum of token losses)`` of ``rows`` of each step; Hebbian update attached."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    module = getattr(model, "module", model)  # unwrap DDP
    module.output.attach_to_optimizer(opt)
    for inputs, targets in steps:
        opt.zero_grad()
        loss, _ = model(inputs[rows], targets[rows], None, reduction="sum")
        (loss * loss_scale).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _worker(rank, init_file, state, steps, out_dir, rule):
    try:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
        per = ROWS // WORLD
        rows = slice(rank * per, (rank + 1) * per)
        results = {}
        for sync in (True, False):
            model = build_model(make_cfg(rule)).double()
            model.load_state_dict(state)
            model.output.sync_distributed = sync
            # DDP averages gradients over ranks: (s_0 + s_1) / WORLD, matched by the reference below
            results[sync] = train(DDP(model), steps, rows, loss_scale=1.0)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["paper", "centred"])
def test_ddp_two_processes_match_one_process(tmp_path, rule):
    model = build_model(make_cfg(rule)).double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    steps = []
    for j in range(STEPS):
        x = torch.randint(0, VOCAB, (ROWS, BPTT))
        y = torch.randint(0, VOCAB // 2, (ROWS, BPTT)) * 2  # few classes: repeats within and across ranks
        y[0, :2] = VOCAB - 1  # a class only rank 0 sees
        y[3, -1] = VOCAB - 2  # a class only rank 1 sees (an odd id: no other target has one)
        if j == 2:
            y[2:] = IGNORE_INDEX  # rank 1 has nothing to record this step but must still take part
        steps.append((x, y))

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, str(tmp_path / "init"), state, steps, str(tmp_path), rule)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    errors = [(tmp_path / f"rank{r}.err").read_text() for r in range(WORLD) if (tmp_path / f"rank{r}.err").exists()]
    assert not errors, "\n".join(errors)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    # one process, the same global batch, loss = global sum / WORLD (what DDP's gradient average computes)
    model.load_state_dict(state)
    ref = train(model, steps, slice(None), loss_scale=1.0 / WORLD)

    synced = [r[True] for r in ranks]
    for k in ref:
        assert torch.equal(synced[0][k], synced[1][k]), f"replicas differ in {k}"
        if k.endswith("counts"):
            assert torch.equal(synced[0][k], ref[k]), k
        else:
            torch.testing.assert_close(synced[0][k], ref[k], rtol=1e-9, atol=1e-9, msg=k)
    assert int(ref["output.counts"].sum()) == sum(int((y != IGNORE_INDEX).sum()) for _, y in steps)
    assert not torch.allclose(ref["embedding.weight"], state["embedding.weight"])

    unsynced = [r[False] for r in ranks]
    assert not torch.allclose(unsynced[0]["output.weight"], unsynced[1]["output.weight"]), "without the sync, replicas should diverge"
    assert not torch.equal(unsynced[0]["output.counts"], unsynced[1]["output.counts"])
