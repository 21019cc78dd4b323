"""The training loop: exact resume, nothing lost on Ctrl-C / NaN / bad checkpoints."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_script, write_prepared_corpus
from lmmem.errors import CheckpointError, DataError, LmmemError
from lmmem.training import TrainConfig, config_from_args, load_checkpoint, resume_config, train
from lmmem.training.checkpoint import save_checkpoint

TINY = dict(embed_dim=16, hidden_dim=32, proj_dim=16, batch_size=4, bptt=12, log_interval=2, eval_interval=4,
            checkpoint_interval=3, eval_batch_size=4, progress=False, warmup_steps=2)


def _cfg(data, out, **kw) -> TrainConfig:
    return config_from_args({"data": str(data), "out": str(out), **TINY, **kw})


def _params(path):
    return load_checkpoint(path)["model"]


def test_resume_equals_uninterrupted_training(small_corpus, tmp_path):
    """Constant schedule: stopping after 5 steps and resuming to 11 is bit-for-bit the 11-step run
    (dropout on, so the RNG state must be restored; 11 > steps per epoch, so epochs roll over)."""
    kw = dict(lr_schedule="constant", dropout=0.3, output_dropout=0.3, batch_size=8, bptt=50)
    full = train(_cfg(small_corpus, tmp_path / "full", max_steps=23, **kw))
    assert full.progress.epoch >= 1  # 6000 tokens / (8 rows x 50) = 14 steps an epoch
    train(_cfg(small_corpus, tmp_path / "split", max_steps=5, **kw))
    train(resume_config(tmp_path / "split", {"max_steps": 23}))
    a, b = _params(tmp_path / "full" / "last.pt"), _params(tmp_path / "split" / "last.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    pa = load_checkpoint(tmp_path / "full" / "last.pt")["progress"]
    pb = load_checkpoint(tmp_path / "split" / "last.pt")["progress"]
    assert pa == pb
    log = [json.loads(l) for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 23  # the metrics log continues across the resume


def test_resume_refuses_a_changed_model(small_corpus, tmp_path):
    train(_cfg(small_corpus, tmp_path / "r", max_steps=2))
    with pytest.raises(CheckpointError, match="--hidden-dim"):
        resume_config(tmp_path / "r", {"hidden_dim": 64})
    with pytest.raises(CheckpointError, match="no .*last.pt"):
        resume_config(tmp_path / "nothing", {})


def test_checkpoint_is_written_atomically(tmp_path):
    target = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}}, target)

    class Boom(Exception):
        pass

    class Exploding:
        def __reduce__(self):
            raise Boom

    with pytest.raises(Boom):
        save_checkpoint({"model": {"w": torch.zeros(2)}, "x": Exploding()}, target)
    assert torch.equal(load_checkpoint(target, require=())["model"]["w"], torch.ones(2))  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_truncated_or_foreign_checkpoint_gives_a_clear_error(small_corpus, tmp_path):
    train(_cfg(small_corpus, tmp_path / "r", max_steps=2))
    good = (tmp_path / "r" / "last.pt").read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not an lmmem checkpoint"):
        load_checkpoint(foreign)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(small_corpus, tmp_path):
    out = tmp_path / "nan"
    train(_cfg(small_corpus, out, max_steps=3, checkpoint_interval=3, optimizer="sgd", lr=0.1))
    before = (out / "last.pt").read_bytes()
    proc = run_script("train.py", "--data", str(small_corpus), "--out", str(out), "--resume", "--max-steps", "40",
                      "--lr", "1e30", "--clip", "0", "--log-interval", "1")
    assert proc.returncode == 3, proc.stderr
    last_line = proc.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: ") and "loss became nan" in last_line.lower() or "loss became inf" in last_line.lower()
    assert "stopped without saving" in last_line
    assert "Traceback" not in proc.stderr
    assert (out / "last.pt").read_bytes() == before  # nothing overwritten with a NaN model
    ckpt = load_checkpoint(out / "last.pt")
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_ctrl_c_saves_then_exits_and_resume_continues(small_corpus, tmp_path):
    out = tmp_path / "int"
    proc = subprocess.Popen(
        [sys.executable, "train.py", "--data", str(small_corpus), "--out", str(out), "--max-steps", "100000",
         "--log-interval", "1", "--checkpoint-interval", "100000", "--eval-interval", "0", "--embed-dim", "16",
         "--hidden-dim", "32", "--proj-dim", "16", "--batch-size", "4", "--bptt", "12"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={"PYTHONUNBUFFERED": "1", "PATH": ""},
    )
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step") or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    step = load_checkpoint(out / "last.pt")["progress"]["step"]
    assert 0 < step < 100000
    assert f"interrupted at step {step}" in stdout
    proc = run_script("train.py", "--out", str(out), "--resume", "--max-steps", str(step + 2), check=True)
    assert f"resumed {out / 'last.pt'} at step {step}" in proc.stdout
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == step + 2


def test_bad_input_gives_one_line_errors(small_corpus, tmp_path):
    cases = [
        (["train.py", "--data", str(tmp_path / "missing")], "does not exist"),
        (["train.py", "--data", str(small_corpus), "--no-such-flag"], "unknown option --no-such-flag"),
        (["train.py", "--data", str(small_corpus), "--batch-size", "100000"], "too few"),
        (["evaluate.py", str(tmp_path / "none.pt"), "--data", str(small_corpus)], "no checkpoint"),
    ]
    for args, message in cases:
        proc = run_script(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_evaluating_on_another_vocabulary_is_refused(small_corpus, tmp_path):
    train(_cfg(small_corpus, tmp_path / "r", max_steps=2))
    other = write_prepared_corpus(tmp_path / "other", vocab_size=150)
    proc = run_script("evaluate.py", str(tmp_path / "r" / "best.pt"), "--data", str(other))
    assert proc.returncode == 2 and "vocabulary" in proc.stderr and "Traceback" not in proc.stderr


def test_truncated_token_file_is_refused(tmp_path):
    root = write_prepared_corpus(tmp_path / "c")
    data = (root / "train.bin").read_bytes()
    (root / "train.bin").write_bytes(data[:-6])
    from lmmem.data.corpus import PreparedCorpus

    with pytest.raises(DataError, match="truncated"):
        PreparedCorpus.open(root).tokens("train")
    with pytest.raises(DataError, match="no 'nope' split"):
        PreparedCorpus.open(root).tokens("nope")


def test_config_validation():
    with pytest.raises(LmmemError, match="--optimizer"):
        config_from_args({"optimizer": "lbfgs"})
    with pytest.raises(LmmemError, match="--preset"):
        config_from_args({"preset": "huge"})
    cfg = config_from_args({"preset": "wt103-paper"})
    assert (cfg.hidden_dim, cfg.proj_dim, cfg.embed_dim, cfg.num_layers, cfg.tie_weights, cfg.output_dropout) == (2048, 512, 512, 1, True, 0.2)
    assert config_from_args({"preset": "wt103-paper", "hidden_dim": 64}).hidden_dim == 64  # flags beat presets
    hebb = config_from_args({"softmax": "hebbian", "hebbian_T": 50, "hebbian_gamma": 0.1, "hebbian_rescale": True,
                             "hebbian_rule": "paper"}).model_config(10)
    assert hebb.softmax_options == {"gamma": 0.1, "smoothing_limit": 50, "rescale": True, "rule": "paper", "start_step": None}
    from lmmem.models import build_model

    layer = build_model(hebb).output
    assert (layer.gamma, layer.smoothing_limit, layer.rescale) == (0.1, 50, True)
