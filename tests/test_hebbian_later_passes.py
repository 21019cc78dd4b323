"""The centred rule's limit in later passes (``later_limit``, off by default): from the second pass
over the training data on, a class seen ``later_limit`` or more times is no longer written. The layer
learns of passes from ``start_pass``, which lmmem's trainer and the Hugging Face callback call at
every epoch start.

Fresh random counts on every run; the λ of every class is checked against the formula in float64.
"""

from __future__ import annotations

import json

import pytest
import torch

from lmmem.output_layers import FullSoftmax, HebbianSoftmax
from lmmem.training.config import TrainConfig


def expected_lambda(counts: torch.Tensor, gamma: float, limit: float) -> torch.Tensor:
    lam = (1.0 / (counts.double() + 1.0)).clamp_min(gamma)
    return torch.where(counts.double() < limit, lam, torch.zeros_like(lam))


@pytest.mark.parametrize("T, later", [(10, 3), (10, 0), (4, 9), (None, 2)])
def test_lambda_uses_T_in_the_first_pass_and_the_later_limit_after(T, later):
    V = 41
    layer = HebbianSoftmax(5, V, smoothing_limit=T, later_limit=later, gamma=0.05)
    layer.counts.copy_(torch.randint(0, 14, (V,)))
    ids = torch.randint(0, V + 3, (29,))  # sentinel ids past the last class too, as the Triton slots carry
    ids[:5] = ids[5]  # a repeated id
    safe = ids.clamp(max=V - 1)
    first = float("inf") if T is None else T
    for passes, limit in ((0, first), (1, later), (3, later), (0, first)):
        layer.start_pass(passes)
        got = layer.mixing_rates(ids, torch.float64)
        torch.testing.assert_close(got, expected_lambda(layer.counts[safe], 0.05, limit), rtol=0, atol=0)
    assert layer.passes.dtype == torch.int64 and "passes" in layer.state_dict()


def test_default_is_one_T_in_every_pass_and_validation():
    from lmmem.output_layers.hebbian_softmax import DEFAULT_LATER_LIMIT

    assert DEFAULT_LATER_LIMIT == {"centred": None, "paper": None}
    assert HebbianSoftmax(4, 10).later_limit is None and HebbianSoftmax(4, 10, rule="paper").later_limit is None
    layer = HebbianSoftmax(4, 10)
    layer.counts.copy_(torch.arange(90, 100))
    before = layer.mixing_rates(torch.arange(10), torch.float64)
    layer.start_pass(2)
    assert torch.equal(layer.mixing_rates(torch.arange(10), torch.float64), before) and bool((before > 0).all())
    for bad in ({"later_limit": -2}, {"rule": "paper", "later_limit": 3}):
        with pytest.raises(ValueError, match="later_limit"):
            HebbianSoftmax(4, 10, **bad)
    FullSoftmax(4, 10).start_pass(3)  # a plain softmax ignores passes


def test_a_state_saved_before_the_option_loads():
    new = HebbianSoftmax(6, 11, later_limit=4)
    new.start_pass(3)
    old = HebbianSoftmax(6, 11, later_limit=4)
    old.load_state_dict({k: v for k, v in new.state_dict().items() if k != "passes"})  # as lmmem saved it before
    assert old.later_limit == 4 and int(old.passes) == 0  # until the trainer tells it the pass
    assert torch.equal(old.weight, new.weight)


def test_the_trainer_tells_the_layer_every_pass_and_a_resumed_run_again(tmp_path, small_corpus):
    from lmmem.checkpoints import load_checkpoint
    from lmmem.training import train
    from lmmem.training.run_folder import resume_config

    tiny = dict(data=str(small_corpus), preset="tiny", batch_size=4, bptt=8, embed_dim=16, hidden_dim=24, proj_dim=16,
                eval_interval=0, progress=False, warmup_steps=1, softmax="hebbian", hebbian_T_later=2, max_steps=10_000)
    seen = []
    original = HebbianSoftmax.start_pass

    def spy(self, completed):
        seen.append(int(completed))
        original(self, completed)

    HebbianSoftmax.start_pass = spy
    try:
        train(TrainConfig(out=str(tmp_path / "run"), max_epochs=2, **tiny))
        assert seen == [0, 1]
        ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
        assert int(ckpt["model"]["output.passes"]) == 1 and ckpt["model_config"]["softmax_options"]["later_limit"] == 2
        seen.clear()
        cfg = resume_config(tmp_path / "run", {"max_epochs": 3})
        train(cfg)
        assert seen[0] == ckpt["progress"]["epoch"] and seen[-1] == 2  # told at the start of the resumed fit, then per pass
    finally:
        HebbianSoftmax.start_pass = original


def test_config_plumbing_and_runs_saved_before_the_option(tmp_path, small_corpus):
    from lmmem.checkpoints import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
    from lmmem.evaluation.cli import main as main_evaluate
    from lmmem.training import train
    from lmmem.training.run_folder import resume_config, run_state

    assert TrainConfig(softmax="hebbian").model_config(7).softmax_options["later_limit"] is None
    assert TrainConfig(softmax="hebbian", hebbian_T_later=5).model_config(7).softmax_options["later_limit"] == 5
    assert "later_limit" not in TrainConfig(softmax="hebbian", hebbian_rule="paper").model_config(7).softmax_options
    tiny = dict(data=str(small_corpus), preset="tiny", batch_size=4, bptt=8, embed_dim=16, hidden_dim=24, proj_dim=16,
                max_steps=3, eval_interval=0, progress=False, warmup_steps=1, softmax="hebbian")
    out = tmp_path / "old"
    train(TrainConfig(out=str(out), **tiny))
    for name in ("last.pt", "best.pt"):  # as lmmem saved runs before the option
        ckpt = load_checkpoint(out / name)
        assert ckpt["train_config"].pop("hebbian_T_later") == -1
        assert ckpt["model_config"]["softmax_options"].pop("later_limit") is None
        ckpt["model"].pop("output.passes")
        save_checkpoint({k: v for k, v in ckpt.items() if k not in ("kind", "format_version")}, out / name)
    assert resume_config(out, {"max_steps": 5}).hebbian_T_later == -1  # one T in every pass, as trained
    assert run_state(out, TrainConfig(out=str(out), **tiny)) == "finished"
    assert run_state(out, TrainConfig(out=str(out), hebbian_T_later=5, **tiny)) == "new"
    old = load_checkpoint(out / "best.pt")
    model = model_from_checkpoint(old)  # and evaluates: evaluate.py's loader
    assert int(model.output.passes) == 0
    assert main_evaluate([str(out / "best.pt"), "--split", "valid", "--batch-size", "4"]) == 0
    old["model"].pop("output.weight")  # a key the layer does not fill is still refused, in one line
    with pytest.raises(CheckpointError, match="do not fit"):
        model_from_checkpoint(old)
    train(resume_config(out, {"max_steps": 5}))  # and it resumes
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 5


def test_cli_refuses_a_negative_later_limit_in_one_line(tmp_path):
    from tests.conftest import run_script

    proc = run_script("train.py", "--softmax", "hebbian", "--hebbian-T-later", "-3", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "--hebbian-T-later" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_hf_callback_tells_the_head_the_epoch_and_the_setting_is_saved(tmp_path):
    transformers = pytest.importorskip("transformers")
    from types import SimpleNamespace

    from lmmem.hf import HebbianSoftmaxCallback, apply_hebbian_softmax, from_pretrained, lmmem_head

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=23, n_positions=32))
    apply_hebbian_softmax(model, later_limit=3)
    head = lmmem_head(model)
    for epoch, passes in ((0.0, 0), (1.0, 1), (2.5, 2)):  # a resumed run starts mid-epoch
        HebbianSoftmaxCallback().on_epoch_begin(None, SimpleNamespace(epoch=epoch), None, model=model)
        assert int(head.passes) == passes
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["lmmem_head"]["options"]["later_limit"] == 3
    loaded = lmmem_head(from_pretrained(tmp_path))
    assert loaded.later_limit == 3 and int(loaded.passes) == 2
    config = json.loads((tmp_path / "config.json").read_text())
    del config["lmmem_head"]["options"]["later_limit"]  # as lmmem wrote it before the option existed
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert lmmem_head(from_pretrained(tmp_path)).later_limit is None  # the default: one T in every pass


def test_hf_trainer_over_three_epochs_tells_the_head_each_pass(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmmem.hf import HebbianSoftmaxCallback, apply_hebbian_softmax, lmmem_head

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=29, n_positions=32))
    apply_hebbian_softmax(model, later_limit=2)
    head = lmmem_head(model)
    rows = torch.randint(0, 29, (12, 10))
    seen = []

    class Spy(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(int(head.passes))

    args = transformers.TrainingArguments(output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=4, report_to=[],
                                          save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in rows],
                         callbacks=[HebbianSoftmaxCallback(), Spy()]).train()
    assert seen == [0, 0, 0, 1, 1, 1, 2, 2, 2]
