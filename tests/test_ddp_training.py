"""A 2-process gloo run under torchrun matches one process with the same global batch."""

from __future__ import annotations

import socket

import pytest
import torch

from conftest import run_script
from lmmem.training import load_checkpoint

ARGS = ["--embed-dim", "16", "--hidden-dim", "32", "--proj-dim", "16", "--batch-size", "8", "--bptt", "12",
        "--max-steps", "6", "--dropout", "0", "--output-dropout", "0", "--log-interval", "3", "--eval-interval", "3",
        "--eval-batch-size", "4", "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("softmax", ["full", "hebbian"])
def test_two_process_gloo_matches_single_process(small_corpus, tmp_path, softmax):
    single, multi = tmp_path / "single", tmp_path / "ddp"
    run_script("train.py", "--data", str(small_corpus), "--out", str(single), "--softmax", softmax, *ARGS, check=True)
    proc = run_script("-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                      "--master-port", str(_free_port()), "train.py", "--data", str(small_corpus), "--out", str(multi),
                      "--softmax", softmax, *ARGS, env={"OMP_NUM_THREADS": "1"}, check=True)
    assert "2 process(es)" in proc.stdout
    a, b = load_checkpoint(single / "last.pt"), load_checkpoint(multi / "last.pt")
    assert a["progress"]["tokens"] == b["progress"]["tokens"]
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=1e-4, atol=1e-5, msg=k)
    # the carried state of the whole global batch was gathered from both ranks
    for s1, s2 in zip(a["carried_state"], b["carried_state"]):
        torch.testing.assert_close(s2, s1, rtol=1e-4, atol=1e-5)
    # validation is sharded across ranks and all-reduced: same validation loss
    assert abs(a["progress"]["best_val_loss"] - b["progress"]["best_val_loss"]) < 1e-4
