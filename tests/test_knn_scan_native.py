"""The native IVF scan (lmmem.kernels.ivf_scan, C++), with fp32 and with bf16 products, against a
float64 brute force and the torch scan it replaces, and its fallback: a build that fails, a probe
that fails, LMMEM_NATIVE=0, LMMEM_NATIVE_BF16=0 (issue 20).
Its equality on the shapes of the torch scan's tests is in tests/test_knn_scan.py."""

from __future__ import annotations

import warnings

import pytest
import torch

from lmmem.kernels import ivf_scan
from lmmem.memories import knn_scan
from lmmem.memories.knn import Datastore
from test_knn import brute_force, clustered
from test_knn_scan import ivfpq_store

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["fp32", "bf16"])
def products(request, monkeypatch, native_op):
    """The native scan with each kind of product. bf16 runs without AMX too (MKL emulates it), so
    it must pass its probe wherever torch's build has MKL's bf16 GEMM (x86-64 wheels)."""
    monkeypatch.setenv("LMMEM_NATIVE_BF16", "0" if request.param == "fp32" else "1")
    if request.param == "bf16" and ivf_scan.screened_scan_op() is None:
        if not torch.ops.lmmem_ivf_scan.has_bf16_gemm():
            pytest.skip("this torch build does not export MKL's bf16 GEMM")
        pytest.fail("MKL's bf16 GEMM is present, so the bf16 scan must pass its probe")
    assert ivf_scan.bf16_products(19) == (request.param == "bf16")
    return request.param


def test_when_the_scan_multiplies_in_bf16(monkeypatch):
    """By default on AMX CPUs for keys at least BF16_MIN_DIM wide; LMMEM_NATIVE_BF16 overrides both ways."""
    monkeypatch.delenv("LMMEM_NATIVE_BF16", raising=False)
    monkeypatch.setattr(ivf_scan, "_cpu_flags", lambda: "flags : fpu avx512f amx_tile amx_bf16 amx_int8")
    assert ivf_scan.bf16_products(768) and not ivf_scan.bf16_products(128)
    monkeypatch.setattr(ivf_scan, "_cpu_flags", lambda: "flags : fpu avx512f avx512_bf16")
    assert not ivf_scan.bf16_products(768)
    monkeypatch.setenv("LMMEM_NATIVE_BF16", "1")
    assert ivf_scan.bf16_products(64)
    monkeypatch.setenv("LMMEM_NATIVE_BF16", "0")
    monkeypatch.setattr(ivf_scan, "_cpu_flags", lambda: "flags : amx_bf16")
    assert not ivf_scan.bf16_products(768)


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of ``b``'s ids (-1 ignored) that ``a`` holds in the same row."""
    return sum(len((set(x.tolist()) & set(y.tolist())) - {-1}) for x, y in zip(a, b)) / int((b >= 0).sum())


@pytest.mark.parametrize("k, extra", [(1, 1), (9, 1), (70, 0), (70, 256), (700, 256)])
def test_native_scan_equals_brute_force_and_the_torch_scan(tmp_path, monkeypatch, products, k, extra):
    """Overlapping clusters (neighbours spread over many lists), nprobe below and at nlist. Small
    pools (POOL_MIN_EXTRA 0–1: cap = 2k) are cut back many times while the lists are scanned; k = 1;
    k above what some queries' probed lists hold (padding with +inf, -1)."""
    monkeypatch.setattr(ivf_scan, "POOL_MIN_EXTRA", extra)
    keys = clustered(3001, 19, clusters=30, seed=3, spread=2.0)
    keys[100:110] = keys[7]  # tied distances
    ds = ivfpq_store(tmp_path, keys, nlist=16)
    lists = ds._lists()
    assert ("bf16 products" in ds.describe_search("cpu", k=k)) == (products == "bf16")
    g = torch.Generator().manual_seed(k)
    queries = torch.cat([keys[:5].half().float(), keys[200:241] + 0.5 * torch.randn(41, 19, generator=g)])
    d, ids = knn_scan.scan_search(lists, queries, k, lists.nlist, native=True)
    ref_d, _ = brute_force(keys, queries, k)
    torch.testing.assert_close(d.double(), ref_d, rtol=1e-5, atol=1e-4)
    true_d = ((queries.double()[:, None, :] - keys.half().double()[ids]) ** 2).sum(-1)
    torch.testing.assert_close(d.double(), true_d, rtol=1e-5, atol=1e-4)
    assert all(len(set(row.tolist())) == k for row in ids) and (d[:5, 0] < 1e-4).all()
    for nprobe in (1, 3):  # fewer lists: the same keys as the torch scan, padded where they hold fewer than k
        d_n, ids_n = knn_scan.scan_search(lists, queries, k, nprobe, native=True)
        d_t, ids_t = knn_scan.scan_search(lists, queries, k, nprobe, native=False)
        assert torch.equal(torch.isinf(d_n), torch.isinf(d_t)) and torch.equal(ids_n < 0, ids_t < 0)
        finite = torch.isfinite(d_t)
        torch.testing.assert_close(d_n[finite], d_t[finite], rtol=1e-5, atol=1e-4)
        assert overlap(ids_n, ids_t) > 0.995  # the same neighbours but for ties
    if k == 700:
        assert torch.isinf(d_n).any()  # some queries' 3 lists hold fewer than 700 keys


def test_native_scan_threads_give_the_same_result(tmp_path, products):
    """Threads take disjoint runs of queries, each with its own grouping by list: the same
    neighbours as one thread (the distances to rounding: the matmuls have other row counts)."""
    keys = clustered(2500, 24, clusters=20, seed=5, spread=1.5)
    lists = ivfpq_store(tmp_path, keys, nlist=16)._lists()
    queries = keys[:57] + 0.3 * torch.randn(57, 24, generator=torch.Generator().manual_seed(2))
    one = knn_scan.scan_search(lists, queries, 300, 6)
    torch.set_num_threads(3)  # the one_thread fixture restores it
    three = knn_scan.scan_search(lists, queries, 300, 6)
    torch.testing.assert_close(one[0], three[0], rtol=1e-5, atol=1e-4)
    assert overlap(one[1], three[1]) > 0.999


def test_bf16_scan_orders_keys_that_bf16_products_cannot_tell_apart(monkeypatch, native_op):
    """Keys at distances 1 + 2e-4·i from the query, in random directions, far from their list's
    centroid: the bf16 products' rounding (~0.4% of |q − c|·|x − c|, here ~100 times the gaps)
    cannot order them, so every one of them is re-checked in fp32 and the top-k is the exact order."""
    monkeypatch.setenv("LMMEM_NATIVE_BF16", "1")
    if ivf_scan.screened_scan_op() is None:
        pytest.skip("no bf16 scan here (see the products fixture)")
    g = torch.Generator().manual_seed(4)
    dim, count, k = 96, 600, 70
    query = torch.randn(dim, generator=g)
    away = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
    rank = torch.randperm(count, generator=g)
    radius = (1 + 2e-4 * rank.double()).sqrt()
    keys = query.double() + radius[:, None] * torch.nn.functional.normalize(torch.randn(count, dim, generator=g), dim=1).double()
    centroid = (query.double() + 2.0 * away.double()).float()
    residuals = (keys - centroid.double()).float()
    lists = knn_scan.IVFLists(centroids=centroid[None], ids=torch.arange(count), starts=torch.tensor([0, count]),
                              list_of=torch.zeros(count, dtype=torch.int64), residuals=residuals,
                              norms=(residuals * residuals).sum(1))
    d, ids = knn_scan.scan_search(lists, query[None], k, 1)
    truth = ((query.double() - residuals.double() - centroid.double()) ** 2).sum(1)
    assert torch.equal(ids[0], truth.argsort()[:k])  # gaps of 2e-4 ≫ fp32 rounding (~1e-6) of distances near 1
    torch.testing.assert_close(d[0].double(), truth.sort().values[:k], rtol=0, atol=2e-6)
    _, bf16_alone = torch.topk(-(residuals.bfloat16().float() - (query - centroid).bfloat16().float()).pow(2).sum(1), k)
    assert not torch.equal(bf16_alone, ids[0])  # the test's premise: bf16 distances alone get the order wrong


@pytest.fixture
def fresh_verdict(monkeypatch):
    """The process's verdicts on the ops cleared before and after: this test's own build or failure.
    Where the library is already loaded (an earlier test, e.g. the demo's with its own LMMEM_CACHE),
    LMMEM_CACHE points at the folder it came from, so that this test's load finds it there."""
    from pathlib import Path

    loaded = [Path(p) for p in torch.ops.loaded_libraries if Path(p).name.startswith(ivf_scan.NAME)]
    if loaded:
        monkeypatch.setenv("LMMEM_CACHE", str(loaded[0].parent.parent.parent))  # CACHE/native/NAME-digest/NAME.so
    ivf_scan._load.cache_clear()
    ivf_scan._load_screened.cache_clear()
    yield
    ivf_scan._load.cache_clear()
    ivf_scan._load_screened.cache_clear()


def test_a_bf16_scan_that_fails_its_probe_falls_back_to_fp32_products(tmp_path, monkeypatch, native_op, fresh_verdict):
    """A wrong bf16 result on the probe problem: one NativeScanWarning, then the fp32 op runs."""
    monkeypatch.setenv("LMMEM_NATIVE_BF16", "1")
    op = ivf_scan.native_scan_op()
    assert op is not None
    monkeypatch.setattr(ivf_scan, "_probe_ok", lambda *a: False)  # the fp32 op's verdict is already cached
    with pytest.warns(ivf_scan.NativeScanWarning, match="bf16 products"):
        assert ivf_scan.screened_scan_op() is None
    keys = clustered(1500, 10, clusters=15, seed=1)
    lists = ivfpq_store(tmp_path, keys, nlist=16)._lists()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ivf_scan.NativeScanWarning)
        got = knn_scan.scan_search(lists, keys[:20] + 0.2, 40, 4)
    assert lists.screen is None  # no bf16 copy made for an op that does not run
    want = knn_scan.scan_search(lists, keys[:20] + 0.2, 40, 4, native=False)
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("failure", ["build", "probe"])
def test_a_native_scan_that_fails_falls_back_to_the_torch_scan(tmp_path, monkeypatch, fresh_verdict, failure):
    """No compiler (the build raises) or a wrong result on the probe problem: one NativeScanWarning
    naming the cause, then the search returns the torch scan's neighbours without asking again."""
    from conftest import native_toolchain_missing
    from torch.utils import cpp_extension

    if failure == "build":
        def no_compiler(*a, **kw):
            raise RuntimeError("Error building extension 'lmmem_ivf_scan': c++: command not found\nmore")
        monkeypatch.setattr(cpp_extension, "load", no_compiler)
    else:
        if native_toolchain_missing():
            pytest.skip(f"the probe runs the built op: {native_toolchain_missing()}")
        monkeypatch.setattr(ivf_scan, "_probe_ok", lambda *a: False)
    with pytest.warns(ivf_scan.NativeScanWarning, match="command not found" if failure == "build" else "probe"):
        assert ivf_scan.native_scan_op() is None
    keys = clustered(1500, 10, clusters=15, seed=1)
    lists = ivfpq_store(tmp_path, keys, nlist=16)._lists()
    queries = keys[:20] + 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("error", ivf_scan.NativeScanWarning)  # warned once: not again
        got = knn_scan.scan_search(lists, queries, 40, 4)
    want = knn_scan.scan_search(lists, queries, 40, 4, native=False)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_build_killed_half_way_blocks_no_later_one(monkeypatch, fresh_verdict, native_op):
    """A build killed with kill -9 leaves torch's baton file (``lock``) in the build folder, on which
    torch's loader would wait forever: the next load removes it under lmmem's own flock."""
    from torch.utils.file_baton import FileBaton

    from lmmem.safety import FolderLock

    folder = ivf_scan._build_folder(ivf_scan._cflags())
    with FolderLock(folder.parent / f"{folder.name}.lock", "the build folder", wait=True):  # no load in between
        (folder / "lock").touch()

    def wait_forever(self):
        raise AssertionError(f"waited on the stale baton {self.lock_file_path}")
    monkeypatch.setattr(FileBaton, "wait", wait_forever)
    ivf_scan._load.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ivf_scan.NativeScanWarning)
        assert ivf_scan.native_scan_op() is not None
    assert not (folder / "lock").exists()


def test_native_switch(tmp_path, monkeypatch):
    """LMMEM_NATIVE=0 and Datastore.open(native=False) keep the torch scan: the op is never asked for."""
    asked = []
    monkeypatch.setattr(ivf_scan, "native_scan_op", lambda: asked.append(1))
    keys = clustered(1500, 10, clusters=15, seed=1)
    ivfpq_store(tmp_path, keys, nlist=16)
    Datastore.open(tmp_path / "ds", backend="scan", native=False).search(keys[:3], 5)
    assert asked == []
    Datastore.open(tmp_path / "ds", backend="scan").search(keys[:3], 5)
    assert asked  # the native op asked for (by the fp32 and the bf16 scan alike)
    monkeypatch.undo()
    monkeypatch.setenv("LMMEM_NATIVE", "0")
    assert not ivf_scan.native_enabled() and ivf_scan.native_scan_op() is None


def test_a_load_after_the_cache_folder_moved_reuses_the_loaded_library(tmp_path, monkeypatch, native_op, fresh_verdict):
    """The op loaded from one cache folder, then LMMEM_CACHE changed (the demo's test does this): a
    second copy of the library would register its ops again and abort the process, so the loaded
    one serves, probed again, and nothing is built in the new folder."""
    from torch.utils import cpp_extension

    def no_second_build(*a, **kw):
        raise AssertionError("a second copy of the native library was built or loaded")
    monkeypatch.setattr(cpp_extension, "load", no_second_build)
    monkeypatch.setenv("LMMEM_CACHE", str(tmp_path / "elsewhere"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ivf_scan.NativeScanWarning)
        assert ivf_scan.native_scan_op() is not None
    assert not (tmp_path / "elsewhere").exists()
