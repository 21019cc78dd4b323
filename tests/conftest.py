"""Shared fixtures: small prepared corpora written directly (independent of data_prep)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU the Triton kernels can only run in Triton's interpreter, which triton reads from the
# environment when it is imported: set it before anything imports triton. (With a GPU the kernels
# compile for it and the interpreter stays off.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lmmem.data.corpus import META_FORMAT_VERSION
from lmmem.data.vocab import Vocabulary

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def write_prepared_corpus(root: Path, *, vocab_size: int = 200, tokens: dict | None = None, seed: int = 0) -> Path:
    """A prepared-corpus folder of Zipf-distributed ids with some repeated structure to learn."""
    tokens = tokens or {"train": 6000, "valid": 1200, "test": 1200}
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, vocab_size - 1)
    p = 1.0 / ranks**1.1
    p /= p.sum()
    streams = {}
    for split, n in tokens.items():
        ids = rng.choice(ranks + 1, size=n, p=p)  # ids 2.. (0 = <eos>, 1 = <unk>)
        ids[::11] = 0  # an <eos> every 11 tokens: a pattern the model can learn
        ids[5::11] = ids[4::11][: len(ids[5::11])]  # a copy pattern
        streams[split] = ids.astype("<u4")
    counts = np.bincount(streams["train"], minlength=vocab_size)
    vocab = Vocabulary(["<eos>", "<unk>"] + [f"w{i}" for i in range(2, vocab_size)], counts.tolist())
    root.mkdir(parents=True, exist_ok=True)
    vocab.save(root / "vocab.txt")
    splits = {}
    for split, ids in streams.items():
        ids.tofile(root / f"{split}.bin")
        splits[split] = {"file": f"{split}.bin", "tokens": int(len(ids))}
    meta = {"format_version": META_FORMAT_VERSION, "corpus": "test-fixture", "source": "tests/conftest.py",
            "tokenizer": "word", "vocab_size": vocab_size, "vocab_fingerprint": vocab.fingerprint, "splits": splits}
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def one_thread():
    """Tiny ops run several times faster on one thread on a shared 2-core machine; the setting is
    restored afterwards. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    return write_prepared_corpus(tmp_path_factory.mktemp("corpus") / "small")


def run_script(*args: str, env: dict | None = None, timeout: int = 300, check: bool = False) -> subprocess.CompletedProcess:
    """Run a repo script (train.py, evaluate.py, -m data_prep) the way a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def prep_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``python -m data_prep ARGV`` in-process: (exit code, stdout, stderr)."""
    from data_prep.__main__ import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def decoded(root: Path, split: str) -> list[str]:
    """The words of a prepared corpus's split."""
    from lmmem.data.corpus import PreparedCorpus

    corpus = PreparedCorpus.open(root)
    return corpus.vocab.decode(corpus.tokens(split))


def native_toolchain_missing() -> str | None:
    """Why the native IVF scan (lmmem/kernels/ivf_scan.cpp) cannot be built here, or None."""
    import shutil
    import sysconfig

    from lmmem.kernels import ivf_scan

    if not ivf_scan.native_enabled():
        return "LMMEM_NATIVE=0"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler"
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        return "no Python headers"
    try:
        import ninja  # noqa: F401
    except ImportError:
        if shutil.which("ninja") is None:
            return "no ninja (pip install ninja)"
    return None


@pytest.fixture
def native_op():
    """The native IVF scan op. Where the toolchain is present it must build and pass its probe (the
    test fails otherwise); where it is absent, the test is skipped with the reason."""
    reason = native_toolchain_missing()
    if reason:
        pytest.skip(f"the native IVF scan cannot be built here: {reason}")
    from lmmem.kernels import ivf_scan

    op = ivf_scan.native_scan_op()
    assert op is not None, "a C++ toolchain is present, so the native IVF scan must build and pass its probe"
    return op
