import numpy as np
import pytest
import torch

from engine_helpers import score
from lmmem.evaluation import DynamicConfig, score_stream
from lmmem.models import ModelConfig, build_model


def score_dynamic(model, tokens, *, bucket_of, num_buckets, cfg, batch_size=16, bptt=128, train_tokens=None):
    s = score(model, tokens, bucket_of=bucket_of, num_buckets=num_buckets, batch_size=batch_size, bptt=bptt, dynamic=cfg,
              train_tokens=train_tokens)
    return s.at(), s.count


def _model(arch="lstm", softmax="full"):
    torch.manual_seed(0)
    return build_model(ModelConfig(arch=arch, vocab_size=30, embed_dim=8, hidden_dim=12, proj_dim=8 if arch == "lstm" else 0, tie_weights=True, context=16,
                                   num_heads=2, softmax=softmax)).double().eval()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch,softmax", [("lstm", "full"), ("transformer", "hebbian")])
def test_zero_learning_rate_is_the_plain_model_and_the_model_is_untouched(arch, softmax):
    model = _model(arch, softmax)
    tokens = np.random.default_rng(0).integers(0, 30, size=200).astype("<u4")
    bucket_of = np.arange(30) % 3
    plain, cnt = score_stream(model, tokens, bucket_of=bucket_of, num_buckets=3, batch_size=4, bptt=10)
    before = _snapshot(model)
    nll, cnt2 = score_dynamic(model, tokens, bucket_of=bucket_of, num_buckets=3, cfg=DynamicConfig(method="sgd", lr=0.0, decay=0.0),
                              batch_size=4, bptt=10)
    np.testing.assert_array_equal(cnt, cnt2)
    np.testing.assert_allclose(nll, plain, rtol=1e-12)
    nll3, _ = score_dynamic(model, tokens, bucket_of=bucket_of, num_buckets=3, cfg=DynamicConfig(method="sgd", lr=0.5, decay=0.01),
                            batch_size=4, bptt=10)
    assert not np.allclose(nll3, plain)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical


def test_dynamic_evaluation_adapts_to_repeated_text():
    model = _model()
    tokens = np.tile(np.random.default_rng(0).integers(0, 30, size=25), 12).astype("<u4")
    bucket_of = np.zeros(30, dtype=np.int64)
    plain, _ = score_stream(model, tokens, bucket_of=bucket_of, num_buckets=1, batch_size=1, bptt=10)
    dyn, _ = score_dynamic(model, tokens, bucket_of=bucket_of, num_buckets=1, cfg=DynamicConfig(method="sgd", lr=0.5, decay=0.0),
                           batch_size=1, bptt=10)
    assert dyn[0] < plain[0]


def test_rms_variant_uses_training_statistics():
    model = _model()
    rng = np.random.default_rng(1)
    tokens, train = rng.integers(0, 30, size=120).astype("<u4"), rng.integers(0, 30, size=400).astype("<u4")
    before = _snapshot(model)
    nll, cnt = score_dynamic(model, tokens, bucket_of=np.zeros(30, dtype=np.int64), num_buckets=1,
                             cfg=DynamicConfig(method="rms", lr=1e-3, decay=0.01, stat_batches=3), batch_size=2, bptt=8,
                             train_tokens=train)
    assert np.isfinite(nll).all() and cnt[0] == 119
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError):
        score_dynamic(model, tokens, bucket_of=np.zeros(30, dtype=np.int64), num_buckets=1, cfg=DynamicConfig(method="rms"))


# ---------------------------------------------------------------------------------------------
# Krause et al.'s update rules against a float64 reference written from the paper / their code


def krause_reference(model, tokens, train, *, method, lr, decay, eps, batch_size, bptt, stat_batches):
    """NLL sum of dynamic evaluation, written independently of lmmem.evaluation.dynamic: gradients
    from torch.autograd.grad, log-probabilities from a full log-softmax, all terms from the
    pre-step weights."""
    import copy

    from lmmem.data.batching import StreamBatcher

    m = copy.deepcopy(model).double().eval()
    params = [p for _, p in m.named_parameters()]
    theta0 = [p.detach().clone() for p in params]
    if method == "rms":
        sq = [torch.zeros_like(p) for p in params]
        stats = StreamBatcher(train, batch_size, bptt, pad=True)
        n = min(stat_batches, len(stats))
        state = m.init_state(batch_size, "cpu")
        for j in range(n):
            b = stats.batch(j)
            loss, state = m(b.inputs, b.targets, state)
            state = m.detach_state(state)
            for s, g in zip(sq, torch.autograd.grad(loss, params)):
                s += g * g
        rms = [(s / n).sqrt() for s in sq]
        gbar = sum(r.mean() for r in rms) / len(rms)  # one normaliser: the mean of the tensors' means
        rate = [torch.clamp(r / gbar, max=1 / decay) for r in rms]
    batcher = StreamBatcher(tokens, batch_size, bptt, pad=True)
    state = m.init_state(batch_size, "cpu")
    total = 0.0
    for j in range(len(batcher)):
        b = batcher.batch(j)
        h, state = m.hidden_states(b.inputs, state)
        state = m.detach_state(state)
        y = b.targets.reshape(-1)
        keep = y != -100
        lp = torch.log_softmax(m.output.logits(h.reshape(-1, h.shape[-1])), -1)[keep].gather(1, y[keep][:, None])[:, 0]
        total += float(-lp.detach().sum())
        grads = torch.autograd.grad(-lp.mean(), params)
        with torch.no_grad():
            if method == "rms":
                new = [p + decay * r * (t0 - p) - lr * g / (s + eps) for p, t0, g, r, s in zip(params, theta0, grads, rate, rms)]
            else:
                new = [p + decay * (t0 - p) - lr * g for p, t0, g in zip(params, theta0, grads)]
            for p, v in zip(params, new):
                p.copy_(v)
    return total


@pytest.mark.parametrize("method,lr,decay", [("sgd", 0.3, 0.05), ("rms", 0.01, 0.02), ("rms", 0.003, 0.4)])
def test_update_rules_match_the_float64_reference(method, lr, decay):
    model = _model()
    rng = np.random.default_rng(4)
    tokens, train = rng.integers(0, 30, size=157).astype("<u4"), rng.integers(0, 30, size=500).astype("<u4")
    cfg = DynamicConfig(method=method, lr=lr, decay=decay, eps=2e-5, stat_batches=5)
    nll, cnt = score_dynamic(model, tokens, bucket_of=np.zeros(30, dtype=np.int64), num_buckets=1, cfg=cfg, batch_size=3,
                             bptt=7, train_tokens=train)
    still, _ = score_dynamic(model, tokens, bucket_of=np.zeros(30, dtype=np.int64), num_buckets=1, batch_size=3, bptt=7,
                             cfg=DynamicConfig(method=method, lr=0.0, decay=0.0, stat_batches=5), train_tokens=train)
    ref = krause_reference(model, tokens, train, method=method, lr=lr, decay=decay, eps=2e-5, batch_size=3, bptt=7, stat_batches=5)
    plain, _ = score_stream(model, tokens, bucket_of=np.zeros(30, dtype=np.int64), num_buckets=1, batch_size=3, bptt=7)
    assert cnt[0] == 156
    assert nll[0] == pytest.approx(ref, rel=1e-10)
    assert still[0] == pytest.approx(plain[0], rel=1e-12)  # η = λ = 0: the plain model
    assert abs(nll[0] - plain[0]) > 0.05  # the updates did change the scores (by more than the tolerance above)


def test_tune_picks_the_best_learning_rate_of_the_grid(tmp_path):
    from conftest import write_prepared_corpus
    from lmmem.evaluation import Methods, TuneGrid, evaluate

    data = write_prepared_corpus(tmp_path / "c", vocab_size=30, tokens={"train": 400, "valid": 160, "test": 60})
    model = _model()
    factors = (0.1, 1.0, 10.0, 1e6)
    cfg = DynamicConfig(method="rms", lr=1e-3, stat_batches=3)
    res = evaluate(model, data=data, methods=Methods(dynamic=cfg), tune=TuneGrid(lr_factors=factors), batch_size=2, bptt=8,
                   progress=False)
    info = res.meta["tuned"]
    from lmmem.data.corpus import PreparedCorpus

    corpus = PreparedCorpus.open(data)
    ppl = {}
    for f in factors:
        nll, cnt = score_dynamic(model, corpus.tokens("valid"), bucket_of=np.zeros(30, dtype=np.int64), num_buckets=1,
                                 cfg=DynamicConfig(method="rms", lr=1e-3 * f, stat_batches=3), batch_size=2, bptt=8,
                                 train_tokens=corpus.tokens("train"))
        loss = nll.sum() / cnt.sum()
        ppl[1e-3 * f] = float(np.exp(loss)) if loss < 700 else None  # inf or NaN: diverged
    assert ppl[1e-3 * 1e6] is None and info["dynamic_lr_grid"]["1000"] is None  # diverged: recorded as None, not inf
    best = min((lr for lr in ppl if ppl[lr] is not None), key=ppl.get)
    assert info["choice"]["+dynamic"]["lr"] == pytest.approx(best, rel=1e-12)
    assert info["valid_perplexity"]["+dynamic"] == pytest.approx(ppl[best], rel=1e-9)
    assert "tuned on valid: +dynamic: lr " + f"{best:.4g}" in "\n".join(res.lines())


def test_json_refuses_non_finite_numbers(tmp_path):
    from lmmem.errors import LmmemError
    from lmmem.evaluation import write_json

    for bad in (float("inf"), float("nan"), -float("inf")):
        with pytest.raises(LmmemError, match=r"non-finite number at methods\.\+dynamic\.buckets\[1\]\.perplexity"):
            write_json({"methods": {"+dynamic": {"buckets": [{"perplexity": 1.0}, {"perplexity": bad}]}}}, tmp_path / "r.json")
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file
    write_json({"ok": [1.0, None]}, tmp_path / "r.json")
    assert (tmp_path / "r.json").read_text().replace(" ", "").replace("\n", "") == '{"ok":[1.0,null]}'


def test_cli_dynamic_divergence_is_an_error_and_writes_no_json(small_corpus, tmp_path, capsys):
    from lmmem.cli import run_cli
    from lmmem.evaluation.cli import main
    from test_evaluate_methods import _checkpoint

    ckpt = _checkpoint(small_corpus, tmp_path / "m.pt")
    out = tmp_path / "e.json"
    code = run_cli(main, [str(ckpt), "--dynamic", "--dynamic-method", "rms", "--dynamic-lr", "1e6", "--max-tokens", "200",
                          "--batch-size", "2", "--json", str(out)])
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "diverged" in errors[0] and "--dynamic-lr" in errors[0] and err.endswith(errors[0] + "\n")


@pytest.mark.slow
def test_cli_rms_dynamic_evaluation_and_tune(small_corpus, tmp_path):
    import json

    from conftest import run_script
    from test_evaluate_methods import _checkpoint

    ckpt = _checkpoint(small_corpus, tmp_path / "m.pt")
    proc = run_script("evaluate.py", str(ckpt), "--dynamic", "--dynamic-method", "rms", "--tune", "--max-tokens", "200", "--batch-size", "2",
                      "--json", str(tmp_path / "e.json"), check=True)
    result = json.loads((tmp_path / "e.json").read_text())  # strict JSON: no Infinity/NaN
    assert "+dynamic" in result["tuned"]["choice"] and "tuned on valid: +dynamic: lr " in proc.stdout
    assert np.isfinite(result["methods"]["+dynamic"]["perplexity"])


def test_tuned_learning_rate_diverging_on_test_keeps_the_other_methods(small_corpus, tmp_path, capsys, monkeypatch):
    """A learning rate chosen on valid that diverges on test is a result, not an error: the dynamic
    rows are left out (and recorded as diverged), the static methods' numbers are written."""
    import json

    import lmmem.evaluation.run as run_module
    from lmmem.cli import run_cli
    from lmmem.evaluation.cli import main
    from lmmem.evaluation.tuning import untuned_rows
    from test_evaluate_methods import _checkpoint

    def choose(ev, methods, knn, grid):  # valid "chose" a learning rate that diverges on test
        return {"choice": {"+dynamic": {"lr": 1e6}}}, untuned_rows(methods, knn)

    monkeypatch.setattr(run_module, "choose", choose)
    ckpt = _checkpoint(small_corpus, tmp_path / "m.pt")
    out = tmp_path / "e.json"
    code = run_cli(main, [str(ckpt), "--cache", "--dynamic", "--dynamic-method", "rms", "--tune", "--max-tokens", "200",
                          "--batch-size", "2", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["diverged"]["dynamic_lr"] == 1e6 and result["diverged"]["split"] == "test"
    assert set(result["diverged"]["methods"]) == {"+dynamic", "+dynamic+cache"}
    assert "+cache" in result["methods"] and "plain" in result["methods"]
    assert not any(m.startswith("+dynamic") for m in result["methods"])
    assert "diverged on test at the learning rate chosen on valid" in capsys.readouterr().out


def _run_tuned(small_corpus, tmp_path, monkeypatch, lr):
    """evaluate.py --dynamic --tune on a small checkpoint, with valid "choosing" ``lr``: exit code, JSON."""
    import json

    import lmmem.evaluation.run as run_module
    from lmmem.cli import run_cli
    from lmmem.evaluation.cli import main
    from lmmem.evaluation.tuning import untuned_rows
    from test_evaluate_methods import _checkpoint

    def choose(ev, methods, knn, grid):
        return {"choice": {"+dynamic": {"lr": lr}}}, untuned_rows(methods, knn)

    monkeypatch.setattr(run_module, "choose", choose)
    ckpt = _checkpoint(small_corpus, tmp_path / "m.pt")
    out = tmp_path / "e.json"
    code = run_cli(main, [str(ckpt), "--dynamic", "--dynamic-method", "rms", "--tune", "--max-tokens", "200",
                          "--batch-size", "2", "--json", str(out)])
    return code, (json.loads(out.read_text()) if out.exists() else None)


def test_a_tuned_learning_rate_whose_perplexity_overflows_counts_as_diverged(small_corpus, tmp_path, capsys, monkeypatch):
    """A loss that stays finite but grows past e^709 a token overflows the perplexity: that is a
    divergence too (the dynamic rows left out, the rest written), not a JSON refused for a
    non-finite number with nothing written."""
    code, result = _run_tuned(small_corpus, tmp_path, monkeypatch, 0.3)
    assert code == 0 and result["diverged"]["dynamic_lr"] == 0.3 and "plain" in result["methods"]
    assert "+dynamic" not in result["methods"]


def test_dynamic_evaluation_that_ends_worse_than_the_model_is_said():
    """One line where dynamic evaluation ends worse than the model alone without diverging: how
    much, at which rate, and what to change (the tuned rate's and the user's); none otherwise."""
    from lmmem.evaluation.buckets import PerplexityReport
    from lmmem.evaluation.results import MethodReport
    from lmmem.evaluation.run import _dynamic_worse_note

    rep = lambda ppl: MethodReport(PerplexityReport(tokens=10, loss=float(np.log(ppl)), perplexity=ppl))  # noqa: E731
    tuned = _dynamic_worse_note({"plain": rep(100.0), "+dynamic": rep(145.2)}, "test", 3e-4, True)
    assert "45.2% worse than the model alone on test" in tuned and "chosen on valid (0.0003)" in tuned
    assert "--dynamic-eps" in tuned
    assert "give a smaller one" in _dynamic_worse_note({"plain": rep(177.0), "+dynamic": rep(180.0)}, "test", 3e-4, False)
    assert _dynamic_worse_note({"plain": rep(177.0), "+dynamic": rep(150.0)}, "test", 3e-4, True) is None
    assert _dynamic_worse_note({"plain": rep(177.0), "+dynamic": rep(177.0)}, "test", 3e-4, True) is None
    assert _dynamic_worse_note({"+dynamic": rep(300.0)}, "test", 3e-4, True) is None


def test_the_note_on_a_worse_dynamic_evaluation_is_printed_and_kept(small_corpus, tmp_path, capsys, monkeypatch):
    import lmmem.evaluation.run as run_module

    monkeypatch.setattr(run_module, "_dynamic_worse_note", lambda reports, split, lr, tuned: f"NOTE {split} {lr:g} {tuned}")
    code, result = _run_tuned(small_corpus, tmp_path, monkeypatch, 1e-3)
    assert code == 0 and "NOTE test 0.001 True" in result["notes"]
    assert "NOTE test 0.001 True" in capsys.readouterr().out
