"""Cost of the test-time methods against the plain evaluation, measured in one run, through the
evaluation engine (lmmem.evaluation.engine.run_pass).

Models (random weights serve for timing):

* ``tiny``: the ``tiny`` preset LSTM (embed 128, hidden 256 projected to 128, tied), vocabulary
  ``--vocab`` (30,000), batch ``--batch-size`` × bptt 35 (lmmem's bptt windows).
* ``gpt2-small``: a GPT-2-small-sized Hugging Face model (d = 768, 12 layers, 12 heads,
  V = 50,257), windows of ``--window`` tokens, ``--batch-size`` at a time.
* ``gpt2-tiny``: GPT-2 with d = 64, 2 layers, V = 50,257 (the size of the real-text experiments).

Methods (``--methods``): ``plain``; ``cache`` (W = 2000); ``mbpa`` (restricted, the default
N = 128; K = 32, 5 steps, memory 2000); ``cache+mbpa``; ``mbpa-exact`` (every output row adapted,
on ``--exact-tokens``); ``knn@K`` (kNN-LM with k = K over ``--datastore``, exact distances by
default, ``--knn-distances``; the datastore's default search: the exact scan of the IVF lists where
it fits in memory, by the native op where it builds); ``knn-scan@K`` (the scan whatever k and the
width); ``knn-fp32scan@K`` (the native scan with fp32 products, ``bf16=False``; the default uses bf16
ones on CPUs with AMX); ``knn-torchscan@K`` (the scan by the torch scan, ``native=False``); ``knn-pq@K`` (the same
over PQ codes + exact re-ranking, ``backend="faiss"``). A method with the suffix ``-torchmbpa``
(``cache+mbpa-torchmbpa``) runs restricted MbPA and its top-n by their torch statements instead
of the native ops, in the same process; ``-unshared``: the cache and MbPA each compute the products
with their (identical) keys; ``-torchlse``: the logits' normalisers by their torch statement, not
the native op. Suffixes combine (``cache+mbpa-unshared-torchlse``). The stream is Zipf-distributed token ids. Each method is timed on the
same stream, interleaved over ``--repeats`` (median); the ratio to plain is of this process's CPU
time (the wall clock of a shared machine swings with other jobs' load; on GPU the wall clock).

    python benchmarks/bench_test_time.py                                   # tiny LSTM, CPU
    python benchmarks/bench_test_time.py --model gpt2-small --methods plain,knn@64,knn@1024 \\
        --datastore DS_1M_768 --tokens 2048 --window 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import markdown_table, write_results  # noqa: E402
from lmmem.evaluation.sources import adapter_for  # noqa: E402
from lmmem.evaluation.engine import run_pass  # noqa: E402
from lmmem.evaluation.methods import CacheMemory, KNNMemory, KNNVariants, MbPAMemory, MemorySet  # noqa: E402
from lmmem.evaluation.sinks import GridSums  # noqa: E402
from lmmem.memories import mbpa as mbpa_module  # noqa: E402
from lmmem.memories import mbpa_restricted  # noqa: E402
from lmmem.evaluation.windows import BpttWindows  # noqa: E402
from lmmem.experiments.paths import portable_command  # noqa: E402
from lmmem.memories import CacheConfig, MbPAConfig  # noqa: E402
from lmmem.memories.knn import Datastore  # noqa: E402
from lmmem.output_layers import base as output_base  # noqa: E402


def build_model(name: str, vocab: int):
    torch.manual_seed(0)
    if name == "tiny":
        from lmmem.models import ModelConfig, build_model as build
        from lmmem.training import PRESETS

        pre = PRESETS["tiny"]
        cfg = ModelConfig(arch="lstm", vocab_size=vocab, embed_dim=pre["proj_dim"], hidden_dim=pre["hidden_dim"],
                          proj_dim=pre["proj_dim"], num_layers=pre["num_layers"], tie_weights=True)
        return build(cfg).eval(), pre["bptt"]
    from transformers import GPT2Config, GPT2LMHeadModel

    size = {"gpt2-small": dict(n_embd=768, n_layer=12, n_head=12), "gpt2-tiny": dict(n_embd=64, n_layer=2, n_head=2)}[name]
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=1024, **size)).eval(), None


TORCH_MBPA = "-torchmbpa"  # method suffix: restricted MbPA and its top-n by their torch statements, not the native ops
# Method suffixes for A/Bs in one process (the VM's speed drifts between processes), each the
# attribute it replaces for that method only (module or class, name, stand-in); they combine.
AB_SUFFIXES = {
    TORCH_MBPA: [(mbpa_module, "_native_score", lambda: None), (mbpa_restricted, "_native_top_n", lambda: None)],
    "-unshared": [(MemorySet, "_same_keys", lambda self: None)],  # the cache and MbPA: a product each
    "-torchlse": [(output_base, "_native_row_lse", lambda x, bias: None)],  # normalisers: the torch loop
}


def ab_suffixes(method: str) -> tuple[str, list[str]]:
    """The method without its A/B suffixes, and those suffixes."""
    found = []
    while any(method.endswith(sfx) for sfx in AB_SUFFIXES):
        sfx = next(sfx for sfx in AB_SUFFIXES if method.endswith(sfx))
        found.append(sfx)
        method = method.removesuffix(sfx)
    return method, found


def memories(method: str, args, stores: dict) -> MemorySet:
    method, _ = ab_suffixes(method)
    cache = CacheMemory(CacheConfig(window=2000), [0.3], [0.1])
    mbpa = MbPAMemory(MbPAConfig(vocab=args.mbpa_vocab), [0.1])
    if method == "plain":
        return MemorySet([])
    if method == "cache":
        return MemorySet([cache])
    if method == "mbpa":
        return MemorySet([mbpa])
    if method == "cache+mbpa":
        return MemorySet([cache, mbpa])
    if method == "mbpa-exact":
        return MemorySet([MbPAMemory(MbPAConfig(vocab=0), [0.1])])
    if method.startswith(("knn@", "knn-pq@", "knn-scan@", "knn-fp32scan@", "knn-torchscan@")):
        k = int(method.split("@")[1])
        store = stores[method.split("@")[0]]
        return MemorySet([KNNMemory(store, KNNVariants([k], [1.0]), [0.25], distances=args.knn_distances,
                                    nprobe=args.knn_nprobe)])
    raise SystemExit(f"unknown method {method}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", choices=["tiny", "gpt2-small", "gpt2-tiny"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", type=int, default=0, help="0: 30,000 (tiny) or 50,257 (GPT-2)")
    p.add_argument("--tokens", type=int, default=20_000)
    p.add_argument("--exact-tokens", type=int, default=2_800, help="stream length for mbpa-exact (timed with its own plain)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--window", type=int, default=256, help="GPT-2: tokens per window")
    p.add_argument("--mbpa-vocab", type=int, default=MbPAConfig.vocab)
    p.add_argument("--methods", default="plain,cache,mbpa,cache+mbpa")
    p.add_argument("--exact-methods", default="", help="methods timed on --exact-tokens, e.g. plain,mbpa-exact")
    p.add_argument("--datastore", default=None, help="a datastore of the model's width, for knn@K")
    p.add_argument("--knn-distances", default="exact", choices=["exact", "index", "auto"])
    p.add_argument("--knn-nprobe", type=int, default=None, help="IVF lists probed (default: the datastore's calibrated setting for k)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    vocab = args.vocab or (30_000 if args.model == "tiny" else 50_257)
    model, bptt = build_model(args.model, vocab)
    model = model.to(dev)
    adapter = adapter_for(model)
    bptt = bptt or args.window
    datastore, stores = None, {}
    if args.datastore:
        datastore = Datastore.open(args.datastore, expect={"dim": adapter.dim})
        options = {"knn-pq": {"backend": "faiss"}, "knn-scan": {"backend": "scan"},
                   "knn-fp32scan": {"backend": "scan", "bf16": False}, "knn-torchscan": {"backend": "scan", "native": False}}
        wanted = {m.split("@")[0] for m in (args.methods + "," + args.exact_methods).split(",") if "@" in m}
        stores = {"knn": datastore} | {name: Datastore.open(args.datastore, **o) for name, o in options.items()
                                       if name in wanted}  # each scan store holds its own fp32 keys: only those asked for
        for store in stores.values():  # untimed: read the index, build the scan's fp32 lists
            store.search(torch.zeros(1, adapter.dim, device=dev), 1)
    rng = np.random.default_rng(0)
    prob = 1.0 / np.arange(1, vocab + 1) ** 1.1
    stream = rng.choice(vocab, size=max(args.tokens, args.exact_tokens) + 1, p=prob / prob.sum()).astype("<u4")

    def timed(method: str, tokens: np.ndarray):
        mem = memories(method, args, stores)
        groups = BpttWindows(tokens, batch_size=args.batch_size, bptt=bptt).groups()
        sums = GridSums(mem.grid.size, 1, device=dev, bucket_of_vocab=np.zeros(vocab, dtype=np.int64))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        patches = [p for sfx in ab_suffixes(method)[1] for p in AB_SUFFIXES[sfx]]  # this method only
        kept = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
        for owner, name, stand_in in patches:
            setattr(owner, name, stand_in)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            res = run_pass(adapter, groups, mem, sums)
        finally:
            for owner, name, value in kept:
                setattr(owner, name, value)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return (time.perf_counter() - t0, time.process_time() - c0), res

    timed("plain", stream[: bptt * args.batch_size * 2 + 1])  # warm-up
    mbpa_module._native_score(), mbpa_restricted._native_top_n(), output_base.row_lse.row_lse_op()  # untimed: the native ops' first build and probes
    rows, times = [], {}
    for n_tokens, names in ((args.tokens, args.methods), (args.exact_tokens, args.exact_methods)):
        names = [m for m in names.split(",") if m]
        if not names:
            continue
        tokens = stream[: n_tokens + 1]
        ts: dict[str, list] = {m: [] for m in names}
        results = {}
        for _ in range(args.repeats):
            for m in names:  # interleaved, so background load hits every method alike
                t, results[m] = timed(m, tokens)
                ts[m].append(t)
        key = 0 if dev.type == "cuda" else 1
        base = statistics.median(x[key] for x in ts["plain"]) if "plain" in ts else None
        for m in names:
            wall, cpu = (statistics.median(x[i] for x in ts[m]) for i in (0, 1))
            row = {"method": m, "tokens": n_tokens, "seconds": round(wall, 3), "cpu seconds": round(cpu, 3),
                   "tokens/s": round(n_tokens / wall, 1), "tokens per CPU-s": round(n_tokens / cpu, 1)}
            if base:
                row["× plain"] = round((wall if key == 0 else cpu) / base, 2)
            row["memory MiB"] = round(sum(results[m].memory_bytes.values()) / 2**20, 2)
            rows.append(row)
            times[f"{m}@{n_tokens}"] = ts[m]
    cols = ["method", "tokens", "seconds", "cpu seconds", "tokens/s", "tokens per CPU-s", "× plain", "memory MiB"]
    print(f"model={args.model} V={vocab:,} D={adapter.dim} batch={args.batch_size} window={bptt} device={dev} "
          f"threads={torch.get_num_threads()} datastore={datastore.size if datastore else None}")
    print(markdown_table(rows, cols))
    config = {**vars(args), "datastore": Path(args.datastore).name if args.datastore else None, "vocab": vocab, "dim": adapter.dim, "window": bptt,
              "datastore_index": ({"count": datastore.size, "dim": datastore.dim, "index": datastore.manifest["index"]}
                                  if datastore else None),
              "searches": {name: store.describe_search(dev, distances=args.knn_distances) for name, store in stores.items()}}
    # the command without this machine's paths (--datastore DATASTORE), as committed results store it
    command = portable_command(sys.argv[1:] if argv is None else argv, "python benchmarks/bench_test_time.py")
    path = write_results(f"bench_test_time_{args.model}_{dev.type}", {"config": config, "rows": rows, "times": times,
                                                                        "command": command}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
