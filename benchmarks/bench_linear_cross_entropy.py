"""Fused linear + cross-entropy (lmmem.kernels) against the alternatives, one op, forward and
backward timed separately, with peak memory.

    python benchmarks/bench_linear_cross_entropy.py                       # GPU: the issue's shapes
    python benchmarks/bench_linear_cross_entropy.py --cpu-acceptance      # CPU: N=2048, D=512, V=267,735, fp32
    python benchmarks/bench_linear_cross_entropy.py --checkpoint runs/x/best.pt   # + logits of a trained model
    python benchmarks/bench_linear_cross_entropy.py --smoke               # tiny shapes: checks the script

Methods (all exact; every one computes the mean loss and the gradients of h and W):

* ``lmmem`` — :func:`lmmem.linear_cross_entropy`, the chunked fused path (Triton step on CUDA,
  PyTorch step on CPU; gradients produced in the forward, so its forward is the heavy half);
* ``eager`` — ``F.cross_entropy(F.linear(h, W).float(), t)``: logits upcast to fp32;
* ``eager-noupcast`` — ``F.cross_entropy(F.linear(h, W), t)`` on the logits as they come (bf16 under
  autocast; the same as ``eager`` in fp32, so only run for bf16);
* ``torch.compile`` — the eager loss compiled (inductor; CUDA by default);
* ``F.linear_cross_entropy`` — where the installed torch has it (2.13 does);
* ``liger`` — Liger-Kernel's fused linear cross-entropy, where ``liger_kernel`` imports;
* ``cce`` — Cut Cross-Entropy with its gradient filter off (``filter_eps=None``: exact), where
  ``cut_cross_entropy`` imports.

dtypes: ``fp32``, ``tf32`` (fp32 tensors, TF32 matmuls allowed; CUDA), ``bf16`` (bf16 tensors) and
``bf16-autocast`` (fp32 h and W under ``torch.autocast(bfloat16)``: the training default).
Inputs: random (``h ~ N(0, 1)``, ``W ~ N(0, 0.02²)``), or with ``--checkpoint`` the output layer and the
final activations of a trained lmmem model on its validation text (peaked, realistic logits).

Reported per row: median forward ms, backward ms, total (wall clock), and the process CPU time of
the call (on a shared CPU machine the steadier measure of the work done); TFLOP/s counting ``6·N·D·V``; on CUDA that
as a fraction of the bf16 matmul peak measured in the same run; peak memory above the inputs (CUDA:
``max_memory_allocated``; CPU: the worker process's peak RSS, ``VmHWM`` after a reset, minus its RSS
with the inputs allocated; each CPU measurement runs in a fresh worker process, rounds interleave
the methods so machine load hits all alike); the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import markdown_table, write_results  # noqa: E402
from lmmem.kernels.linear_cross_entropy import linear_cross_entropy  # noqa: E402

DTYPES = ("fp32", "tf32", "bf16", "bf16-autocast")


def available_methods(device: torch.device, dtype: str) -> dict:
    """name → loss(h, W, t)."""
    methods = {"lmmem": lambda h, W, t: linear_cross_entropy(h, W, None, t)}
    methods["eager"] = lambda h, W, t: F.cross_entropy(F.linear(h, W).float(), t)
    if dtype.startswith("bf16"):
        methods["eager-noupcast"] = lambda h, W, t: F.cross_entropy(F.linear(h, W), t)
    if device.type == "cuda":
        compiled = torch.compile(lambda h, W, t: F.cross_entropy(F.linear(h, W).float(), t))
        methods["torch.compile"] = compiled
    if hasattr(F, "linear_cross_entropy"):
        methods["F.linear_cross_entropy"] = lambda h, W, t: F.linear_cross_entropy(h, W, t)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        methods["liger"] = lambda h, W, t: liger(W, h, t)
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        methods["cce"] = lambda h, W, t: cce(h, W, t, filter_eps=None)  # the filter off: exact gradients
    except ImportError:
        pass
    return methods


def make_inputs(N: int, D: int, V: int, dtype: str, device: torch.device, source: dict | None):
    """h (N, D), W (V, D) as leaves needing gradients, t (N,); from a checkpoint when given."""
    if source is not None:
        h, W, t = source["h"][:N], source["W"], source["t"][:N]
    else:
        g = torch.Generator().manual_seed(0)
        h = torch.randn(N, D, generator=g) * 0.5
        W = torch.randn(V, D, generator=g) * 0.02
        t = torch.randint(0, V, (N,), generator=g)
    store = torch.bfloat16 if dtype == "bf16" else torch.float32
    return (h.to(device, store).requires_grad_(), W.to(device, store).requires_grad_(), t.to(device))


def checkpoint_source(path: str, data: str | None, tokens: int) -> dict:
    """The output layer of a trained lmmem model and its final activations on ``tokens`` validation
    tokens (targets: the next tokens)."""
    from lmmem.data.corpus import PreparedCorpus
    from lmmem.checkpoints import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt)
    root = data or (ckpt.get("train_config") or {}).get("data")
    if not root or not Path(root).exists():
        raise SystemExit(f"--checkpoint needs the model's prepared corpus: pass --data (tried {root!r})")
    corpus = PreparedCorpus.open(root)
    split = "valid" if "valid" in corpus.splits else corpus.splits[0]
    ids = torch.from_numpy(corpus.tokens(split)[: tokens + 1].astype("int64"))
    with torch.no_grad():
        hidden, _ = model.hidden_states(ids[None, :-1])
    out = model.output
    return {"h": hidden[0].float(), "W": out.weight.detach().float(), "t": ids[1:], "path": str(path), "split": split,
            "data": str(root)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _now(device):
    _sync(device)
    return time.perf_counter()


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(method: str, N: int, D: int, V: int, dtype: str, device: torch.device, warmup: int, repeat: int,
            source: dict | None) -> dict:
    """One method at one shape: peak memory on the first call (after the inputs exist), then the
    median forward and backward times over ``repeat`` calls after ``warmup``."""
    torch.set_float32_matmul_precision("high" if dtype == "tf32" else "highest")  # the API that cannot raise
    fn = available_methods(device, dtype)[method]
    h, W, t = make_inputs(N, D, V, dtype, device, source)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16-autocast")
    fwd, bwd, cpu, peak = [], [], [], None
    # one tiny call first: one-time costs (lazy imports, op registration, autotuning caches) are not
    # the method's per-call time, and must not count in a warmup-free CPU round
    hp, Wp, tp = make_inputs(8, D, 16, dtype, device, None)
    with autocast:
        fn(hp, Wp, tp).backward()
    del hp, Wp, tp
    for i in range(warmup + repeat):
        if i == 0:  # peak memory of the first call, above the inputs
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            else:
                base = _rss_mib("VmRSS")
                try:
                    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
                except OSError:
                    base = None
        c0 = time.process_time()
        t0 = _now(device)
        with autocast:
            loss = fn(h, W, t)
        t1 = _now(device)
        loss.backward()
        t2 = _now(device)
        c2 = time.process_time()
        if i == 0:
            if device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            elif base is not None:
                peak = _rss_mib("VmHWM") - base
        if i >= warmup:
            fwd.append(1e3 * (t1 - t0))
            bwd.append(1e3 * (t2 - t1))
            cpu.append(1e3 * (c2 - c0))
        h.grad = W.grad = None
        del loss
    f, b = statistics.median(fwd), statistics.median(bwd)
    return {"forward_ms": f, "backward_ms": b, "ms": f + b, "cpu_ms": statistics.median(cpu), "peak_extra_mib": peak,
            "runs": len(fwd)}


def matmul_peak_tflops(device, repeat: int = 20) -> float | None:
    """bf16 ``torch.matmul`` TFLOP/s on a large GEMM: the ceiling a matmul-bound op can reach here."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    t0 = _now(device)
    for _ in range(repeat):
        a @ b
    ms = 1e3 * (_now(device) - t0) / repeat
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def run_worker(spec: dict) -> dict:
    """CPU: one measurement in this (fresh) process, so its peak RSS is the method's alone."""
    source = None
    if spec.get("checkpoint"):
        source = checkpoint_source(spec["checkpoint"], spec.get("data"), spec["N"])
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    return measure(spec["method"], spec["N"], spec["D"], spec["V"], spec["dtype"], torch.device("cpu"),
                   spec["warmup"], spec["repeat"], source)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--N", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--D", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--V", type=int, nargs="+", default=[267_735])
    p.add_argument("--dtype", nargs="+", default=["bf16-autocast", "bf16", "tf32"], choices=DTYPES)
    p.add_argument("--methods", nargs="+", default=None, help="subset of the methods (default: all available)")
    p.add_argument("--checkpoint", default=None, help="also time on the output layer + activations of this lmmem checkpoint")
    p.add_argument("--data", default=None, help="the checkpoint's prepared corpus (default: the one it was trained on)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="CPU: worker processes per method, interleaved")
    p.add_argument("--cpu-acceptance", action="store_true",
                   help="CPU: N=2048, D=512, V=267,735, fp32; lmmem vs eager vs F.linear_cross_entropy")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: checks that the script runs")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/bench_linear_cross_entropy_<device>.json)")
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))))
        return
    cuda = torch.cuda.is_available() and not args.smoke and not args.cpu_acceptance
    device = torch.device("cuda" if cuda else "cpu")
    if args.smoke:
        args.N, args.D, args.V, args.dtype, args.warmup, args.repeat, args.rounds = [37], [24], [131], ["fp32"], 0, 1, 1
        args.methods = args.methods or ["lmmem", "eager", "F.linear_cross_entropy"]
    elif args.cpu_acceptance:
        args.N, args.D, args.V, args.dtype = [2048], [512], [267_735], ["fp32"]
        args.methods = args.methods or ["lmmem", "eager", "F.linear_cross_entropy"]
        args.warmup, args.repeat = 0, 1  # each round: one call, the first (memory) and the timed one
    elif not cuda:
        sys.exit("the default shapes need a CUDA GPU (use --cpu-acceptance or --smoke on CPU)")
    load_before = os.getloadavg()
    peak = matmul_peak_tflops(device)
    source = checkpoint_source(args.checkpoint, args.data, max(args.N)) if args.checkpoint else None
    shapes = [(N, D, V, "random") for V in args.V for D in args.D for N in args.N]
    if source is not None:  # the checkpoint fixes V and D
        shapes += [(min(N, source["t"].numel()), source["W"].shape[1], source["W"].shape[0], "checkpoint") for N in args.N]
    rows = []
    for dtype in args.dtype:
        names = [m for m in available_methods(device, dtype) if not args.methods or m in args.methods]
        for N, D, V, logits in shapes:
            group = {m: {"method": m, "dtype": dtype, "N": N, "D": D, "V": V, "logits": logits} for m in names}
            samples = {m: [] for m in names}
            for _ in range(args.rounds if device.type == "cpu" else 1):
                for m in names:  # interleaved: load that comes and goes hits every method
                    try:
                        if device.type == "cpu":
                            spec = {"method": m, "N": N, "D": D, "V": V, "dtype": dtype, "warmup": args.warmup,
                                    "repeat": args.repeat}
                            if logits == "checkpoint":
                                spec.update(checkpoint=args.checkpoint, data=args.data or source.get("data"))
                            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                                                  capture_output=True, text=True, env={**os.environ})
                            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                            if proc.returncode != 0 or not lines:
                                raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "worker failed")
                            samples[m].append(json.loads(lines[-1][7:]))
                        else:
                            torch.cuda.empty_cache()
                            samples[m].append(measure(m, N, D, V, dtype, device, args.warmup, args.repeat, source if logits == "checkpoint" else None))
                    except torch.cuda.OutOfMemoryError:
                        group[m]["error"] = "out of memory"
                        torch.cuda.empty_cache()
                    except Exception as e:  # a baseline that fails is reported, not fatal
                        group[m]["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            for m, runs in samples.items():
                r = group[m]
                if not runs:
                    continue
                for key in ("forward_ms", "backward_ms", "ms", "cpu_ms"):
                    r[key] = statistics.median(x[key] for x in runs)
                peaks = [x["peak_extra_mib"] for x in runs if x["peak_extra_mib"] is not None]
                r["peak_extra_mib"] = max(peaks) if peaks else None
                r["ms_all_rounds"] = [x["ms"] for x in runs]
                r["tflops"] = 6 * N * D * V / (r["ms"] * 1e-3) / 1e12
                r["peak_fraction"] = r["tflops"] / peak if peak else None
                print(f"  {dtype} N={N} D={D} V={V:,} {logits} {m}: fwd {r['forward_ms']:.1f} ms, bwd {r['backward_ms']:.1f} ms, "
                      f"peak +{r['peak_extra_mib'] if r['peak_extra_mib'] is None else round(r['peak_extra_mib'])} MiB",
                      file=sys.stderr, flush=True)
            exact_peers = [r["ms"] for m, r in group.items() if m not in ("lmmem",) and r.get("ms")]
            ours = group.get("lmmem", {})
            if ours.get("ms") and exact_peers:
                ours["speedup_vs_fastest_peer"] = min(exact_peers) / ours["ms"]
            eager = group.get("eager", {})
            if ours.get("ms") and eager.get("ms"):
                ours["time_ratio_vs_eager"] = ours["ms"] / eager["ms"]
                ours["cpu_time_ratio_vs_eager"] = ours["cpu_ms"] / eager["cpu_ms"]
                if ours.get("peak_extra_mib") is not None and eager.get("peak_extra_mib"):
                    ours["memory_ratio_vs_eager"] = ours["peak_extra_mib"] / eager["peak_extra_mib"]
            rows += group.values()
    cols = ["method", "dtype", "logits", "N", "D", "V", "forward_ms", "backward_ms", "ms", "tflops", "peak_fraction",
            "peak_extra_mib", "cpu_ms", "time_ratio_vs_eager", "cpu_time_ratio_vs_eager", "memory_ratio_vs_eager", "speedup_vs_fastest_peer", "error"]
    print(markdown_table(rows, cols))
    payload = {"results": rows, "matmul_peak_bf16_tflops": peak,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "warmup": args.warmup, "repeat": args.repeat, "rounds": args.rounds, "flops_counted": "6*N*D*V",
               "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "checkpoint": {k: source[k] for k in ("path", "split", "data")} if source else None}
    if args.cpu_acceptance:
        ours = next((r for r in rows if r["method"] == "lmmem"), {})
        payload["acceptance"] = {
            "memory_ratio_vs_eager": ours.get("memory_ratio_vs_eager"), "time_ratio_vs_eager": ours.get("time_ratio_vs_eager"),
            "cpu_time_ratio_vs_eager": ours.get("cpu_time_ratio_vs_eager"),
            "memory_ok (<= 1/8)": (ours.get("memory_ratio_vs_eager") or 9) <= 1 / 8,
            "time_ok (wall, median of rounds, <= 1)": (ours.get("time_ratio_vs_eager") or 9) <= 1.0,
            "cpu_time_ok (process CPU time, <= 1)": (ours.get("cpu_time_ratio_vs_eager") or 9) <= 1.0}
        print(json.dumps(payload["acceptance"]))
    name = f"bench_linear_cross_entropy_{device.type}" + ("_acceptance" if args.cpu_acceptance else "")
    path = write_results(name, payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
