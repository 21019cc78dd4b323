"""The evaluation engine on Hugging Face causal LMs (tiny random GPT-2, Llama and GPT-NeoX; a
tokenizer trained here; no hub): the plain score is the model's own, Hugging Face's strided loop
and lm-evaluation-harness's rolling loglikelihood are reproduced, the memories run on the hidden
state captured at the output embedding, and models that break the assumption are refused."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hf_helpers import hf_folder, tiny_model, train_tokenizer, write_text_folder
from lmmem.errors import LmmemError
from lmmem.evaluation import EvalConfig, Evaluation, Methods, evaluate
from lmmem.memories import CacheConfig, MbPAConfig

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def text_and_tokenizer(tmp_path_factory):
    text = write_text_folder(tmp_path_factory.mktemp("hf") / "text")
    return text, train_tokenizer([text / "train.txt"])


def columns(ev: Evaluation, methods: Methods | None = None, path=None) -> tuple:
    """(result, per-token log-probabilities of every method by stream position)."""
    import tempfile
    from pathlib import Path

    path = Path(path or tempfile.mkdtemp()) / "wp.tsv"
    res = ev.run(methods, word_probs=path)
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    out = {m: np.full(len(ev.data.tokens), np.nan) for m in head[5:]}
    for line in lines[1:]:
        cells = line.split("\t")
        for j, m in enumerate(head[5:], 5):
            out[m][int(cells[0])] = float(cells[j])
    return res, out


@pytest.mark.parametrize("kind", ["gpt2", "llama", "neox"])
def test_plain_nll_is_the_models_own_in_float64(kind, text_and_tokenizer):
    text, tok = text_and_tokenizer
    model = tiny_model(kind, len(tok)).double()
    W = 16
    ev = Evaluation(model, tokenizer=tok, data=str(text), config=EvalConfig(bptt=W, batch_size=3, streams=3, max_tokens=400),
                    progress=False)
    _, cols = columns(ev)
    got = cols["plain"]
    ids = torch.as_tensor(ev.data.tokens.astype(np.int64))
    windows = ev.windows(ev.data).groups()[0]
    ref = np.full(len(ids), np.nan)
    hf_losses = []
    with torch.no_grad():
        for step in range(windows.steps):
            b = windows.batch(step)
            for r in range(b.inputs.shape[0]):
                pos = b.positions[r]
                keep = pos >= 0
                if not keep.any():
                    continue
                x = ids[pos[keep][0] - 1 : pos[keep][-1] + 1][None]  # the window: inputs and its last target
                out = model(input_ids=x, labels=x)
                nll = F.cross_entropy(out.logits[0, :-1], x[0, 1:], reduction="none")  # float64 logits, float64 loss
                ref[pos[keep]] = -nll.numpy()
                hf_losses.append((float(out.loss), float(nll.mean())))
    assert np.isnan(got[0]) and not np.isnan(got[1:]).any()
    np.testing.assert_allclose(got[1:], ref[1:], rtol=1e-9, atol=1e-12)
    # the model's own .loss: Hugging Face computes it from logits cast to float32 (ForCausalLMLoss), hence 1e-6
    for own, mean in hf_losses:
        assert own == pytest.approx(mean, rel=1e-6)


def hf_documented_strided_loop(model, ids: torch.Tensor, max_length: int, stride: int, *, float64: bool = False,
                               page_count: bool = False) -> float:
    """The loop of Hugging Face's "Perplexity of fixed-length models" page (``float64``: the loss
    computed in float64 from the same logits instead of the model's float32 ``loss``).

    The page weights each window's mean loss by ``num_valid_tokens − batch_size`` (``page_count``):
    right for the first window, one token short for every later one, whose first label is already
    −100 before the shift drops it. By default the loop weights by the labels the loss really
    averaged (those left after the shift), which makes it the exact per-token mean."""
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
            if float64:
                neg_log_likelihood = F.cross_entropy(outputs.logits[0, :-1], target_ids[0, 1:], ignore_index=-100)
            else:
                neg_log_likelihood = outputs.loss
        if page_count:
            num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
        else:
            num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += float(neg_log_likelihood) * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.parametrize("max_length,stride", [(17, 8), (32, 16), (20, 19), (12, 5)])
def test_sliding_equals_the_documented_strided_loop(max_length, stride, text_and_tokenizer):
    text, tok = text_and_tokenizer
    model = tiny_model("gpt2", len(tok)).double()
    res = evaluate(model, tokenizer=tok, data=str(text), window="sliding", bptt=max_length - 1, context=max_length - 1 - stride,
                   batch_size=3, max_tokens=600, progress=False)
    ids = torch.as_tensor(Evaluation(model, tokenizer=tok, data=str(text), config=EvalConfig(max_tokens=600),
                                     progress=False).data.tokens.astype(np.int64))[None]
    assert res.plain.tokens == ids.size(1) - 1
    assert res.plain.perplexity == pytest.approx(hf_documented_strided_loop(model, ids, max_length, stride, float64=True), rel=1e-10)
    assert res.plain.perplexity == pytest.approx(hf_documented_strided_loop(model, ids, max_length, stride), rel=1e-6)
    page = hf_documented_strided_loop(model, ids, max_length, stride, float64=True, page_count=True)
    if stride < max_length:  # the page's count differs only where windows overlap, and only a little
        assert page != pytest.approx(res.plain.perplexity, rel=1e-10) and page == pytest.approx(res.plain.perplexity, rel=2e-2)
    assert res.meta["window"] == {"convention": "sliding", "window": max_length - 1, "context": max_length - 1 - stride,
                                  "stride": stride, "max_length": max_length, "streams": 1, "batch_size": 3}


def test_lm_eval_convention_equals_lm_evaluation_harness(tmp_path, monkeypatch):
    """``--window lm-eval``: word_perplexity, byte_perplexity and bits_per_byte as lm-evaluation-
    harness's HFLM.loglikelihood_rolling and its wikitext task count them, on a local model folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    folder, text = hf_folder(tmp_path, "gpt2")
    res = evaluate(folder, data=str(text), window="lm-eval", batch_size=4, progress=False)
    docs = [line + "\n" for line in (text / "test.txt").read_text().splitlines() if line.strip()]
    lm = HFLM(pretrained=str(folder), device="cpu", batch_size=1, dtype="float32")
    requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(d,), idx=i) for i, d in enumerate(docs)]
    ll = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    words = sum(len(re.split(r"\s+", d)) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    ours = res.reports["plain"].lm_eval
    assert (ours["documents"], ours["words"], ours["bytes"]) == (len(docs), words, nbytes)
    assert ours["word_perplexity"] == pytest.approx(math.exp(-sum(ll) / words), rel=1e-4)
    assert ours["byte_perplexity"] == pytest.approx(math.exp(-sum(ll) / nbytes), rel=1e-4)
    assert ours["bits_per_byte"] == pytest.approx(-sum(ll) / nbytes / math.log(2), rel=1e-4)
    assert lm_eval.__version__ and res.meta["window"]["convention"] == "lm-eval"
    assert res.meta["window"]["max_length"] == 64  # the model's n_positions, as lm-eval resolves it


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_memories_on_the_captured_hidden_state(kind, text_and_tokenizer):
    """The cache and MbPA of an HF model key on the input of get_output_embeddings(); λ = 0 is the
    plain model bit for bit; the model is left as it was (no hook, same weights)."""
    text, tok = text_and_tokenizer
    model = tiny_model(kind, len(tok)).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    methods = Methods(cache=CacheConfig(window=60, lam=0.0), mbpa=MbPAConfig(k=4, steps=2, memory=60, lam=0.0))
    res = evaluate(model, tokenizer=tok, data=str(text), methods=methods, bptt=16, batch_size=2, max_tokens=300, progress=False)
    for m in ("+cache", "+mbpa", "+cache+mbpa"):
        assert res.reports[m].report.to_dict() == res.plain.to_dict()
    res = evaluate(model, tokenizer=tok, data=str(text), bptt=16, batch_size=2, max_tokens=300, progress=False,
                   methods=Methods(cache=CacheConfig(window=60, lam=0.3, theta=1.0)))
    assert res.reports["+cache"].report.perplexity < res.plain.perplexity  # the text repeats a small word list
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    head = model.get_output_embeddings()
    assert not head._forward_hooks


def test_cache_on_hf_equals_the_reference_cache(text_and_tokenizer):
    """p_cache from the engine's captured states equals Grave et al.'s cache written out per position
    on the hidden states taken with output_hidden_states (the last layer's, after the final norm)."""
    from lmmem.memories.neural_cache import cache_reference

    text, tok = text_and_tokenizer
    model = tiny_model("gpt2", len(tok)).double()
    ev = Evaluation(model, tokenizer=tok, data=str(text), config=EvalConfig(bptt=64, batch_size=1, streams=1, max_tokens=63),
                    progress=False)
    _, cols = columns(ev, Methods(cache=CacheConfig(window=20, theta=0.5, lam=1.0)))
    ids = torch.as_tensor(ev.data.tokens.astype(np.int64))[None]
    with torch.no_grad():
        h = model(ids[:, :-1], output_hidden_states=True).hidden_states[-1][0]
    ref = cache_reference(h, ids[0, 1:], 20, 0.5).numpy()
    got = cols["+cache"][1:]
    plain = cols["plain"][1:]
    empty = np.isnan(ref)  # the first position: an empty cache scores as the model
    np.testing.assert_allclose(got[~empty], ref[~empty], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got[empty], plain[empty], rtol=1e-12)


def test_words_of_a_prepared_corpus_are_its_tokens(tmp_path, capsys):
    """An HF model on a prepared corpus reads its text units: its whitespace words (and a line break
    for every <eos>) are the corpus's tokens, bucketed by the corpus's own training counts."""
    from conftest import prep_cli
    from lmmem.data.corpus import PreparedCorpus

    text = write_text_folder(tmp_path / "text")
    rc, _, err = prep_cli(capsys, "text", "--source", str(text), "--out", str(tmp_path / "c"), "--rule", "whitespace",
                          "--min-count", "1", "--quiet")
    assert rc == 0, err
    corpus = PreparedCorpus.open(tmp_path / "c")
    tok = train_tokenizer([text / "train.txt"])
    model = tiny_model("gpt2", len(tok))
    res = evaluate(model, tokenizer=tok, data=tmp_path / "c", bptt=32, batch_size=2, buckets="100,10", progress=False)
    words = res.reports["plain"].words
    assert words.tokens == len(corpus.tokens("test")) - 1  # every token but the first (context only)
    from lmmem.evaluation import FrequencyBuckets

    counts = corpus.train_counts()[np.asarray(corpus.tokens("test"))[1:]]
    expected = np.bincount(FrequencyBuckets((100, 10)).assign(counts), minlength=3)
    assert [b.tokens for b in words.buckets] == expected.tolist()
    assert res.plain.tokens > words.tokens  # several tokens a word
    assert res.reports["plain"].bytes["bytes"] == sum(len((u + "\n").encode()) for u in corpus.text_units("test"))


def test_logits_that_are_not_head_of_hidden_are_refused_for_memories(text_and_tokenizer):
    text, tok = text_and_tokenizer
    model = tiny_model("gpt2", len(tok))
    forward = model.forward

    def scaled(*args, **kwargs):  # a model that rescales its logits after the head
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    model.forward = scaled
    plain = evaluate(model, tokenizer=tok, data=str(text), bptt=16, max_tokens=100, progress=False)
    assert np.isfinite(plain.plain.perplexity)  # the model's own distribution still scores
    for methods in (Methods(cache=CacheConfig()), Methods(mbpa=MbPAConfig())):
        with pytest.raises(LmmemError, match="logits are not its output layer applied to the final hidden states"):
            evaluate(model, tokenizer=tok, data=str(text), bptt=16, max_tokens=100, methods=methods, progress=False)


@pytest.mark.slow
def test_cli_on_an_hf_folder_with_an_lmmem_head(tmp_path):
    """evaluate.py takes a save_pretrained folder (lmmem heads re-applied), any text source, and
    refuses a model whose logits are transformed after the head in one line."""
    from conftest import run_script
    from lmmem.hf import apply_hebbian_softmax

    folder, text = hf_folder(tmp_path, "gpt2")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    apply_hebbian_softmax(model)
    model.save_pretrained(tmp_path / "hebbian")
    (tmp_path / "hebbian").joinpath("tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).exists():
            (tmp_path / "hebbian" / name).write_bytes((folder / name).read_bytes())
    jsonl = tmp_path / "rows"
    jsonl.mkdir()
    for split in ("train", "valid", "test"):
        rows = [{"text": line} for line in (text / f"{split}.txt").read_text().splitlines()]
        (jsonl / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    proc = run_script("evaluate.py", str(tmp_path / "hebbian"), "--data", str(jsonl), "--cache", "--window", "sliding",
                      "--context", "8", "--bptt", "24", "--max-tokens", "300", "--json", str(tmp_path / "e.json"), check=True)
    out = json.loads((tmp_path / "e.json").read_text())
    assert out["window"]["convention"] == "sliding" and set(out["methods"]) == {"plain", "+cache"}
    assert "words" in out["methods"]["+cache"] and "per word" in proc.stdout and "bits per byte" in proc.stdout
    from transformers import Gemma2Config, Gemma2ForCausalLM

    capped = Gemma2ForCausalLM(Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                            num_key_value_heads=1, head_dim=16, vocab_size=model.config.vocab_size,
                                            final_logit_softcapping=3.0))
    capped.save_pretrained(tmp_path / "capped")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (folder / name).exists():
            (tmp_path / "capped" / name).write_bytes((folder / name).read_bytes())
    bad = run_script("evaluate.py", str(tmp_path / "capped"), "--data", str(text), "--cache", "--max-tokens", "50")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "soft-capping" in bad.stderr, bad.stderr


@pytest.mark.parametrize("window", ["bptt", "sliding", "lm-eval"])
def test_every_method_with_every_sink_and_window(window, text_and_tokenizer, tmp_path):
    """Cache, MbPA and dynamic evaluation, alone and together, under each window convention: every
    per-token column written by --word-probs sums to its method's reported perplexity, and the
    per-word and per-byte (or lm-eval) numbers come with every method."""
    from lmmem.evaluation import DynamicConfig

    text, tok = text_and_tokenizer
    model = tiny_model("gpt2", len(tok))
    methods = Methods(cache=CacheConfig(window=40), mbpa=MbPAConfig(k=4, steps=2, memory=40),
                      dynamic=DynamicConfig(method="sgd", lr=1e-3))
    ev = Evaluation(model, tokenizer=tok, data=str(text), config=EvalConfig(window=window, bptt=24, context=8 if window == "sliding" else 0,
                                                                         batch_size=2, max_tokens=150), progress=False)
    res, cols = columns(ev, methods, tmp_path)
    assert list(res.reports) == ["plain", "+cache", "+mbpa", "+cache+mbpa", "+dynamic", "+dynamic+cache+mbpa"]
    for m, r in res.reports.items():
        lp = cols[m][~np.isnan(cols[m])]
        assert len(lp) == r.report.tokens and math.exp(-lp.mean()) == pytest.approx(r.report.perplexity, rel=1e-9), m
        assert r.words is not None and r.words.tokens > 0
        assert (r.lm_eval if window == "lm-eval" else r.bytes) is not None
    assert res.meta["window"]["convention"] == window


def test_conventions_a_model_cannot_take_are_refused(small_corpus, tmp_path):
    from test_evaluate_methods import _checkpoint

    lstm = _checkpoint(small_corpus, tmp_path / "l.pt")
    for window in ("sliding", "lm-eval"):
        with pytest.raises(LmmemError, match="LSTM carries its state"):
            evaluate(lstm, window=window, progress=False)
    transformer = _checkpoint(small_corpus, tmp_path / "t.pt", arch="transformer")
    with pytest.raises(LmmemError, match="lm-eval scores documents of text encoded by the model's tokenizer"):
        evaluate(transformer, window="lm-eval", progress=False)
