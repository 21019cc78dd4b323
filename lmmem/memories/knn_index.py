"""Nearest-neighbour search over a kNN-LM datastore's keys: FAISS indexes and an exact torch search.

The keys live on disk as an fp16 ``(count, dim)`` memmap. Three ways to search them:

* **Flat** (exact): FAISS ``IndexFlatL2`` filled from the keys when the datastore is opened (no
  index file: the keys *are* the index). Chosen by ``finish(index="auto")`` while
  ``count · dim ≤ FLAT_MAX_MACS``: the multiply-adds per query of an exact search. At 2^26 (87K
  rows at d = 768, 262K at d = 256) one query costs about half the multiply-adds of a GPT-2-small
  forward per token (124M), so exact search keeps kNN-LM evaluation within ~1.5× of the plain one;
  above it the cost grows with the datastore and IVFPQ's sub-linear search pays for its training.
  IVFPQ also needs enough keys to train (39 per list and 256 per sub-quantiser centroid), which the
  threshold guarantees at any dim.
* **IVFPQ** (approximate, Khandelwal et al. 2020; Jégou et al. 2011): ``nlist`` inverted lists, each
  key stored as ``m`` bytes of product-quantiser code. See :func:`ivfpq_params` for the rules.
* **torch exact** (no FAISS, or queries on a GPU without FAISS's GPU build): a chunked matmul and
  top-k over the keys, bounded memory; the same neighbours as Flat.

Distances: FAISS returns squared L2 from its own arithmetic (PQ-approximate for IVFPQ; for Flat
and the torch search the ``|q|² + |x|² − 2 q·x`` form, which loses digits to cancellation when
``d ≪ |x|²``). :func:`exact_distances` recomputes ``Σ (q_i − x_i)²`` in fp32 from the stored fp16
keys for the retrieved ids, which is what a p_kNN at temperature 1 needs: PQ distances are what
made the kNN-transformers defaults give 17.34 instead of 12.57 perplexity.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lmmem.errors import LmmemError
from lmmem.memories import knn_scan
from lmmem.progress import Progress

FLAT_MAX_MACS = 2**26  # rows × dim up to which finish(index="auto") keeps the exact Flat index
PQ_M_CHOICES = (96, 64, 56, 48, 40, 32, 28, 24, 20, 16, 12, 8, 4, 3, 2, 1)  # code bytes FAISS's GPU IVFPQ supports
PQ_SUB_DIMS = 8  # dimensions per sub-quantiser (at least): 96-byte codes at d = 768
MIN_POINTS_PER_CENTROID = 39  # FAISS's own floor for k-means (it warns below it)
SEARCH_ELEMENTS = 2**24  # fp32 elements of the largest temporary a search chunk builds (64 MB)
ADD_CHUNK_ROWS = 65_536  # keys converted to fp32 at a time while filling an index (bounded memory)


class FaissMissingWarning(UserWarning):
    """faiss is not installed: searches run exactly with torch (the same neighbours as Flat, slower
    than IVFPQ on large datastores)."""


class RecallWarning(UserWarning):
    """An IVFPQ index cannot reach the recall target asked for at any nprobe."""


def faiss_or_none():
    """The ``faiss`` module, or None where it is not installed (or blocked: ``sys.modules['faiss'] = None``)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_version() -> str | None:
    faiss = faiss_or_none()
    return None if faiss is None else getattr(faiss, "__version__", "unknown")


# ---------------------------------------------------------------------------------------------
# IVFPQ parameters and building


@dataclass(frozen=True)
class IVFPQParams:
    nlist: int  # inverted lists (coarse k-means centroids)
    m: int  # product-quantiser sub-vectors = code bytes per key at nbits 8
    nbits: int  # bits per sub-vector code
    train_rows: int  # keys the quantisers are trained on (a seeded sample)
    nprobe: int  # lists probed per query (the default; Khandelwal et al. use 32)
    seed: int = 0


def ivfpq_params(count: int, dim: int, *, nlist: int | None = None, m: int | None = None, nbits: int | None = None,
                 train_rows: int | None = None, nprobe: int = 32, seed: int = 0) -> IVFPQParams:
    """The IVFPQ shape for ``count`` keys of width ``dim`` (any argument given overrides its rule).

    * ``nlist`` = the power of two nearest ``4·√count`` (FAISS's guideline; 4,096 at 1M keys, the
      paper's count), at most ``count / 39`` so that k-means has 39 points per list.
    * ``m`` = the largest of FAISS-GPU's supported code sizes (≤ 96) that divides ``dim`` and leaves
      each sub-quantiser at least 8 dimensions: 96 bytes at d = 768, the paper's 64 at d = 1024.
      Finer than the paper's 12–16 dimensions because PQ's ranking errors cap recall (on the
      benchmark's mixture 64-byte codes at d = 768 found ~60% of the exact top-k at any nprobe);
      the codes stay small beside the fp16 keys the datastore keeps anyway (96 vs 1,536 bytes), and
      FAISS's k-means is slow below 8 dimensions.
    * ``nbits`` = 8 (256 centroids per sub-vector, the paper's), fewer only when the training
      sample holds fewer than 39 points per centroid.
    * ``train_rows`` = ``min(count, max(64·nlist, 65,536))``: 64 keys per list (FAISS samples at
      most 256) and the 65,536 FAISS's PQ training uses; the sample is read from the memmap, so
      memory is ``train_rows · dim · 4`` bytes (0.8 GB at 1M × 768).
    """
    if count < 1 or dim < 1:
        raise LmmemError(f"an IVFPQ index needs keys; got {count} rows of width {dim}")
    if nlist is None:
        nlist = 2 ** round(math.log2(max(4 * math.sqrt(count), 1)))
        nlist = max(1, min(nlist, 2 ** int(math.log2(max(count // MIN_POINTS_PER_CENTROID, 1)))))
    if m is None:
        m = next(c for c in PQ_M_CHOICES if dim % c == 0 and dim // c >= min(PQ_SUB_DIMS, dim))
    if dim % m:
        raise LmmemError(f"IVFPQ m = {m} does not divide the key width {dim}; choose a divisor of {dim}")
    if train_rows is None:
        train_rows = max(64 * nlist, 65_536)
    train_rows = min(train_rows, count)
    if nbits is None:
        nbits = 8
        while nbits > 1 and train_rows < MIN_POINTS_PER_CENTROID * 2**nbits:
            nbits -= 1
    if nlist > train_rows:
        raise LmmemError(f"IVFPQ with {nlist} lists needs at least {nlist} training keys; the datastore has {count}. "
                         f"Use index='flat' or fewer lists")
    return IVFPQParams(nlist=nlist, m=m, nbits=nbits, train_rows=train_rows, nprobe=nprobe, seed=seed)


def fp32_rows(keys: np.ndarray, rows) -> torch.Tensor:
    """``keys[rows]`` (a slice or sorted ids) of the fp16 memmap as a contiguous fp32 tensor; the
    conversion runs in torch (vectorised; numpy's fp16 → fp32 is several times slower)."""
    part = np.array(keys[rows]) if isinstance(rows, slice) else np.take(keys, rows, axis=0)  # (copies: writable)
    return torch.from_numpy(part).to(torch.float32)


def sample_rows(count: int, n: int, seed: int) -> np.ndarray:
    """``n`` distinct row ids out of ``count``, sorted (sequential reads of the memmap), seeded."""
    if n >= count:
        return np.arange(count, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=n, replace=False)).astype(np.int64)


def build_ivfpq(keys: np.ndarray, params: IVFPQParams, *, progress: bool = True) -> tuple[object, dict]:
    """Train an ``IndexIVFPQ`` on a seeded sample of ``keys`` (an fp16 memmap) and add every key,
    ``ADD_CHUNK_ROWS`` at a time (peak memory: the sample in fp32 plus one chunk plus the codes).
    Returns the index and what to record (parameters, timings, FAISS version)."""
    faiss = faiss_or_none()
    if faiss is None:
        raise LmmemError("an IVFPQ index needs faiss: pip install faiss-cpu (or build with index='flat')")
    count, dim = keys.shape
    quantizer = faiss.IndexFlatL2(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, params.nlist, params.m, params.nbits)
    index.cp.seed = params.seed  # the coarse k-means and the PQ's: a rebuild gives the same bytes
    index.pq.cp.seed = params.seed
    index.cp.verbose = index.pq.verbose = False
    if progress:
        print(f"datastore: training IVFPQ ({params.nlist} lists, {params.m}×{params.nbits}-bit codes) on "
              f"{params.train_rows:,} of {count:,} keys", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    sample = fp32_rows(keys, sample_rows(count, params.train_rows, params.seed)).numpy()
    index.train(sample)
    del sample
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    bar = Progress(count, "datastore index", unit="row", enabled=progress)
    for start in range(0, count, ADD_CHUNK_ROWS):
        chunk = fp32_rows(keys, slice(start, start + ADD_CHUNK_ROWS)).numpy()
        index.add(chunk)
        bar.update(len(chunk))
    bar.close()
    record = {"type": "ivfpq", "metric": "l2", **asdict(params), "code_bytes": params.m * params.nbits / 8,
              "faiss_version": faiss_version(), "train_seconds": round(train_s, 3),
              "add_seconds": round(time.perf_counter() - t0, 3)}
    record["trained_on"] = record.pop("train_rows")
    return index, record


def flat_record() -> dict:
    return {"type": "flat", "metric": "l2", "faiss_version": faiss_version() or "torch-exact"}


def build_flat(keys: np.ndarray):
    """A FAISS ``IndexFlatL2`` holding ``keys`` in fp32 (filled in chunks)."""
    faiss = faiss_or_none()
    index = faiss.IndexFlatL2(keys.shape[1])
    for start in range(0, keys.shape[0], ADD_CHUNK_ROWS):
        index.add(fp32_rows(keys, slice(start, start + ADD_CHUNK_ROWS)).numpy())
    return index


# ---------------------------------------------------------------------------------------------
# searching


def faiss_search(index, queries: torch.Tensor, k: int, nprobe: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dists float32, ids int64) from a FAISS index (CPU or GPU); missing results: (+inf, -1)."""
    faiss = faiss_or_none()
    x = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
    params = None
    if nprobe is not None and hasattr(index, "nprobe"):
        if _is_gpu_index(index):  # GPU indexes take nprobe as an attribute, not as search parameters
            index.nprobe = nprobe
        else:
            params = faiss.SearchParametersIVF(nprobe=nprobe)
    d, i = index.search(x, k, params=params) if params is not None else index.search(x, k)
    dists, ids = torch.from_numpy(d), torch.from_numpy(i)
    dists[ids < 0] = math.inf
    return dists, ids


def _is_gpu_index(index) -> bool:
    return type(index).__name__.startswith("Gpu")


def to_gpu(index, device: torch.device):
    """A FAISS GPU copy of ``index`` on ``device`` (FAISS's GPU build only: ``faiss.get_num_gpus() > 0``).
    IVFPQ lookup tables in fp16: FAISS's GPU kernels need them for 64-byte codes. Returns the index
    and its resources object, which must stay alive as long as the index."""
    faiss = faiss_or_none()
    res = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    options.useFloat16 = True
    return faiss.index_cpu_to_gpu(res, device.index or 0, index, options), res


def torch_exact_search(keys, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest keys of each query: chunks of keys (fp16 memmap or tensor) → fp32 on the
    queries' device, ``|x|² − 2 q·x`` by one matmul per chunk, merged into a running top-k.
    Memory: a ``queries × (chunk + k)`` score block of about ``SEARCH_ELEMENTS`` floats (queries are
    taken 1,024 at a time). Returns ascending (dists float32, ids int64), (+inf, -1) past ``count``."""
    n, dev = queries.shape[0], queries.device
    count = keys.shape[0]
    q = queries.detach().to(torch.float32)
    q_rows = max(1, min(n, 1024))
    chunk = max(4 * k, SEARCH_ELEMENTS // q_rows)  # keys per step: the merge re-sorts k, amortised over 4k+
    out_d = torch.full((n, k), math.inf, dtype=torch.float32, device=dev)
    out_i = torch.full((n, k), -1, dtype=torch.int64, device=dev)
    for qs in range(0, n, q_rows):
        qb = q[qs:qs + q_rows]
        best_d = torch.empty((len(qb), 0), dtype=torch.float32, device=dev)
        best_i = torch.empty((len(qb), 0), dtype=torch.int64, device=dev)
        for start in range(0, count, chunk):
            x = _rows_fp32(keys, start, start + chunk, dev)
            scores = torch.addmm((x * x).sum(1).unsqueeze(0), qb, x.t(), alpha=-2.0)  # |x|² − 2 q·x
            kept = best_d.shape[1]
            d, pos = torch.topk(torch.cat([best_d, scores], 1), min(k, kept + scores.shape[1]), dim=1,
                                largest=False, sorted=False)
            from_best = pos < kept
            ids = torch.where(from_best, torch.gather(best_i, 1, pos.clamp(max=max(kept - 1, 0))) if kept else pos,
                              pos - kept + start)
            best_d, best_i = d, ids
        best_d = (best_d + (qb * qb).sum(1, keepdim=True)).clamp_min_(0)
        best_d, order = torch.sort(best_d, dim=1)
        out_d[qs:qs + q_rows, :best_d.shape[1]] = best_d
        out_i[qs:qs + q_rows, :best_d.shape[1]] = torch.gather(best_i, 1, order)
    return out_d, out_i


def _rows_fp32(keys, start: int, stop: int, device: torch.device) -> torch.Tensor:
    if isinstance(keys, torch.Tensor):
        return keys[start:stop].to(device=device, dtype=torch.float32)
    return fp32_rows(keys, slice(start, stop)).to(device)


def exact_distances(keys, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``Σ_j (q_j − x_j)²`` in fp32 for each retrieved id (``ids`` (N, k), -1 → +inf), from the
    stored fp16 keys: no cancellation, so identical vectors give 0 and near ones their true gap.

    Per block of queries, the block's distinct ids are gathered once in sorted order (sequential
    reads of the memmap; neighbouring queries share many neighbours) and converted to fp32; then
    FAISS's ``pairwise_indexed_L2sqr`` (SIMD, reads each needed row in place) gives the distances,
    or without FAISS (or on a GPU) torch expands the rows, subtracts and reduces. The temporaries
    are at most ``SEARCH_ELEMENTS`` floats."""
    n, k = ids.shape
    dev = queries.device
    q = queries.detach().to(torch.float32).contiguous()
    out = torch.empty((n, k), dtype=torch.float32, device=dev)
    rows = max(1, SEARCH_ELEMENTS // max(k * q.shape[1], 1))
    ids_cpu = ids.cpu()
    faiss = faiss_or_none() if dev.type == "cpu" else None
    for s in range(0, n, rows):
        block = ids_cpu[s:s + rows]
        uniq, inverse = torch.unique(block.clamp_min(0), sorted=True, return_inverse=True)
        if isinstance(keys, torch.Tensor):
            gathered = keys.index_select(0, uniq.to(keys.device)).to(device=dev, dtype=torch.float32)
        else:
            gathered = fp32_rows(keys, uniq.numpy()).to(dev)
        if faiss is not None:
            out[s:s + rows] = _pairwise_faiss(faiss, q[s:s + rows], gathered, inverse)
        else:
            diff = gathered[inverse.to(dev)] - q[s:s + rows].unsqueeze(1)  # (rows, k, dim)
            out[s:s + rows] = (diff * diff).sum(2)
    out[ids.to(dev) < 0] = math.inf
    return out


def _pairwise_faiss(faiss, q: torch.Tensor, rows: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``|q[i] − rows[inverse[i, j]]|²`` for every (i, j), by FAISS without expanding the rows."""
    n, k = inverse.shape
    x, y = q.numpy(), rows.contiguous().numpy()
    ix = np.repeat(np.arange(n, dtype=np.int64), k)
    iy = np.ascontiguousarray(inverse.numpy().reshape(-1), dtype=np.int64)
    dis = np.empty(n * k, dtype=np.float32)
    faiss.pairwise_indexed_L2sqr(x.shape[1], n * k, faiss.swig_ptr(x), faiss.swig_ptr(ix), faiss.swig_ptr(y),
                                 faiss.swig_ptr(iy), faiss.swig_ptr(dis))
    return torch.from_numpy(dis).view(n, k)


def rerank_exact(keys, queries: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` candidates of each row of ``ids`` nearest by :func:`exact_distances`, ascending
    (a stable sort: ties keep the index's order)."""
    exact = exact_distances(keys, queries, ids)
    exact, order = torch.sort(exact, dim=1, stable=True)
    return exact[:, :k], torch.gather(ids, 1, order[:, :k])


# ---------------------------------------------------------------------------------------------
# calibration: the nprobe and re-ranking depth that reach a recall target


CALIBRATION_KS = (8, 64, 1024)  # the k a recall target must hold for (1,024: the paper's and KNNConfig's default)
CALIBRATION_QUERIES = 256
RERANK_CHOICES = (1, 2, 4, 8)  # candidates fetched per neighbour kept, re-ranked by exact distance
SATURATED = 0.005  # a recall that rises less than this when nprobe doubles has stopped rising
RECALL_SLACK = 0.02  # an unmet target: the cheapest setting within this of the best recall seen
RERANK_MIN = 64  # a re-ranking search fetches at least rerank · 64 candidates (cheap, and small k needs them most)


def candidates(k: int, rerank: int) -> int:
    """How many neighbours a search keeping ``k`` fetches from the index to re-rank exactly."""
    return k if rerank <= 1 else rerank * max(k, RERANK_MIN)


def calibrate(index, keys: np.ndarray, *, target: float = 0.9, ks=CALIBRATION_KS, queries: int = CALIBRATION_QUERIES,
              seed: int = 0) -> dict:
    """For each k in ``ks``, the cheapest ``(nprobe, rerank)`` whose search finds at least
    ``target`` of the exact top-k, measured on ``queries`` stored keys (a seeded sample; each
    query's own key is left out of both the exact and the searched neighbours, so the answer is not
    given away). A search for k uses the setting of the smallest calibrated k ≥ it (:func:`setting_for`).

    ``nprobe`` doubles from 4 up to ``nlist``; at each, one search fetches the candidates of the
    deepest re-ranking, ranked by the index, whose exact distances give the recall of every
    ``(k, rerank)`` (fetch :func:`candidates`, keep the ``k`` nearest) as prefixes of that one list.
    Cost, a model of the bytes a query touches (deterministic, so a rebuild chooses the same): the
    codes scanned, ``nprobe/nlist · count · m``, plus the keys re-read, ``candidates · 6 · dim``
    (fp16 row and its fp32 copy). A k whose recall stops rising (by less than ``SATURATED`` over a
    doubling of nprobe) without reaching the target gets the cheapest setting within
    ``RECALL_SLACK`` of the best recall seen, with ``met = False`` (not a scan of every list).
    Each k also gets ``scan_nprobe``: the nprobe at which the exact scan of the lists reaches the
    target (:func:`knn_scan.calibrate_scan`, on the same queries and exact neighbours)."""
    count, dim = keys.shape
    ks = sorted({max(1, min(k, count - 1)) for k in ks})
    rows = torch.from_numpy(sample_rows(count, min(queries, count), seed + 1))
    q = fp32_rows(keys, rows.numpy())
    own = rows.unsqueeze(1)
    truth = _drop_own(torch_exact_search(keys, q, ks[-1] + 1)[1], own)
    fetch = min(candidates(ks[-1], RERANK_CHOICES[-1]) + 1, count)
    nprobes = sorted({min(2**i, index.nlist) for i in range(2, max(3, int(math.log2(index.nlist)) + 2))})
    best: dict[int, tuple] = {}  # k → (cost, nprobe, rerank, recall): the cheapest meeting the target
    tried: dict[int, list] = {k: [] for k in ks}
    saturated: set[int] = set()
    for nprobe in nprobes:
        scan = nprobe / index.nlist * count * index.pq.M
        if all(k in saturated or (k in best and scan >= best[k][0]) for k in ks):
            break  # more lists cost more than each k's best setting, or no longer help
        cand = _drop_own(faiss_search(index, q, fetch, nprobe)[1], own)
        exact = exact_distances(keys, q, cand)
        for k in ks:
            if k in saturated:
                continue
            before = max((t[3] for t in tried[k]), default=-1.0)
            for rerank in RERANK_CHOICES:
                n = min(candidates(k, rerank), cand.shape[1])
                order = torch.sort(exact[:, :n], dim=1, stable=True).indices[:, :k]
                recall = _recall(torch.gather(cand[:, :n], 1, order), truth[:, :k], count)
                tried[k].append((scan + candidates(k, rerank) * 6 * dim, nprobe, rerank, recall))
                if recall >= target:
                    best[k] = min(best.get(k, tried[k][-1]), tried[k][-1])
                    break  # a deeper re-ranking at this nprobe only costs more
            if k not in best and max(t[3] for t in tried[k]) < before + SATURATED:
                saturated.add(k)
    by_k = {}
    for k in ks:
        if k in best:
            chosen = best[k]
        else:
            reachable = max(t[3] for t in tried[k])
            chosen = min(t for t in tried[k] if t[3] >= reachable - RECALL_SLACK)
        by_k[str(k)] = {"nprobe": chosen[1], "rerank": chosen[2], "recall": round(chosen[3], 4), "met": k in best}
    for k, scan in knn_scan.calibrate_scan(knn_scan.ivf_lists(index), q, truth, ks, target).items():
        by_k[str(k)].update(scan_nprobe=scan["nprobe"], scan_recall=scan["recall"])
    top = by_k[str(ks[-1])]
    return {"nprobe": top["nprobe"], "rerank": top["rerank"], "target": target, "met": all(v["met"] for v in by_k.values()),
            "queries": len(rows), "by_k": by_k}


def calibrated_ks(index_record: dict) -> list[int]:
    """The k values an index's build (or ``Datastore.recalibrate``) calibrated it for, ascending."""
    return sorted(int(c) for c in ((index_record.get("calibration") or {}).get("by_k") or {}))


def _calibrated_for(index_record: dict, k: int) -> dict | None:
    """The calibration entry of the smallest calibrated k ≥ ``k`` (the largest one beyond); None uncalibrated."""
    ks = calibrated_ks(index_record)
    if not ks:
        return None
    return index_record["calibration"]["by_k"][str(next((c for c in ks if c >= k), ks[-1]))]


def setting_for(index_record: dict, k: int) -> tuple[int | None, int]:
    """(nprobe, rerank) a search for ``k`` neighbours uses by default: the calibrated setting of the
    smallest calibrated k ≥ ``k`` (the largest one beyond), else the index's own ``nprobe``, rerank 1."""
    pick = _calibrated_for(index_record, k)
    if pick is None:
        return index_record.get("nprobe"), index_record.get("rerank", 1)
    return pick["nprobe"], pick["rerank"]


def scan_setting_for(index_record: dict, k: int) -> int | None:
    """The nprobe an exact scan of the lists (:mod:`knn_scan`) uses for ``k`` by default: the
    calibrated ``scan_nprobe`` of the smallest calibrated k ≥ ``k``; for a datastore calibrated
    before scans existed, the IVFPQ setting's nprobe, whose recall the scan matches or beats (it
    finds every neighbour in the lists that re-ranking draws its candidates from)."""
    pick = _calibrated_for(index_record, k)
    if pick is None:
        return index_record.get("nprobe")
    return pick.get("scan_nprobe", pick["nprobe"])


def _drop_own(ids: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """``ids`` without each row's own id (moved to the end, then the last column dropped)."""
    order = torch.sort((ids == own).to(torch.int8), dim=1, stable=True).indices
    return torch.gather(ids, 1, order)[:, :-1]


def _recall(found: torch.Tensor, truth: torch.Tensor, count: int) -> float:
    """Share of ``truth``'s ids that ``found`` holds, row by row (ids offset per row, then one isin)."""
    offset = torch.arange(len(truth)).unsqueeze(1) * (count + 1)
    hits = torch.isin(found.clamp_min(-1) + 1 + offset, truth + 1 + offset)
    return float(hits.sum()) / truth.numel()
