"""kNN-LM through the evaluation engine: datastores written by ``lmmem datastore`` for lmmem and
Hugging Face models, the leakage check (the evaluated text in its own datastore, k = 1: perplexity
near 1), the log-space interpolation against a brute-force kNN, λ = 0 exactly the model, and one
line for every datastore that must not be used."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, run_script
from test_evaluate_methods import _checkpoint

pytest.importorskip("lmmem.memories.knn")
pytestmark = pytest.mark.usefixtures("one_thread")


def build(*args, check=True, env=None):
    return run_script("-m", "lmmem", "datastore", *map(str, args), check=check, env=env)


def knn_eval(*args, check=True, env=None):
    return run_script("evaluate.py", *map(str, args), check=check, env=env)


def trained_lstm(corpus, path):
    """A checkpoint whose hidden states tell contexts apart (a few training steps)."""
    from lmmem.training import config_from_args, train

    train(config_from_args({"data": str(corpus), "out": str(path), "preset": "tiny", "max_steps": 20, "batch_size": 4,
                            "bptt": 16, "embed_dim": 32, "hidden_dim": 48, "proj_dim": 32, "tie_weights": True,
                            "eval_interval": 0, "progress": False}))
    return path / "last.pt"


def test_leakage_check_and_lambda_zero(small_corpus, tmp_path):
    """The test split in its own datastore, k = 1: every query finds itself (distance 0) holding
    its own target, so p_kNN = 1 and perplexity is near 1 at λ near 1; λ = 0 is the model bit for bit."""
    from lmmem.evaluation import KNNSpec, Methods, evaluate
    from lmmem.evaluation.datastore import DatastoreConfig, build_datastore
    from lmmem.evaluation.run import Evaluation, EvalConfig
    from lmmem.memories.knn import KNNConfig

    ckpt = trained_lstm(small_corpus, tmp_path / "run")
    ev = Evaluation(ckpt, config=EvalConfig(split="test", max_tokens=600, batch_size=4), progress=False)
    ds = build_datastore(ev, DatastoreConfig(out=str(tmp_path / "ds"), index="flat"))
    leak = evaluate(ckpt, max_tokens=600, batch_size=4, progress=False,
                    methods=Methods(knn=KNNSpec(ds, KNNConfig(k=1, temperature=1.0, lam=0.999, distances="exact"))))
    assert leak.plain.perplexity > 20 and leak.reports["+knn"].report.perplexity < 1.05
    zero = evaluate(ckpt, max_tokens=600, batch_size=4, progress=False,
                    methods=Methods(knn=KNNSpec(ds, KNNConfig(k=8, lam=0.0))))
    assert zero.reports["+knn"].report.to_dict() == zero.plain.to_dict()


def test_interpolation_in_log_space_against_brute_force(small_corpus, tmp_path):
    """Per token: log(λ·p_kNN + (1 − λ)·p_LM), p_kNN from the k nearest stored keys by exact squared
    L2 distance (fp16 keys, read back here) at temperature T, computed by hand over every key."""
    from lmmem.evaluation import KNNSpec, Methods
    from lmmem.evaluation.datastore import DatastoreConfig, build_datastore
    from lmmem.evaluation.run import Evaluation, EvalConfig
    from lmmem.memories.knn import KNNConfig

    ckpt = trained_lstm(small_corpus, tmp_path / "run")
    train_ev = Evaluation(ckpt, config=EvalConfig(split="train", max_tokens=900, batch_size=4), progress=False)
    ds = build_datastore(train_ev, DatastoreConfig(out=str(tmp_path / "ds"), index="flat"))
    ev = Evaluation(ckpt, config=EvalConfig(split="test", max_tokens=120, batch_size=2), progress=False)
    k, T, lam = 6, 0.7, 0.3
    res = ev.run(Methods(knn=KNNSpec(ds, KNNConfig(k=k, temperature=T, lam=lam, distances="exact"))), word_probs=tmp_path / "wp.tsv")
    lines = [line.split("\t") for line in (tmp_path / "wp.tsv").read_text().splitlines()[1:]]
    got = {int(r[0]): (float(r[4]), float(r[5])) for r in lines}
    keys = torch.from_numpy(np.fromfile(ds / "keys.f16", dtype=np.float16).reshape(-1, ev.adapter.dim).astype(np.float32))
    values = torch.from_numpy(np.fromfile(ds / "values.i32", dtype=np.int32).astype(np.int64))
    # the queries: the model's hidden states at each scored position, recomputed in the same layout
    groups = ev.windows(ev.data).groups()
    state = ev.adapter.init_state(groups[0].rows)
    checked = 0
    with torch.no_grad():
        for step in range(groups[0].steps):
            b = groups[0].batch(step)
            fwd = ev.adapter.forward(b.inputs, state)
            state = fwd.state
            h = fwd.hidden.reshape(-1, fwd.hidden.shape[-1]).float()
            for i, pos in enumerate(b.positions.reshape(-1)):
                if pos < 0:
                    continue
                d = ((keys - h[i]) ** 2).sum(-1)
                near = torch.topk(d, k, largest=False)
                w = torch.softmax(-near.values.double() / T, 0)
                p_knn = float(w[values[near.indices] == int(ev.data.tokens[pos])].sum())
                plain, mixed = got[int(pos)]
                expected = math.log(lam * p_knn + (1 - lam) * math.exp(plain))
                assert mixed == pytest.approx(expected, rel=1e-4, abs=1e-5), pos
                checked += 1
    assert checked == 120 and res.reports["+knn"].params["knn"]["k"] == k


def test_recall_k_calibrates_above_1024_and_evaluation_names_an_uncalibrated_k(small_corpus, tmp_path):
    """--recall-k: the k an IVFPQ build calibrates for (a bad list: one line, exit 2, before the
    model loads); evaluating with a larger k says so in one line and in the results."""
    bad = build(tmp_path / "no-model", "--out", tmp_path / "x", "--recall-k", "8,0", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--recall-k" in bad.stderr, bad.stderr
    ckpt = trained_lstm(small_corpus, tmp_path / "run")
    build(ckpt, "--split", "train", "--out", tmp_path / "ds", "--max-tokens", "3000", "--index", "ivfpq",
          "--recall-k", "4,8")
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert sorted(map(int, manifest["index"]["calibration"]["by_k"])) == [4, 8]
    proc = knn_eval(ckpt, "--knn", tmp_path / "ds", "--knn-k", "16", "--max-tokens", "100", "--json", tmp_path / "e.json")
    note = json.loads((tmp_path / "e.json").read_text())["datastore"]["calibration_note"]
    assert "k = 16 is above the largest k" in note and "--recall-k 4,8,16" in note
    assert note in proc.stdout + proc.stderr


@pytest.mark.slow
def test_datastore_cli_tune_and_bad_datastores(small_corpus, tmp_path):
    """`lmmem datastore` + `evaluate.py --knn DS --tune`; then every datastore that must not be used
    is refused in one line with exit 2: another model's, another vocabulary's, a half-built one
    (kill -9 during the build), and the build resumes when run again."""
    ckpt = trained_lstm(small_corpus, tmp_path / "run")
    build(ckpt, "--split", "train", "--out", tmp_path / "ds", "--max-tokens", "2000", "--batch-size", "4")
    proc = knn_eval(ckpt, "--knn", tmp_path / "ds", "--knn-k", "16", "--tune", "--max-tokens", "300", "--batch-size", "4",
                    "--json", tmp_path / "e.json")
    out = json.loads((tmp_path / "e.json").read_text())
    assert set(out["methods"]) == {"plain", "+knn"} and "+knn" in out["tuned"]["choice"] and "λ_knn" in proc.stdout
    assert out["datastore"]["count"] == 2000  # --max-tokens 2000: the first 2,001 tokens, 2,000 targets
    assert "over 2,000 keys, exact distances" in out["datastore"]["search"]  # what the search did, in the results
    other = _checkpoint(small_corpus, tmp_path / "other.pt")  # another model, same vocabulary
    bad = knn_eval(other, "--knn", tmp_path / "ds", "--max-tokens", "50", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "model_fingerprint" in bad.stderr, bad.stderr
    # kill -9 during a build: the half-built datastore is refused, naming the command that resumes it
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = subprocess.Popen([sys.executable, "-m", "lmmem", "datastore", str(ckpt), "--out", str(tmp_path / "half"),
                               "--batch-size", "1", "--bptt", "4"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    staging = tmp_path / ".half.staging"
    for _ in range(30000):  # start-up (torch, faiss) takes long on a loaded machine
        if staging.is_dir():
            break
        time.sleep(0.01)
    # at once: on a fast CPU the build at batch 1 × bptt 4 can finish within half a second (a 0.3 s wait here once let it)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert staging.is_dir() and not (tmp_path / "half").exists()
    bad = knn_eval(ckpt, "--knn", tmp_path / "half", "--max-tokens", "50", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "lmmem datastore" in bad.stderr, bad.stderr
    build(ckpt, "--out", tmp_path / "half", "--batch-size", "1", "--bptt", "4")
    assert knn_eval(ckpt, "--knn", tmp_path / "half", "--max-tokens", "50").returncode == 0


@pytest.mark.slow
def test_hf_datastore_other_tokenizer_and_no_faiss(tmp_path):
    """A Hugging Face model's datastore from a text source; a model with another tokenizer is
    refused; without faiss the search is exact in torch, said in one line."""
    from hf_helpers import hf_folder, tiny_model, train_tokenizer

    folder, text = hf_folder(tmp_path, "gpt2")
    build(folder, "--data", text, "--out", tmp_path / "ds", "--window", "sliding", "--context", "16", "--bptt", "32")
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["key_source"] == "input of get_output_embeddings()" and manifest["built"]["window"]["convention"] == "sliding"
    ok = knn_eval(folder, "--data", text, "--knn", tmp_path / "ds", "--knn-k", "8", "--context", "16", "--bptt", "32",
                  "--json", tmp_path / "faiss.json")
    assert "+knn" in ok.stdout
    # the same weights with another tokenizer (another special token: the same size, other ids' meaning)
    tok = train_tokenizer([text / "train.txt"], special="<s>")
    model = tiny_model("gpt2", len(tok))
    model.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    bad = knn_eval(tmp_path / "other", "--data", text, "--knn", tmp_path / "ds", check=False)
    assert bad.returncode == 2 and "tokenizer_fingerprint" in bad.stderr and "lmmem datastore" in bad.stderr, bad.stderr
    assert [line for line in bad.stderr.splitlines() if not line.startswith("[transformers]")] == [bad.stderr.splitlines()[-1]]
    # no faiss: a stand-in package that fails to import
    shim = tmp_path / "nofaiss"
    (shim / "faiss").mkdir(parents=True)
    (shim / "faiss" / "__init__.py").write_text("raise ImportError('faiss hidden by the test')\n")
    path = os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])
    exact = knn_eval(folder, "--data", text, "--knn", tmp_path / "ds", "--knn-k", "8", "--context", "16", "--bptt", "32",
                     "--json", tmp_path / "torch.json", env={"PYTHONPATH": path})
    a, b = (json.loads((tmp_path / f).read_text())["methods"]["+knn"]["perplexity"] for f in ("faiss.json", "torch.json"))
    assert b == pytest.approx(a, rel=1e-3)  # Flat: exact neighbours either way (up to ties at the k-th)
    said = [line for line in exact.stderr.splitlines() if "faiss" in line]
    assert len(said) == 1 and "pip install faiss-cpu" in said[0]
