#!/usr/bin/env bash
# Compile every shipped Triton kernel variant for sm_80 and sm_90a, without a GPU, under the pinned
# triton (the project venv) and under triton 3.6.0 (the GPU machines' version, in a venv of its own
# that holds triton only: the check imports no torch). Called by .ci/run via `make compile-check`.
#
#   bash benchmarks/compile_check.sh                 # exit 1 if any variant fails a check
#   JSON_DIR=benchmarks/results bash benchmarks/compile_check.sh   # also write per-variant JSON
#
# Cost: the 3.6.0 venv is created once and cached in .venv-triton36 (one ~150 MB wheel from the
# package index); each run compiles 154 (variant, architecture) pairs per triton version, a few minutes of CPU each.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
VENV36=${TRITON36_VENV:-.venv-triton36}
BASE_PYTHON=${BASE_PYTHON:-python3}
json() { if [ -n "${JSON_DIR:-}" ]; then echo "--json $JSON_DIR/compile_check_triton-$1.json"; fi; }

echo "== pinned triton ($($PY -c 'import triton; print(triton.__version__)'))"
# shellcheck disable=SC2046
"$PY" benchmarks/compile_check.py $(json pinned)

if ! "$VENV36/bin/python" -c "import sys, triton; sys.exit(triton.__version__ != '3.6.0')" 2>/dev/null; then
  rm -rf "$VENV36"
  "$BASE_PYTHON" -m venv "$VENV36"
  "$VENV36/bin/python" -m pip install --quiet "triton==3.6.0"
fi
echo "== triton 3.6.0"
# shellcheck disable=SC2046
"$VENV36/bin/python" benchmarks/compile_check.py $(json 3.6.0)
