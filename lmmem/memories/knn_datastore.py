"""Opening and searching a kNN-LM datastore written by :class:`lmmem.memories.knn_store.DatastoreWriter`.

:meth:`Datastore.open` checks before anything is used: a complete folder (``manifest.json``, not
a staging folder), the format version, file sizes against ``count × dim`` (a truncated or
corrupted file), and the caller's ``expect`` (model and tokenizer fingerprints, key source, width).
Each failure is one :class:`LmmemError` line naming the fix.

Where a search runs (``backend="auto"``), per call, from the queries' device:

* CPU queries: the FAISS index (IVFPQ from ``index.faiss``; Flat filled from the keys on first use).
  Where the native scan runs, a Flat datastore is scanned instead, as one list (the same exact
  search, faster at large k).
  An IVFPQ datastore searched with exact distances is scanned instead (``"scan"``,
  :mod:`lmmem.memories.knn_scan`): the index's lists, every key of the probed ones at its exact
  distance, one matmul per list for a whole batch of queries. At the same nprobe it finds at least
  as many of the exact neighbours as PQ + re-ranking, several times faster at large k. It holds the
  keys in fp32 (twice the keys file), so it is chosen while that takes at most ``SCAN_RAM_FRACTION``
  of physical memory, and for searches where its matmuls are large enough to pay for the loop over
  lists (``k ≥ SCAN_MIN_K`` or keys ``≥ SCAN_MIN_DIM`` wide) or where the scan runs as the native
  op of :mod:`lmmem.kernels.ivf_scan` (where it builds; ``native=False``: the torch scan), faster
  than PQ + re-ranking at every k; ``backend="faiss"`` keeps PQ + re-ranking.
* CUDA queries: FAISS's GPU build where installed (``faiss.get_num_gpus() > 0``; a GPU copy of the
  index, made once); otherwise the exact torch search on the GPU with the keys copied there once
  (fp16) when they take at most half its free memory (exact beats IVFPQ's recall, and a GPU
  matmul over 1M keys costs milliseconds); otherwise FAISS on the CPU.
* No FAISS: the exact torch search, with one warning (:class:`knn_index.FaissMissingWarning`).

Distances (``distances=``): ``"exact"`` recomputes ``Σ (q − x)²`` from the stored keys for the
retrieved ids and re-sorts; ``"index"`` keeps the search's own (PQ-approximate for IVFPQ);
``"auto"`` is exact while the keys file takes at most ``EXACT_RAM_FRACTION`` of physical memory
(random gathers from a memmap that stays in the page cache are cheap; from disk they are not).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from lmmem.errors import LmmemError
from lmmem.jsonio import write_json
from lmmem.kernels import ivf_scan
from lmmem.memories import knn_index, knn_scan
from lmmem.memories.knn_store import (
    BUILD_FILE, FORMAT_VERSION, INDEX_FILE, KEYS_FILE, MANIFEST_FILE, VALUES_FILE, rebuild_hint, lock_path,
    staging_path)
from lmmem.safety import FolderLock, recover_swap, retired_name

DISTANCES = ("auto", "exact", "index")
BACKENDS = ("auto", "faiss", "scan", "torch")
EXACT_RAM_FRACTION = 0.5  # distances="auto" recomputes exactly while keys.f16 ≤ this share of RAM
SCAN_RAM_FRACTION = 0.25  # backend="auto" scans IVF lists exactly while their fp32 keys take ≤ this share of RAM
# ... and, for the torch scan (the native op pays everywhere), for k ≥ SCAN_MIN_K or keys ≥ SCAN_MIN_DIM
# wide: below both, its per-list matmuls are too small to pay for their loop (the benchmark at 1M × 64:
# the torch scan at 0.5–0.7× PQ's speed at k = 8)
SCAN_MIN_K = 256
SCAN_MIN_DIM = 512
GPU_MAX_K = 2048  # FAISS's GPU search returns at most this many neighbours
GPU_KEYS_FRACTION = 0.5  # the torch search copies the keys to a GPU while they take ≤ this share of its free memory


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _short(v) -> str:
    text = str(v)
    return text if len(text) <= 16 else text[:12] + "…"


class Datastore:
    """A complete datastore, opened read-only. Use :meth:`open`."""

    def __init__(self, path: Path, manifest: dict, *, backend: str = "auto", native: bool = True,
                 bf16: bool | None = None):
        self.path, self.manifest = path, manifest
        self.dim, self.size = int(manifest["dim"]), int(manifest["count"])
        self.keys = np.memmap(path / KEYS_FILE, dtype=np.float16, mode="r", shape=(self.size, self.dim))
        self._values = torch.from_numpy(np.fromfile(path / VALUES_FILE, dtype=np.int32)).to(torch.int64)
        self.index_type = manifest["index"]["type"]
        self.backend, self.native, self.bf16 = backend, native, bf16
        self._faiss = None if backend == "torch" else knn_index.faiss_or_none()
        if self._faiss is None and backend == "faiss":
            raise LmmemError("backend='faiss' needs faiss: pip install faiss-cpu")
        if self._faiss is None and backend == "auto":
            warnings.warn(f"faiss is not installed: the datastore {path} is searched exactly with torch (slower than its "
                          f"{self.index_type} index on large datastores); pip install faiss-cpu",
                          knn_index.FaissMissingWarning, stacklevel=3)
        self._cpu_index = None
        self._gpu_index: dict[str, tuple] = {}  # device → (index, its GPU resources)
        self._device_keys: dict[str, torch.Tensor] = {}
        self._device_values: dict[str, torch.Tensor] = {}
        self._scan_lists: knn_scan.IVFLists | None = None

    # -- opening ------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path, *, expect: dict | None = None, backend: str = "auto", native: bool = True,
             bf16: bool | None = None) -> "Datastore":
        """Open the datastore folder ``path`` after the checks of the module docstring.
        ``expect``: manifest fields this use needs (e.g. ``model_fingerprint``, ``dim``); looked up
        at the manifest's top level, then under ``built``. ``backend``: ``"auto"``, ``"faiss"`` (the
        index as built: PQ codes + re-ranking for IVFPQ), ``"scan"`` (IVFPQ: the exact scan of its
        lists on CPU, whatever the memory) or ``"torch"`` (exact search everywhere). ``native``: the
        scan runs as the fused C++ op where it builds (:mod:`lmmem.kernels.ivf_scan`); False keeps
        the torch scan (the same neighbours; for comparisons). ``bf16``: the native scan's products
        in bf16 with fp32 re-checks (the same neighbours; a bf16 copy of the keys beside the fp32
        one); None: on AMX CPUs for wide keys (:func:`lmmem.kernels.ivf_scan.bf16_products`)."""
        if backend not in BACKENDS:
            raise LmmemError(f"unknown datastore backend {backend!r}; choose {', '.join(BACKENDS)}")
        path = Path(path)
        path = path.resolve() if path.is_symlink() else path
        manifest = _read_manifest(path)
        _check_files(path, manifest)
        if expect:
            _check_expected(path, manifest, expect)
        return cls(path, manifest, backend=backend, native=native, bf16=bf16)

    # -- searching ----------------------------------------------------------------------------------
    def search(self, queries: torch.Tensor, k: int, *, distances: str = "auto", nprobe: int | None = None,
               rerank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest keys of each query: (dists (N, k) float32 ascending squared L2, values
        (N, k) int64), on the queries' device; past the stored count: (+inf, -1). ``nprobe`` and
        ``rerank`` (IVFPQ: fetch ``knn_index.candidates(k, rerank)``, keep the ``k`` nearest by exact distance)
        default to the values calibrated for this k when the datastore was built (its manifest's
        ``index.calibration``; see ``knn_index.setting_for``; a scan uses its own calibrated nprobe,
        ``knn_index.scan_setting_for``, and no re-ranking)."""
        dists, ids = self.search_ids(queries, k, distances=distances, nprobe=nprobe, rerank=rerank)
        return dists, self.values_of(ids)

    def search_ids(self, queries: torch.Tensor, k: int, *, distances: str = "auto", nprobe: int | None = None,
                   rerank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`search`, with the neighbours' row ids (int64, -1 where missing) instead of values."""
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise LmmemError(f"queries of shape {tuple(queries.shape)} do not match the datastore's key width {self.dim} "
                             f"({self.path} was built for another model?); rebuild it with {rebuild_hint(self.path)}")
        if k < 1:
            raise LmmemError(f"k must be at least 1, got {k}")
        if distances not in DISTANCES:
            raise LmmemError(f"unknown distances {distances!r}; choose {', '.join(DISTANCES)}")
        dev = queries.device
        if queries.shape[0] == 0:
            return torch.empty((0, k), device=dev), torch.empty((0, k), dtype=torch.int64, device=dev)
        exact = self.uses_exact_distances(distances)
        where = self.search_plan(dev, distances=distances, k=k)
        if where == "faiss-gpu" and k > GPU_MAX_K:
            where = "faiss"  # beyond what FAISS's GPU search returns: its CPU index
        if where == "scan":
            flat = self.index_type == "flat"
            nprobe = 1 if flat else nprobe or knn_index.scan_setting_for(self.manifest["index"], k)
            dists, ids = knn_scan.scan_search(self._lists(), queries, k, nprobe, native=self.native, bf16=self.bf16)
            if flat and exact:  # one list around the keys' mean: its expanded form rounds as FAISS's Flat does
                return knn_index.rerank_exact(self._keys_for(dev), queries, ids.to(dev), k)
            return dists.to(dev), ids.to(dev)
        if where == "torch":
            dists, ids = knn_index.torch_exact_search(self._keys_for(dev), queries, k)
        else:
            default_nprobe, default_rerank = knn_index.setting_for(self.manifest["index"], k)
            fetch = k
            if exact and self.index_type == "ivfpq":
                fetch = knn_index.candidates(k, rerank or default_rerank)
                fetch = max(k, min(fetch, GPU_MAX_K)) if where == "faiss-gpu" else fetch
            dists, ids = knn_index.faiss_search(self._faiss_index(dev if where == "faiss-gpu" else None), queries,
                                                fetch, nprobe or default_nprobe)
            dists, ids = dists.to(dev), ids.to(dev)
        if exact:
            return knn_index.rerank_exact(self._keys_for(dev), queries, ids, k)
        return dists, ids

    def calibrate(self, *, target: float = 0.9, ks=knn_index.CALIBRATION_KS, queries: int = knn_index.CALIBRATION_QUERIES,
                  seed: int = 0) -> dict:
        """The (nprobe, rerank) per k that reach ``target`` recall on this IVFPQ datastore
        (:func:`knn_index.calibrate`; the build did this for its own target and ks): for another
        k or target without rebuilding. Pass the result's settings to :meth:`search`."""
        if self.index_type != "ivfpq" or self._faiss is None:
            raise LmmemError(f"{self.path}: calibration is for IVFPQ datastores searched with faiss (this one: "
                             f"{self.index_type}, {'faiss' if self._faiss else 'no faiss'}); Flat search is exact")
        return knn_index.calibrate(self._faiss_index(None), self.keys, target=target, ks=ks, queries=queries, seed=seed)

    def recalibrate(self, *, target: float = 0.9, ks=knn_index.CALIBRATION_KS, seed: int = 0) -> dict:
        """Calibrate again (:meth:`calibrate`) and store the result as the manifest's defaults, in
        place: for a datastore built before the scan of the lists existed, which then gets its
        own nprobe per k without rebuilding the index. The manifest is rewritten atomically under
        the datastore's build lock (refused while a build of this folder runs); nothing else changes."""
        t0 = time.perf_counter()
        calibration = self.calibrate(target=target, ks=ks, seed=seed)
        calibration["seconds"] = round(time.perf_counter() - t0, 3)
        with FolderLock(lock_path(self.path), f"datastore {self.path}"):
            manifest = _read_manifest(self.path)
            manifest["index"].update(nprobe=calibration["nprobe"], rerank=calibration["rerank"], calibration=calibration)
            write_json(manifest, self.path / MANIFEST_FILE, what="the datastore manifest")
        self.manifest = manifest
        return calibration

    def calibration_note(self, k: int) -> str | None:
        """One line when a search for ``k`` neighbours would use the setting calibrated for a
        smaller k (an IVFPQ datastore; its recall at ``k`` is then not measured), else None."""
        ks = knn_index.calibrated_ks(self.manifest["index"]) if self.index_type == "ivfpq" else []
        if not ks or k <= ks[-1]:
            return None
        grid = ",".join(map(str, sorted({*ks, k})))
        return (f"kNN k = {k:,} is above the largest k {self.path} was calibrated for ({ks[-1]:,}): its searches use that "
                f"k's setting, whose recall at {k:,} is not measured; calibrate it in place with python -c \"from "
                f"lmmem.memories.knn import Datastore; Datastore.open('{self.path}').recalibrate(ks=({grid},))\" "
                f"(or build it with --recall-k {grid})")

    def values_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The stored token of each row id (int64, on ``ids``' device); -1 for -1."""
        values = self._device_values.get(str(ids.device))
        if values is None:
            values = self._device_values.setdefault(str(ids.device), self._values.to(ids.device))
        return torch.where(ids >= 0, values[ids.clamp_min(0)], -1)

    def uses_exact_distances(self, distances: str = "auto") -> bool:
        """Whether ``distances`` means recomputing them from the keys (see the module docstring)."""
        if distances != "auto":
            return distances == "exact"
        return self.keys.nbytes <= EXACT_RAM_FRACTION * _physical_memory()

    def search_plan(self, device: torch.device | str = "cpu", *, distances: str = "auto", k: int | None = None) -> str:
        """Which search runs for ``k`` neighbours (None: an evaluation's default, 1,024) of queries on
        ``device``: ``"faiss"``, ``"faiss-gpu"``, ``"scan"`` or ``"torch"``."""
        device = torch.device(device)
        if self._faiss is None:
            return "torch"
        if device.type == "cuda":
            if self._faiss.get_num_gpus() > 0:
                return "faiss-gpu"
            if self.backend == "auto" and self._fits_on(device):
                return "torch"
        bf16 = self._native_scan() and self._bf16_wanted()  # the bf16 scan also holds a bf16 copy of the keys
        fits = (self._scan_lists is not None
                or knn_scan.scan_bytes(self.size, self.dim, bf16=bf16) <= SCAN_RAM_FRACTION * _physical_memory())
        if self.index_type == "flat" and (self.backend == "scan" or (self.backend == "auto" and self._native_scan() and fits)):
            return "scan"  # one list: the same exact search as Flat, 1.8× its speed at k = 1,024 (docs/results/knn-lm.md)
        if self.index_type == "ivfpq" and (self.backend == "scan" or (
                self.backend == "auto" and self.uses_exact_distances(distances)
                and ((k or 1024) >= SCAN_MIN_K or self.dim >= SCAN_MIN_DIM or self._native_scan()) and fits)):
            return "scan"
        return "faiss"

    def _native_scan(self) -> bool:
        """The scan runs as the native op (built on first use): it is then faster than PQ +
        re-ranking at every k and width measured, so ``SCAN_MIN_K`` and ``SCAN_MIN_DIM`` do not apply."""
        return self.native and ivf_scan.native_scan_op() is not None

    def _bf16_wanted(self) -> bool:
        return ivf_scan.bf16_products(self.dim) if self.bf16 is None else self.bf16

    def describe_search(self, device: torch.device | str = "cpu", *, distances: str = "auto",
                        nprobe: int | None = None, k: int | None = None) -> str:
        """One line for results files: what a search for ``k`` neighbours on ``device`` does."""
        plan = self.search_plan(device, distances=distances, k=k)
        exact = "exact distances" if self.uses_exact_distances(distances) else "index distances"
        if plan == "torch":
            return f"torch exact search over {self.size:,} keys on {torch.device(device).type}, {exact}"
        idx = self.manifest["index"]
        how = ("native, bf16 products with fp32 re-checks" if self._native_scan() and self._bf16_wanted()
               and ivf_scan.screened_scan_op()
               else "native" if self._native_scan() else "torch")
        if plan == "scan" and idx["type"] == "flat":
            return f"exact scan ({how}) of the Flat datastore as one list, over {self.size:,} keys, exact distances"
        if plan == "scan":
            return (f"scan of IVF lists ({how}; {knn_index.faiss_version()} nlist {idx['nlist']}, nprobe "
                    f"{nprobe or 'calibrated per k'}) over {self.size:,} fp32 keys, exact distances")
        shape = "Flat" if idx["type"] == "flat" else (
            f"IVFPQ nlist {idx['nlist']} m {idx['m']}×{idx['nbits']}b nprobe {nprobe or idx.get('nprobe')} "
            f"rerank {idx.get('rerank', 1)}")
        return f"{plan} {knn_index.faiss_version()} {shape} over {self.size:,} keys, {exact}"

    def _fits_on(self, device: torch.device) -> bool:
        if str(device) in self._device_keys:
            return True
        free, _ = torch.cuda.mem_get_info(device)
        return self.keys.nbytes <= GPU_KEYS_FRACTION * free

    def _keys_for(self, device: torch.device):
        """The keys where a search on ``device`` reads them: the memmap on CPU, a GPU copy when it fits."""
        if device.type == "cpu":
            return self.keys
        if str(device) not in self._device_keys and self._fits_on(device):
            copy = torch.empty((self.size, self.dim), dtype=torch.float16, device=device)
            for start in range(0, self.size, knn_index.ADD_CHUNK_ROWS):  # bounded host memory
                copy[start:start + knn_index.ADD_CHUNK_ROWS] = torch.from_numpy(
                    np.array(self.keys[start:start + knn_index.ADD_CHUNK_ROWS]))
            self._device_keys[str(device)] = copy
        return self._device_keys.get(str(device), self.keys)

    def _lists(self) -> knn_scan.IVFLists:
        """The index's lists with their keys in fp32 (:func:`knn_scan.ivf_lists`), built on first use."""
        if self._scan_lists is None:
            self._scan_lists = (knn_scan.one_list(self.keys) if self.index_type == "flat" else
                                knn_scan.ivf_lists(self._faiss_index(None), self.keys))
        return self._scan_lists

    def _faiss_index(self, gpu: torch.device | None):
        if self._cpu_index is None:
            if self.index_type == "flat":
                self._cpu_index = knn_index.build_flat(self.keys)
            else:
                self._cpu_index = self._faiss.read_index(str(self.path / INDEX_FILE))
        if gpu is None:
            return self._cpu_index
        if str(gpu) not in self._gpu_index:
            self._gpu_index[str(gpu)] = knn_index.to_gpu(self._cpu_index, gpu)
        return self._gpu_index[str(gpu)][0]

    def close(self) -> None:
        """Drop the index, the device copies and the memmap."""
        self._cpu_index = None
        self._scan_lists = None
        self._gpu_index.clear()
        self._device_keys.clear()
        self._device_values.clear()
        self.keys = None

    def __repr__(self) -> str:
        return f"Datastore({str(self.path)!r}, size={self.size:,}, dim={self.dim}, index={self.index_type})"


# ---------------------------------------------------------------------------------------------
# the checks of open()


def _read_manifest(path: Path) -> dict:
    name = path.name
    if name.startswith(".") and name.endswith(".staging"):
        _half_built(path.with_name(name[1:-len(".staging")]), path)
    if not path.exists():
        _recover_interrupted_swap(path)
    if not path.exists():
        if staging_path(path).is_dir():
            _half_built(path, staging_path(path))
        raise LmmemError(f"no datastore at {path}; build one with {rebuild_hint(path)}")
    if not path.is_dir():
        raise LmmemError(f"{path} is a file, not a datastore folder; give the folder `lmmem datastore` wrote")
    if not (path / MANIFEST_FILE).is_file():
        if (path / BUILD_FILE).is_file() or (path / KEYS_FILE).is_file():
            _half_built(path, path)
        raise LmmemError(f"{path} is not a datastore (no {MANIFEST_FILE}); build one with {rebuild_hint(path)}")
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
        if not isinstance(manifest, dict):
            raise ValueError
    except (OSError, ValueError):
        raise LmmemError(f"{path / MANIFEST_FILE} is unreadable or corrupted; rebuild the datastore with "
                         f"{rebuild_hint(path)}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise LmmemError(f"{path} is a datastore of format {manifest.get('format_version')!r}, this lmmem reads format "
                         f"{FORMAT_VERSION}; rebuild it with {rebuild_hint(path, manifest.get('built'))}")
    return manifest


def _half_built(out: Path, folder: Path):
    info = {}
    try:
        info = json.loads((folder / BUILD_FILE).read_text(encoding="utf-8")).get("info", {})
    except (OSError, ValueError, AttributeError):
        pass
    raise LmmemError(f"{folder} is a half-built datastore (its build was interrupted) and is never used; run the same "
                     f"build again to resume it: {rebuild_hint(out, info)}")


def _recover_interrupted_swap(path: Path) -> None:
    """A build killed between the two renames of a fallback swap left the previous datastore aside:
    put it back (under the build lock, so never under a live build's feet)."""
    if not retired_name(path).is_dir():
        return
    with FolderLock(lock_path(path), f"datastore {path}"):
        recover_swap(path)


def _check_files(path: Path, manifest: dict) -> None:
    count, dim = int(manifest["count"]), int(manifest["dim"])
    sizes = {KEYS_FILE: count * dim * 2, VALUES_FILE: count * 4}
    for name, want in sizes.items():
        have = (path / name).stat().st_size if (path / name).is_file() else None
        if have != want:
            what = "is missing" if have is None else f"holds {have:,} bytes, the manifest's {count:,} × {dim} need {want:,}"
            raise LmmemError(f"{path / name} {what} (truncated or corrupted); rebuild the datastore with "
                             f"{rebuild_hint(path, manifest.get('built'))}")
    if manifest["index"]["type"] not in ("flat", "ivfpq"):
        raise LmmemError(f"{path}: unknown index type {manifest['index']['type']!r}; rebuild the datastore")
    if manifest["index"]["type"] == "ivfpq" and not (path / INDEX_FILE).is_file():
        raise LmmemError(f"{path / INDEX_FILE} is missing; rebuild the datastore with "
                         f"{rebuild_hint(path, manifest.get('built'))}")


def _check_expected(path: Path, manifest: dict, expect: dict) -> None:
    built = manifest.get("built") or {}
    wrong = [(k, manifest[k] if k in manifest else built.get(k), v) for k, v in expect.items()
             if (manifest[k] if k in manifest else built.get(k)) != v]
    if not wrong:
        return
    key, have, want = wrong[0]
    more = f" (and {len(wrong) - 1} more: {', '.join(w[0] for w in wrong[1:])})" if len(wrong) > 1 else ""
    if key == "dim":
        what = f"keys of width {have}, but this model's are {want}: it was built for another model"
    else:
        what = f"was built with {key} {_short(have)}, this use has {_short(want)}"
    raise LmmemError(f"the datastore {path} {'holds ' if key == 'dim' else ''}{what}{more}; rebuild it for this model "
                     f"with {rebuild_hint(path, built)}")
