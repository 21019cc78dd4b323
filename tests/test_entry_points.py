"""What a user sees and keeps, through the real entry points (issue 23, items 2-5 and 8-10):
progress lines with step/total and time left in a redirected run, a resume that changes the
learning-rate schedule says so, runs record absolute paths (and old relative ones still resolve),
checkpoints and exports get the user's umask, a corpus without a valid split is said to be one, a
raw-text --data gets a command that works, and a refused data_prep re-run names the option."""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import REPO, write_prepared_corpus
from lmmem.checkpoints import load_checkpoint, save_checkpoint
from lmmem.data.corpus import PreparedCorpus
from lmmem.training import config_from_args
from lmmem.training.optim import schedule_change

pytestmark = pytest.mark.slow

TINY = ["--embed-dim", "16", "--hidden-dim", "32", "--proj-dim", "16", "--batch-size", "4", "--bptt", "12",
        "--eval-batch-size", "4", "--warmup-steps", "2", "--log-interval", "5"]


def run(*args, cwd: Path = REPO, umask: int | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """``python ARGS`` as a user types it, from ``cwd`` (repo scripts by absolute path), stdout and
    stderr both going to files (pipes: not a terminal)."""
    args = [str(REPO / a) if a in ("train.py", "evaluate.py") else str(a) for a in args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def test_redirected_training_prints_progress_with_total_and_time_left(small_corpus, tmp_path):
    log = tmp_path / "train.log"
    with open(log, "w") as f:  # the output of `python train.py ... > train.log 2>&1`
        subprocess.run([sys.executable, str(REPO / "train.py"), "--data", str(small_corpus), "--out", str(tmp_path / "r"), *TINY,
                        "--max-steps", "20", "--eval-interval", "10", "--eval-tokens", "480"], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    text = log.read_text()
    train_lines = re.findall(r"^train: (\d+)/20 steps \(\d+%\), \S+ elapsed, ~\S+ left", text, re.MULTILINE)
    assert len(train_lines) >= 3, text  # a line at every tenth of the run, each with step/total and time left
    assert re.search(r"^valid: \d+/\d+ batches \(\d+%\), \S+ elapsed, ~\S+ left", text, re.MULTILINE), text
    assert re.search(r"^step +5  loss ", text, re.MULTILINE), text  # the per-log-interval metric lines stay


def test_resume_says_when_it_changes_the_schedule(small_corpus, tmp_path):
    out = tmp_path / "r"
    run("train.py", "--data", small_corpus, "--out", out, *TINY, "--max-steps", "6", "--eval-interval", "0")
    same = run("train.py", "--out", out, "--resume", "--max-steps", "6")
    assert "schedule" not in same.stdout
    longer = run("train.py", "--out", out, "--resume", "--max-steps", "12")
    notes = [line for line in longer.stdout.splitlines() if "learning-rate schedule" in line]
    assert len(notes) == 1 and "--max-steps 12" in notes[0] and "--max-steps 6" in notes[0], longer.stdout
    # a constant schedule does not depend on --max-steps: nothing to say; a lower --lr is said
    flat = config_from_args({"lr_schedule": "constant", "max_steps": 8})
    assert schedule_change({**flat.to_dict(), "max_steps": 4}, flat, 4) is None
    assert "--lr 0.003" in schedule_change({**flat.to_dict(), "lr": 3e-3}, replace(flat, lr=1e-3), 4)


def test_runs_record_absolute_paths_and_old_relative_ones_still_resolve(tmp_path):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_prepared_corpus(project / "data" / "c")
    run("train.py", "--data", "data/c", "--out", "runs/x", *TINY, "--max-steps", "3", cwd=project)
    ckpt = load_checkpoint(project / "runs" / "x" / "last.pt")
    assert ckpt["train_config"]["data"] == str(project / "data" / "c")
    assert json.loads((project / "runs" / "x" / "config.json").read_text())["train"]["out"] == str(project / "runs" / "x")
    run("evaluate.py", project / "runs" / "x" / "best.pt", "--split", "valid", cwd=elsewhere)  # from another folder

    # a run written before paths were recorded absolute: "data/c" and "runs/old", as typed in `project`
    old = project / "runs" / "old"
    old.mkdir()
    save_checkpoint({**ckpt, "train_config": {**ckpt["train_config"], "data": "data/c", "out": "runs/old"}}, old / "best.pt")
    config = json.loads((project / "runs" / "x" / "config.json").read_text())
    config["train"].update(data="data/c", out="runs/old")
    (old / "config.json").write_text(json.dumps(config))
    run("evaluate.py", old / "best.pt", "--split", "valid", cwd=elsewhere)  # found where that run was started
    run("train.py", "--config", old / "config.json", "--out", "again", "--max-steps", "2", cwd=elsewhere)  # trained again
    assert load_checkpoint(elsewhere / "again" / "last.pt")["train_config"]["data"] == str(project / "data" / "c")
    moved = tmp_path / "copied-best.pt"  # outside its run folder, the old relative path means nothing
    moved.write_bytes((old / "best.pt").read_bytes())
    err = run("evaluate.py", moved, cwd=elsewhere, check=False)
    assert err.returncode == 2 and "'data/c', which is not a folder on this machine" in err.stderr


def test_checkpoints_and_exports_get_the_users_umask(small_corpus, tmp_path):
    pytest.importorskip("safetensors")
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    out = tmp_path / "r"
    run("train.py", "--data", small_corpus, "--out", out, *TINY, "--max-steps", "3", umask=0o027)
    for name in ("last.pt", "best.pt", "config.json", "metrics.jsonl"):
        assert mode(out / name) == 0o640, name  # not tempfile's 0600
    run("-m", "lmmem.training.export", out / "best.pt", "--out", tmp_path / "exp", umask=0o027)
    assert mode(tmp_path / "exp") == 0o750  # not tempfile's 0700
    assert {p.name: mode(p) for p in (tmp_path / "exp").iterdir()} == {
        "model.safetensors": 0o640, "vocab.txt": 0o640, "config.json": 0o640}


def test_a_corpus_without_a_valid_split_is_said_to_be_one(tmp_path):
    data = write_prepared_corpus(tmp_path / "c", tokens={"train": 3000})
    proc = run("train.py", "--data", data, "--out", tmp_path / "r", *TINY, "--max-steps", "3")
    warning = next(line for line in proc.stdout.splitlines() if line.startswith("warning:"))
    assert "no valid split" in warning and "best.pt will be the last model" in warning
    best = next(line for line in proc.stdout.splitlines() if line.startswith("best checkpoint:"))
    assert "the last model" in best
    command = next(line for line in proc.stdout.splitlines() if line.startswith("next:")).split(":", 1)[1].split("#")[0]
    assert "--split train" in command
    assert run(*shlex.split(command)[1:]).returncode == 0  # the suggested evaluation runs


def test_raw_text_as_data_suggests_the_command_that_works(tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    for i in range(3):
        (books / f"book{i}.txt").write_text("\n\n".join(f"Paragraph {j} of book {i}, with some words in it." for j in range(40)))
    proc = run("train.py", "--data", books, "--out", tmp_path / "r", check=False)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    command = re.search(r"`(python -m data_prep [^`]+)`", line).group(1)
    assert f"--source {books}" in command and f"--out {books}-prepared" in command
    run(*shlex.split(command)[1:])  # it works: a corpus outside the source, for --data
    assert PreparedCorpus.open(f"{books}-prepared").splits == ["train", "valid", "test"]


def test_a_refused_data_prep_rerun_names_the_option_that_differs(tmp_path):
    source = REPO / "tests" / "fixtures" / "gutenberg"
    out = tmp_path / "gut"
    run("-m", "data_prep", "gutenberg", "--source", source, "--out", out, "--quiet")
    proc = run("-m", "data_prep", "gutenberg", "--source", source, "--out", out, "--quiet", "--min-count", "5", check=False)
    assert proc.returncode == 2 and "--min-count 5 here, 3 there" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
