"""Nothing lost (issue 13): run folders and prepared corpora survive slips, races, kill -9 and a full disk.

The CLIs are driven in-process through their real ``main`` and ``lmmem.cli.run_cli`` (same code path as
``python train.py``, without paying for a fresh interpreter and torch import each time), and as real
subprocesses where two processes must race. The crash tests fork this (already imported) process and
SIGKILL the child at seeded random moments.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_script, write_prepared_corpus
from lmmem.cli import run_cli
from lmmem.data.corpus import PreparedCorpus
from lmmem.errors import DataError
from lmmem.safety import FolderBusy, FolderLock, describe_os_error
from lmmem.training import load_checkpoint
from lmmem.checkpoints import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"_cli_{name}", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN = _load_script("train")
EVALUATE = _load_script("evaluate")
# the scripts are thin wrappers; their parsers live in the package
from lmmem.evaluation import cli as _evaluate_cli  # noqa: E402
from lmmem.training import config as _train_config  # noqa: E402
TINY = ["--embed-dim", "8", "--hidden-dim", "12", "--proj-dim", "8", "--batch-size", "4", "--bptt", "8",
        "--eval-batch-size", "4", "--no-progress", "--warmup-steps", "1", "--log-interval", "1"]


def cli(main, *argv, capsys=None) -> tuple[int, str, str]:
    rc = run_cli(main, [str(a) for a in argv])
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return rc, out, err


def train_cli(capsys, data, out, *extra):
    return cli(TRAIN.main, "--data", data, "--out", out, *TINY, *extra, capsys=capsys)


def prep_cli(capsys, out, *extra, seed=0, tokens=3000):
    from data_prep.__main__ import main

    rc = main(["synthetic", "--out", str(out), "--seed", str(seed), "--train-tokens", str(tokens), "--valid-tokens", "400",
               "--test-tokens", "400", "--quiet", *map(str, extra)])
    out_, err = capsys.readouterr() if capsys is not None else ("", "")
    return rc, out_, err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def metric_steps(out: Path) -> list[int]:
    return [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if "train_loss" in l]


def stray_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or ".staging" in p.name or p.name.endswith(".old"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_prepared_corpus(tmp_path_factory.mktemp("data") / "c", vocab_size=60,
                                 tokens={"train": 1500, "valid": 300, "test": 300})


# ---------------------------------------------------------------------------------------------
# 1-3, 7, 8: run folders


def test_a_fresh_run_refuses_a_folder_that_holds_a_run(corpus, tmp_path, capsys):
    out = tmp_path / "r"
    assert train_cli(capsys, corpus, out, "--max-steps", "6", "--eval-interval", "3")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "eval-test.json").write_text("{}")
    rc, _, err = train_cli(capsys, corpus, out, "--max-steps", "2")
    line = one_line_error(err)
    assert rc == 2 and "--resume" in line and "another --out" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "eval-test.json"} == before  # nothing touched
    rc, stdout, _ = train_cli(capsys, corpus, out, "--max-steps", "2", "--overwrite")
    assert rc == 0 and "--overwrite: deleted" in stdout and "still holds eval-test.json" in stdout
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 2 and metric_steps(out) == [1, 2]
    rc, _, err = train_cli(capsys, corpus, out, "--resume", "--overwrite")
    assert rc == 2 and "give one of them" in one_line_error(err)


def test_resume_writes_the_folder_it_reads(corpus, tmp_path, capsys):
    """A copied (or crafted) checkpoint names another folder in train_config.out: it is never written."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert train_cli(capsys, corpus, a, "--max-steps", "2")[0] == 0
    b.mkdir()
    for name in ("last.pt", "metrics.jsonl"):
        (b / name).write_bytes((a / name).read_bytes())
    a_before = {p.name: p.read_bytes() for p in a.iterdir()}
    rc, stdout, _ = cli(TRAIN.main, "--out", b, "--resume", "--max-steps", "4", capsys=capsys)
    assert rc == 0 and f"resumed {b / 'last.pt'} at step 2" in stdout
    assert load_checkpoint(b / "last.pt")["progress"]["step"] == 4
    assert load_checkpoint(b / "last.pt")["train_config"]["out"] == str(b)
    assert {p.name: p.read_bytes() for p in a.iterdir()} == a_before


def test_resume_messages(corpus, tmp_path, capsys):
    rc, _, err = cli(TRAIN.main, "--out", tmp_path / "fresh", "--resume", capsys=capsys)
    assert rc == 2 and "drop --resume" in one_line_error(err)
    out = tmp_path / "r"
    assert train_cli(capsys, corpus, out, "--max-steps", "2")[0] == 0
    rc, _, err = cli(TRAIN.main, "--out", out, "--resume", "--preset", "small", capsys=capsys)
    assert rc == 2 and "--preset" in one_line_error(err) and "drop --preset" in err
    # a run killed between its first best.pt and its first last.pt
    (out / "best.pt").write_bytes((out / "last.pt").read_bytes())
    (out / "last.pt").unlink()
    rc, _, err = cli(TRAIN.main, "--out", out, "--resume", capsys=capsys)
    assert rc == 2 and "best.pt but no last.pt" in one_line_error(err) and "--overwrite" in err


def test_folder_lock_names_the_holder(tmp_path):
    lock = FolderLock(tmp_path / ".lock", "run folder X")
    with pytest.raises(FolderBusy, match=f"in use by process {os.getpid()}"):
        FolderLock(tmp_path / ".lock", "run folder X")
    lock.release()
    FolderLock(tmp_path / ".lock", "run folder X").release()  # free again once released


def test_divergence_without_nan_exits_3_and_keeps_the_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "d"
    assert train_cli(capsys, corpus, out, "--max-steps", "2")[0] == 0
    before = (out / "last.pt").read_bytes()
    rc, _, err = cli(TRAIN.main, "--out", out, "--resume", "--max-steps", "40", "--lr", "1e6", "--clip", "0", capsys=capsys)
    line = one_line_error(err)
    assert rc == 3 and "diverged" in line and "ln V" in line and "last good checkpoint is kept" in line
    assert (out / "last.pt").read_bytes() == before
    # no checkpoint yet: the message must not claim one is kept
    rc, _, err = train_cli(capsys, corpus, tmp_path / "new", "--lr", "1e6", "--clip", "0",
                           "--checkpoint-interval", "1000", "--eval-interval", "0", "--max-steps", "40")
    line = one_line_error(err)
    assert rc == 3 and "holds none" in line and "kept" not in line
    assert not (tmp_path / "new" / "last.pt").exists()


def test_start_removes_stale_temp_files_and_resume_trims_the_metrics(corpus, tmp_path, capsys):
    out = tmp_path / "k"
    assert train_cli(capsys, corpus, out, "--max-steps", "3")[0] == 0
    (out / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # what kill -9 mid-save leaves
    with open(out / "metrics.jsonl", "a") as f:  # steps logged after the checkpoint, then a torn line
        f.write(json.dumps({"step": 4, "train_loss": 1.0}) + "\n" + '{"step": 5, "tr')
    assert cli(TRAIN.main, "--out", out, "--resume", "--max-steps", "5", capsys=capsys)[0] == 0
    assert stray_files(out) == []
    assert metric_steps(out) == [1, 2, 3, 4, 5]  # no duplicate step 4, no torn line


# ---------------------------------------------------------------------------------------------
# 4-6: data_prep


def test_prepare_refuses_a_different_corpus_and_keeps_it_on_failure(tmp_path, capsys):
    out = tmp_path / "s"
    assert prep_cli(capsys, out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert prep_cli(capsys, out)[0] == 0  # the same corpus again: allowed, byte-identical
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    rc, _, err = prep_cli(capsys, out, seed=1)
    # the refusal names the option that differs (issue 23)
    assert rc == 2 and "prepared with other options (--seed 1 here, 0 there)" in one_line_error(err) and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert prep_cli(capsys, out, "--overwrite", seed=1)[0] == 0
    assert PreparedCorpus.open(out).meta["seed"] == 1
    assert stray_files(tmp_path) == [] and stray_files(out) == []
    # a folder with other files in it is never replaced, not even with --overwrite
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    rc, _, err = prep_cli(capsys, other, "--overwrite")
    assert rc == 2 and "notes.txt" in one_line_error(err) and (other / "notes.txt").read_text() == "precious"


def test_prepare_refuses_out_inside_source(tmp_path, capsys):
    from data_prep.__main__ import main

    src = tmp_path / "books"
    src.mkdir()
    (src / "a.txt").write_text("one two three\n" * 50)
    for out in (src, src / "prepared"):
        rc = main(["gutenberg", "--source", str(src), "--out", str(out), "--quiet", "--allow-missing-splits"])
        err = capsys.readouterr().err
        assert rc == 2 and "overlap" in one_line_error(err)
    assert sorted(p.name for p in src.iterdir()) == ["a.txt"]


def test_prepare_refuses_the_current_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, _, err = prep_cli(capsys, ".")
    assert rc == 2 and "current folder" in one_line_error(err) and list(tmp_path.iterdir()) == []


def test_an_interrupted_swap_is_recovered(tmp_path, capsys):
    """A crash between the two renames of the fallback swap leaves the old corpus parked at .NAME.old."""
    out = tmp_path / "s"
    assert prep_cli(capsys, out)[0] == 0
    os.rename(out, tmp_path / ".s.old")
    (tmp_path / ".s.staging").mkdir()  # the unfinished new one
    rc, _, err = prep_cli(capsys, out, seed=3)  # another corpus without --overwrite: refused, after recovery
    assert rc == 2 and "other options (--seed 3 here, 0 there)" in err
    assert PreparedCorpus.open(out).meta["seed"] == 0 and stray_files(tmp_path) == []


def test_swap_without_renameat2(tmp_path, capsys, monkeypatch):
    """Where the kernel or file system has no atomic exchange, two renames do it (recovered above)."""
    import lmmem.safety as S

    out = tmp_path / "s"
    assert prep_cli(capsys, out)[0] == 0
    monkeypatch.setattr(S, "_exchange", lambda a, b: False)
    assert prep_cli(capsys, out, "--overwrite", seed=4)[0] == 0
    assert PreparedCorpus.open(out).meta["seed"] == 4 and stray_files(tmp_path) == []


def test_out_that_is_a_symlink(tmp_path, capsys):
    real = tmp_path / "disk" / "corpus"
    assert prep_cli(capsys, real)[0] == 0
    (tmp_path / "link").symlink_to(real)
    assert prep_cli(capsys, tmp_path / "link", "--overwrite", seed=2)[0] == 0
    assert (tmp_path / "link").is_symlink() and PreparedCorpus.open(tmp_path / "link").meta["seed"] == 2
    assert stray_files(tmp_path) == [] and stray_files(real.parent) == []


def test_two_first_runs_share_the_embedded_corpus(tmp_path, monkeypatch):
    """Two first-ever train.py (no --data) race to write the synthetic corpus: one writes, the other waits."""
    from lmmem.data import synthetic
    from lmmem.training import run as trainer_run
    from lmmem.training.config import TrainConfig
    from lmmem.training.distributed import DistContext

    monkeypatch.setenv("LMMEM_CACHE", str(tmp_path / "cache"))
    writes = []
    real = synthetic.write_synthetic_corpus

    def small(path, **kw):
        writes.append(path)
        time.sleep(0.3)  # keep the window open
        return real(path, train_tokens=3000, valid_tokens=300, test_tokens=300, **kw)

    monkeypatch.setattr(synthetic, "write_synthetic_corpus", small)
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    results, errors = [], []

    def run():
        try:
            results.append(trainer_run.ensure_data(TrainConfig(), ctx))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(writes) == 1 and len(results) == 2
    PreparedCorpus.open(results[0]).tokens("train")


# ---------------------------------------------------------------------------------------------
# 9, 11: untrusted files


def test_split_files_must_be_plain_names(tmp_path):
    root = write_prepared_corpus(tmp_path / "c", vocab_size=30, tokens={"train": 200, "valid": 50, "test": 50})
    (tmp_path / "elsewhere.bin").write_bytes((root / "test.bin").read_bytes())
    meta = json.loads((root / "meta.json").read_text())
    for name in ("../elsewhere.bin", str(tmp_path / "elsewhere.bin"), "..", "sub/test.bin"):
        meta["splits"]["test"]["file"] = name
        (root / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(DataError, match="plain names inside the corpus folder"):
            PreparedCorpus.open(root).tokens("test")


def test_token_ids_beyond_the_vocabulary_and_bad_counts_are_refused(tmp_path):
    root = write_prepared_corpus(tmp_path / "c", vocab_size=30, tokens={"train": 200, "valid": 50, "test": 50})
    ids = np.fromfile(root / "valid.bin", dtype="<u4")
    ids[17] = 38_389
    ids.tofile(root / "valid.bin")
    corpus = PreparedCorpus.open(root)
    corpus.tokens("train")
    with pytest.raises(DataError, match="token id 38389 but .* has 30 entries"):
        corpus.tokens("valid")
    text = (root / "vocab.txt").read_text().replace("\t", "\t²", 1)  # "²".isdigit() is True
    (root / "vocab.txt").write_text(text)
    with pytest.raises(DataError, match="vocab.txt:1 is not `token<TAB>count`"):
        PreparedCorpus.open(root)


def test_damaged_checkpoints_are_refused(corpus, tmp_path, capsys):
    out = tmp_path / "r"
    assert train_cli(capsys, corpus, out, "--max-steps", "1")[0] == 0
    ckpt = torch.load(out / "last.pt", weights_only=True)
    bad = dict(ckpt)
    del bad["model_config"]
    save_checkpoint(bad, tmp_path / "missing.pt")
    rc, _, err = cli(EVALUATE.main, tmp_path / "missing.pt", capsys=capsys)
    assert rc == 2 and "lacks model_config" in one_line_error(err)
    for vocab in (10**12, 0, "60"):
        bad = {**ckpt, "model_config": {**ckpt["model_config"], "vocab_size": vocab}}
        save_checkpoint(bad, tmp_path / "absurd.pt")
        rc, _, err = cli(EVALUATE.main, tmp_path / "absurd.pt", capsys=capsys)
        assert rc == 2 and "vocabulary of" in one_line_error(err)
    # consistent but absurd shapes: refused before anything is allocated
    bad = {**ckpt, "model_config": {**ckpt["model_config"], "hidden_dim": 10**9}}
    save_checkpoint(bad, tmp_path / "huge.pt")
    rc, _, err = cli(EVALUATE.main, tmp_path / "huge.pt", capsys=capsys)
    assert rc == 2 and "do not fit" in one_line_error(err)
    # train_config.data is only a default: a path that is not there asks for --data
    bad = {**ckpt, "train_config": {**ckpt["train_config"], "data": str(tmp_path / "gone")}}
    save_checkpoint(bad, tmp_path / "moved.pt")
    rc, _, err = cli(EVALUATE.main, tmp_path / "moved.pt", capsys=capsys)
    assert rc == 2 and "pass --data" in one_line_error(err) and not (tmp_path / "gone").exists()
    assert cli(EVALUATE.main, tmp_path / "moved.pt", "--data", corpus, "--max-tokens", "50", capsys=capsys)[0] == 0


# ---------------------------------------------------------------------------------------------
# 10: OS errors as one line


def test_out_that_is_a_file_and_unwritable_json(corpus, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = train_cli(capsys, corpus, f, "--max-steps", "1")
    assert rc == 2 and "is a file" in one_line_error(err)
    rc, _, err = train_cli(capsys, corpus, f / "run", "--max-steps", "1")
    assert rc == 2 and "is a file" in one_line_error(err)
    rc, _, err = prep_cli(capsys, f)
    assert rc == 2 and "is a file" in one_line_error(err)
    rc, _, err = prep_cli(capsys, f / "corpus")
    assert rc == 2 and "is a file" in one_line_error(err)
    assert train_cli(capsys, corpus, tmp_path / "r", "--max-steps", "1")[0] == 0
    rc, _, err = cli(EVALUATE.main, tmp_path / "r" / "last.pt", "--max-tokens", "40", "--json", f / "e.json", capsys=capsys)
    assert rc == 2 and str(f) in one_line_error(err)
    rc, _, err = cli(EVALUATE.main, tmp_path / "r" / "last.pt", "--max-tokens", "40", "--json", tmp_path, capsys=capsys)
    assert rc == 2 and str(tmp_path) in one_line_error(err)
    rc, _, err = cli(TRAIN.main, "--data", f, capsys=capsys)
    assert rc == 2 and "is a file" in one_line_error(err) and "--data" in err


def test_read_only_out(corpus, tmp_path, capsys, monkeypatch):
    """(Root ignores file modes, so the read-only file system is injected where the folder is made.)"""
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **kw):
        if "ro" in self.parts:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    rc, _, err = train_cli(capsys, corpus, tmp_path / "ro" / "run", "--max-steps", "1")
    assert rc == 2 and "read-only file system" in one_line_error(err) and "writable --out" in err
    rc, _, err = prep_cli(capsys, tmp_path / "ro" / "corpus")
    assert rc == 2 and "read-only file system" in one_line_error(err)


def test_os_error_lines():
    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/d/last.pt")).startswith("no space left on /d/last.pt")
    assert "read-only" in describe_os_error(OSError(errno.EROFS, "Read-only file system", "/ro/x"))
    assert "permission denied: /p" in describe_os_error(PermissionError(errno.EACCES, "Permission denied", "/p"))


class _FullDisk:
    """A file object that takes ``budget`` bytes, then fails like a full disk."""

    def __init__(self, f, budget: int):
        self.f, self.budget = f, budget

    def write(self, data):
        self.budget -= len(data)
        if self.budget < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_full_disk_during_a_checkpoint(corpus, tmp_path, capsys, monkeypatch):
    """ENOSPC injected into the checkpoint writes from the second one on: one line, exit 2, the first
    checkpoint intact and loadable, no temp file left."""
    from lmmem import checkpoints as C

    out = tmp_path / "full"
    real_fdopen, saves = os.fdopen, []

    def fdopen(fd, *a, **kw):
        saves.append(fd)
        f = real_fdopen(fd, *a, **kw)
        return f if len(saves) == 1 else _FullDisk(f, budget=4096)

    monkeypatch.setattr(C.os, "fdopen", fdopen)
    rc, _, err = train_cli(capsys, corpus, out, "--max-steps", "6", "--checkpoint-interval", "2", "--eval-interval", "0")
    line = one_line_error(err)
    assert rc == 2 and f"no space left on {out / 'last.pt'}" in line
    assert load_checkpoint(out / "last.pt")["progress"]["step"] == 2
    assert stray_files(out) == []
    monkeypatch.undo()
    assert cli(TRAIN.main, "--out", out, "--resume", "--max-steps", "6", capsys=capsys)[0] == 0


def test_full_disk_during_data_prep(tmp_path, capsys, monkeypatch):
    from lmmem.data.vocab import Vocabulary

    out = tmp_path / "s"
    assert prep_cli(capsys, out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Vocabulary, "save", full)
    rc, _, err = prep_cli(capsys, out, "--overwrite", seed=5)
    assert rc == 2 and "no space left on" in one_line_error(err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and stray_files(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 12-14: flags


BAD_TRAIN_FLAGS = [
    ("--embed-dim", "0"), ("--hebbian-gamma", "nan"), ("--clip", "-1"), ("--warmup-steps", "-5"),
    ("--eval-interval", "-1"), ("--time-budget", "-2"), ("--max-epochs", "-1"), ("--lr", "inf"), ("--dropout", "1"),
]
BAD_EVAL_FLAGS = [
    ("--mbpa-lr", "nan"), ("--mbpa-alpha", "nan"), ("--cache-theta", "nan"), ("--dynamic-lr", "nan"),
    ("--mbpa-eps", "0"), ("--mbpa-eps", "-1"), ("--max-tokens", "-1"), ("--cache-lambda", "2"),
]


@pytest.mark.parametrize("flag,value", BAD_TRAIN_FLAGS)
def test_bad_train_flags(flag, value, corpus, tmp_path, capsys):
    rc, _, err = train_cli(capsys, corpus, tmp_path / "r", flag, value)
    line = one_line_error(err)
    assert rc == 2 and f"{flag} {value}" in line.lower() and "expected" in line and "(" in line
    assert not (tmp_path / "r").exists()


def test_bad_evaluate_flags(corpus, tmp_path, capsys):
    assert train_cli(capsys, corpus, tmp_path / "r", "--max-steps", "1")[0] == 0
    for flag, value in BAD_EVAL_FLAGS:
        rc, _, err = cli(EVALUATE.main, tmp_path / "r", "--cache", "--mbpa", "--dynamic", flag, value, capsys=capsys)
        assert rc == 2 and flag in one_line_error(err), (flag, err)
    rc, _, err = cli(EVALUATE.main, tmp_path / "r", "--mbpa", "--mbpa-k", "500", "--mbpa-memory", "100", capsys=capsys)
    assert rc == 2 and "larger than --mbpa-memory" in one_line_error(err)


def _numeric_flags(parser) -> set[str]:
    import argparse

    dests = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                dests |= _numeric_flags(sub)
        elif action.type in (int, float) or getattr(action.type, "__name__", "") in ("positive_int", "fraction"):
            dests.add(action.dest)
    return dests


def _parser_of(main) -> "argparse.ArgumentParser":
    import argparse

    class Got(Exception):
        pass

    captured = []
    real = argparse.ArgumentParser.parse_args

    def capture(self, *a, **kw):
        captured.append(self)
        raise Got

    argparse.ArgumentParser.parse_args = capture
    try:
        main(["x"])
    except Got:
        pass
    finally:
        argparse.ArgumentParser.parse_args = real
    return captured[0]


def test_every_numeric_flag_of_every_cli_has_a_rule():
    """A new int/float flag needs one line in lmmem.validation.RULES (the reason included)."""
    from lmmem.experiments import (
        binding, curriculum, dynamic_sweep, long_training, mbpa_sweep, name_recall, no_blowup, softmax_comparison,
    )
    from lmmem.validation import RULES

    from data_prep.__main__ import build_parser as prep_parser

    parsers = {"train.py": _train_config.build_parser(), "evaluate.py": _evaluate_cli.build_parser(), "data_prep": prep_parser()}
    for module in (binding, curriculum, dynamic_sweep, long_training, mbpa_sweep, name_recall, no_blowup, softmax_comparison):
        parsers[module.__name__] = _parser_of(module.main)
    missing = {name: sorted(_numeric_flags(p) - set(RULES)) for name, p in parsers.items()}
    assert not any(missing.values()), f"add a rule to lmmem/validation.py for {missing}"


def test_help_states_each_default_once():
    """Was "(default: the training bptt) (default: None)"."""
    import argparse

    import re

    from data_prep.__main__ import build_parser as prep_parser

    subs = [a for a in prep_parser()._actions if isinstance(a, argparse._SubParsersAction)][0].choices.values()
    for parser in (_train_config.build_parser(), _evaluate_cli.build_parser(), *subs):
        text = " ".join(parser.format_help().split())
        assert "(default: None)" not in text
        assert not re.search(r"default[^()]*\) \(default", text), re.search(r".{80}default[^()]*\) \(default.{20}", text)


@pytest.mark.slow
def test_experiment_entry_points_print_one_line(tmp_path, capsys):
    proc = run_script("-m", "lmmem.experiments.mbpa_sweep", str(tmp_path / "missing.pt"))  # was a traceback
    assert proc.returncode == 2 and "no checkpoint at" in one_line_error(proc.stderr)
    from lmmem.experiments import curriculum, name_recall

    rc, _, err = cli(name_recall.main, tmp_path / "m.pt", "--max-tokens", "-1", capsys=capsys)
    assert rc == 2 and "--max-tokens -1" in one_line_error(err)
    rc, _, err = cli(curriculum.cli, "--classes", "0", capsys=capsys)
    assert rc == 2 and "--classes 0" in one_line_error(err)
