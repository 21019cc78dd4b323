"""Data-preparation throughput and peak memory: ``python -m data_prep``'s pipeline vs a naive baseline.

    .venv/bin/python benchmarks/bench_data_prep.py                   # shared corpora + 25/100/400 MB
    .venv/bin/python benchmarks/bench_data_prep.py --sizes 25,100     # smaller generated files

The naive baseline is what a first script does::

    text = open(f).read(); words = text.split()          # per split
    counts = collections.Counter(train_words)              # vocabulary by count
    ids = [stoi.get(w, unk) for w in words]                # a Python list of ids
    np.array(ids, dtype=np.uint32).tofile(...)

Every measurement runs in a fresh subprocess; the time covers the processing only (imports
excluded), and memory is the peak RSS (``ru_maxrss``) above the RSS right after the imports
(``data_prep`` imports ``lmmem``, which imports torch; that baseline is the same for any corpus).
Cases: the shared real corpora in ``../shared/data`` (WikiText-2 valid+test, Gutenberg,
news-abc) and WikiText-format files of the given sizes generated from WikiText-2's text (a
stand-in for WikiText-103's 540 MB train file). For Gutenberg and news, ``data_prep`` uses its
regex word rule while the baseline splits on whitespace: different tokens, shown for scale.

Prints a markdown table and writes ``benchmarks/results/bench_data_prep.json`` (machine,
versions, sizes, numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------
# children: one measurement each


def child_naive(source: Path, out: Path) -> dict:
    import collections

    import numpy as np

    files = {s: source / f"wiki.{s}.tokens" for s in ("train", "valid", "test")}
    if not any(p.is_file() for p in files.values()):  # a folder of .txt books / news files
        files = {"train": sorted(source.glob("*.txt"))}
    base = _rss_mb()
    t = time.perf_counter()
    words = {}
    for split, paths in files.items():
        paths = paths if isinstance(paths, list) else [paths]
        paths = [p for p in paths if p.is_file()]
        if paths:
            words[split] = [w for p in paths for w in open(p, encoding="utf-8", errors="replace").read().split()]
    vocab_split = "train" if "train" in words else next(iter(words))
    counts = collections.Counter(words[vocab_split])
    itos = ["<unk>"] + [w for w, _ in counts.most_common()]
    stoi = {w: i for i, w in enumerate(itos)}
    n = 0
    for split, ws in words.items():
        ids = [stoi.get(w, 0) for w in ws]
        np.array(ids, dtype=np.uint32).tofile(out / f"{split}.bin")
        n += len(ids)
    seconds = time.perf_counter() - t
    return {"tokens": n, "seconds": seconds, "peak_rss_mb": _maxrss_mb(), "baseline_rss_mb": base}


def child_ours(kind: str, source: Path, out: Path, workers: int) -> dict:
    from data_prep import gigaword, gutenberg, wikitext
    from lmmem.data.encoding import TokenizerOptions, VocabOptions
    from lmmem.data.writer import prepare
    from data_prep.reading import ReadOptions

    base = _rss_mb()
    t = time.perf_counter()
    ro = ReadOptions(encoding_errors="fallback")
    if kind == "wikitext":
        src, tok, vocab = wikitext.local_source(source, ro, allow_missing_splits=True), TokenizerOptions(), VocabOptions()
    elif kind == "gutenberg":
        src, tok, vocab = gutenberg.local_source(source, ro), TokenizerOptions(rule="regex"), VocabOptions(min_count=3)
    else:
        src, tok, vocab = gigaword.local_source(source, ro), TokenizerOptions(rule="regex"), VocabOptions(min_count=3)
    meta = prepare(out, src, tok, vocab, workers=workers, quiet=True)
    seconds = time.perf_counter() - t
    n = sum(s["tokens"] for s in meta["splits"].values())
    return {"tokens": n, "seconds": seconds, "peak_rss_mb": _maxrss_mb(), "baseline_rss_mb": base, "vocab_size": meta["vocab_size"]}


def run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {args} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------


def make_wikitext_file(folder: Path, megabytes: int) -> Path:
    """A WikiText-format folder whose train file is WikiText-2's text repeated to ``megabytes``."""
    wt2 = SHARED / "wikitext-2"
    folder.mkdir(parents=True, exist_ok=True)
    piece = (wt2 / "wiki.valid.tokens").read_bytes() + (wt2 / "wiki.test.tokens").read_bytes()
    with open(folder / "wiki.train.tokens", "wb") as f:
        written = 0
        while written < megabytes * 10**6:
            f.write(piece)
            written += len(piece)
    for split in ("valid", "test"):
        shutil.copyfile(wt2 / f"wiki.{split}.tokens", folder / f"wiki.{split}.tokens")
    return folder


def machine() -> dict:
    import numpy

    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
        with open("/proc/meminfo") as f:
            info["memory_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="25,100,400", help="generated WikiText-format train files, in MB (default 25,100,400)")
    p.add_argument("--workers", type=int, default=1, help="data_prep --workers (default 1)")
    p.add_argument("--json", type=Path, default=RESULTS / "bench_data_prep.json")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        what, kind, source, out = args.child[:4]
        result = child_naive(Path(source), Path(out)) if what == "naive" else \
            child_ours(kind, Path(source), Path(out), int(args.child[4]))
        print(json.dumps(result))
        return 0

    if not SHARED.is_dir():
        print(f"{SHARED} is absent: the benchmark needs the shared corpora beside the checkout", file=sys.stderr)
        return 2
    cases = [("WikiText-2 valid+test (shared)", "wikitext", SHARED / "wikitext-2", None),
             ("Gutenberg, 13 books (shared)", "gutenberg", SHARED / "gutenberg", None),
             ("news-abc (shared)", "news", SHARED / "news-abc", None)]
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data_prep_") as tmp:
        tmp = Path(tmp)
        for mb in sizes:
            cases.append((f"WikiText format, {mb} MB (generated)", "wikitext", tmp / f"wt{mb}", mb))
        for name, kind, source, mb in cases:
            if mb is not None:
                make_wikitext_file(source, mb)
            size = sum(f.stat().st_size for f in Path(source).iterdir() if f.is_file())
            results = {}
            for who in ("naive", "ours"):
                out = tmp / f"out-{who}"
                shutil.rmtree(out, ignore_errors=True)
                out.mkdir()
                results[who] = run_child(who, kind, str(source), str(out), str(args.workers))
                shutil.rmtree(out, ignore_errors=True)
            if mb is not None:
                shutil.rmtree(source, ignore_errors=True)
            row = {"case": name, "input_mb": round(size / 1e6, 1), **{f"{w}_{k}": v for w, r in results.items() for k, v in r.items()}}
            for w in ("naive", "ours"):
                row[f"{w}_mtok_s"] = row[f"{w}_tokens"] / row[f"{w}_seconds"] / 1e6
                row[f"{w}_mem_mb"] = row[f"{w}_peak_rss_mb"] - row[f"{w}_baseline_rss_mb"]
            row["speedup"] = row["ours_mtok_s"] / row["naive_mtok_s"]
            rows.append(row)
            print(f"done: {name}", file=sys.stderr)

    print("| case | input MB | naive Mtok/s | data_prep Mtok/s | speed-up | naive peak MB | data_prep peak MB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['input_mb']:.1f} | {r['naive_mtok_s']:.2f} | {r['ours_mtok_s']:.2f} | {r['speedup']:.2f}x "
              f"| {r['naive_mem_mb']:.0f} | {r['ours_mem_mb']:.0f} |")
    print("\npeak MB: peak RSS above the RSS after imports; tokens: each pipeline's own count (data_prep adds <eos>)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "data_prep vs naive read/split/Counter/list-of-ids", "date": time.strftime("%Y-%m-%d"),
              "machine": machine(), "workers": args.workers, "rows": rows}
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.json.relative_to(REPO) if args.json.is_relative_to(REPO) else args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
