"""The centred rule's ``write_momentum``: a write of row i with rate λ_i multiplies the optimizer's
first moment of that row (Adam's exp_avg, SGD's momentum_buffer) by 1 − λ_i, and nothing else.

Fresh random inputs on every run, odd shapes, repeated labels and ignored positions; float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from lmmem.constants import IGNORE_INDEX
from lmmem.kernels.hebbian_rule import hebbian_lambda
from lmmem.output_layers import HebbianSoftmax
from lmmem.training.config import TrainConfig

D, V = 7, 13


def layer64(**kw) -> HebbianSoftmax:
    kw.setdefault("start_step", 0)
    layer = HebbianSoftmax(D, V, rule="centred", **kw).double()
    layer.train()
    return layer


def batch(n: int = 17):
    t = torch.randint(0, V, (n,))
    t[:4] = t[4]  # a repeated label for certain
    t[torch.randperm(n)[:3]] = IGNORE_INDEX
    return torch.randn(n, D, dtype=torch.float64), t


def step(layer, opt, hidden, targets):
    """A training step; returns (first moment after optimizer.step(), λ of every class for this write)."""
    opt.zero_grad()
    layer.loss(hidden, targets).backward()
    opt.step()
    state = opt.state[layer.weight]
    first = (state["exp_avg"] if "exp_avg" in state else state["momentum_buffer"]).clone()
    lam = hebbian_lambda(layer.counts, layer.gamma, layer.smoothing_limit, torch.float64)
    if int(layer.updates) < layer.start_step:
        lam = torch.zeros_like(lam)
    present = torch.zeros(V, dtype=torch.bool)
    present[targets[targets != IGNORE_INDEX]] = True
    return first, torch.where(present, lam, torch.zeros_like(lam))


@pytest.mark.parametrize("make_opt", [lambda p: torch.optim.Adam(p, lr=0.05),
                                      lambda p: torch.optim.AdamW(p, lr=0.05, foreach=False),
                                      lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)], ids=["adam", "adamw", "sgd-momentum"])
def test_scale_multiplies_the_written_rows_first_moment_by_one_minus_lambda(make_opt):
    layer = layer64(write_momentum="scale", smoothing_limit=6, start_step=2)  # saturates within the run
    opt = make_opt(layer.parameters())
    seen_partial = False
    for _ in range(7):
        h, t = batch()
        first, lam = step(layer, opt, h, t)
        layer.on_optimizer_step(opt)
        state = opt.state[layer.weight]
        after = state["exp_avg"] if "exp_avg" in state else state["momentum_buffer"]
        torch.testing.assert_close(after, first * (1 - lam).unsqueeze(1), rtol=1e-12, atol=0)
        seen_partial |= bool(((lam > 0) & (lam < 1)).any())
    assert seen_partial and int(layer.counts.max()) >= 6  # written rows at 0 < λ < 1, and saturated rows (λ = 0)
    if "exp_avg_sq" in opt.state[layer.weight]:
        assert (opt.state[layer.weight]["exp_avg_sq"] > 0).any()  # second moments are left as Adam made them


def test_keep_leaves_the_optimizer_alone_and_the_rows_do_not_depend_on_the_choice():
    torch.manual_seed(torch.seed())
    a, b = layer64(write_momentum="keep"), layer64(write_momentum="scale")
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = torch.optim.Adam(a.parameters(), lr=0.05), torch.optim.Adam(b.parameters(), lr=0.05)
    h, t = batch()
    first, lam = step(a, opt_a, h, t)
    step(b, opt_b, h, t)
    a.on_optimizer_step(opt_a)
    b.on_optimizer_step(opt_b)
    assert (lam > 0).any()
    assert torch.equal(opt_a.state[a.weight]["exp_avg"], first)
    assert torch.equal(a.weight, b.weight)  # one step: the write itself is the same
    assert not torch.equal(opt_b.state[b.weight]["exp_avg"], first)


def test_attached_optimizer_is_used_and_an_unseen_one_warns_once():
    layer = layer64(write_momentum="scale")
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    layer.attach_to_optimizer(opt)
    h, t = batch()
    layer.loss(h, t).backward()
    opt.step()  # the hook runs the update with the optimizer that stepped
    written = t[t != IGNORE_INDEX].unique()
    assert torch.equal(opt.state[layer.weight]["exp_avg"][written], torch.zeros(len(written), D, dtype=torch.float64))  # λ = 1

    lone = layer64(write_momentum="scale")
    lone_opt = torch.optim.Adam(lone.parameters(), lr=0.05)
    with pytest.warns(UserWarning, match="cannot see the optimizer"):
        step(lone, lone_opt, *batch())
        lone.on_optimizer_step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(lone, lone_opt, *batch())
        lone.on_optimizer_step()  # once only


def test_sentinel_slots_scale_like_the_filtered_ids():
    """The Triton statistics path carries sentinel ids past the last class: the (V,) factor vector
    used there equals the index path on the real ids."""
    layer = layer64(write_momentum="scale")
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    step(layer, opt, *batch())
    buf = opt.state[layer.weight]["exp_avg"]
    ids = torch.randperm(V)[:6]
    factor = torch.rand(6, dtype=torch.float64)
    expected = buf.clone()
    expected[ids] *= factor.unsqueeze(1)
    saved = buf.clone()
    layer._scale_momentum_(opt, ids, factor)
    torch.testing.assert_close(buf, expected, rtol=0, atol=0)
    buf.copy_(saved)
    slot_ids = torch.cat([ids, torch.full((5,), V), torch.full((2,), V + 3)])[torch.randperm(13)]
    slot_factor = torch.ones(13, dtype=torch.float64)
    for i, c in enumerate(slot_ids.tolist()):
        if c < V:
            slot_factor[i] = factor[(ids == c).nonzero()[0, 0]]
        else:
            slot_factor[i] = 0.25  # whatever a sentinel slot holds, it must not be used
    layer._scale_momentum_(opt, slot_ids, slot_factor, slots=True)
    torch.testing.assert_close(buf, expected, rtol=0, atol=0)


def test_validation_and_training_config_plumbing():
    with pytest.raises(ValueError, match="write_momentum must be one of"):
        HebbianSoftmax(D, V, write_momentum="reset")
    with pytest.raises(ValueError, match="centred' only"):
        HebbianSoftmax(D, V, rule="paper", write_momentum="scale")
    cfg = TrainConfig(softmax="hebbian", hebbian_write_momentum="scale")
    assert cfg.model_config(V).softmax_options["write_momentum"] == "scale"
    assert "write_momentum" not in TrainConfig(softmax="hebbian", hebbian_rule="paper").model_config(V).softmax_options
    assert HebbianSoftmax(D, V, rule="paper").write_momentum == "keep"


def test_hf_callback_passes_the_trainer_optimizer_and_the_setting_is_saved(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmmem.hf import HebbianSoftmaxCallback, apply_hebbian_softmax, lmmem_head

    vocab = 29
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=vocab, n_positions=32))
    apply_hebbian_softmax(model, start_step=0, write_momentum="scale")
    head = lmmem_head(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, vocab, (3, 11))
    model(ids, labels=ids).loss.backward()
    opt.step()
    first = opt.state[head.weight]["exp_avg"].clone()
    written = ids[:, 1:].unique()
    HebbianSoftmaxCallback().on_optimizer_step(None, None, None, model=model, optimizer=opt)
    after = opt.state[head.weight]["exp_avg"]
    assert torch.equal(after[written], torch.zeros_like(after[written]))  # first sightings: λ = 1
    others = torch.ones(vocab, dtype=torch.bool)
    others[written] = False
    assert torch.equal(after[others], first[others])
    model.save_pretrained(tmp_path)
    assert model.config.lmmem_head["options"]["write_momentum"] == "scale"


def test_a_run_saved_before_the_option_resumes_and_is_reused_as_it_was_trained(tmp_path, small_corpus):
    """Runs saved without hebbian_write_momentum were trained with 'keep': resume_config fills that,
    not today's default ('scale'), and run_state compares what the runs used (full-softmax runs are
    unaffected by the option)."""
    from lmmem.checkpoints import load_checkpoint, save_checkpoint
    from lmmem.training import train
    from lmmem.training.run_folder import resume_config, run_state

    tiny = dict(data=str(small_corpus), preset="tiny", batch_size=4, bptt=8, embed_dim=16, hidden_dim=24, proj_dim=16,
                max_steps=3, eval_interval=0, progress=False, warmup_steps=1)
    for softmax in ("hebbian", "full"):
        out = tmp_path / softmax
        cfg = TrainConfig(out=str(out), softmax=softmax, **tiny)
        train(cfg)
        for name in ("last.pt", "best.pt"):
            ckpt = load_checkpoint(out / name)
            assert ckpt["train_config"].pop("hebbian_write_momentum") == "auto"
            ckpt["model_config"]["softmax_options"].pop("write_momentum", None)
            save_checkpoint({k: v for k, v in ckpt.items() if k not in ("kind", "format_version")}, out / name)
        if softmax == "full":  # the option does nothing there: the run is these settings
            assert run_state(out, TrainConfig(out=str(out), softmax=softmax, **tiny)) == "finished"
            continue
        assert resume_config(out, {"max_steps": 5}).hebbian_write_momentum == "keep"
        assert run_state(out, TrainConfig(out=str(out), softmax=softmax, hebbian_write_momentum="keep", **tiny)) == "finished"
        # today's default ("auto" = the rule's, "scale") is not what the run was trained with
        assert run_state(out, TrainConfig(out=str(out), softmax=softmax, **tiny)) == "new"
        assert run_state(out, TrainConfig(out=str(out), softmax=softmax, hebbian_write_momentum="scale", **tiny)) == "new"
        train(resume_config(out, {"max_steps": 5}))  # and it resumes: its model_config lacks the option too
        assert load_checkpoint(out / "last.pt")["model_config"]["softmax_options"]["write_momentum"] == "keep"


def test_an_hf_head_saved_before_the_option_loads_as_it_was_trained(tmp_path):
    transformers = pytest.importorskip("transformers")
    import json

    from lmmem.hf import apply_hebbian_softmax, from_pretrained, lmmem_head

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=23, n_positions=32))
    apply_hebbian_softmax(model)
    assert lmmem_head(model).write_momentum == "scale"  # today's default for the centred rule
    model.save_pretrained(tmp_path)
    assert lmmem_head(from_pretrained(tmp_path)).write_momentum == "scale"
    config = json.loads((tmp_path / "config.json").read_text())
    del config["lmmem_head"]["options"]["write_momentum"]  # as lmmem wrote it before the option existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert lmmem_head(from_pretrained(tmp_path)).write_momentum == "keep"

