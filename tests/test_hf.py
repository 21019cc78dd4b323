"""lmmem.hf: the softmax layers as the head of Hugging Face causal LMs (tiny random GPT-2 and Llama
configs, CPU, offline), the Trainer callback, wrapped optimizers, the forgotten-attach warning,
save_pretrained → from_pretrained, and exports of train.py runs."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="lmmem[hf] extra not installed")

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from lmmem.errors import LmmemError  # noqa: E402
from lmmem.hf import (  # noqa: E402
    HebbianLMHead, HebbianSoftmaxCallback, apply_fused_softmax, apply_hebbian_softmax, attach_to_optimizer, from_pretrained,
)
from lmmem.output_layers.hebbian_softmax import MissingHebbianUpdateWarning, hebbian_update_reference  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
V, T = 61, 16
transformers.logging.set_verbosity_error()  # tiny configs make transformers warn about token ids


def tiny(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "gpt2":  # tied input/output embeddings (GPT-2's default)
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=V, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                         attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      vocab_size=V, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg)


def batch(n: int = 4, seed: int = 0, ignore_tail: int = 3):
    """Learnable sequences (each token = previous + step, mod V) with the last ``ignore_tail`` labels -100."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, V, (n, 1), generator=g)
    step = torch.randint(1, 3, (n, 1), generator=g)
    ids = (start + step * torch.arange(T)) % V
    labels = ids.clone()
    if ignore_tail:
        labels[:, -ignore_tail:] = -100
    return ids, labels


def seen_targets(labels: torch.Tensor) -> torch.Tensor:
    """HF's shifted targets of a label batch, ignored ones dropped."""
    t = labels[:, 1:].reshape(-1)
    return t[t != -100]


ARCHS = ["gpt2", "llama"]


def test_import_lmmem_does_not_import_transformers():
    code = ("import sys, lmmem, lmmem.output_layers, lmmem.training, lmmem.evaluation, lmmem.training.export; "
            "bad = [m for m in ('transformers', 'accelerate') if m in sys.modules]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("arch", ARCHS)
def test_apply_keeps_logits_ties_and_generate(arch):
    model = tiny(arch).eval()
    ids, _ = batch()
    logits = model(ids).logits
    generated = model.generate(ids[:, :4], attention_mask=torch.ones_like(ids[:, :4]), max_new_tokens=6, do_sample=False)
    old_weight = model.get_output_embeddings().weight
    apply_hebbian_softmax(model, gamma=0.05)
    head = model.get_output_embeddings()
    assert isinstance(head, HebbianLMHead) and head.gamma == 0.05
    assert head.weight is old_weight  # the pretrained head is the layer's initial rows
    assert (head.weight is model.get_input_embeddings().weight) == (arch == "gpt2")  # tied stays tied
    assert torch.equal(model(ids).logits, logits)
    out = model.generate(ids[:, :4], attention_mask=torch.ones_like(ids[:, :4]), max_new_tokens=6, do_sample=False)
    assert out.shape == (4, 10) and torch.equal(out, generated)
    assert model.config.lmmem_head["layer"] == "hebbian"
    # the head's state starts as in a layer built the ordinary way
    fresh = dict(HebbianLMHead(32, V, bias=False).named_buffers())
    for name, buf in head.named_buffers():
        assert buf.dtype == fresh[name].dtype and torch.equal(buf, fresh[name]), name


def test_applying_to_a_model_saved_with_a_head_warns(tmp_path):
    model = tiny("llama")
    apply_hebbian_softmax(model)
    model.save_pretrained(tmp_path)
    plain = LlamaForCausalLM.from_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="lmmem.hf.from_pretrained"):
        apply_hebbian_softmax(plain)


def test_apply_patches_only_the_model_given_not_its_shared_config(tmp_path):
    """A config object is shared by every model built from it: applying the head to one model must
    not make a stock baseline from the same config save and load as an lmmem model."""
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=V, n_positions=64)
    h = GPT2LMHeadModel(cfg)
    h.transformer.h[0].eval()  # a part the user keeps in eval mode stays there (the probe restores each module's mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "saved with an lmmem head" warning on a fresh model
        apply_hebbian_softmax(h, gamma=0.05)
    assert not hasattr(cfg, "lmmem_head") and h.config.lmmem_head["layer"] == "hebbian"
    assert h.transformer.config is h.config  # the model's own modules share its (private) copy
    assert h.training and not h.transformer.h[0].training and h.transformer.h[1].training
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = GPT2LMHeadModel(cfg)
        apply_fused_softmax(GPT2LMHeadModel(cfg))  # a second model from the config: no false warning
    assert not hasattr(s.config, "lmmem_head")
    s.save_pretrained(tmp_path / "stock")
    h.save_pretrained(tmp_path / "hebbian")
    stock = from_pretrained(tmp_path / "stock")
    assert type(stock.get_output_embeddings()) is torch.nn.Linear and not hasattr(stock.config, "lmmem_head")
    loaded = from_pretrained(tmp_path / "hebbian")
    assert isinstance(loaded.get_output_embeddings(), HebbianLMHead) and loaded.get_output_embeddings().gamma == 0.05


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_items", [False, True])
def test_fused_loss_and_gradients_equal_the_stock_model(arch, num_items):
    """float64: the patched forward's loss and every parameter gradient equal the unpatched model's
    (HF's shift, -100 ignored, num_items_in_batch as the Trainer passes it), and no logits come back."""
    stock = tiny(arch).double().train()
    model = copy.deepcopy(stock)
    apply_fused_softmax(model)
    ids, labels = batch(ignore_tail=5)
    labels[0, 3] = -100
    kwargs = {"num_items_in_batch": torch.tensor(97)} if num_items else {}
    ref = stock(input_ids=ids, labels=labels, **kwargs)
    out = model(input_ids=ids, labels=labels, **kwargs)
    assert out.logits is None
    # (HF computes its loss in float32 even for a float64 model: hence the float32-level tolerance)
    torch.testing.assert_close(out.loss, ref.loss.double(), rtol=1e-6, atol=1e-7)
    ref.loss.backward()
    out.loss.backward()
    for (name, p), q in zip(stock.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    # positional labels and return_dict=False take the fused path too
    loss_tuple = model(ids, None, None, return_dict=False, labels=labels)
    torch.testing.assert_close(loss_tuple[0], stock(ids, labels=labels).loss.double(), rtol=1e-6, atol=1e-7)


def train_plain_loop(model, steps: int, lr: float = 3e-3, **attach):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    attach_to_optimizer(model, opt)
    model.train()
    losses, seen = [], []
    for step in range(steps):
        ids, labels = batch(seed=step % 4)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        seen.append(seen_targets(labels))
    return losses, torch.cat(seen)


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_loop_trains_counts_and_rows_follow_the_rule(arch):
    model = tiny(arch).double()
    apply_hebbian_softmax(model, rule="paper")  # the rule with an exact per-class reference (the centred one is
    head = model.get_output_embeddings()        # tested against its own in tests/test_hebbian_rules.py)
    # one step checked against the float64 reference of the rule: θ̂ captured right after the
    # optimizer step (a hook registered before the layer's), the activations at the head's input
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    snap = {}
    opt.register_step_post_hook(lambda *_: snap.update(w=head.weight.detach().clone(), c=head.counts.clone()))
    attach_to_optimizer(model, opt)
    grab = head.register_forward_hook(lambda mod, inp, out: snap.update(h=inp[0].detach().clone()))
    model.train()
    ids, labels = batch(seed=7)
    labels[1, 2:6] = labels[1, 1]  # repeated targets in one batch
    model(input_ids=ids, labels=labels).loss.backward()
    opt.step()
    grab.remove()
    targets = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    w_ref, c_ref = hebbian_update_reference(snap["w"], snap["c"], snap["h"].reshape(-1, 32), targets.reshape(-1),
                                            gamma=head.gamma, smoothing_limit=head.smoothing_limit)
    torch.testing.assert_close(head.weight.detach(), w_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(head.counts, c_ref)
    moved = torch.unique(seen_targets(labels))
    assert not torch.equal(head.weight[moved], snap["w"][moved])  # rows really moved
    # then a few steps with Adam: the loss goes down and counts equal the non-ignored labels seen
    model = tiny(arch)
    apply_hebbian_softmax(model)
    losses, seen = train_plain_loop(model, steps=30)
    head = model.get_output_embeddings()
    assert torch.equal(head.counts, torch.bincount(seen, minlength=V))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert head.pending_statistics() is None


@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_from_pretrained_round_trip(arch, tmp_path, caplog):
    model = tiny(arch)
    apply_hebbian_softmax(model, gamma=0.02, smoothing_limit=100)
    train_plain_loop(model, steps=4)
    model.save_pretrained(tmp_path)
    transformers.logging.set_verbosity_warning()
    try:
        type(model).from_pretrained(tmp_path)  # the stock loader reports the counts as stray keys...
        assert "lm_head.counts" in caplog.text
        caplog.clear()
        loaded = from_pretrained(tmp_path)
        assert "UNEXPECTED" not in caplog.text  # ...lmmem's does not: it restores them
    finally:
        transformers.logging.set_verbosity_error()
    head, head2 = model.get_output_embeddings(), loaded.get_output_embeddings()
    assert isinstance(head2, HebbianLMHead) and (head2.gamma, head2.smoothing_limit) == (0.02, 100)
    assert head.counts.sum() > 0 and torch.equal(head2.counts, head.counts)
    assert (head2.weight is loaded.get_input_embeddings().weight) == (arch == "gpt2")
    # a head applied with default options saves the T in effect (a later default does not change it)
    from lmmem.hf.patch import CONFIG_KEY
    assert getattr(apply_hebbian_softmax(tiny(arch)).config, CONFIG_KEY)["options"] == {"smoothing_limit": 100, "write_momentum": "scale", "later_limit": None}
    ids, _ = batch(seed=3)
    model.eval(), loaded.eval()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    # a resumed fine-tune continues counting from the saved counts
    before = head2.counts.clone()
    _, seen = train_plain_loop(loaded, steps=2)
    assert torch.equal(head2.counts, before + torch.bincount(seen, minlength=V))
    # sharded checkpoints: the counts are found in whichever shard holds them
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    assert torch.equal(from_pretrained(tmp_path / "sharded").get_output_embeddings().counts, head.counts)
    # a model saved without an lmmem head loads as a plain model
    plain = tiny(arch)
    plain.save_pretrained(tmp_path / "plain")
    assert isinstance(from_pretrained(tmp_path / "plain").get_output_embeddings(), torch.nn.Linear)


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_trainer_with_gradient_accumulation(arch, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny(arch)
    examples = []
    for seed in range(4):
        ids, labels = batch(seed=seed)
        examples += [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=16, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             learning_rate=3e-3, warmup_steps=0, logging_steps=1, report_to="none", save_strategy="no",
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=examples)
    apply_hebbian_softmax(model, trainer=trainer)  # adds HebbianSoftmaxCallback
    assert sum(isinstance(cb, HebbianSoftmaxCallback) for cb in trainer.callback_handler.callbacks) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingHebbianUpdateWarning)  # accumulation is not a forgotten update
        trainer.train()
    head = model.get_output_embeddings()
    # 16 examples, 8 per optimizer step: 16 steps = 8 epochs over every example
    all_labels = torch.stack([e["labels"] for e in examples])
    assert torch.equal(head.counts, 8 * torch.bincount(seen_targets(all_labels), minlength=V))
    assert head.pending_statistics() is None
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 16 and sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, losses
    metrics = trainer.evaluate(examples[:8])  # eval mode: the stock path (logits + HF's loss), nothing recorded
    assert 0 < metrics["eval_loss"] < losses[0] and head.pending_statistics() is None
    model.eval()
    out = model.generate(all_labels[:2, :4], attention_mask=torch.ones(2, 4, dtype=torch.long), max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 9)


def test_wrapped_optimizers_and_schedulers_are_unwrapped():
    from accelerate import Accelerator

    model = tiny("llama")
    apply_hebbian_softmax(model)
    head = model.get_output_embeddings()
    accelerator = Accelerator(cpu=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, wrapped = accelerator.prepare(model, opt)
    assert type(wrapped).__name__ == "AcceleratedOptimizer"
    handles = attach_to_optimizer(model, wrapped)
    ids, labels = batch()
    for _ in range(2):
        accelerator.backward(model(input_ids=ids, labels=labels).loss)
        wrapped.step()
        wrapped.zero_grad()
    assert torch.equal(head.counts, 2 * torch.bincount(seen_targets(labels), minlength=V))
    for h in handles:
        h.remove()
    # an LR scheduler stands for its optimizer
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    head.attach_to_optimizer(sched)
    model(input_ids=ids, labels=labels).loss.backward()
    opt.step()
    sched.step()
    assert torch.equal(head.counts, 3 * torch.bincount(seen_targets(labels), minlength=V))
    with pytest.raises(LmmemError, match="on_optimizer_step"):
        head.attach_to_optimizer(object())


@pytest.mark.parametrize("fused", [False, True])
def test_forgotten_attach_warns_once(fused):
    model = tiny("gpt2")
    apply_hebbian_softmax(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused)  # a fused optimizer leaves the version counter alone
    model.train()
    ids, labels = batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # gradient accumulation: two micro-batches before the step is fine
            model(input_ids=ids, labels=labels).loss.backward()
        assert not [w for w in caught if w.category is MissingHebbianUpdateWarning]
        opt.step()
        opt.zero_grad()
        for _ in range(3):
            model(input_ids=ids, labels=labels).loss.backward()
            opt.step()
            opt.zero_grad()
    forgot = [w for w in caught if w.category is MissingHebbianUpdateWarning]
    assert len(forgot) == 1 and "attach_to_optimizer" in str(forgot[0].message)
    assert int(model.get_output_embeddings().counts.sum()) == 0


def test_refusals_name_the_fix():
    model = tiny("gpt2")
    apply_hebbian_softmax(model)
    with pytest.raises(LmmemError, match="already has an lmmem head"):
        apply_hebbian_softmax(model)
    with pytest.raises(LmmemError, match="takes no option"):
        apply_fused_softmax(tiny("llama"), loss_options={"no_such_option": 1})
    softcapped = tiny("llama")
    softcapped.config.final_logit_softcapping = 30.0
    with pytest.raises(LmmemError, match="post-processes its logits"):
        apply_hebbian_softmax(softcapped)
    scaled = tiny("llama")  # a model that changes its logits after the head, unknown to the config check
    inner = scaled.forward

    def forward(*args, **kwargs):
        out = inner(*args, **kwargs)
        out.logits = 3 * torch.tanh(out.logits / 3)  # a soft-cap the config does not announce
        return out

    scaled.forward = forward
    head = scaled.lm_head
    with pytest.raises(LmmemError, match="not lm_head"):
        apply_hebbian_softmax(scaled)
    assert scaled.lm_head is head and scaled.forward is forward and not hasattr(scaled.config, "lmmem_head")  # untouched
    with pytest.raises(LmmemError, match="gamma"):
        apply_hebbian_softmax(tiny("llama"), gamma=2.0)
    with pytest.raises(LmmemError, match="no_such"):
        apply_hebbian_softmax(tiny("llama"), no_such=1)


# -- exports of train.py runs ----------------------------------------------------------------------
def test_export_run_and_evaluate_it(small_corpus, tmp_path):
    from lmmem.evaluation import evaluate
    from lmmem.training import config_from_args, train
    from lmmem.checkpoints import load_export
    from lmmem.training.export import export_run

    run = tmp_path / "run"
    train(config_from_args({"data": str(small_corpus), "out": str(run), "preset": "tiny", "softmax": "hebbian", "max_steps": 6,
                            "batch_size": 4, "bptt": 16, "tie_weights": True, "embed_dim": 32, "hidden_dim": 48,
                            "proj_dim": 32, "eval_tokens": 200, "progress": False}))
    out = export_run(run / "last.pt", tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]
    model, vocab, config = load_export(out)
    assert len(vocab) == config["vocab_size"] == 200 and model.output.counts.sum() > 0
    assert model.output.weight is model.embedding.weight  # tied weights come back tied
    a = evaluate(run / "last.pt", split="valid", max_tokens=300, progress=False)
    b = evaluate(out, split="valid", max_tokens=300, progress=False)
    assert b.plain.loss == a.plain.loss and b.meta["step"] == a.meta["step"] == 6
    with pytest.raises(LmmemError, match="never overwrites"):
        export_run(run / "last.pt", out)


@pytest.mark.slow
def test_export_cli_and_its_errors(small_corpus, tmp_path):
    from conftest import run_script

    run = tmp_path / "run"
    run_script("train.py", "--data", str(small_corpus), "--out", str(run), "--max-steps", "2", "--batch-size", "4", "--bptt", "8",
               "--embed-dim", "16", "--hidden-dim", "24", "--proj-dim", "16", "--eval-tokens", "100", check=True)
    ok = run_script("-m", "lmmem.training.export", str(run / "last.pt"), "--out", str(tmp_path / "exp"), check=True)
    assert "exported" in ok.stdout
    again = run_script("-m", "lmmem.training.export", str(run / "last.pt"), "--out", str(tmp_path / "exp"))
    missing = run_script("-m", "lmmem.training.export", str(tmp_path / "nothing.pt"), "--out", str(tmp_path / "exp2"))
    for proc in (again, missing):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")
    assert not (tmp_path / "exp2").exists()
    ev = run_script("evaluate.py", str(tmp_path / "exp"), "--split", "valid", "--max-tokens", "100", check=True)
    assert "valid" in ev.stdout


@pytest.mark.slow
def test_hf_head_comparison_runs(small_corpus, tmp_path):
    from lmmem.experiments.hf_head_comparison import main

    out = tmp_path / "cmp.json"
    assert main(["--data", str(small_corpus), "--steps", "3", "--seeds", "1", "--n-embd", "16", "--n-head", "2", "--n-layer", "1",
                 "--context", "16", "--batch-size", "4", "--valid-windows", "8", "--json", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert set(result["summary"]) == {"stock", "fused", "hebbian"}
    runs = {r["head"]: r for r in result["runs"]}
    assert runs["fused"]["train_losses"] == pytest.approx(runs["stock"]["train_losses"], rel=1e-4)  # same model, same loss
