import hashlib
import json

import numpy as np
import pytest
import torch

from conftest import run_script
from engine_helpers import score
from lmmem.data.corpus import PreparedCorpus
from lmmem.evaluation import DynamicConfig, FrequencyBuckets, Methods, TuneGrid, evaluate
from lmmem.memories import CacheConfig, MbPAConfig
from lmmem.models import ModelConfig, build_model
from lmmem.checkpoints import save_checkpoint


def _checkpoint(corpus_dir, path, arch="lstm", softmax="full"):
    torch.manual_seed(0)
    corpus = PreparedCorpus.open(corpus_dir)
    cfg = ModelConfig(arch=arch, vocab_size=200, embed_dim=16, hidden_dim=24, proj_dim=16 if arch == "lstm" else 0,
                      tie_weights=True, context=16, num_heads=2, softmax=softmax)
    model = build_model(cfg)
    save_checkpoint({"model_config": cfg.to_dict(), "model": model.state_dict(), "progress": {"step": 0},
                     "train_config": {"data": str(corpus_dir), "bptt": 16}, "vocab_fingerprint": corpus.fingerprint}, path)
    return path


def _tiny_model(arch):
    torch.manual_seed(0)
    return build_model(ModelConfig(arch=arch, vocab_size=40, embed_dim=8, hidden_dim=12, proj_dim=0, tie_weights=False,
                                   context=12, num_heads=2)).double().eval()


@pytest.mark.parametrize("arch,mbpa_vocab", [("lstm", 0), ("transformer", 0), ("lstm", 10)])
def test_batch_size_1_and_8_give_the_same_perplexity(arch, mbpa_vocab):
    """With a fixed number of streams the sequences scored do not depend on the batch size."""
    model = _tiny_model(arch)
    tokens = np.random.default_rng(0).integers(0, 40, size=403).astype("<u4")
    bucket_of = FrequencyBuckets((1000, 100)).assign(np.random.default_rng(1).integers(0, 3000, size=40))
    kw = dict(bucket_of=bucket_of, num_buckets=3, streams=8, bptt=12, cache=CacheConfig(window=30, lam=0.2),
              mbpa=MbPAConfig(k=5, steps=2, lr=0.2, memory=25, lam=0.3, vocab=mbpa_vocab))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    one = score(model, tokens, batch_size=1, **kw)
    eight = score(model, tokens, batch_size=8, **kw)
    four = score(model, tokens, batch_size=4, **kw)
    np.testing.assert_array_equal(one.count, eight.count)
    assert one.count.sum() == 402
    np.testing.assert_allclose(one.nll, eight.nll, rtol=1e-10)
    np.testing.assert_allclose(four.nll, eight.nll, rtol=1e-10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(Exception, match="multiple"):
        score(model, tokens, batch_size=3, **kw)


def test_evaluate_side_by_side(small_corpus, tmp_path):
    ckpt = _checkpoint(small_corpus, tmp_path / "m.pt")
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    res = evaluate(ckpt, batch_size=4, device="cpu", max_tokens=300, progress=False,
                   methods=Methods(cache=CacheConfig(window=50), mbpa=MbPAConfig(k=4, steps=2, memory=50),
                                   dynamic=DynamicConfig(lr=1e-3)),
                   tune=TuneGrid(thetas=(0.1, 1.0), lambdas=(0.0, 0.1, 0.3)))
    assert list(res.reports) == ["plain", "+cache", "+mbpa", "+cache+mbpa", "+dynamic", "+dynamic+cache+mbpa"]
    assert all(r.report.tokens == 300 for r in res.reports.values())
    choice = res.meta["tuned"]["choice"]
    assert choice["+cache"]["theta"] in (0.1, 1.0) and choice["+cache"]["cache_lambda"] in (0.1, 0.3)
    assert choice["+dynamic+cache+mbpa"]["lr"] == choice["+dynamic"]["lr"]
    assert res.meta["memory_bytes"]["cache"] > 0 and res.meta["memory_bytes"]["mbpa"] > 0
    assert res.meta["window"] == {"convention": "bptt", "bptt": 16, "streams": 4, "batch_size": 4}
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == digest
    plain = evaluate(ckpt, batch_size=4, device="cpu", max_tokens=300, progress=False).plain  # the plain evaluation alone
    assert plain.perplexity == pytest.approx(res.plain.perplexity, rel=1e-6)  # float32: MbPA shares the logits (another summation order)


@pytest.mark.parametrize("arch,softmax,extra", [("lstm", "hebbian", ["--mbpa-vocab", "20"]), ("transformer", "full", [])])
def test_evaluate_cli_with_methods(small_corpus, tmp_path, arch, softmax, extra):
    ckpt = _checkpoint(small_corpus, tmp_path / "m.pt", arch, softmax)
    out = tmp_path / "eval.json"
    proc = run_script("evaluate.py", str(ckpt), "--cache", "--mbpa", "--mbpa-k", "4", "--mbpa-steps", "2", "--dynamic",
                      "--tune", "--batch-size", "4", "--max-tokens", "200", "--cache-window", "40", "--mbpa-memory", "40",
                      "--json", str(out), "--device", "cpu", *extra, check=True)
    for m in ("+cache", "+mbpa", "+cache+mbpa", "+dynamic", ">10K ppl", "token share", "tuned on valid", "window: bptt 16"):
        assert m in proc.stdout, proc.stdout
    result = json.loads(out.read_text())
    assert result["tokens"] == 200 and result["split"] == "test" and result["window"]["convention"] == "bptt"
    assert set(result["methods"]) == {"plain", "+cache", "+mbpa", "+cache+mbpa", "+dynamic", "+dynamic+cache+mbpa"}
    for r in result["methods"].values():
        assert [b["name"] for b in r["buckets"]] == [">10K", "1K–10K", "100–1K", "<100"]
    assert result["methods"]["+mbpa"]["params"]["mbpa"]["k"] == 4
    assert "dynamic" in result["methods"]["+dynamic+cache+mbpa"]["params"]


def test_evaluate_cli_plain_output(small_corpus, tmp_path):
    ckpt = _checkpoint(small_corpus, tmp_path / "m.pt")
    proc = run_script("evaluate.py", str(ckpt), "--max-tokens", "100", "--json", str(tmp_path / "e.json"), check=True)
    result = json.loads((tmp_path / "e.json").read_text())
    assert list(result["methods"]) == ["plain"] and result["tokens"] == 100 and "token share" in proc.stdout
    bad = run_script("evaluate.py", str(ckpt), "--tune")
    assert bad.returncode == 2 and "--tune needs" in bad.stderr and bad.stderr.count("\n") == 1


@pytest.mark.parametrize("vocab", [0, 7])
def test_mbpa_memory_prefilled_from_training_data_equals_reference(vocab):
    """train_pairs = P: every stream's memory starts with the model's last P training pairs, as if
    they preceded the evaluation stream — checked against the per-query autograd reference."""
    from lmmem.memories import mbpa_reference

    model = _tiny_model("lstm")
    rng = np.random.default_rng(2)
    train = rng.integers(0, 40, size=300).astype("<u4")
    tokens = rng.integers(0, 40, size=31).astype("<u4")
    cfg = MbPAConfig(k=4, steps=2, lr=0.3, memory=20, lam=1.0, vocab=vocab, train_pairs=12)
    kw = dict(batch_size=1, bptt=7, mbpa=cfg, mbpa_lambdas=[1.0])
    got = score(model, tokens, train_tokens=train, **kw)
    with torch.no_grad():
        h_train, _ = model.hidden_states(torch.as_tensor(train[-13:-1].astype(np.int64))[None])
        h_eval, _ = model.hidden_states(torch.as_tensor(tokens[:-1].astype(np.int64))[None])
    keys = torch.cat([h_train[0], h_eval[0]])
    values = torch.cat([torch.as_tensor(train[-12:].astype(np.int64)), torch.as_tensor(tokens[1:].astype(np.int64))])
    ref = mbpa_reference(keys, values, model.output.weight, model.output.bias, cfg)[12:]
    np.testing.assert_allclose(got.at(mbpa_lambda=1.0)[0], -ref.sum().item(), rtol=1e-8)
    without = score(model, tokens, **{**kw, "mbpa": MbPAConfig(**{**cfg.__dict__, "train_pairs": 0})})
    assert abs(without.at(mbpa_lambda=1.0)[0] - got.at(mbpa_lambda=1.0)[0]) > 1e-6  # the prefill matters
    with pytest.raises(Exception, match="train"):
        score(model, tokens, **kw)  # no train tokens given


def test_dynamic_evaluation_refuses_streams(small_corpus, tmp_path):
    ckpt = _checkpoint(small_corpus, tmp_path / "m.pt")
    with pytest.raises(Exception, match="--streams"):
        evaluate(ckpt, batch_size=2, streams=4, device="cpu", methods=Methods(dynamic=DynamicConfig(lr=1e-3)), max_tokens=50,
                 progress=False)


@pytest.mark.parametrize("lam", [0.0])
def test_lambda_zero_is_the_plain_model_exactly(small_corpus, tmp_path, lam):
    """λ = 0 leaves every memory out bit for bit (log 0 = −inf in the log-space mixture)."""
    ckpt = _checkpoint(small_corpus, tmp_path / "m.pt")
    res = evaluate(ckpt, batch_size=4, device="cpu", max_tokens=200, progress=False,
                   methods=Methods(cache=CacheConfig(window=30, lam=lam), mbpa=MbPAConfig(k=3, steps=2, memory=30, lam=lam)))
    for m in ("+cache", "+mbpa", "+cache+mbpa"):
        assert res.reports[m].report.to_dict() == res.plain.to_dict(), m
