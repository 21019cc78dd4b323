#!/usr/bin/env bash
# Every check that needs a CUDA GPU, as one short command with JSON output (the GPU figures of the
# kernel and test-time issues). Run in the repo root on a machine with torch + triton + a GPU;
# optional peers (liger_kernel, cut_cross_entropy) are used where importable.
#
#   bash benchmarks/gpu_checks.sh          # ~9 min on an H100/H200: tests, op benchmark, tuning, train step, Hebbian step
#   FULL=1 bash benchmarks/gpu_checks.sh   # + more shapes/dtypes and the test-time memories (longer)
#
# Writes benchmarks/results/*_cuda.json and benchmarks/results/gpu_checks_cuda.json (each step's
# status and seconds, versions, the GPU); copies them to $OUT when set (the device tool brings $OUT back).
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RES=benchmarks/results
mkdir -p "$RES"
STEPS=()
status=0
step() {  # step NAME CMD...: run, record status and duration
  local name=$1; shift
  echo; echo "== $name: $*"
  local t0=$SECONDS
  "$@"; local rc=$?
  [ $rc -eq 0 ] || { echo "!! failed ($rc): $name"; status=1; }
  STEPS+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}")
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
# 1. kernel tests on the GPU: bf16/fp16 vs PyTorch's own error, bf16 autocast determinism, V = 267,735,
#    int64 offsets, peak memory; the centred rule's kernels (bf16/fp16, V = 267,735 deterministic, no host
#    sync in the layer's update); the kernel-health table must show no fallback
step tests $PY -m pytest -q -rs -x tests/test_kernels.py tests/test_hebbian_kernel.py tests/test_hebbian_softmax.py tests/test_hebbian_momentum.py \
  --junitxml="$RES/gpu_tests_cuda.xml"
# 2. tuning: rows per chunk, then the step kernel's BLOCK_V / num_warps (JSON: every setting and the best)
step tune $PY benchmarks/tune_linear_cross_entropy.py --N 8192 --D 512 --V 267735 --dtype bf16-autocast
# 3. the op vs eager / eager-noupcast / torch.compile / F.linear_cross_entropy / Liger / CCE (filter off),
#    forward and backward separately, ≥ 55% of the measured bf16 matmul peak is the target
if [ -n "${FULL:-}" ]; then
  step bench $PY benchmarks/bench_linear_cross_entropy.py --N 4096 8192 16384 --D 512 1024 --dtype bf16-autocast bf16 tf32
else
  step bench $PY benchmarks/bench_linear_cross_entropy.py --N 8192 --D 512 --dtype bf16-autocast bf16 --warmup 2 --repeat 5
fi
# 4. end to end: train.py's step with the wt103-paper preset, fused Hebbian vs eager full softmax (target ≥ 2×)
step train $PY benchmarks/bench_train.py --preset wt103-paper --vocab 267735 --device cuda --softmax full/torch hebbian/triton full/triton
# 5. the Hebbian step: LSTM step full vs Hebbian, and the bookkeeping (statistics + update) per rule, torch vs
#    Triton, at one WikiText-103 step (8,192 tokens, D = 512, V = 267,735); JSON bench_hebbian_step_cuda.json
step hebbian $PY benchmarks/bench_hebbian_step.py --device cuda --vocab 267735 --steps 20
# 6. test-time memories at WikiText-103 scale (FULL only: long)
[ -z "${FULL:-}" ] || step test_time $PY benchmarks/bench_test_time.py --device cuda --vocab 267735 --tokens 245000 --exact-tokens 24500 --dim 512

versions=$($PY -c "import json, torch, triton; print(json.dumps({'torch': torch.__version__, 'triton': triton.__version__, 'gpu': torch.cuda.get_device_name(0)}))" 2>/dev/null || echo '{}')
joined=$(IFS=,; echo "${STEPS[*]}")
echo "{\"versions\": $versions, \"steps\": [$joined], \"ok\": $([ $status -eq 0 ] && echo true || echo false)}" > "$RES/gpu_checks_cuda.json"
cat "$RES/gpu_checks_cuda.json"
if [ -n "${OUT:-}" ]; then cp "$RES"/*cuda*.json "$RES"/*cuda*.xml "$OUT"/ 2>/dev/null || true; fi
exit $status
