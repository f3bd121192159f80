#!/usr/bin/env bash
# The prepared device check (issue 13): build popcomp in place for this GPU, then run
# bench/gpu_check.py (CUDA tests, determinism, graph capture, K-means targets, GPU benches) and
# print one Markdown table. On a machine without a GPU it only checks that its files exist.
set -uo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 POPCOMP_NO_PROGRESS=1
PY=${PYTHON:-python3}
if $PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  t=$(date +%s)
  # sm_90 machine code only (H100/H200): a third of the default build time
  CUDAARCHS=${CUDAARCHS:-90-real} $PY -m pip install -q --no-build-isolation -e . || { echo "[FAIL] build"; exit 1; }
  echo "[PASS] build ($(( $(date +%s) - t )) s)"
fi
exec $PY bench/gpu_check.py "$@"
