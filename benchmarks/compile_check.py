"""Compile every shipped Triton kernel variant for sm_80 and sm_90a on a machine without a GPU, and
check what a GPU would otherwise be needed to find out.

    python benchmarks/compile_check.py [--json PATH]      # any python with triton; torch not needed
    bash benchmarks/compile_check.sh                       # the pinned triton and triton 3.6.0 (CI)

For each kernel of :mod:`lmmem.kernels.triton_kernels`, each variant the launchers can ask for (the
dtypes and compile-time flags that make Triton build a new binary) and the shipped launch
parameters, ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` builds the cubin,
and this asserts:

* it compiles (a CompilationError / PTXASError here is one a user's GPU would hit);
* shared memory fits: ≤ 227 KB on sm_90a, ≤ 163 KB on sm_80 (what one block may use);
* no register spills in the hot kernels (``ptxas -v`` on the kernel's PTX: 0 bytes spill stores);
* tensor-core instructions where a kernel multiplies large enough tiles (``tl.dot`` with all dims ≥ 64:
  ``wgmma`` in the sm_90a PTX). The shipped kernels have no ``tl.dot`` — the chunked linear
  cross-entropy leaves its three matmuls to cuBLAS — so this applies to none today and guards
  any future one;
* no fenced atomics in hot loops: no ``MEMBAR`` (fence) in the SASS (``nvdisasm``), and no atomics
  at all (``ATOM``/``RED``) — the kernels are meant to be atomic-free (deterministic).

The issue's variant list maps onto kernel binaries as follows: fp32 and tf32 training both hand the
step fp32 logits (TF32 is cuBLAS's business); bf16 and bf16-autocast-over-fp32-weights both hand it
bf16 logits; fp16 gives fp16 logits. With/without bias is not a kernel variant (the bias goes into
cuBLAS's ``addmm``), nor is contiguity (the step reads its own contiguous chunk buffer).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lmmem.kernels import triton_kernels as K  # noqa: E402  (imports triton only)

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = {"sm_80": 80, "sm_90a": 90}
DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


def _bin(name: str) -> str:
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} (this triton wheel does not ship {name})")
    return str(path)


def _ptxas(cc: int) -> str:
    """The ptxas triton itself uses for this architecture (its choice differs between versions)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(cc).path
    except (ImportError, AttributeError, TypeError):
        return _bin("ptxas")


def variants():
    """(kernel name, jit fn, signature, constexprs, launch options, hot, label) for every shipped variant."""
    out = []
    for dt, tgt, grad, cap in itertools.product(DTYPES, ("i64", "i32"), (True, False), (False, True)):
        sig = {"z_ptr": f"*{dt}", "stride_z": "i64", "t_ptr": f"*{tgt}", "w_ptr": "*fp32", "loss_ptr": "*fp32",
               "lse_ptr": "*fp32", "V": "i32", "ignore_index": "i32", "smoothing": "fp32", "z_loss": "fp32",
               "softcap": "fp32", "HAS_GRAD": "constexpr", "SOFTCAP": "constexpr", "BLOCK_V": "constexpr"}
        const = {"HAS_GRAD": grad, "SOFTCAP": cap, "BLOCK_V": K.CE_STEP_CUDA["BLOCK_V"]}
        label = f"logits {dt}, targets {tgt}, {'loss+grad' if grad else 'loss only'}, {'softcap' if cap else 'no softcap'}"
        out.append(("ce_step_kernel", K.ce_step_kernel, sig, const, {"num_warps": K.CE_STEP_CUDA["num_warps"]}, True, label))
    for dt in DTYPES:
        sig = {"h_ptr": f"*{dt}", "order_ptr": "*i64", "start_ptr": "*i64", "sums_ptr": "*fp32", "D": "i32",
               "stride_hn": "i64", "stride_hd": "i64", "BLOCK_D": "constexpr"}
        out.append(("segment_sum_kernel", K.segment_sum_kernel, sig, {"BLOCK_D": K.SEGMENT_SUM_CUDA["BLOCK_D"]},
                    {"num_warps": K.SEGMENT_SUM_CUDA["num_warps"]}, True, f"hidden {dt}"))
    for dt, limit, rescale, bd in itertools.product(DTYPES, (True, False), (False, True), (512, K.MIX_CUDA["BLOCK_D_MAX"])):
        sig = {"w_ptr": f"*{dt}", "class_counts_ptr": "*i64", "ids_ptr": "*i64", "n_ptr": "*i64", "sums_ptr": "*fp32",
               "V": "i32", "D": "i32", "stride_wv": "i64", "stride_wd": "i64", "gamma": "fp32", "limit": "fp32",
               "HAS_LIMIT": "constexpr", "RESCALE": "constexpr", "BLOCK_D": "constexpr"}
        out.append(("mix_kernel", K.mix_kernel, sig, {"HAS_LIMIT": limit, "RESCALE": rescale, "BLOCK_D": bd},
                    {"num_warps": K.MIX_CUDA["num_warps"]}, False,
                    f"weight {dt}, {'limit' if limit else 'no limit'}, {'rescale' if rescale else 'no rescale'}, BLOCK_D {bd}"))
    return out + centred_variants()


def centred_variants():
    """The centred rule's four kernels: the running state (μ, ρ) in fp32 or in the weight's dtype (a
    model cast to bf16/fp16 casts its buffers too), each ``write_norm``; the per-slot kernels at the
    largest row block shipped (1024: the most registers; a smaller D compiles a narrower block).
    All are checked for spills."""
    C = K.CENTRED_CUDA
    opts = {"num_warps": C["num_warps"]}
    pairs = [(w, st) for w in DTYPES for st in dict.fromkeys(("fp32", w))]  # (weight, state) dtypes
    out = []
    for st in DTYPES:
        sig = {"ids_ptr": "*i64", "n_ptr": "*i64", "sums_ptr": "*fp32", "mu_ptr": f"*{st}", "mu_out_ptr": f"*{st}",
               "updates_ptr": "*i64", "S": "i32", "V": "i32", "D": "i32", "min_rate": "fp32",
               "BLOCK_S": "constexpr", "BLOCK_D": "constexpr"}
        out.append(("centred_mean_kernel", K.centred_mean_kernel, sig, {"BLOCK_S": C["BLOCK_S"], "BLOCK_D": C["BLOCK_D"]},
                    opts, True, f"state {st}"))
        sig = {"ids_ptr": "*i64", "n_ptr": "*i64", "perp_ptr": "*fp32", "norm_ptr": f"*{st}", "norm_out_ptr": f"*{st}",
               "updates_ptr": "*i64", "S": "i32", "V": "i32", "min_rate": "fp32", "BLOCK_S": "constexpr"}
        out.append(("centred_norm_kernel", K.centred_norm_kernel, sig, {"BLOCK_S": C["BLOCK_S"]}, opts, True, f"state {st}"))
    bd = C["BLOCK_D_MAX"]
    for w, st in pairs:
        sig = {"w_ptr": f"*{w}", "ids_ptr": "*i64", "mu_ptr": f"*{st}", "along_ptr": "*fp32", "perp_ptr": "*fp32",
               "V": "i32", "D": "i32", "stride_wv": "i64", "stride_wd": "i64", "BLOCK_D": "constexpr"}
        out.append(("centred_row_kernel", K.centred_row_kernel, sig, {"BLOCK_D": bd}, opts, True,
                    f"weight {w}, state {st}, BLOCK_D {bd}"))
    for (w, st), norm in itertools.product(pairs, K.CENTRED_WRITE_NORMS):
        sig = {"w_ptr": f"*{w}", "class_counts_ptr": "*i64", "ids_ptr": "*i64", "n_ptr": "*i64", "sums_ptr": "*fp32",
               "lam_ptr": "*fp32", "mu_ptr": f"*{st}", "norm_ptr": f"*{st}", "along_ptr": "*fp32", "perp_ptr": "*fp32",
               "updates_ptr": "*i64", "start_step": "i32", "V": "i32", "D": "i32", "stride_wv": "i64", "stride_wd": "i64",
               "WRITE_NORM": "constexpr", "BLOCK_D": "constexpr"}
        out.append(("centred_mix_kernel", K.centred_mix_kernel, sig, {"WRITE_NORM": K.CENTRED_WRITE_NORMS[norm], "BLOCK_D": bd}, opts, True,
                    f"weight {w}, state {st}, write_norm {norm}, BLOCK_D {bd}"))
    return out


def _large_dot(fn) -> bool:
    """Whether the kernel's source multiplies tiles with ``tl.dot`` (then wgmma is expected on sm_90a).
    The shipped kernels have none; a future one is expected to use ≥ 64-wide tiles."""
    return "tl.dot(" in getattr(fn, "src", "")


def check_one(name, fn, sig, const, opts, hot, arch, cc, workdir: Path) -> dict:
    row = {"kernel": name, "arch": arch, **opts}
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", cc, 32), options=opts)
    except Exception as e:  # the failure a user's GPU would hit: report it
        row.update(ok=False, failures=[f"compile: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"])
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    failures = []
    shared = int(getattr(k.metadata, "shared", 0))
    row["shared_bytes"] = shared
    if shared > SHARED_LIMIT[cc]:
        failures.append(f"shared memory {shared} B > {SHARED_LIMIT[cc]} B")
    stem = workdir / f"{name}_{arch}_{abs(hash((str(sig), str(const), str(opts)))) % 10**8}"
    ptx = stem.with_suffix(".ptx")
    ptx.write_text(k.asm["ptx"])
    cubin = stem.with_suffix(".cubin")
    cubin.write_bytes(k.asm["cubin"])
    proc = subprocess.run([_ptxas(cc), f"-arch={arch}", "-v", str(ptx), "-o", str(stem.with_suffix(".o"))],
                          capture_output=True, text=True)
    info = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", info)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", info)]
    row["registers"] = int(regs.group(1)) if regs else None
    row["spill_store_bytes"] = max(spills) if spills else 0
    if proc.returncode != 0:
        failures.append(f"ptxas -v failed: {info.strip()[-300:]}")
    if hot and row["spill_store_bytes"]:
        failures.append(f"{row['spill_store_bytes']} bytes of register spills in a hot kernel")
    sass = subprocess.run([_bin("nvdisasm"), str(cubin)], capture_output=True, text=True)
    if sass.returncode != 0:
        failures.append(f"nvdisasm failed: {sass.stderr.strip()[-200:]}")
    text = sass.stdout
    row["sass_lines"] = text.count("\n")
    row["fences"] = len(re.findall(r"\bMEMBAR\b", text))
    row["atomics"] = len(re.findall(r"\b(ATOM|ATOMG|RED|REDG)\b", text))
    if row["fences"]:
        failures.append(f"{row['fences']} MEMBAR fences in the SASS (a fenced atomic or barrier in a hot loop)")
    if row["atomics"]:
        failures.append(f"{row['atomics']} atomic instructions (the kernels are meant to be atomic-free)")
    row["has_dot"] = _large_dot(fn)
    row["wgmma"] = "wgmma" in k.asm["ptx"]
    if cc == 90 and row["has_dot"] and not row["wgmma"]:
        failures.append("tl.dot without wgmma on sm_90a")
    row.update(ok=not failures, failures=failures)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="write the per-variant results here")
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    args = p.parse_args()
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="lmmem-compile-check-cache-"))
    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn, sig, const, opts, hot, label in variants():
            for arch in args.archs:
                row = check_one(name, fn, sig, const, opts, hot, arch, ARCHS[arch], Path(tmp))
                row["variant"] = label
                rows.append(row)
                status = "ok  " if row["ok"] else "FAIL"
                print(f"{status} {arch:7s} {name:19s} {label:60s} regs={row.get('registers')} "
                      f"smem={row.get('shared_bytes')} spills={row.get('spill_store_bytes')} "
                      f"atomics={row.get('atomics')} fences={row.get('fences')}"
                      + ("" if row["ok"] else f"  {row['failures']}"), flush=True)
    bad = [r for r in rows if not r["ok"]]
    summary = {"triton": triton.__version__, "python": platform.python_version(), "variants": len(rows),
               "failed": len(bad), "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(summary))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"summary": summary, "results": rows}, indent=1) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
