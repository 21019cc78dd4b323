"""lmmem.experiments.train_hf: a tiny HF GPT-2/Llama trained with the Trainer on a prepared corpus's
text. The folder loads with from_pretrained, its tokenizer round-trips the corpus text, runs are
deterministic given the seed, an interrupted run continues to the same weights, and a finished run
is reused, never silently replaced."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="lmmem[hf] extra not installed")

from lmmem.data.corpus import PreparedCorpus  # noqa: E402
from lmmem.errors import LmmemError  # noqa: E402
from lmmem.experiments.train_hf import (  # noqa: E402
    HFTrainConfig, encode_units, main, stream_nll, train_hf, train_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")
transformers.logging.set_verbosity_error()


def config(corpus, out, **kw) -> HFTrainConfig:
    base = dict(data=str(corpus), out=str(out), vocab_size=320, d_model=16, layers=1, heads=2, context=32, batch_size=2,
                steps=6, eval_interval=2, eval_batch_size=8, warmup_steps=1, progress=False)
    return HFTrainConfig(**{**base, **kw})


def weights(folder) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_model_folder_loads_and_tokenizer_round_trips(small_corpus, tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = train_hf(config(small_corpus, tmp_path / arch, arch=arch))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / arch)
    tok = AutoTokenizer.from_pretrained(tmp_path / arch)
    assert model.config.model_type == arch and model.config.tie_word_embeddings
    corpus = PreparedCorpus.open(small_corpus)
    units = list(corpus.text_units("valid"))
    newline = tok.convert_tokens_to_ids("Ċ")  # byte-level BPE's symbol for "\n"
    for unit in units:
        ids = tok(unit + "\n")["input_ids"]
        assert tok.eos_token_id not in ids  # the tokenizer adds nothing by itself
        assert tok.decode(ids) == unit + "\n" and ids[-1] == newline and newline not in ids[:-1]
    # the stream: every unit followed by its line break, each tokenized on its own
    stream = encode_units(tok, units)
    assert (stream == newline).sum() == len(units) and stream[-1] == newline
    assert tok.decode(stream) == "".join(u + "\n" for u in units)
    assert record["split_words"]["valid"] == len(corpus.tokens("valid"))
    assert record["split_tokens"]["valid"] == len(stream) - 1
    assert record["steps"] == 6 and record["train_tokens"] == 6 * 2 * 32
    assert record["best_step"] in (2, 4, 6)
    # the saved model is the best checkpoint: its per-token valid loss is what run.json says
    total, count = stream_nll(model, stream, 32)
    assert total / count == pytest.approx(record["valid"]["token_loss"], rel=1e-6)
    assert record["valid"]["word_loss"] == pytest.approx(total / record["split_words"]["valid"], rel=1e-6)


def test_tokenizer_keeps_spaces_and_unk():
    # word-level corpus text: a space before every punctuation mark and split contraction, which
    # transformers' clean_up_tokenization_spaces would remove on decoding
    texts = ["the cat <unk> sat .", "<unk> and <unk> , the dog 's bowl .", '" Yes , " she said ; do n\'t ( 1,000 ) ?',
             "Émile ' s café — 3.14 % <unk>"]
    tok = train_tokenizer(texts * 40, 300)
    for text in [*texts, "a <unk> b", " leading and trailing  spaces "]:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.convert_ids_to_tokens(tok(" <unk>")["input_ids"]) == ["Ġ<unk>"]


def test_stream_nll_scores_every_token_once():
    class Uniform(torch.nn.Module):  # log-prob of token t at position i: a known function of (i, t)
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, 7, dtype=torch.float64)
            logits.scatter_(2, input_ids[..., None] % 7, 1.0)  # prefers repeating the current token
            return type("Out", (), {"logits": logits})

    ids = np.random.default_rng(0).integers(0, 7, size=101)
    expected = 0.0
    for a, b in zip(ids[:-1], ids[1:]):
        expected -= (1.0 if a == b else 0.0) - np.log(np.e + 6)
    for context in (8, 9, 200):
        total, count = stream_nll(Uniform(), ids, context, batch_size=3)
        assert count == 100 and total == pytest.approx(expected, rel=1e-12)


@pytest.mark.slow
def test_deterministic_resumable_and_reused(small_corpus, tmp_path):
    from transformers import TrainerCallback

    a = train_hf(config(small_corpus, tmp_path / "a"))

    class StopAt4(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                control.should_training_stop = True

    class Count(TrainerCallback):
        steps = 0

        def on_step_end(self, args, state, control, **kw):
            Count.steps += 1

    assert train_hf(config(small_corpus, tmp_path / "b"), callbacks=[StopAt4()]) == {"stopped_at": 4}
    assert not (tmp_path / "b" / "run.json").exists()
    b = train_hf(config(small_corpus, tmp_path / "b"), callbacks=[Count()])  # continues from checkpoint-4
    assert Count.steps == 2
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a["valid"] == b["valid"] and b["train_seconds"] > 0
    # killed while saving the finished model: the next call trains nothing and saves the same model
    for name in ("run.json", "model.safetensors"):
        (tmp_path / "b" / name).unlink()
    Count.steps = 0
    assert train_hf(config(small_corpus, tmp_path / "b"), callbacks=[Count()])["valid"] == a["valid"]
    assert Count.steps == 0 and all(torch.equal(wa[k], weights(tmp_path / "b")[k]) for k in wa)
    other = train_hf(config(small_corpus, tmp_path / "c", seed=2))
    assert other["valid"]["token_loss"] != a["valid"]["token_loss"]

    # finished: the same settings reuse it untouched; other settings are refused, or replaced with --overwrite
    stamp = (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns
    assert train_hf(config(small_corpus, tmp_path / "a")) == a
    assert (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(LmmemError, match="another run"):
        train_hf(config(small_corpus, tmp_path / "a", steps=4))
    assert json.loads((tmp_path / "a" / "run.json").read_text()) == a
    assert train_hf(config(small_corpus, tmp_path / "a", steps=4, overwrite=True))["steps"] == 4


def test_cli_bad_input_is_one_line(small_corpus, tmp_path, capsys):
    from lmmem.cli import run_cli

    assert run_cli(main, ["--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == "error: give --data (a prepared corpus folder) and --out (the model folder)"
    assert run_cli(main, ["--data", str(small_corpus), "--out", str(tmp_path / "x"), "--d-model", "30", "--heads", "4"]) == 2
    assert "not a multiple of --heads" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert run_cli(main, ["--data", str(small_corpus), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
