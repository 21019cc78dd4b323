"""kNN-LM datastore (lmmem.memories.knn): search against brute force, p_kNN against a per-row
reference, staged/resumable writing (kill -9 included) and the one-line refusals (issue 20)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lmmem.errors import LmmemError
from lmmem.memories import knn_index
from lmmem.memories.knn import (
    Datastore, ivfpq_params, DatastoreWriter, FaissMissingWarning, KNNConfig, knn_interpolate, knn_log_probs, knn_target_log_probs)

pytestmark = pytest.mark.usefixtures("one_thread")
INFO = {"model_fingerprint": "model-a", "tokenizer_fingerprint": "tok-a", "key_source": "test"}
REPO = Path(__file__).resolve().parents[1]


def build(out, keys, values, *, index="flat", chunk=1000, info=INFO, expected_rows=None, **index_options):
    w = DatastoreWriter(out, dim=keys.shape[1], info=info, progress=False, expected_rows=expected_rows)
    for s in range(w.rows_done, len(keys), chunk):
        w.append(keys[s:s + chunk], values[s:s + chunk])
    return w.finish(index, **index_options)


def brute_force(keys, queries, k):
    """float64 reference over the keys as stored (fp16): (dists, ids) ascending."""
    d = ((queries.double()[:, None, :] - keys.half().double()[None]) ** 2).sum(-1)
    return d.topk(min(k, keys.shape[0]), dim=1, largest=False)


def clustered(n, dim, *, clusters=50, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(clusters, dim, generator=g)
    pick = torch.randint(0, clusters, (n,), generator=g)
    return centres[pick] + spread * torch.randn(n, dim, generator=g)


def datastore_bytes(path: Path) -> dict:
    # (a build.json the swap left behind when killed just after it is harmless)
    files = {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name not in ("manifest.json", "build.json")}
    manifest = json.loads((path / "manifest.json").read_text())
    for key in ("append_seconds", "sessions"):  # the only fields a resumed build may differ in
        manifest["writer"].pop(key)
    for key in ("train_seconds", "add_seconds"):
        manifest["index"].pop(key, None)
    manifest["index"].get("calibration", {}).pop("seconds", None)
    return {**files, "manifest": manifest}


# ---------------------------------------------------------------------------------------------
# search


@pytest.mark.parametrize("native", [False, True], ids=["faiss", "native"])
@pytest.mark.parametrize("n, dim, nq, k", [(1237, 37, 53, 17), (300, 5, 9, 300), (40, 8, 3, 64)])
def test_flat_search_equals_brute_force(tmp_path, request, n, dim, nq, k, native):
    """FAISS's Flat search, and where the native scan runs, the scan of all keys as one list."""
    if native:
        request.getfixturevalue("native_op")
    torch.manual_seed(n)
    keys, values = torch.randn(n, dim) * 3, torch.randint(0, 97, (n,))
    ds = Datastore.open(build(tmp_path / "ds", keys, values), native=native)
    assert ds.manifest["index"]["type"] == "flat" and ds.search_plan() == ("scan" if native else "faiss")
    queries = torch.randn(nq, dim) * 3
    ref_d, ref_i = brute_force(keys, queries, k)
    for distances in ("exact", "index"):
        d, ids = ds.search_ids(queries, k, distances=distances)
        assert d.dtype == torch.float32 and ids.dtype == torch.int64 and d.shape == (nq, k)
        assert torch.equal(ids[:, :ref_i.shape[1]], ref_i)
        tol = 1e-6 if distances == "exact" else 1e-4
        torch.testing.assert_close(d[:, :ref_d.shape[1]].double(), ref_d, rtol=tol, atol=tol * ref_d.mean().item())
    if k > n:  # fewer stored than asked: padded
        assert torch.isinf(d[:, n:]).all() and (ids[:, n:] == -1).all()
    d, v = ds.search(queries, k)
    assert torch.equal(v[:, :ref_i.shape[1]], values[ref_i])
    assert (torch.diff(d, dim=1)[:, : min(k, n) - 1] >= 0).all()


def test_torch_fallback_equals_faiss_flat(tmp_path, monkeypatch):
    torch.manual_seed(1)
    keys, values = torch.randn(2111, 19), torch.randint(0, 50, (2111,))
    path = build(tmp_path / "ds", keys, values)
    queries = torch.randn(77, 19)
    d_faiss, i_faiss = Datastore.open(path).search_ids(queries, 33, distances="index")
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now fails
    with pytest.warns(FaissMissingWarning, match="pip install faiss-cpu"):
        ds = Datastore.open(path)
    assert ds.search_plan() == "torch"
    monkeypatch.setattr(knn_index, "SEARCH_ELEMENTS", 4096)  # many key chunks and query blocks to merge
    d, ids = ds.search_ids(queries, 33, distances="index")
    assert torch.equal(ids, i_faiss)
    torch.testing.assert_close(d, d_faiss, rtol=1e-4, atol=1e-4)
    ref_d, ref_i = brute_force(keys, queries, 33)
    d, ids = ds.search_ids(queries, 33, distances="exact")
    assert torch.equal(ids, ref_i)
    torch.testing.assert_close(d.double(), ref_d, rtol=1e-6, atol=1e-6)


def test_torch_search_pads_past_the_count():
    keys = torch.randn(5, 4).half()
    d, ids = knn_index.torch_exact_search(keys, torch.randn(3, 4), 8)
    assert (ids[:, :5].sort(1).values == torch.arange(5)).all() and (ids[:, 5:] == -1).all()
    assert torch.isinf(d[:, 5:]).all() and torch.isfinite(d[:, :5]).all()


def test_exact_distances_equal_the_reference(monkeypatch):
    torch.manual_seed(2)
    keys = (torch.randn(500, 23) * 4 + 30).half()  # far from the origin: |x|² ≫ d, where q·x forms lose digits
    queries = keys[:40].float() + 1e-3 * torch.randn(40, 23)
    ids = torch.randint(-1, 500, (40, 31))
    ids[:, 0] = torch.arange(40)  # the query's own key: a tiny distance
    ids[:, 1] = ids[:, 2]  # repeated ids
    monkeypatch.setattr(knn_index, "SEARCH_ELEMENTS", 23 * 31 * 3)  # several query blocks
    d = knn_index.exact_distances(keys.numpy(), queries, ids)
    d_tensor = knn_index.exact_distances(keys, queries, ids)
    ref = ((queries.double()[:, None] - keys.double()[ids.clamp_min(0)]) ** 2).sum(-1)
    ref[ids < 0] = math.inf
    torch.testing.assert_close(d.double(), ref, rtol=1e-6, atol=1e-9)
    assert torch.equal(d, d_tensor)
    assert (d[:, 0] < 1e-3).all()  # the matmul form would give O(1e-1) noise here


@pytest.mark.slow
def test_ivfpq_recall_against_flat_at_the_calibrated_nprobe(tmp_path):
    keys = clustered(40_000, 32, clusters=200, seed=3)
    values = torch.randint(0, 1000, (len(keys),))
    ds = Datastore.open(build(tmp_path / "ds", keys, values, index="ivfpq", chunk=8192))
    idx = ds.manifest["index"]
    rule = ivfpq_params(40_000, 32)
    assert (idx["type"], idx["nlist"], idx["m"], idx["nbits"], idx["trained_on"]) == (
        "ivfpq", rule.nlist, rule.m, rule.nbits, rule.train_rows)
    assert idx["calibration"]["met"] and (idx["nprobe"], idx["rerank"]) == (
        idx["calibration"]["nprobe"], idx["calibration"]["rerank"])
    # fresh queries (the calibration used stored keys): near the data, not in it
    queries = keys[torch.randperm(len(keys), generator=torch.Generator().manual_seed(9))[:300]] + 0.3 * torch.randn(300, 32)
    _, truth = brute_force(keys, queries, 1024)
    for k in (8, 64, 1024):
        _, ids = ds.search_ids(queries, k)  # the defaults: calibrated nprobe and rerank, exact distances
        hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, truth[:, :k]))
        assert hits / (k * len(queries)) >= 0.9, (k, hits / (k * len(queries)))
    _, ids = ds.search_ids(queries, 64, nprobe=1, rerank=1)  # the check can fail: one list finds too few
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, truth[:, :64]))
    assert hits / (64 * len(queries)) < 0.9


# ---------------------------------------------------------------------------------------------
# p_kNN


def per_row_reference(dists, values, targets, k, temperature):
    """Plain python, one row at a time, in log space with math.fsum over shifted exponentials."""
    out = []
    for d, v, t in zip(dists.tolist(), values.tolist(), targets.tolist()):
        logits = [-x / temperature for x in d[:k] if x != math.inf]
        held = [-x / temperature for x, w in zip(d[:k], v[:k]) if x != math.inf and w == t and w >= 0]
        if not held:
            out.append(-math.inf)
            continue
        def lse(zs):
            top = max(zs)
            return top + math.log(math.fsum(math.exp(z - top) for z in zs))

        out.append(lse(held) - lse(logits))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("temperature", [1.0, 7.5, 1e-3])
def test_knn_target_log_probs_equal_a_per_row_reference(temperature):
    torch.manual_seed(4)
    n, kmax = 41, 23
    dists = (torch.rand(n, kmax) * 50).sort(1).values
    dists[:5, 3:9] = dists[:5, 3:4]  # ties
    dists[5:8, 15:] = math.inf  # padding (fewer stored than retrieved)
    values = torch.randint(0, 6, (n, kmax))  # few tokens: repeated values
    values[5:8, 15:] = -1
    targets = values[torch.arange(n), torch.randint(0, 15, (n,))]
    targets[::7] = 99  # absent from every neighbour list
    targets[6] = -1  # the padding's value is no token
    for k in (1, 7, kmax):  # a sweep from one retrieval
        got = knn_target_log_probs(dists, values, targets, k=k, temperature=temperature)
        ref = per_row_reference(dists, values, targets, k, temperature)
        assert got.dtype == torch.float64
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
        assert (got[::7] == -math.inf).all()
        full = knn_log_probs(dists, values, k=k, temperature=temperature, vocab_size=100)
        real = targets >= 0
        torch.testing.assert_close(full[real].gather(1, targets[real, None]).squeeze(1), ref[real], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.logsumexp(full, 1), torch.zeros(n, dtype=torch.float64), rtol=0, atol=1e-12)


def test_knn_log_probs_keep_far_groups_that_would_underflow():
    # at T = 1e-3 the second token's share is exp(-5000): 0 in float64 unless summed in log space
    dists = torch.tensor([[0.0, 5.0, 5.0]])
    values = torch.tensor([[0, 1, 1]])
    full = knn_log_probs(dists, values, k=3, temperature=1e-3, vocab_size=3)
    assert full[0, 1].item() == pytest.approx(-5000.0 + math.log(2), rel=1e-12)
    assert full[0, 2].item() == -math.inf
    got = knn_target_log_probs(dists, values, torch.tensor([1]), k=3, temperature=1e-3)
    assert got.item() == pytest.approx(-5000.0 + math.log(2), rel=1e-12)


def test_interpolation_and_config():
    lm = torch.log_softmax(torch.randn(6, 9, dtype=torch.float64), 1)
    kn = torch.log_softmax(torch.randn(6, 9, dtype=torch.float64), 1)
    kn[0, 3] = -math.inf
    assert torch.equal(knn_interpolate(lm, kn, 0.0), lm)  # λ = 0: the base exactly
    mixed = knn_interpolate(lm, kn, 0.25)
    torch.testing.assert_close(mixed.exp(), 0.25 * kn.exp() + 0.75 * lm.exp(), rtol=1e-12, atol=0)
    assert KNNConfig() == KNNConfig(k=1024, temperature=1.0, lam=0.25, distances="auto", nprobe=None, rerank=None)
    for bad in ({"k": 0}, {"temperature": 0.0}, {"lam": 1.5}, {"distances": "pq"}, {"nprobe": 0}, {"rerank": 0}):
        with pytest.raises(ValueError):
            KNNConfig(**bad)
    with pytest.raises(ValueError, match="between 1 and"):
        knn_target_log_probs(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2), k=4, temperature=1.0)


def test_leakage_the_evaluated_states_themselves_give_p_knn_one(tmp_path):
    """Keys = the very states evaluated, k = 1: every query's nearest key is its own (at the fp16
    rounding distance), whose value is the target, so log p_kNN(target) = 0 for every query."""
    torch.manual_seed(5)
    states = torch.randn(3001, 48) * 5
    targets = torch.randint(0, 40, (3001,))  # repeated targets: only the own key must count at k = 1
    ds = Datastore.open(build(tmp_path / "ds", states, targets))
    for distances in ("exact", "index"):
        dists, values = ds.search(states, 1, distances=distances)
        assert torch.equal(values[:, 0], targets)
        assert (knn_target_log_probs(dists, values, targets, k=1, temperature=1.0) == 0).all()
    dists, _ = ds.search(states, 1, distances="exact")
    assert dists.max() < 1e-3  # fp16 rounding of the keys, not the 1e-1 of |q|²+|x|²−2q·x


# ---------------------------------------------------------------------------------------------
# writing: staged, resumable, refusals


def test_resume_after_an_interruption_is_byte_identical(tmp_path):
    keys = clustered(12_000, 16, seed=6)
    values = torch.randint(0, 300, (len(keys),))
    opts = {"index": "ivfpq", "chunk": 700, "expected_rows": len(keys), "m": 1, "nlist": 64, "recall_ks": (8, 64)}
    build(tmp_path / "ref", keys, values, **opts)

    out = tmp_path / "ds"
    w = DatastoreWriter(out, dim=16, info=INFO, expected_rows=len(keys), progress=False, commit_rows=1000)
    for s in range(0, 4900, 700):
        w.append(keys[s:s + 700], values[s:s + 700])
    assert w.rows_done == 4900 and w._committed == 4200  # committed at 1,400, 2,800 and 4,200 rows
    w._files[0].write(b"\x01" * 37)  # a torn row after the last commit, as a kill would leave it
    w._files[0].flush()
    w.close()  # the process stops here (kill -9 drops the lock the same way)
    with pytest.raises(LmmemError, match="half-built"):
        Datastore.open(out)
    with pytest.raises(LmmemError, match="half-built"):
        Datastore.open(tmp_path / ".ds.staging")
    w = DatastoreWriter(out, dim=16, info=INFO, expected_rows=len(keys), progress=False)
    assert w.rows_done == 4200  # the committed rows; the caller continues from there
    for s in range(w.rows_done, len(keys), 700):
        w.append(keys[s:s + 700], values[s:s + 700])
    w.finish("ivfpq", m=1, nlist=64, recall_ks=(8, 64))
    assert datastore_bytes(out) == datastore_bytes(tmp_path / "ref")
    manifest = Datastore.open(out).manifest
    assert manifest["writer"]["sessions"] == 2 and manifest["count"] == len(keys)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ds.lock", ".ref.lock", "ds", "ref"]  # no staging left


def test_refusals_are_one_line(tmp_path, monkeypatch):
    keys, values = torch.randn(300, 12), torch.randint(0, 9, (300,))
    path = build(tmp_path / "ds", keys, values)

    def refused(match, fn, *a, **kw):
        with pytest.raises(LmmemError, match=match) as e:
            fn(*a, **kw)
        assert "\n" not in str(e.value), str(e.value)
        return str(e.value)

    msg = refused("model_fingerprint", Datastore.open, path, expect={"model_fingerprint": "model-b"})
    assert "rebuild" in msg and "lmmem datastore" in msg
    refused("tokenizer_fingerprint", Datastore.open, path, expect={"tokenizer_fingerprint": "tok-b", "dim": 12})
    refused("width 12", Datastore.open, path, expect={"dim": 768})
    Datastore.open(path, expect={**INFO, "dim": 12})  # everything as built: fine
    refused("width 12", Datastore.open(path).search, torch.randn(3, 16), 4)
    refused("already holds a datastore", DatastoreWriter, path, dim=12, info=INFO)
    refused("no datastore at", Datastore.open, tmp_path / "missing")
    # a truncated or corrupted keys file
    with open(path / "keys.f16", "r+b") as f:
        f.truncate(300 * 12 * 2 - 10)
    refused("truncated or corrupted", Datastore.open, path)
    (path / "manifest.json").write_text("{not json")
    refused("corrupted", Datastore.open, path)
    # a second build of the same folder while one runs
    w = DatastoreWriter(tmp_path / "ds2", dim=12, info=INFO, progress=False)
    refused("in use by process", DatastoreWriter, tmp_path / "ds2", dim=12, info=INFO)
    w.append(keys[:10], values[:10])
    w.close()
    refused("another build", DatastoreWriter, tmp_path / "ds2", dim=12, info={**INFO, "model_fingerprint": "b"})
    refused("another build", DatastoreWriter, tmp_path / "ds2", dim=13, info=INFO)
    w = DatastoreWriter(tmp_path / "ds2", dim=12, info={**INFO, "model_fingerprint": "b"}, resume=False, progress=False)
    assert w.rows_done == 0  # started over on request
    refused(r"\(n, 12\)", w.append, keys[:5, :7], values[:5])
    refused("integer token ids", w.append, keys[:5], values[:5].float())
    refused("fp16", w.append, torch.full((2, 12), 1e6), values[:2])
    refused("no rows", w.finish)
    w.close()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    refused("would be lost", DatastoreWriter, tmp_path / "foreign", dim=12, info=INFO)
    w = DatastoreWriter(tmp_path / "ds3", dim=12, info=INFO, expected_rows=100, progress=False)
    w.append(keys[:60], values[:60])
    refused("declared 100 rows but 60", w.finish)
    w.close()


def test_full_disk_is_one_line_and_the_build_resumes(tmp_path, monkeypatch):
    keys, values = torch.randn(500, 8), torch.randint(0, 9, (500,))
    out = tmp_path / "ds"
    w = DatastoreWriter(out, dim=8, info=INFO, progress=False, commit_rows=100)
    w.append(keys[:250], values[:250])

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    w._files = (Full(w._files[0]), w._files[1])
    with pytest.raises(LmmemError, match="no space left .* resumes") as e:
        w.append(keys[250:300], values[250:300])
    assert "\n" not in str(e.value)
    w = DatastoreWriter(out, dim=8, info=INFO, progress=False)
    assert w.rows_done == 250  # the last commit (rows past it would be written again)
    w.append(keys[250:], values[250:])
    ds = Datastore.open(w.finish())
    assert torch.equal(torch.from_numpy(np.array(ds.keys)), keys.half())
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(LmmemError, match="GiB free"):
        DatastoreWriter(tmp_path / "big", dim=768, info=INFO, expected_rows=10**6, progress=False)


def test_without_faiss_auto_builds_flat_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    monkeypatch.setattr(knn_index, "FLAT_MAX_MACS", 100)
    keys, values = torch.randn(64, 4), torch.randint(0, 9, (64,))
    with pytest.warns(FaissMissingWarning):
        path = build(tmp_path / "ds", keys, values, index="auto")
    with pytest.warns(FaissMissingWarning):
        ds = Datastore.open(path)
    assert ds.manifest["index"] == {"type": "flat", "metric": "l2", "faiss_version": "torch-exact"}
    with pytest.raises(LmmemError, match="pip install faiss-cpu"):
        build(tmp_path / "ds2", keys, values, index="ivfpq")


def build_version(out: Path, version: int) -> None:
    """A build as `lmmem datastore` runs it: chunks appended from ``rows_done`` on, then an IVFPQ index."""
    g = torch.Generator().manual_seed(version)
    keys, values = torch.randn(6000, 16, generator=g), torch.randint(0, 50, (6000,), generator=g)
    w = DatastoreWriter(out, dim=16, info={"model_fingerprint": f"v{version}"}, expected_rows=6000, overwrite=True,
                        progress=False, commit_rows=500)
    for s in range(w.rows_done, 6000, 300):
        w.append(keys[s:s + 300], values[s:s + 300])
    w.finish("ivfpq", nlist=16, m=1, target_recall=None, seed=version)


def in_child(fn, *args) -> int:
    """Run ``fn(*args)`` in a forked child (torch and faiss already imported: a trial costs
    milliseconds, not an interpreter start); returns its pid."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            torch.set_num_threads(1)
            knn_index.faiss_or_none().omp_set_num_threads(1)  # no OpenMP pool inherited across the fork
            fn(*args)
            code = 0
        finally:
            os._exit(code)
    return pid


def wait(pid: int, timeout: float = 120.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("a build child hung")


DURABLE_STEPS = ("fsync", "rename", "replace")  # the calls a crash-safe build orders its writes by


def build_killed_at(out: Path, version: int, step: int, before: bool, count_file: Path | None = None) -> None:
    """:func:`build_version` in a child that SIGKILLs itself just before (or just after) its ``step``-th
    durable step: the moments where a wrong order of writes would show. ``count_file`` gets the number
    of steps a build that was not killed took."""
    seen = [0]

    def hooked(real):
        def call(*args, **kwargs):
            seen[0] += 1
            if before and seen[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            result = real(*args, **kwargs)
            if not before and seen[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return call

    for name in DURABLE_STEPS:  # the child's own os module: the parent's stays as it was
        setattr(os, name, hooked(getattr(os, name)))
    build_version(out, version)
    if count_file is not None:
        count_file.write_text(str(seen[0]))


def check_after_kill(tmp_path: Path, out: Path, reference: dict, version: int, previous: int, trial) -> None:
    # whatever moment it died: the previous complete datastore, or the new complete one
    held = Datastore.open(out).manifest["built"]["model_fingerprint"]
    assert held in (f"v{previous}", f"v{version}") and datastore_bytes(out) == reference[int(held[1:])], trial
    with pytest.raises(LmmemError, match="half-built"):  # the staging folder, if any, never opens
        Datastore.open(tmp_path / ".ds.staging")
    assert wait(in_child(build_version, out, version)) == 0, trial  # the same build again: resumes, completes
    assert datastore_bytes(out) == reference[version], trial
    assert not (tmp_path / ".ds.staging").exists(), trial


@pytest.mark.slow
def test_kill_9_of_a_build_never_leaves_a_datastore_that_opens_half_built(tmp_path):
    out = tmp_path / "ds"
    reference = {}
    assert wait(in_child(build_version, out, 0)) == 0
    reference[0] = datastore_bytes(out)
    t0 = time.monotonic()
    count_file = tmp_path / "steps"
    assert wait(in_child(build_killed_at, out, 1, 0, False, count_file)) == 0  # replaces version 0, counted
    duration = time.monotonic() - t0
    reference[1] = datastore_bytes(out)
    steps = int(count_file.read_text())
    assert steps >= 20, steps  # 12 commits of 3 files, the state file, the index and the swap
    # Kills at chosen durable steps (every trial dies inside its build, whatever the machine's speed),
    # spread from the first step to the last, alternately just before and just after one.
    for trial, step in enumerate(sorted({round(1 + i * (steps - 1) / 13) for i in range(14)})):
        version = trial % 2  # each trial replaces the version the folder holds
        pid = in_child(build_killed_at, out, version, step, trial % 2 == 0)
        assert wait(pid) == -signal.SIGKILL, (trial, step)
        check_after_kill(tmp_path, out, reference, version, 1 - version, (trial, step))
    # Kills at random moments reach the middle of a write too; how many land inside a build depends on
    # the machine's load, so their count is not asserted.
    rng = random.Random(11)
    held = int(Datastore.open(out).manifest["built"]["model_fingerprint"][1:])
    for trial in range(6):
        version = 1 - held
        pid = in_child(build_version, out, version)
        time.sleep(rng.uniform(0.0, duration))
        os.kill(pid, signal.SIGKILL)
        wait(pid)
        check_after_kill(tmp_path, out, reference, version, held, ("random", trial))
        held = version


def test_search_routing_by_device(tmp_path, monkeypatch):
    """Which search serves which device (the GPU paths themselves need a GPU and FAISS's GPU build);
    FAISS's Flat search, as where the native scan does not run (tests/test_knn_scan.py: where it does)."""
    ds = Datastore.open(build(tmp_path / "ds", torch.randn(50, 4), torch.randint(0, 5, (50,))), native=False)
    assert ds.search_plan("cpu") == "faiss"
    monkeypatch.setattr(ds, "_fits_on", lambda device: True)
    assert ds.search_plan("cuda:0") == "torch"  # CUDA queries, no FAISS GPU build: exact torch on the GPU
    monkeypatch.setattr(ds, "_fits_on", lambda device: False)
    assert ds.search_plan("cuda:0") == "faiss"  # keys too large for the GPU: FAISS on the CPU
    monkeypatch.setattr(ds._faiss, "get_num_gpus", lambda: 1)
    assert ds.search_plan("cuda:0") == "faiss-gpu"
    assert Datastore.open(tmp_path / "ds", backend="torch").search_plan("cpu") == "torch"
    assert "Flat over 50 keys, exact distances" in ds.describe_search("cpu")


def test_calibration_of_an_index_that_cannot_reach_the_target(tmp_path):
    """A 2-bit code of 32 unclustered dimensions cannot find 90% of the exact top-256: the build
    warns, and the default is the cheapest setting near the best recall seen, not a scan of every list."""
    keys = torch.randn(6000, 32, generator=torch.Generator().manual_seed(8))
    values = torch.randint(0, 50, (len(keys),))
    with pytest.warns(knn_index.RecallWarning, match="at most"):
        path = build(tmp_path / "ds", keys, values, index="ivfpq", nlist=64, m=1, nbits=2, recall_ks=(256,))
    ds = Datastore.open(path)
    cal = ds.manifest["index"]["calibration"]
    assert not cal["met"] and cal["by_k"]["256"]["nprobe"] < 64
    assert ds.calibrate(target=0.5, ks=(8,))["by_k"]["8"]["met"]
    with pytest.raises(LmmemError, match="Flat search is exact"):
        Datastore.open(build(tmp_path / "flat", keys[:100], values[:100])).calibrate()


def test_a_k_above_the_calibrated_ones_is_named_and_can_be_calibrated(tmp_path):
    """k above every calibrated k: the search would reuse the largest one's setting with unmeasured
    recall, so the datastore names it in one line with the command that calibrates it; after
    recalibrate(ks=...) the note is gone and the new k has a setting of its own."""
    keys = clustered(3000, 16, clusters=40, seed=3)
    values = torch.randint(0, 97, (3000,), generator=torch.Generator().manual_seed(2))
    ds = Datastore.open(build(tmp_path / "ds", keys, values, index="ivfpq", nlist=32, m=1, recall_ks=(8,)))
    assert knn_index.calibrated_ks(ds.manifest["index"]) == [8]
    assert ds.calibration_note(8) is None and ds.calibration_note(5) is None
    note = ds.calibration_note(200)
    assert "\n" not in note and "above the largest k" in note and "recalibrate(ks=(8,200,))" in note
    assert "--recall-k 8,200" in note
    ds.recalibrate(ks=(8, 200))
    assert ds.calibration_note(200) is None and knn_index.calibrated_ks(ds.manifest["index"]) == [8, 200]
    assert knn_index.setting_for(ds.manifest["index"], 200) != (None, 1)
    flat = Datastore.open(build(tmp_path / "flat", keys, values))
    assert flat.calibration_note(10_000) is None  # exact search: nothing to calibrate
