#!/usr/bin/env bash
# Every check that needs a CUDA GPU, as one command (the GPU figures of the kernel and test-time
# issues). Runs in the repo root on a machine with torch + triton + a GPU; optional baselines
# (liger_kernel, cut_cross_entropy) are used where importable.
#
#   bash benchmarks/gpu_checks.sh            # writes benchmarks/results/*_cuda.json (and copies them to $OUT if set)
#   QUICK=1 bash benchmarks/gpu_checks.sh    # the tests and N = 8192, D = 512 only
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
status=0
step() { echo; echo "== $*"; "$@" || { echo "!! failed: $*"; status=1; }; }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"

# 1. the GPU-only kernel tests (bf16/fp16 vs PyTorch's own error, V = 267,735, int64 offsets, peak memory) and the rest of the kernel tests compiled for the GPU
step $PY -m pytest -q -rs tests/test_kernels.py tests/test_hebbian_softmax.py
# 2. the op benchmark: fused linear CE + Hebbian statistics vs eager / torch.compile / F.linear_cross_entropy / Liger / CCE
if [ -n "${QUICK:-}" ]; then
  step $PY benchmarks/bench_linear_cross_entropy.py --N 8192 --D 512 --dtype bf16
else
  step $PY benchmarks/bench_linear_cross_entropy.py
fi
# 3. end to end: train.py's step with the wt103-paper preset, Triton Hebbian vs eager full softmax (target ≥ 2×)
step $PY benchmarks/bench_train.py --preset wt103-paper --vocab 267735 --device cuda --softmax full/torch hebbian/triton full/triton
# 4. test-time memories at WikiText-103 scale (245K tokens, V = 267,735, D = 512)
# exact MbPA timed on a tenth of the stream (×10 estimates the whole); restricted MbPA on all of it
[ -n "${QUICK:-}" ] || step $PY benchmarks/bench_test_time.py --device cuda --vocab 267735 --tokens 245000 --exact-tokens 24500 --dim 512

if [ -n "${OUT:-}" ]; then cp benchmarks/results/*cuda*.json "$OUT"/ 2>/dev/null || true; fi
exit $status
