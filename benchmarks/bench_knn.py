"""kNN-LM datastore at scale: writing, IVFPQ training and adding, peak memory, search throughput at
recall ≥ 0.9 against exact search, the cost of exact distances, and the torch exact fallback.

Keys: ``--entries`` rows of width ``--dim`` drawn from :class:`Mixture` (a stand-in for an LM's last
hidden states, see there), written through :class:`lmmem.memories.knn.DatastoreWriter` in chunks of
``--chunk`` rows (the generation is not timed, the appends are), then ``finish("ivfpq")``. Peak RSS
is this process's VmHWM after the build (the build streams the keys: it holds the training sample
in fp32, one add chunk and the codes, never the whole key matrix).

Queries: fresh draws from the same mixture (test text is new text from the training distribution).
Ground truth: the exact top-``max(--ks)`` by the torch exact search over the memmap, which is also
the fallback's throughput. For each k, ``nprobe`` is swept until recall@k (the share of the exact
top-k that the search returns) reaches ``--target-recall``; throughput is then measured at that
``nprobe`` for each ``--batch-sizes`` (queries per call, as an evaluation batches them), with the
index's distances and with exact ones recomputed from the stored keys. Then the exact scan of the
IVF lists (``backend="scan"``, :mod:`lmmem.memories.knn_scan`; the native op where it builds) at
its calibrated nprobe for each k: recall on the same queries, and queries/s against PQ +
re-ranking at its calibrated setting on the same fresh batches, in the same run.

    python benchmarks/bench_knn.py --entries 100000 --root /tmp/knn-bench          # minutes
    python benchmarks/bench_knn.py --root /work/exp/NAME/knn-bench --threads 2     # 1M × 768: 1.5 GB of keys
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import markdown_table, peak_rss_mib, write_results  # noqa: E402
from lmmem.memories import knn_index  # noqa: E402
from lmmem.memories.knn import Datastore, DatastoreWriter  # noqa: E402

RESULTS_JSON = ROOT / "docs" / "results" / "knn-datastore.json"


class Mixture:
    """Keys shaped like an LM's last hidden states: a Zipf-weighted mixture of ``clusters`` centres
    (contexts that predict alike), in an anisotropic space (variance ∝ 1/i along a random rotation,
    as the fast-decaying spectra of transformer states) with a shared offset that has three large
    'outlier' dimensions. ``spread``: within-cluster noise relative to the centres' scale."""

    def __init__(self, dim: int, *, clusters: int = 4096, spread: float = 0.5, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
        scale = (1.0 + torch.arange(dim, dtype=torch.float32)) ** -0.5
        scale *= math.sqrt(dim / float((scale ** 2).sum()))
        self.basis = scale[:, None] * q
        self.centres = torch.randn(clusters, dim, generator=g)
        weights = (1.0 + torch.arange(clusters, dtype=torch.float64)) ** -1.0
        self.weights = weights / weights.sum()
        self.offset = torch.zeros(dim)
        self.offset[:3] = torch.tensor([12.0, -8.0, 6.0])
        self.dim, self.spread = dim, spread

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        c = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = self.centres[c] + self.spread * torch.randn(n, self.dim, generator=generator)
        return z @ self.basis + self.offset


def build_datastore(args, out: Path, mix: Mixture) -> dict:
    """Write ``--entries`` keys in ``--chunk`` rows; time the appends apart from the generation."""
    g = torch.Generator().manual_seed(args.seed + 1)
    writer = DatastoreWriter(out, dim=args.dim, info={"model_fingerprint": f"mixture-{args.seed}", "key_source": "Mixture",
                                                      "entries": args.entries}, expected_rows=args.entries,
                             overwrite=True)
    append_s = 0.0
    for start in range(writer.rows_done, args.entries, args.chunk):
        n = min(args.chunk, args.entries - start)
        keys, values = mix.sample(n, g), torch.randint(0, 50_000, (n,), generator=g)
        t0 = time.perf_counter()
        writer.append(keys, values)
        append_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    writer.finish("ivfpq", train_rows=args.train_rows, recall_ks=tuple(args.ks), target_recall=args.target_recall,
                  seed=args.seed)
    ds = Datastore.open(out)
    idx = ds.manifest["index"]
    rows = args.entries
    return {"entries": rows, "dim": args.dim, "append_seconds": round(append_s, 3),
            "write_rows_per_s": rows / append_s if append_s else None,
            "write_mb_per_s": rows * (2 * args.dim + 4) / 2**20 / append_s if append_s else None,
            "finish_seconds": round(time.perf_counter() - t0, 3), "index": idx,
            "keys_bytes": rows * args.dim * 2, "index_bytes": (out / "index.faiss").stat().st_size,
            "peak_rss_mib_build": peak_rss_mib()}


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    k = truth.shape[1]
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, truth))
    return hits / (k * truth.shape[0])


def timed(fn, *a, **kw):
    """(result, wall seconds, CPU seconds of this process): on a shared machine the CPU time is the
    steadier measure (other jobs stretch the wall clock), the wall time the one a user waits."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t0, time.process_time() - c0


def sweep(ds: Datastore, queries: torch.Tensor, truth: torch.Tensor, args) -> list:
    """recall@k and throughput of the exact-distance search for each k and re-ranking depth, nprobe
    doubling until recall reaches the target or stops rising (by < 0.005 per doubling)."""
    rows = []
    for k in args.ks:
        for rerank in knn_index.RERANK_CHOICES:
            previous = -1.0
            for nprobe in args.nprobes:
                (_, ids), wall, cpu = timed(ds.search_ids, queries, k, distances="exact", nprobe=nprobe, rerank=rerank)
                r = recall(ids, truth[:, :k])
                rows.append({"k": k, "rerank": rerank, "nprobe": nprobe, "recall": r,
                             "queries_per_s": len(queries) / wall, "queries_per_cpu_s": len(queries) / cpu})
                print(f"  k {k:5d} rerank {rerank} nprobe {nprobe:4d}: recall {r:.3f}, {len(queries) / wall:,.0f} "
                      f"queries/s ({len(queries) / cpu:,.0f} per CPU-s)", flush=True)
                if r >= args.target_recall or r < previous + knn_index.SATURATED:
                    break
                previous = r
    return rows


def throughput(ds: Datastore, mix: Mixture, args, calibration: dict) -> list:
    """Queries/s at evaluation batch sizes, at the calibrated (nprobe, rerank) for each k and at the
    paper's nprobe 32 without re-ranking; index vs exact distances, and the exact recompute alone
    (``knn_index.exact_distances`` over the k neighbours)."""
    g = torch.Generator().manual_seed(args.seed + 3)
    rows = []
    for k in args.ks:
        tuned = calibration["by_k"][str(k)]
        for label, nprobe, rerank in (("calibrated", tuned["nprobe"], tuned["rerank"]), ("paper nprobe 32", 32, 1)):
            for batch in args.batch_sizes:
                queries = mix.sample(batch, g)
                (_, ids), w_index, c_index = timed(ds.search_ids, queries, k, distances="index", nprobe=nprobe)
                _, w_recompute, c_recompute = timed(knn_index.exact_distances, ds.keys, queries, ids)
                _, w_exact, c_exact = timed(ds.search, queries, k, distances="exact", nprobe=nprobe, rerank=rerank)
                rows.append({"k": k, "setting": label, "nprobe": nprobe, "rerank": rerank, "batch": batch,
                             "index_queries_per_s": batch / w_index, "exact_queries_per_s": batch / w_exact,
                             "exact_queries_per_cpu_s": batch / c_exact,
                             "recompute_ms_per_query": 1e3 * w_recompute / batch,
                             "exact_over_index_cpu": c_exact / c_index})
                print(f"  {rows[-1]}", flush=True)
    return rows


def scan_throughput(path: Path, mix: Mixture, args, calibration: dict, queries, truth) -> tuple[dict, list]:
    """The exact scan against PQ + re-ranking (both at their calibrated settings, exact distances):
    recall on ``queries``, then queries/s per k and batch size on the same fresh batches."""
    scan_ds, pq_ds = Datastore.open(path, backend="scan"), Datastore.open(path, backend="faiss")
    _, wall, cpu = timed(scan_ds._lists)
    lists = {"build_seconds": wall, "build_cpu_seconds": cpu, "peak_rss_mib": peak_rss_mib()}
    print(f"scan: lists with fp32 keys built in {wall:.1f} s; {scan_ds.describe_search()}", flush=True)
    g = torch.Generator().manual_seed(args.seed + 4)
    rows = []
    for k in args.ks:
        nprobe = knn_index.scan_setting_for({"calibration": calibration}, k)
        _, ids = scan_ds.search_ids(queries, k, nprobe=nprobe)
        found = recall(ids, truth[:, :k])
        for batch in args.batch_sizes:
            q = mix.sample(batch, g)
            _, w_scan, c_scan = timed(scan_ds.search_ids, q, k, nprobe=nprobe)
            _, w_pq, c_pq = timed(pq_ds.search_ids, q, k, distances="exact")
            rows.append({"k": k, "scan_nprobe": nprobe, "scan_recall": found, "batch": batch,
                         "scan_queries_per_cpu_s": batch / c_scan, "pq_queries_per_cpu_s": batch / c_pq,
                         "scan_queries_per_s": batch / w_scan, "pq_queries_per_s": batch / w_pq,
                         "pq_over_scan_cpu": c_pq / c_scan})
            print(f"  {rows[-1]}", flush=True)
    return lists, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--root", required=True, help="folder for the datastore (1.5 GB at 1M × 768; never inside the repo)")
    p.add_argument("--reuse", action="store_true", help="reuse a datastore already at --root from the same settings")
    p.add_argument("--chunk", type=int, default=8192, help="rows per append (an evaluation batch's worth)")
    p.add_argument("--train-rows", type=int, default=None, help="IVFPQ training sample (default: the library's rule)")
    p.add_argument("--queries", type=int, default=500, help="queries for recall against the exact search")
    p.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64, 1024])
    p.add_argument("--nprobes", type=lambda s: [int(x) for x in s.split(",")], default=[8, 16, 32, 64, 128, 256, 512, 1024])
    p.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[512, 4096])
    p.add_argument("--target-recall", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=2, help="torch and faiss threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-sweep", action="store_true", help="skip the nprobe sweep and the PQ-only throughput table")
    p.add_argument("--out", default=str(RESULTS_JSON))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    faiss = knn_index.faiss_or_none()
    faiss.omp_set_num_threads(args.threads)
    root = Path(args.root)
    if root.resolve().is_relative_to(ROOT):
        p.error("--root must be outside the repository (the datastore is gigabytes)")
    out = root / f"mixture-{args.entries}x{args.dim}"
    mix = Mixture(args.dim, seed=args.seed)

    if args.reuse and (out / "manifest.json").is_file():
        build = {"entries": args.entries, "dim": args.dim, "reused": True}
    else:
        build = build_datastore(args, out, mix)
    ds = Datastore.open(out, expect={"model_fingerprint": f"mixture-{args.seed}", "dim": args.dim}, backend="faiss")
    calibration = ds.manifest["index"]["calibration"]
    if build.get("reused"):  # calibrated again with this code's rules (the index itself is the same)
        (calibration, wall, _) = timed(ds.calibrate, target=args.target_recall, ks=args.ks, seed=args.seed)
        calibration["seconds"] = round(wall, 3)
        build["peak_rss_mib_reused"] = peak_rss_mib()
    print(f"datastore: {ds.describe_search()}\ncalibration: {calibration}", flush=True)

    queries = mix.sample(args.queries, torch.Generator().manual_seed(args.seed + 2))
    (_, truth), wall, cpu = timed(knn_index.torch_exact_search, ds.keys, queries, max(args.ks))
    torch_exact = {"k": max(args.ks), "queries": args.queries, "queries_per_s": args.queries / wall,
                   "queries_per_cpu_s": args.queries / cpu}
    print(f"torch exact search (the ground truth; the no-faiss path): {torch_exact}", flush=True)
    sweep_rows = [] if args.no_sweep else sweep(ds, queries, truth, args)
    rows = [] if args.no_sweep else throughput(ds, mix, args, calibration)
    lists, scan_rows = scan_throughput(out, mix, args, calibration, queries, truth)
    peak = peak_rss_mib()
    crossing = {}
    for r in sweep_rows:
        key = f"k={r['k']} rerank={r['rerank']}"
        if r["recall"] >= args.target_recall and key not in crossing:
            crossing[key] = {"nprobe": r["nprobe"], "recall": r["recall"], "queries_per_s": r["queries_per_s"]}

    print()
    print(markdown_table(rows, ["k", "setting", "nprobe", "rerank", "batch", "index_queries_per_s", "exact_queries_per_s",
                                "exact_queries_per_cpu_s", "recompute_ms_per_query", "exact_over_index_cpu"]))
    print(markdown_table(scan_rows, ["k", "scan_nprobe", "scan_recall", "batch", "scan_queries_per_cpu_s",
                                     "pq_queries_per_cpu_s", "pq_over_scan_cpu"]))
    print(f"\nbuild: {build}\ncrossing recall {args.target_recall}: {crossing}\npeak RSS {peak:,.0f} MiB")
    payload = {"shapes": {"entries": args.entries, "dim": args.dim, "queries": args.queries, "ks": args.ks},
               "faiss": knn_index.faiss_version(), "threads": args.threads, "build": build,
               "index": ds.manifest["index"], "calibration": calibration, "torch_exact": torch_exact, "sweep": sweep_rows,
               "crossing": crossing, "throughput": rows,
               "scan": {"lists": lists, "throughput": scan_rows}, "peak_rss_mib": peak, "target_recall": args.target_recall,
               # no paths of this machine in the committed JSON
               "command": " ".join(["python benchmarks/bench_knn.py", *(a if a not in (args.root, args.out) else "PATH"
                                                                         for a in (argv if argv is not None else sys.argv[1:]))])}
    path = write_results("knn-datastore", payload, out=args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
