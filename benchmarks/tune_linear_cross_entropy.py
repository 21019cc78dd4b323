"""Tune the chunked linear cross-entropy on a GPU: rows per chunk and the step kernel's launch
parameters (BLOCK_V, num_warps), timed forward + backward at the WikiText-103 shape.

    python benchmarks/tune_linear_cross_entropy.py [--N 8192] [--D 512] [--V 267735] [--dtype bf16-autocast]

Writes benchmarks/results/tune_linear_cross_entropy_cuda.json: every setting's median ms, and the
best. The shipped defaults are ``CE_STEP_CUDA`` in lmmem/kernels/triton_kernels.py and the budget in
``chunk_rows`` (lmmem/kernels/linear_cross_entropy.py); change them from these numbers (and re-run
``make compile-check``: a new BLOCK_V / num_warps must still compile without spills).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import markdown_table, write_results  # noqa: E402
from lmmem.kernels import triton_kernels  # noqa: E402
from lmmem.kernels.linear_cross_entropy import chunk_rows, linear_cross_entropy  # noqa: E402
from lmmem.kernels.runtime import kernel_health, reset_kernel_health  # noqa: E402


def time_once(h, W, t, chunk, autocast, repeat) -> float:
    times = []
    for i in range(repeat + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = linear_cross_entropy(h, W, None, t, chunk_size=chunk)
        loss.backward()
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end))
        h.grad = W.grad = None
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--N", type=int, default=8192)
    p.add_argument("--D", type=int, default=512)
    p.add_argument("--V", type=int, default=267_735)
    p.add_argument("--dtype", default="bf16-autocast", choices=["bf16-autocast", "bf16", "fp32"])
    p.add_argument("--chunks", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--block-v", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tuning needs a CUDA GPU")
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    store = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    h = (torch.randn(args.N, args.D, device=dev, generator=g) * 0.5).to(store).requires_grad_()
    W = (torch.randn(args.V, args.D, device=dev, generator=g) * 0.02).to(store).requires_grad_()
    t = torch.randint(0, args.V, (args.N,), device=dev, generator=g)
    autocast = args.dtype == "bf16-autocast"
    shipped = dict(triton_kernels.CE_STEP_CUDA)
    compute = torch.bfloat16 if args.dtype != "fp32" else torch.float32
    default_chunk = chunk_rows(args.N, args.V, args.D, dev, compute, use_triton=True)
    rows = []
    flops = 6 * args.N * args.D * args.V
    # 1. chunk size with the shipped step config; 2. step config at the best chunk size
    for chunk in sorted(set(args.chunks + [default_chunk])):
        try:
            ms = time_once(h, W, t, chunk, autocast, args.repeat)
            rows.append({"chunk": chunk, **shipped, "ms": ms, "tflops": flops / ms / 1e9, "default": chunk == default_chunk})
        except torch.cuda.OutOfMemoryError:
            rows.append({"chunk": chunk, **shipped, "error": "out of memory"})
            torch.cuda.empty_cache()
    best_chunk = min((r for r in rows if r.get("ms")), key=lambda r: r["ms"])["chunk"]
    for bv, warps in itertools.product(args.block_v, args.warps):
        triton_kernels.CE_STEP_CUDA.update(BLOCK_V=bv, num_warps=warps)
        reset_kernel_health()  # a new config is a new binary: probe it afresh
        try:
            ms = time_once(h, W, t, best_chunk, autocast, args.repeat)
            row = {"chunk": best_chunk, "BLOCK_V": bv, "num_warps": warps, "ms": ms, "tflops": flops / ms / 1e9}
        except Exception as e:  # a config that does not fit is a data point
            row = {"chunk": best_chunk, "BLOCK_V": bv, "num_warps": warps, "error": f"{type(e).__name__}: {str(e)[:120]}"}
        if not all(kernel_health().values()):  # it fell back to PyTorch: the time is not this config's
            row = {**row, "ms": None, "error": f"kernel fell back: {kernel_health()}"}
        rows.append(row)
    reset_kernel_health()
    triton_kernels.CE_STEP_CUDA.clear()
    triton_kernels.CE_STEP_CUDA.update(shipped)
    best = min((r for r in rows if r.get("ms")), key=lambda r: r["ms"])
    print(markdown_table(rows, ["chunk", "BLOCK_V", "num_warps", "ms", "tflops", "default", "error"]))
    print("best:", best)
    payload = {"shape": {"N": args.N, "D": args.D, "V": args.V, "dtype": args.dtype}, "results": rows, "best": best,
               "shipped": {"chunk": default_chunk, **shipped}, "kernel_health": {str(k): v for k, v in kernel_health().items()},
               "device": torch.cuda.get_device_name(dev)}
    print(f"wrote {write_results('tune_linear_cross_entropy_cuda', payload, args.out)}")


if __name__ == "__main__":
    main()
