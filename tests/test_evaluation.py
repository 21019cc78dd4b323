import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_script
from lmmem.evaluation import FrequencyBuckets, PerplexityReport, format_table, score_stream
from lmmem.models import ModelConfig, build_model


def test_bucket_names_and_assignment():
    b = FrequencyBuckets()
    assert b.names == [">10K", "1K–10K", "100–1K", "<100"]
    counts = np.array([0, 99, 100, 999, 1000, 9999, 10000, 10**6])
    assert b.assign(counts).tolist() == [3, 3, 2, 2, 1, 1, 0, 0]
    assert FrequencyBuckets.parse("5,50").names == [">50", "5–50", "<5"]
    with pytest.raises(ValueError):
        FrequencyBuckets.parse("ten")


def test_report_from_sums():
    b = FrequencyBuckets((10, 1))
    r = PerplexityReport.from_sums(np.array([2.0, 0.0, 9.0]), np.array([2.0, 0.0, 3.0]), b)
    assert r.tokens == 5 and math.isclose(r.loss, 11 / 5)
    assert math.isclose(r.buckets[0].perplexity, math.e) and r.buckets[1].perplexity is None
    assert math.isclose(r.buckets[2].share, 0.6)
    assert "–" in format_table({"m": r})


@pytest.mark.parametrize("batch_size,bptt", [(1, 64), (3, 7), (8, 5)])
def test_score_stream_equals_a_plain_loop(batch_size, bptt):
    """Streamed, batched, bucketed scoring equals scoring the whole stream as one sequence, up to
    the state reset at each row's start (exactly equal for batch 1)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=40, embed_dim=8, hidden_dim=12, proj_dim=0, tie_weights=False)).double().eval()
    tokens = np.random.default_rng().integers(0, 40, size=97).astype("<u4")
    counts = np.random.default_rng().integers(0, 3000, size=40)
    buckets = FrequencyBuckets((1000, 100))
    nll, cnt = score_stream(model, tokens, bucket_of=buckets.assign(counts), num_buckets=3, batch_size=batch_size, bptt=bptt)
    assert cnt.sum() == len(tokens) - 1
    # reference: each of the batch rows scored as one independent sequence
    row_len = math.ceil((len(tokens) - 1) / batch_size)
    ref = np.zeros(3)
    with torch.no_grad():
        for r in range(batch_size):
            pos = np.arange(r * row_len, min((r + 1) * row_len, len(tokens) - 1))
            if len(pos) == 0:
                continue
            x = torch.as_tensor(tokens[pos].astype(np.int64))[None]
            y = torch.as_tensor(tokens[pos + 1].astype(np.int64))
            h, _ = model.hidden_states(x)
            logp = (h[0] @ model.output.weight.T + model.output.bias).log_softmax(-1)
            for t, lp in zip(y.tolist(), logp[torch.arange(len(y)), y].tolist()):
                ref[buckets.assign(counts)[t]] -= lp
    np.testing.assert_allclose(nll, ref, rtol=1e-10, atol=1e-10)
    assert not model.training


@pytest.mark.slow
def test_train_then_evaluate_through_the_clis(small_corpus, tmp_path):
    out = tmp_path / "run"
    run_script("train.py", "--data", str(small_corpus), "--out", str(out), "--max-steps", "30", "--embed-dim", "16",
               "--hidden-dim", "32", "--proj-dim", "16", "--batch-size", "8", "--bptt", "16", "--eval-interval", "10",
               check=True)
    assert {"best.pt", "last.pt", "metrics.jsonl", "config.json"} <= {p.name for p in out.iterdir()}
    proc = run_script("evaluate.py", str(out / "best.pt"), "--split", "test", "--json", str(out / "eval.json"), check=True)
    assert ">10K ppl" in proc.stdout and "token share" in proc.stdout
    result = json.loads((out / "eval.json").read_text())
    assert result["split"] == "test" and result["tokens"] == 1199
    assert [b["name"] for b in result["buckets"]] == [">10K", "1K–10K", "100–1K", "<100"]
    assert math.isclose(sum(b["share"] for b in result["buckets"]), 1.0)
    # a trained model beats the uniform distribution over 200 words
    assert result["perplexity"] < 200
    shares = sum(b["tokens"] for b in result["buckets"])
    assert shares == result["tokens"]
    # the metrics log has training and validation records
    log = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in log) and any("tokens_per_s" in r for r in log)


@pytest.mark.parametrize("bias", [True, False])
def test_an_lmmem_adapters_logits_for_memories_are_the_heads_and_reuse_one_buffer(bias):
    """LmmemAdapter's logits for MbPA: bit for bit the head's, written into one buffer that the
    next batch reuses (smaller batches into its first rows); with autograd on, a fresh tensor."""
    from lmmem.evaluation.adapters import Forward, LmmemAdapter

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=300, embed_dim=16, hidden_dim=24, tie_weights=False)).eval()
    if not bias:
        model.output.bias = None
    adapter = LmmemAdapter(model)
    D = model.output.weight.shape[1]
    with torch.no_grad():
        outs = []
        for n in (50, 20):
            h = torch.randn(1, n, D)
            y = torch.randint(0, 300, (n,))
            lp, z = adapter.target_log_probs(Forward(h, None, None), y, want_logits=True)
            assert torch.equal(z, model.output.logits(h[0]))
            torch.testing.assert_close(lp, torch.log_softmax(model.output.logits(h[0]), -1)[torch.arange(n), y])
            outs.append(z)
        assert outs[1].data_ptr() == outs[0].data_ptr()  # the same storage, overwritten
    h = torch.randn(1, 7, D)
    _, z = adapter.target_log_probs(Forward(h, None, None), torch.zeros(7, dtype=torch.long), want_logits=True)
    assert z.data_ptr() != outs[0].data_ptr() and z.requires_grad  # autograd: the head's own tensor


def test_the_test_time_benchmark_runs_its_ab_variants_in_one_process(tmp_path):
    """benchmarks/bench_test_time.py on a small model: plain, cache + MbPA, and cache + MbPA with
    every A/B suffix (the torch statements, separate products, the torch normalisers), each timed,
    with the same memory."""
    import json

    from conftest import run_script

    out = tmp_path / "bench.json"
    methods = "plain,cache+mbpa,cache+mbpa-unshared-torchlse-torchmbpa"
    run_script("benchmarks/bench_test_time.py", "--vocab", "500", "--tokens", "300", "--repeats", "1",
               "--methods", methods, "--out", str(out), check=True, timeout=300)
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(methods.split(",")) and all(r["cpu seconds"] > 0 for r in rows.values()), rows
    assert rows["cache+mbpa"]["memory MiB"] == rows["cache+mbpa-unshared-torchlse-torchmbpa"]["memory MiB"] > 0
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_test_time", Path(__file__).parents[1] / "benchmarks" / "bench_test_time.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.ab_suffixes("cache+mbpa-unshared-torchlse-torchmbpa") == ("cache+mbpa", ["-torchmbpa", "-torchlse", "-unshared"])
    assert bench.ab_suffixes("knn@64") == ("knn@64", [])
