"""The exact scan of an IVFPQ datastore's lists (lmmem.memories.knn_scan, and the native op of
lmmem.kernels.ivf_scan: tests/test_knn_scan_native.py) against a float64 brute force, its recall
model against its own searches, and where Datastore routes to it (issue 20)."""

from __future__ import annotations

import pytest
import torch

from lmmem.errors import LmmemError
from lmmem.kernels import ivf_scan
from lmmem.memories import knn_index, knn_scan
from lmmem.memories import knn_datastore
from lmmem.memories.knn import Datastore
from test_knn import brute_force, build, clustered

pytestmark = pytest.mark.usefixtures("one_thread")


def ivfpq_store(tmp_path, keys, *, nlist=16, **options):
    values = torch.randint(0, 97, (len(keys),), generator=torch.Generator().manual_seed(5))
    return Datastore.open(build(tmp_path / "ds", keys, values, index="ivfpq", nlist=nlist, m=1, chunk=500,
                                recall_ks=(8, 64), **options))


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
@pytest.mark.parametrize("n, dim, nq, k, block", [(1237, 37, 53, 17, None), (1237, 37, 20, 3, 2), (250, 6, 9, 300, 1),
                                                  (600, 11, 31, 64, 5)])
def test_scan_of_every_list_equals_brute_force(tmp_path, monkeypatch, request, n, dim, nq, k, block, native):
    """nprobe = nlist: every key at its exact distance, by the torch scan and by the native op.
    Odd shapes; k below the list sizes (the per-list top-k), above the count (padding); blocks of a
    few queries; repeated keys (ties); queries that are stored keys (distance 0)."""
    if native:
        request.getfixturevalue("native_op")  # the op builds here, or the reason it cannot
    g = torch.Generator().manual_seed(n + dim)
    keys = clustered(n, dim, clusters=9, seed=n)
    keys[n // 2:n // 2 + 7] = keys[3]  # repeated keys: tied distances
    ds = ivfpq_store(tmp_path, keys)
    if block is not None:
        rows = knn_scan.BLOCK_COLUMNS * k if not native else ivf_scan.pool_size(k)  # a block's size, per path
        monkeypatch.setattr(knn_scan, "SCAN_ELEMENTS", block * rows)
    queries = torch.cat([keys[:4].half().float(), keys[5:5 + nq - 4] + 0.2 * torch.randn(nq - 4, dim, generator=g)])
    lists = ds._lists()
    d, ids = knn_scan.scan_search(lists, queries, k, lists.nlist, native=native)
    ref_d, _ = brute_force(keys, queries, k)
    kk = ref_d.shape[1]
    torch.testing.assert_close(d[:, :kk].double(), ref_d, rtol=1e-5, atol=1e-4)
    assert (d[:, kk:] == float("inf")).all() and (ids[:, kk:] == -1).all()
    # each returned id is at the distance reported (ties may pick other ids than the reference)
    true_d = ((queries.double()[:, None, :] - keys.half().double()[ids[:, :kk]]) ** 2).sum(-1)
    torch.testing.assert_close(d[:, :kk].double(), true_d, rtol=1e-5, atol=1e-4)
    assert all(len(set(row.tolist())) == kk for row in ids[:, :kk])  # no id twice
    assert (d[:4, 0] < 1e-4).all()


@pytest.mark.parametrize("first_pass, merge_every, elements", [(4, 1.0, None), (1, 1.0, None), (1, 0.01, None),
                                                                (1, 1.0, 37 * 256)])
def test_two_pass_scan_equals_brute_force(tmp_path, monkeypatch, first_pass, merge_every, elements):
    """k ≥ TWO_PASS_MIN_K: pass 1's τ from the nearest lists, pass 2 keeps only keys within it. With
    overlapping clusters many true neighbours lie outside pass 1's lists (pass 2 must find them);
    FIRST_PASS = 1 loosens τ, so that queries have many survivors, in different numbers; a small
    MERGE_EVERY merges them into the running top-k (tightening τ) after nearly every list; a small
    SCAN_ELEMENTS merges them in chunks of a few queries."""
    keys = clustered(4001, 9, clusters=30, seed=8, spread=2.0)
    ds = ivfpq_store(tmp_path, keys, nlist=16)
    monkeypatch.setattr(knn_scan, "FIRST_PASS", first_pass)
    monkeypatch.setattr(knn_scan, "MERGE_EVERY", merge_every)
    if elements:  # one block of every query, and merge tables of a few queries each
        monkeypatch.setattr(knn_scan, "SCAN_ELEMENTS", elements)
        monkeypatch.setattr(knn_scan, "BLOCK_COLUMNS", 1)
    merges = []
    real_top = knn_scan._top
    monkeypatch.setattr(knn_scan, "_top", lambda *a, **kw: merges.append(1) or real_top(*a, **kw))
    kept = []
    real_survivors = knn_scan._survivors
    monkeypatch.setattr(knn_scan, "_survivors", lambda *a: (kept.append(len(r)) or (w, x, r, j, dd)
                                                            for w, x, r, j, dd in real_survivors(*a)))
    queries = keys[:37] + 0.5 * torch.randn(37, 9, generator=torch.Generator().manual_seed(9))
    lists = ds._lists()
    d, ids = knn_scan.scan_search(lists, queries, 256, lists.nlist, native=False)  # the torch scan's two passes
    ref_d, _ = brute_force(keys, queries, 256)
    torch.testing.assert_close(d.double(), ref_d, rtol=1e-5, atol=1e-4)
    true_d = ((queries.double()[:, None, :] - keys.half().double()[ids]) ** 2).sum(-1)
    torch.testing.assert_close(d.double(), true_d, rtol=1e-5, atol=1e-4)
    assert all(len(set(row.tolist())) == 256 for row in ids)
    assert sum(kept) > 256  # pass 2 found neighbours outside pass 1's lists
    assert (len(merges) > 3) == (merge_every < 1 or elements is not None)  # merges, or chunks of a merge


def test_scan_recall_is_what_the_scan_finds(tmp_path):
    """scan_recall (from the lists that hold the exact neighbours) equals the share of them each
    nprobe's search returns, and it falls short of 1 at small nprobe (the check can fail)."""
    keys = clustered(3000, 16, clusters=40, seed=2, spread=2.0)  # overlapping clusters: lists split neighbourhoods
    ds = ivfpq_store(tmp_path, keys, nlist=32)
    queries = keys[:60] + 0.3 * torch.randn(60, 16, generator=torch.Generator().manual_seed(1))
    _, truth = brute_force(keys, queries, 50)
    lists = ds._lists()
    seen = []
    for nprobe in (1, 2, 4, 32):
        _, ids = knn_scan.scan_search(lists, queries, 50, nprobe)
        found = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, truth)) / truth.numel()
        assert knn_scan.scan_recall(lists, queries, truth, nprobe) == pytest.approx(found, abs=1e-12)
        seen.append(found)
    assert seen[0] < 0.9 and seen == sorted(seen) and seen[-1] == 1.0


def test_calibration_records_the_scan_nprobe(tmp_path):
    keys = clustered(3000, 16, clusters=40, seed=4)
    ds = ivfpq_store(tmp_path, keys, nlist=32)
    by_k = ds.manifest["index"]["calibration"]["by_k"]
    for k in ("8", "64"):
        assert by_k[k]["scan_recall"] >= 0.9 + knn_scan.SCAN_MARGIN
        assert by_k[k]["scan_nprobe"] in knn_scan.scan_nprobes(32)
        assert knn_index.scan_setting_for(ds.manifest["index"], int(k)) == by_k[k]["scan_nprobe"]
    smaller = [n for n in knn_scan.scan_nprobes(32) if n < by_k["64"]["scan_nprobe"]]
    if smaller:  # the next smaller nprobe misses the goal: the calibration takes the smallest that meets it
        lists = ds._lists()
        rows = torch.from_numpy(knn_index.sample_rows(len(keys), 256, 1))
        q = keys[rows].half().float()
        truth = knn_index._drop_own(knn_index.torch_exact_search(ds.keys, q, 65)[1], rows.unsqueeze(1))
        assert knn_scan.scan_recall(lists, q, truth[:, :64], smaller[-1]) < 0.9 + knn_scan.SCAN_MARGIN
    # a datastore calibrated before scans existed: the IVFPQ nprobe (the scan's recall there is at least as high)
    old = {"nprobe": 5, "calibration": {"by_k": {"64": {"nprobe": 12, "rerank": 4}}}}
    assert knn_index.scan_setting_for(old, 8) == 12 and knn_index.scan_setting_for({"nprobe": 5}, 8) == 5


def test_search_routing_to_the_scan(tmp_path, monkeypatch):
    monkeypatch.setenv("LMMEM_NATIVE_BF16", "0")  # the patched op below has no bf16 variant
    keys = clustered(2000, 8, clusters=20, seed=6)
    ivfpq_store(tmp_path, keys)
    ds = Datastore.open(tmp_path / "ds", native=False)  # the torch scan
    assert ds.search_plan("cpu") == "scan" and "scan of IVF lists" in ds.describe_search("cpu")
    assert ds.search_plan("cpu", k=1024) == "scan" and ds.search_plan("cpu", k=64) == "faiss"  # small k, narrow keys
    monkeypatch.setattr(ivf_scan, "native_scan_op", lambda: len)  # the native op runs: the scan at every k
    assert Datastore.open(tmp_path / "ds").search_plan("cpu", k=8) == "scan" and ds.search_plan("cpu", k=8) == "faiss"
    assert "(native;" in Datastore.open(tmp_path / "ds").describe_search("cpu") and "(torch;" in ds.describe_search("cpu")
    monkeypatch.setattr(ivf_scan, "native_scan_op", lambda: None)  # it does not build here: as the torch scan
    assert Datastore.open(tmp_path / "ds").search_plan("cpu", k=64) == "faiss"
    monkeypatch.undo()
    assert ds.search_plan("cpu", distances="index") == "faiss"  # PQ distances asked for: the index
    assert Datastore.open(tmp_path / "ds", backend="faiss").search_plan("cpu") == "faiss"
    monkeypatch.setattr(knn_datastore, "SCAN_RAM_FRACTION", 0.0)  # fp32 keys too large for RAM: PQ + re-ranking
    fresh = Datastore.open(tmp_path / "ds")
    assert fresh.search_plan("cpu") == "faiss"
    assert Datastore.open(tmp_path / "ds", backend="scan").search_plan("cpu", distances="index") == "scan"
    # the scan and PQ + re-ranking at the same nprobe: the scan finds at least as many exact neighbours
    queries = keys[:40] + 0.3 * torch.randn(40, 8, generator=torch.Generator().manual_seed(3))
    _, truth = brute_force(keys, queries, 64)
    recall = {}
    for backend in ("scan", "faiss"):
        _, ids = Datastore.open(tmp_path / "ds", backend=backend).search_ids(queries, 64, nprobe=2, rerank=2)
        recall[backend] = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, truth)) / truth.numel()
    assert recall["scan"] >= recall["faiss"]
    dists, values = ds.search(queries, 64, nprobe=2)
    assert values.dtype == torch.int64 and dists.shape == (40, 64) and (dists[:, 1:] >= dists[:, :-1]).all()


def test_recalibrate_gives_an_older_datastore_its_scan_nprobe(tmp_path):
    """A manifest calibrated before the scan existed (no scan_nprobe): the scan uses the PQ nprobe;
    recalibrate() stores the scan's own, in place, and leaves the rest of the manifest as it was."""
    import json

    keys = clustered(3000, 16, clusters=40, seed=4)
    ds = ivfpq_store(tmp_path, keys, nlist=32)
    path = tmp_path / "ds" / "manifest.json"
    manifest = json.loads(path.read_text())
    for v in manifest["index"]["calibration"]["by_k"].values():
        v.pop("scan_nprobe"), v.pop("scan_recall")
    path.write_text(json.dumps(manifest))
    old = Datastore.open(tmp_path / "ds")
    assert knn_index.scan_setting_for(old.manifest["index"], 64) == manifest["index"]["calibration"]["by_k"]["64"]["nprobe"]
    cal = old.recalibrate(ks=(8, 64))
    again = json.loads(path.read_text())
    assert again["index"]["calibration"]["by_k"]["64"]["scan_nprobe"] == cal["by_k"]["64"]["scan_nprobe"]
    assert Datastore.open(tmp_path / "ds").manifest == old.manifest == again
    assert {k: v for k, v in again.items() if k != "index"} == {k: v for k, v in manifest.items() if k != "index"}
    assert (tmp_path / "ds" / "keys.f16").read_bytes() == ds.keys.tobytes()
    with pytest.raises(LmmemError, match="Flat search is exact"):
        Datastore.open(build(tmp_path / "flat", keys[:100], torch.zeros(100, dtype=torch.long))).recalibrate()
