"""kill -9 and races (issue 13): a killed train.py resumes to the same model, a killed data_prep leaves
the previous corpus (or the complete new one), and two processes on one --out never interleave.

The crash trials fork this process (torch and lmmem already imported, so a trial costs a fraction of
a second instead of an interpreter start) and run the real CLI ``main`` through ``run_cli`` in the
child; the parent SIGKILLs it at a seeded random moment within the run's measured duration. The
races start real ``python train.py`` / ``python -m data_prep`` processes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import write_prepared_corpus
from lmmem.cli import run_cli
from lmmem.data.corpus import PreparedCorpus
from lmmem.training import load_checkpoint
from test_safety import TINY, TRAIN, metric_steps, stray_files

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
TRIALS = 20


def _in_child(main, argv) -> int:
    """Run ``run_cli(main, argv)`` in a forked child; returns its pid (output to /dev/null)."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 99
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            torch.set_num_threads(1)
            code = run_cli(main, [str(a) for a in argv])
        finally:
            os._exit(code if isinstance(code, int) else 98)
    return pid


def _wait(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _run(main, argv, limit: float = 300.0) -> tuple[int, float]:
    """Run to completion in a forked child. A child forked from pytest can inherit a lock that
    another pytest thread held at the fork and then wait on it forever (seen once under CI load):
    such a child is killed after ``limit`` seconds and the run forked again, once."""
    for attempt in range(2):
        t0 = time.monotonic()
        pid = _in_child(main, argv)
        while time.monotonic() - t0 < limit:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status), time.monotonic() - t0
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        _wait(pid)
    raise AssertionError(f"a forked run did not finish within {limit:.0f} s, twice")


def _killed(main, argv, after: float) -> int:
    pid = _in_child(main, argv)
    time.sleep(after)
    os.kill(pid, signal.SIGKILL)
    return _wait(pid)


def test_kill_9_during_training_then_resume(tmp_path):
    data = write_prepared_corpus(tmp_path / "c", vocab_size=60, tokens={"train": 1500, "valid": 300, "test": 300})
    steps = 10
    # a checkpoint every step and a validation (best.pt) every 3: most of the time is spent writing
    args = ["--data", data, *TINY, "--max-steps", steps, "--checkpoint-interval", "1", "--eval-interval", "3",
            "--lr-schedule", "constant", "--dropout", "0.2"]
    rc, duration = _run(TRAIN.main, [*args, "--out", tmp_path / "ref"])
    assert rc == 0
    reference = load_checkpoint(tmp_path / "ref" / "last.pt")["model"]
    rng = random.Random(13)
    outcomes = {"resumed": 0, "restarted": 0}
    for trial in range(TRIALS):
        out = tmp_path / f"run{trial}"
        # (0: a run faster than the reference had finished already)
        assert _killed(TRAIN.main, [*args, "--out", out], rng.uniform(0.0, 0.9 * duration)) in (-signal.SIGKILL, 0)
        if (out / "last.pt").is_file():
            load_checkpoint(out / "last.pt")  # whatever moment it died, last.pt is whole
            argv, kind = ["--out", out, "--resume", "--max-steps", steps], "resumed"
        else:  # died before its first last.pt (best.pt alone needs --overwrite, see test_safety)
            argv, kind = [*args, "--out", out, "--overwrite"], "restarted"
        assert _run(TRAIN.main, argv)[0] == 0, (trial, kind)
        outcomes[kind] += 1
        assert stray_files(out) == [], trial  # the start removed what the kill left
        assert metric_steps(out) == list(range(1, steps + 1)), trial  # no duplicated or torn records
        final = load_checkpoint(out / "last.pt")
        assert final["progress"]["step"] == steps
        for k, v in reference.items():  # bit-for-bit the uninterrupted run
            assert torch.equal(final["model"][k], v), (trial, kind, k)
    assert outcomes["resumed"] >= TRIALS // 4, outcomes  # the kills spread over the run (timing varies with load)


def test_kill_9_during_data_prep_keeps_a_whole_corpus(tmp_path):
    from data_prep.__main__ import main

    out = tmp_path / "corpus"

    def argv(seed):
        return ["synthetic", "--out", out, "--seed", seed, "--train-tokens", 10_000, "--valid-tokens", 2000,
                "--test-tokens", 2000, "--quiet", "--overwrite"]

    def prep(args):  # data_prep's main wraps run_cli itself
        return main(args)

    rc, duration = _run(prep, argv(0))
    assert rc == 0
    rng = random.Random(7)
    current = 0
    swapped = 0
    for trial in range(1, TRIALS + 1):
        assert _killed(prep, argv(trial), rng.uniform(0.0, 1.1 * duration)) in (-signal.SIGKILL, 0)  # 0: it had finished
        # whatever moment it died: the old corpus or the complete new one, never a mix
        if not out.is_dir():  # died between the two renames of the fallback swap: the next start recovers
            assert (tmp_path / ".corpus.old").is_dir()
        else:
            corpus = PreparedCorpus.open(out)
            assert corpus.meta["seed"] in (current, trial), trial
            swapped += corpus.meta["seed"] == trial
            for split in ("train", "valid", "test"):
                corpus.tokens(split)  # sizes match meta.json and every id is in the vocabulary
        assert _run(prep, argv(trial))[0] == 0, trial  # the next start cleans up and succeeds
        current = trial
        assert PreparedCorpus.open(out).meta["seed"] == trial
        assert stray_files(tmp_path) == [] and stray_files(out) == [], trial
    assert sorted(p.name for p in tmp_path.iterdir()) == [".corpus.lock", "corpus"]
    assert swapped < TRIALS  # most kills landed before the swap


# ---------------------------------------------------------------------------------------------
# races: the first process is a forked child running the CLI, the second this process running it


def _wait_for_lock(lock: Path, pid: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.is_file() and lock.read_text().strip() == str(pid):
            return
        done, status = os.waitpid(pid, os.WNOHANG)
        assert done == 0, f"the first process exited ({status}) before taking the lock"
        time.sleep(0.02)
    raise AssertionError(f"{lock} never named {pid}")


def test_two_trainings_on_one_out(tmp_path, capsys):
    data = write_prepared_corpus(tmp_path / "c", vocab_size=60, tokens={"train": 1500, "valid": 300, "test": 300})
    out = tmp_path / "run"
    first = _in_child(TRAIN.main, ["--data", data, "--out", out, *TINY, "--max-steps", 1_000_000, "--checkpoint-interval", 5,
                                   "--eval-interval", 0])
    try:
        _wait_for_lock(out / ".lock", first)
        capsys.readouterr()
        rc = run_cli(TRAIN.main, [str(a) for a in ["--data", data, "--out", out, *TINY, "--max-steps", 3]])
        err = capsys.readouterr().err
        assert rc == 2 and f"in use by process {first}" in err and len(err.strip().splitlines()) == 1, err
        deadline = time.monotonic() + 120  # let the survivor reach its loop (its Ctrl-C handler) and log
        while not (out / "metrics.jsonl").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.kill(first, signal.SIGINT)  # Ctrl-C: the survivor saves and exits 130
        assert _wait(first) == 130
    step = load_checkpoint(out / "last.pt")["progress"]["step"]
    assert step > 0 and metric_steps(out) == list(range(1, step + 1))  # one writer: no interleaved records
    assert _run(TRAIN.main, ["--out", out, "--resume", "--max-steps", step + 1])[0] == 0


def test_two_data_preps_on_one_out(tmp_path, capsys):
    from data_prep.__main__ import main

    out = tmp_path / "corpus"

    def argv(tokens):
        return ["synthetic", "--out", str(out), "--quiet", "--train-tokens", str(tokens)]

    first = _in_child(lambda a: main(a), argv(300_000))
    try:
        _wait_for_lock(tmp_path / ".corpus.lock", first)
        capsys.readouterr()
        rc = main(argv(5000))
        err = capsys.readouterr().err
        assert rc == 2 and f"in use by process {first}" in err and len(err.strip().splitlines()) == 1, err
    finally:
        assert _wait(first) == 0
    corpus = PreparedCorpus.open(out)
    assert corpus.meta["options"]["train_tokens"] == 300_000
    for split in corpus.splits:
        corpus.tokens(split)
    assert stray_files(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# a real full disk: a small tmpfs in a private mount namespace (skipped where mounting is not allowed;
# tests/test_safety.py injects ENOSPC everywhere)

_FULL_DISK_SCRIPT = r"""
import errno, json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import test_safety as T
from lmmem.cli import run_cli
from lmmem.training import load_checkpoint

disk, data = Path(sys.argv[1]), sys.argv[2]
out = disk / "run"
common = ["--data", data, "--out", str(out), *T.TINY, "--checkpoint-interval", "1", "--eval-interval", "0"]
assert run_cli(T.TRAIN.main, [*map(str, common), "--max-steps", "2"]) == 0
size = (out / "last.pt").stat().st_size
fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)  # fill the disk, then give back less than one checkpoint
try:
    while True:
        os.write(fd, b"\0" * 4096)
except OSError as e:
    assert e.errno == errno.ENOSPC
os.close(fd)
os.truncate(disk / "filler", max(0, (disk / "filler").stat().st_size - size // 2))
rc = run_cli(T.TRAIN.main, ["--out", str(out), "--resume", "--max-steps", "6"])
print(json.dumps({"rc": rc, "step": load_checkpoint(out / "last.pt")["progress"]["step"],
                  "files": sorted(p.name for p in out.iterdir())}))
"""


def test_full_disk_on_a_real_tmpfs(tmp_path):
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    data = write_prepared_corpus(tmp_path / "c", vocab_size=60, tokens={"train": 1500, "valid": 300, "test": 300})
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "full_disk.py"
    script.write_text(_FULL_DISK_SCRIPT)
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {disk}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({probe.stderr.decode().strip()[:80]}); the injected ENOSPC tests cover it")
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size=1m tmpfs "$1" && exec "$2" "$3" "$1" "$4" "$5"', "sh",
         str(disk), sys.executable, str(script), str(data), str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert result["rc"] == 2 and len(errors) == 1 and "no space left on" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert result["step"] >= 2  # the last checkpoint that fitted is intact and loads
    assert not [f for f in result["files"] if f.endswith(".tmp")], result["files"]
