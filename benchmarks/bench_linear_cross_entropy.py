"""Fused linear + cross-entropy + Hebbian statistics (lmmem.kernels) against the alternatives, one op.

    python benchmarks/bench_linear_cross_entropy.py                     # GPU: the issue's shapes
    python benchmarks/bench_linear_cross_entropy.py --smoke             # CPU interpreter: tiny shapes, checks the script

Every method does the same work per call: forward (the mean loss), backward (gradients for the
hidden states and the output weight), and the Hebbian statistics of the batch plus the row update
(``hebbian`` rows; ``--no-hebbian`` times the loss alone). Methods, all in one run:

* ``lmmem-triton`` — ``HebbianSoftmax(backend="triton")``: the fused kernels, no ``N × V`` buffer;
* ``eager`` — ``F.linear`` + ``F.cross_entropy`` (fp32 softmax, as the layer's torch backend) + the
  reference statistics (``torch.unique`` + ``index_add_``) and update;
* ``torch.compile`` — the same loss compiled (inductor), same statistics;
* ``F.linear_cross_entropy`` — where the installed torch has it;
* ``liger`` — Liger-Kernel's fused linear cross-entropy, where ``liger_kernel`` imports;
* ``cce`` — Cut Cross-Entropy (``cut_cross_entropy``), where it imports.
  (Their wheels can be carried to a GPU machine without network: see the device README.)

Reported per (N, D, V, dtype): median ms of forward+backward(+statistics), TFLOP/s counting
``6·N·D·V``, that as a fraction of the bf16 matmul peak *measured in the same run* (a large
``torch.matmul``), peak memory above the inputs (``torch.cuda.max_memory_allocated``), and the
speed-up over the fastest baseline. ``tf32`` means fp32 tensors with TF32 matmuls allowed.
JSON with the device, versions and shapes goes to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import markdown_table, write_results  # noqa: E402
from lmmem.output_layers.hebbian_softmax import HebbianSoftmax, hebbian_mix_  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "tf32": torch.float32, "fp32": torch.float32}


def torch_statistics_and_update(weight: torch.Tensor, counts: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> None:
    """The reference bookkeeping: the classes present by ``torch.unique``, sums by ``index_add_``,
    then the vectorised update (the torch backend of HebbianSoftmax)."""
    with torch.no_grad():
        ids, inverse, n = torch.unique(targets, return_inverse=True, return_counts=True)
        sums = torch.zeros(ids.numel(), hidden.shape[1], dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, inverse, hidden.detach().float())
        hebbian_mix_(weight.data, counts, ids, n, sums, 0.01, 500)


def make_methods(N, D, V, dtype, device, hebbian: bool) -> dict:
    """name → (setup() -> state, step(state)) pairs; setup allocates the inputs."""
    def inputs():
        g = torch.Generator(device=device).manual_seed(0)
        h = (torch.randn(N, D, device=device, generator=g) * 0.5).to(dtype).requires_grad_()
        W = (torch.randn(V, D, device=device, generator=g) * 0.02).to(dtype).requires_grad_()
        t = torch.randint(0, V, (N,), device=device, generator=g)
        counts = torch.zeros(V, dtype=torch.int64, device=device)
        return {"h": h, "W": W, "t": t, "counts": counts}

    def with_stats(loss_fn):
        def step(s):
            loss = loss_fn(s)
            loss.backward()
            if hebbian:
                torch_statistics_and_update(s["W"], s["counts"], s["h"], s["t"])
            s["h"].grad = s["W"].grad = None
        return step

    methods = {}

    def ours_setup():
        s = inputs()
        layer = HebbianSoftmax(D, V, bias=False, backend="triton").to(device)
        layer.weight = torch.nn.Parameter(s["W"].detach().clone())
        s["layer"] = layer
        return s

    def ours_step(s):
        layer = s["layer"]
        if not hebbian:
            layer.eval()  # no statistics recorded; the loss path is the same kernel
            with torch.enable_grad():
                loss = layer.cross_entropy(s["h"], s["t"])
        else:
            loss = layer.loss(s["h"], s["t"])
        loss.backward()
        if hebbian:
            layer.hebbian_update_()
        s["h"].grad = layer.weight.grad = None

    methods["lmmem-triton"] = (ours_setup, ours_step)

    def eager_loss(s):
        return F.cross_entropy(F.linear(s["h"], s["W"]).float(), s["t"])

    methods["eager"] = (inputs, with_stats(eager_loss))
    compiled = torch.compile(lambda h, W, t: F.cross_entropy(F.linear(h, W).float(), t))
    methods["torch.compile"] = (inputs, with_stats(lambda s: compiled(s["h"], s["W"], s["t"])))
    if hasattr(F, "linear_cross_entropy"):
        methods["F.linear_cross_entropy"] = (inputs, with_stats(lambda s: F.linear_cross_entropy(s["h"], s["W"], s["t"])))
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        methods["liger"] = (inputs, with_stats(lambda s: liger(s["W"], s["h"], s["t"])))
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        methods["cce"] = (inputs, with_stats(lambda s: cce(s["h"], s["W"], s["t"])))
    except ImportError:
        pass
    return methods


def time_method(setup, step, device, warmup: int, repeat: int) -> dict:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    s = setup()
    base = torch.cuda.memory_allocated(device) if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + repeat):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(s)
            end.record()
            torch.cuda.synchronize(device)
            ms = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            step(s)
            ms = 1e3 * (time.perf_counter() - t0)
        if i >= warmup:
            times.append(ms)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else None
    del s
    return {"ms": statistics.median(times), "peak_extra_mib": peak}


def matmul_peak_tflops(device, repeat: int = 20) -> float | None:
    """bf16 ``torch.matmul`` TFLOP/s on a large square-ish GEMM: the ceiling a matmul-bound op can reach here."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    ms = start.elapsed_time(end) / repeat
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--N", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--D", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--V", type=int, nargs="+", default=[267_735])
    p.add_argument("--dtype", nargs="+", default=["bf16", "tf32"], choices=list(DTYPES))
    p.add_argument("--methods", nargs="+", default=None, help="subset of the methods (default: all available)")
    p.add_argument("--no-hebbian", action="store_true", help="time the loss alone, without the Hebbian statistics/update")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--smoke", action="store_true",
                   help="CPU, Triton interpreter, tiny shapes, lmmem-triton, eager and F.linear_cross_entropy (where it exists) "
                        "only: checks that the script runs")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_linear_cross_entropy_<device>.json)")
    args = p.parse_args()
    if args.smoke:
        args.N, args.D, args.V, args.dtype, args.warmup, args.repeat = [37], [24], [131], ["fp32"], 1, 2
        args.methods = args.methods or ["lmmem-triton", "eager", "F.linear_cross_entropy"]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        sys.exit("this benchmark needs a CUDA GPU (use --smoke to check the script on CPU)")
    peak = matmul_peak_tflops(device)
    rows = []
    for dtype_name in args.dtype:
        torch.backends.cuda.matmul.allow_tf32 = dtype_name == "tf32"
        dtype = DTYPES[dtype_name]
        for V in args.V:
            for D in args.D:
                for N in args.N:
                    methods = make_methods(N, D, V, dtype, device, hebbian=not args.no_hebbian)
                    group = []
                    for name, (setup, step) in methods.items():
                        if args.methods and name not in args.methods:
                            continue
                        row = {"method": name, "dtype": dtype_name, "N": N, "D": D, "V": V}
                        try:
                            r = time_method(setup, step, device, args.warmup, args.repeat)
                            tflops = 6 * N * D * V / (r["ms"] * 1e-3) / 1e12
                            row.update(ms=r["ms"], tflops=tflops, peak_fraction=tflops / peak if peak else None,
                                       peak_extra_mib=r["peak_extra_mib"])
                        except torch.cuda.OutOfMemoryError:
                            row.update(ms=None, error="out of memory")
                            torch.cuda.empty_cache()
                        except Exception as e:  # a baseline that fails is reported, not fatal
                            row.update(ms=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
                        group.append(row)
                        print(f"  {dtype_name} N={N} D={D} V={V:,} {name}: "
                              + (f"{row['ms']:.2f} ms" if row.get("ms") else row.get("error", "")), file=sys.stderr)
                    baselines = [r["ms"] for r in group if r["method"] != "lmmem-triton" and r.get("ms")]
                    for r in group:
                        if r.get("ms") and baselines:
                            r["speedup_vs_fastest_baseline"] = min(baselines) / r["ms"]
                    rows += group
    cols = ["method", "dtype", "N", "D", "V", "ms", "tflops", "peak_fraction", "peak_extra_mib", "speedup_vs_fastest_baseline", "error"]
    print(markdown_table(rows, cols))
    payload = {"results": rows, "matmul_peak_bf16_tflops": peak, "hebbian": not args.no_hebbian,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)",
               "warmup": args.warmup, "repeat": args.repeat, "flops_counted": "6*N*D*V"}
    path = write_results(f"bench_linear_cross_entropy_{device.type}", payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
