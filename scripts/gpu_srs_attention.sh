#!/usr/bin/env bash
# GPU checks of srs_attention: build, GPU tests, compute-sanitizer memcheck + racecheck, quick benchmark.
# Usage: bash scripts/gpu_srs_attention.sh [OUT_DIR]
set -uo pipefail
out=${1:-benchmarks/results}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
nvidia-smi -L
MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} UDI_KERNELS_CUDA=1 \
  $PY setup.py build_ext --inplace > /tmp/udi_build.log 2>&1 || { tail -40 /tmp/udi_build.log; exit 1; }
$PY -m pytest tests/test_srs_attention.py -q -m gpu -p no:logging -p no:cacheprovider 2>&1 | tail -25
compute-sanitizer --tool memcheck --error-exitcode 1 $PY scripts/sanitize_srs_attention.py 2>&1 | tail -5
compute-sanitizer --tool racecheck --error-exitcode 1 $PY scripts/sanitize_srs_attention.py 2>&1 | tail -5
$PY benchmarks/srs_attention.py --quick --out "$out" 2>&1 | tail -45
