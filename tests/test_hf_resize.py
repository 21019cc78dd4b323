"""resize_token_embeddings (and tokenizer.add_tokens + resize) on Hugging Face models whose head is an
lmmem layer: tiny GPT-2 (tied) and Llama (untied), CPU, offline. The head, its counts and rule state
survive; new rows are initialised as transformers initialises a stock model's and counted as never seen."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="lmmem[hf] extra not installed")

from test_hf import ARCHS, V, batch, tiny, train_plain_loop  # noqa: E402

from lmmem.errors import LmmemError  # noqa: E402
from lmmem.hf import HebbianLMHead, apply_hebbian_softmax, from_pretrained  # noqa: E402
from lmmem.hf.resize import per_class_buffers  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
RULE_STATE = ("activation_mean", "running_row_norm", "updates", "passes")


def trained(arch: str):
    """A model with the default Hebbian head after a few steps (counts, running statistics, updates
    all non-trivial), and a stock twin with the same weights."""
    model = tiny(arch)
    apply_hebbian_softmax(model, start_step=0)
    train_plain_loop(model, steps=4)
    model.zero_grad(set_to_none=True)  # (transformers resizes embeddings in place: a stale .grad of the old size would stay)
    head = model.get_output_embeddings()
    assert head.counts.sum() > 0 and int(head.updates) == 4 and head.activation_mean.abs().sum() > 0
    stock = tiny(arch)
    stock.load_state_dict({k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] not in ("counts", *RULE_STATE)})
    return model, stock


def test_per_class_state_is_found_from_the_layer_itself():
    assert per_class_buffers(HebbianLMHead(8, 8)) == ["counts"]  # not activation_mean, even when D == V


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mean_resizing", [True, False])
def test_resize_keeps_the_head_and_its_state_new_rows_as_transformers(arch, mean_resizing):
    model, stock = trained(arch)
    head = model.get_output_embeddings()
    before = {n: b.clone() for n, b in head.named_buffers()}
    old_weight = head.weight.detach().clone()
    new_v = V + 7
    torch.manual_seed(5)
    stock.resize_token_embeddings(new_v, mean_resizing=mean_resizing)
    torch.manual_seed(5)
    model.resize_token_embeddings(new_v, mean_resizing=mean_resizing)
    assert model.get_output_embeddings() is head and isinstance(head, HebbianLMHead)
    assert head.num_classes == new_v and head.weight.shape == (new_v, 32) and head.counts.shape == (new_v,)
    assert torch.equal(head.counts[:V], before["counts"]) and int(head.counts[V:].abs().sum()) == 0  # new: never seen
    for name in RULE_STATE:
        assert torch.equal(getattr(head, name), before[name]), name
    assert model.config.vocab_size == new_v
    assert (head.weight is model.get_input_embeddings().weight) == (arch == "gpt2")  # ties survive
    # every weight, the new rows included, is what transformers gives the stock twin
    torch.testing.assert_close(head.weight[:V], old_weight, rtol=0, atol=0)
    torch.testing.assert_close(head.weight, stock.get_output_embeddings().weight, rtol=0, atol=0)
    torch.testing.assert_close(model.get_input_embeddings().weight, stock.get_input_embeddings().weight, rtol=0, atol=0)
    ids = torch.tensor([[1, 5, V + 2, 9, V + 6, 3]])
    model.eval(), stock.eval()
    logits = model(ids).logits
    assert logits.shape == (1, 6, new_v) and torch.equal(logits, stock(ids).logits)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 10) and torch.equal(out, stock.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                                                                      do_sample=False))


@pytest.mark.parametrize("arch", ARCHS)
def test_training_after_resize_counts_and_writes_new_rows_and_round_trips(arch, tmp_path):
    model, _ = trained(arch)
    head = model.get_output_embeddings()
    model.resize_token_embeddings(V + 4)
    before = head.counts.clone()
    rows = head.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # built after the resize, as with a stock model
    from lmmem.hf import attach_to_optimizer

    attach_to_optimizer(model, opt)
    model.train()
    ids, labels = batch(seed=2)
    ids[:, 5] = labels[:, 5] = V + 1  # a new token, seen as a target for the first time
    ids[0, 9] = labels[0, 9] = V + 3
    model(input_ids=ids, labels=labels).loss.backward()
    opt.step()
    targets = labels[:, 1:].reshape(-1)
    targets = targets[targets != -100]
    assert torch.equal(head.counts, before + torch.bincount(targets, minlength=V + 4))
    assert int(head.counts[V + 1]) == ids.shape[0] and int(head.counts[V + 3]) == 1 and int(head.counts[V + 2]) == 0
    assert not torch.allclose(head.weight[V + 1], rows[V + 1])  # written by the rule (λ = 1 at a first sighting)
    model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path)
    head2 = loaded.get_output_embeddings()
    assert isinstance(head2, HebbianLMHead) and head2.num_classes == V + 4
    for name, buf in head.named_buffers():
        assert torch.equal(getattr(head2, name), buf), name
    model.eval(), loaded.eval()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    # the loaded model resizes again (its own wrapper), with its state
    loaded.resize_token_embeddings(V + 6, pad_to_multiple_of=8)
    assert head2.num_classes == 72 and torch.equal(head2.counts[: V + 4], head.counts) and head2.counts[V + 4:].sum() == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_add_tokens_then_resize_and_shrinking(arch, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(V)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")
    model, stock = trained(arch)
    head = model.get_output_embeddings()
    counts = head.counts.clone()
    assert tokenizer.add_tokens(["kangaroo", "wallaby"]) == 2
    model.resize_token_embeddings(len(tokenizer))
    ids = tokenizer("w3 kangaroo w7 wallaby", return_tensors="pt").input_ids
    assert ids.tolist() == [[3, V, 7, V + 1]]
    assert head.counts.shape == (V + 2,) and torch.equal(head.counts[:V], counts) and head.counts[V:].sum() == 0
    model.eval()
    assert model(ids).logits.shape == (1, 4, V + 2)
    # shrinking drops the last rows and their counts, as transformers drops the rows
    model.resize_token_embeddings(V - 3)
    stock.resize_token_embeddings(V - 3)
    assert head.counts.shape == (V - 3,) and torch.equal(head.counts, counts[: V - 3])
    assert torch.equal(head.weight, stock.get_output_embeddings().weight)


def test_resize_between_forward_and_step_is_refused_and_changes_nothing():
    model, _ = trained("llama")
    head = model.get_output_embeddings()
    ids, labels = batch()
    model.train()
    model(input_ids=ids, labels=labels).loss.backward()  # statistics pending until the optimizer step
    weight = head.weight
    with pytest.raises(LmmemError, match="between a training forward and its optimizer step"):
        model.resize_token_embeddings(V + 3)
    assert model.get_output_embeddings() is head and head.weight is weight and model.config.vocab_size == V
    assert model.get_input_embeddings().weight.shape[0] == V


def test_a_refused_apply_leaves_resize_as_it_was():
    model = tiny("llama")
    inner = model.forward

    def forward(*args, **kwargs):
        out = inner(*args, **kwargs)
        out.logits = 3 * torch.tanh(out.logits / 3)  # post-processed logits: apply refuses
        return out

    model.forward = forward
    with pytest.raises(LmmemError, match="not lm_head"):
        apply_hebbian_softmax(model)
    assert "resize_token_embeddings" not in vars(model)
    plain = copy.deepcopy(model)
    plain.resize_token_embeddings(V + 2)
    assert plain.lm_head.weight.shape[0] == V + 2
