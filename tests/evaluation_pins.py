"""Numbers of the evaluation code as it was before the one-engine rewrite (issue 20), pinned.

``python tests/evaluation_pins.py --write`` was run ONCE on the code before the rewrite (commit
"pins: ...") and wrote tests/data/evaluation_pins.json; tests/test_evaluation_pins.py recomputes the
same cases through the engine and compares to 1e-9. Everything runs in float64 (models trained here
for a few dozen steps from a fixed seed, checkpoints loaded as float64), so the pins do not depend
on the CPU's float32 summation order.

The cases (all on small synthetic corpora written here, independent of data_prep):

* ``lstm`` / ``transformer``: plain bucketed sums (``score_stream``); every method side by side with
  ``--tune`` (cache, restricted MbPA, rms dynamic evaluation; chosen values, valid perplexities,
  per-token log-probabilities of every method as ``--word-probs`` writes them); cache + exact MbPA
  over 4 streams at batch 2; sgd dynamic evaluation; MbPA prefilled from the train split (LSTM);
  the sliding window (Transformer: ``score_stream(context=...)`` and ``--context``).
* ``sentencepiece``: word-level numbers of a SentencePiece corpus.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PINS = HERE / "data" / "evaluation_pins.json"
EDGES = (100, 10)


def write_corpus(root: Path, *, pieces: bool = False, seed: int = 0) -> Path:
    """A prepared corpus (word tokens, or SentencePiece-like pieces with ``▁`` word marks)."""
    from conftest import write_prepared_corpus
    from lmmem.data.vocab import Vocabulary

    write_prepared_corpus(root, vocab_size=120, tokens={"train": 3000, "valid": 700, "test": 700}, seed=seed)
    if pieces:  # the same ids, renamed as pieces: every third one continues a word
        meta = json.loads((root / "meta.json").read_text())
        vocab = Vocabulary.load(root / "vocab.txt")
        names = vocab.tokens[:2] + [("\u2581" if i % 3 else "") + f"p{i}" for i in range(2, len(vocab.tokens))]
        vocab = Vocabulary(names, list(vocab.counts))
        vocab.save(root / "vocab.txt")
        meta.update(tokenizer={"type": "sentencepiece"}, vocab_fingerprint=vocab.fingerprint)
        (root / "meta.json").write_text(json.dumps(meta))
    return root


def train_tiny(arch: str, corpus_dir: Path, steps: int = 40, softmax: str = "full"):
    """A float64 model trained ``steps`` Adam steps on the corpus's train split (fixed seed)."""
    from lmmem.data.batching import StreamBatcher
    from lmmem.data.corpus import PreparedCorpus
    from lmmem.models import ModelConfig, build_model

    torch.manual_seed(0)
    corpus = PreparedCorpus.open(corpus_dir)
    cfg = ModelConfig(arch=arch, vocab_size=len(corpus.vocab), embed_dim=16, hidden_dim=24, proj_dim=16 if arch == "lstm" else 0,
                      tie_weights=True, context=16, num_heads=2, softmax=softmax, dropout=0.0, output_dropout=0.0)
    model = build_model(cfg).double()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batcher = StreamBatcher(corpus.tokens("train"), 8, 12)
    state = model.init_state(8, "cpu")
    model.train()
    for step in range(steps):
        b = batcher.batch(step % len(batcher))
        loss, state = model(b.inputs, b.targets, state)
        state = model.detach_state(state)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.output.on_optimizer_step()
    return model.eval(), cfg


def save(model, cfg, corpus_dir: Path, path: Path, bptt: int = 8) -> Path:
    from lmmem.data.corpus import PreparedCorpus
    from lmmem.checkpoints import save_checkpoint

    corpus = PreparedCorpus.open(corpus_dir)
    save_checkpoint({"model_config": cfg.to_dict(), "model": model.state_dict(), "progress": {"step": 40},
                     "train_config": {"data": str(corpus_dir), "bptt": bptt}, "vocab_fingerprint": corpus.fingerprint}, path)
    return path


@contextmanager
def float64_checkpoints():
    """Checkpoints load as float64 models (the old orchestrators load them themselves)."""
    import lmmem.checkpoints as ck

    original = ck.model_from_checkpoint

    def as_double(ckpt, device="cpu"):
        return original(ckpt, device).double()

    patched = [(ck, "model_from_checkpoint")]
    import importlib

    for name in ("lmmem.evaluation", "lmmem.evaluation.sources"):  # before / after the rewrite
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "model_from_checkpoint"):
            patched.append((module, "model_from_checkpoint"))
    saved = [(m, n, getattr(m, n)) for m, n in patched]
    for m, n in patched:
        setattr(m, n, as_double)
    try:
        yield
    finally:
        for m, n, v in saved:
            setattr(m, n, v)


# the settings of every case (shared with the test that replays them through the engine)
CACHE = dict(window=50)
MBPA = dict(k=4, steps=2, memory=50, vocab=20)
DYNAMIC = dict(lr=1e-3, stat_batches=3)
THETAS, LAMBDAS = (0.1, 1.0), (0.0, 0.1, 0.3)
METHODS = dict(batch_size=4, max_tokens=400, tune=True, thetas=THETAS, lambdas=LAMBDAS)
STREAMS = dict(batch_size=2, streams=4, max_tokens=300, cache=dict(window=40, theta=0.3, lam=0.2),
               mbpa=dict(k=3, steps=2, memory=30, vocab=0, lam=0.3))
SGD = dict(method="sgd", lr=0.05, decay=0.01)
PREFILL = dict(k=4, steps=2, lr=0.3, memory=20, lam=1.0, vocab=7, train_pairs=12)


def read_word_probs(path: Path) -> dict:
    lines = path.read_text(encoding="utf-8").splitlines()
    head = lines[0].split("\t")
    rows = [line.split("\t") for line in lines[1:]]
    return {"positions": [int(r[0]) for r in rows], **{m: [float(r[j]) for r in rows] for j, m in enumerate(head[4:], 4)}}


def old_numbers(tmp: Path) -> dict:
    """Every pinned number, from the evaluation code before the rewrite."""
    from lmmem.data.corpus import PreparedCorpus
    from lmmem.evaluation import (DynamicConfig, FrequencyBuckets, evaluate_checkpoint, evaluate_methods, score_dynamic,
                                  score_stream, score_test_time)
    from lmmem.memories import CacheConfig, MbPAConfig

    buckets = FrequencyBuckets(EDGES)
    out: dict = {}
    data = write_corpus(tmp / "words")
    corpus = PreparedCorpus.open(data)
    test, train = corpus.tokens("test"), corpus.tokens("train")
    bucket_of = buckets.assign(corpus.train_counts())
    for arch, softmax in (("lstm", "full"), ("transformer", "hebbian")):
        model, cfg = train_tiny(arch, data, softmax=softmax)
        ckpt = save(model, cfg, data, tmp / f"{arch}.pt")
        case: dict = {}
        nll, cnt = score_stream(model, test, bucket_of=bucket_of, num_buckets=3, batch_size=4, bptt=8)
        case["plain"] = {"nll": nll.tolist(), "count": cnt.tolist()}
        with float64_checkpoints():
            reports, meta = evaluate_methods(ckpt, device="cpu", buckets=buckets, cache=CacheConfig(**CACHE),
                                             mbpa=MbPAConfig(**MBPA), dynamic=DynamicConfig(**DYNAMIC),
                                             word_probs=tmp / f"{arch}.tsv", **METHODS)
            case["methods"] = {"reports": {m: r.to_dict() for m, r in reports.items()}, "tuned": meta["tuned"],
                               "word_probs": read_word_probs(tmp / f"{arch}.tsv")}
            reports, meta = evaluate_methods(ckpt, device="cpu", buckets=buckets, **{
                **STREAMS, "cache": CacheConfig(**STREAMS["cache"]), "mbpa": MbPAConfig(**STREAMS["mbpa"])})
            case["streams"] = {m: r.to_dict() for m, r in reports.items()}
        nll, cnt = score_dynamic(model, test, bucket_of=bucket_of, num_buckets=3, cfg=DynamicConfig(**SGD), batch_size=3, bptt=7)
        case["dynamic_sgd"] = {"nll": nll.tolist(), "count": cnt.tolist()}
        if arch == "lstm":
            s = score_test_time(model, test[:201], bucket_of=bucket_of, num_buckets=3, batch_size=1, bptt=7,
                                mbpa=MbPAConfig(**PREFILL), mbpa_lambdas=[0.0, 1.0], train_tokens=train)
            case["prefill"] = {"nll": s.sums(mbpa_lambda=1.0).tolist(), "count": s.count.tolist()}
        else:
            nll, cnt = score_stream(model, test, bucket_of=bucket_of, num_buckets=3, batch_size=2, bptt=3, context=5)
            case["score_stream_context"] = {"nll": nll.tolist(), "count": cnt.tolist()}
            with float64_checkpoints():
                for bs in (1, 4):
                    res = evaluate_checkpoint(ckpt, batch_size=bs, bptt=12, context=8, buckets=buckets, device="cpu", max_tokens=500)
                    case[f"context_batch{bs}"] = res.report.to_dict()
        out[arch] = case
    sp = write_corpus(tmp / "pieces", pieces=True, seed=1)
    model, cfg = train_tiny("lstm", sp, steps=20)
    ckpt = save(model, cfg, sp, tmp / "sp.pt", bptt=10)
    with float64_checkpoints():
        res = evaluate_checkpoint(ckpt, split="test", batch_size=3, buckets=buckets, device="cpu")
    out["sentencepiece"] = {"report": res.report.to_dict(), "words": res.words.to_dict()}
    return out


if __name__ == "__main__":
    import tempfile

    sys.path.insert(0, str(HERE))
    import conftest  # noqa: F401  (TRITON_INTERPRET before anything imports triton)

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/evaluation_pins.py --write   (only on the code before the rewrite)")
    with tempfile.TemporaryDirectory() as d:
        numbers = old_numbers(Path(d))
    PINS.parent.mkdir(exist_ok=True)
    PINS.write_text(json.dumps(numbers, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {PINS} ({PINS.stat().st_size:,} bytes)")
