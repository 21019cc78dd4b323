"""The GPU compile check (benchmarks/compile_check.py) checks what it says: a shipped kernel passes,
and a kernel with a fenced atomic in its loop is caught. The full check (every variant, sm_80 and
sm_90a, pinned triton and 3.6.0) is `make compile-check`, run by CI.

Runs in a subprocess: conftest turns on Triton's interpreter for this process, and interpreted
functions cannot be compiled for a GPU target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the compile check needs the triton package (Linux)")
REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import json, sys, tempfile
    from pathlib import Path
    import triton, triton.language as tl
    from benchmarks import compile_check as cc

    @triton.jit
    def atomic_loop_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        for i in range(0, N, BLOCK):
            tl.atomic_add(out_ptr + offs, tl.load(x_ptr + i + offs))  # acq_rel by default: fenced

    tmp = Path(tempfile.mkdtemp())
    name, fn, sig, const, opts, hot, _ = next(v for v in cc.variants() if v[0] == "ce_step_kernel")
    good = cc.check_one(name, fn, sig, const, opts, hot, "sm_90a", 90, tmp)
    bad = cc.check_one("atomic_loop", atomic_loop_kernel, {"x_ptr": "*fp32", "out_ptr": "*fp32", "N": "i32", "BLOCK": "constexpr"},
                       {"BLOCK": 128}, {"num_warps": 4}, True, "sm_90a", 90, tmp)
    labels = [v[6] for v in cc.variants() if v[0] == "ce_step_kernel"]
    print(json.dumps({"good": good, "bad": bad, "labels": labels, "kernels": sorted({v[0] for v in cc.variants()})}))
''')


@pytest.mark.slow
def test_compile_check_passes_a_shipped_kernel_and_catches_a_fenced_atomic(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO)}
    script = tmp_path / "check.py"  # a file: @triton.jit needs the kernel's source
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    good, bad = out["good"], out["bad"]
    assert good["ok"], good["failures"]
    assert good["registers"] and good["shared_bytes"] <= 227 * 1024 and good["atomics"] == 0 and good["fences"] == 0
    assert not bad["ok"] and bad["atomics"] > 0 and any("atomic" in f for f in bad["failures"]), bad
    # the variants: fp32/tf32, bf16 (and bf16 over fp32 weights), fp16 logits; loss only and loss+gradient
    for dt in ("fp32", "bf16", "fp16"):
        for mode in ("loss only", "loss+grad"):
            assert any(f"logits {dt}" in lab and mode in lab for lab in out["labels"]), (dt, mode)
    assert out["kernels"] == ["ce_step_kernel", "centred_mean_kernel", "centred_mix_kernel", "centred_norm_kernel",
                              "centred_row_kernel", "mix_kernel", "segment_sum_kernel"]
