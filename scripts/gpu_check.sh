#!/usr/bin/env bash
# The whole GPU check in one run (H100/H200 machine, torch + triton preinstalled, offline):
# build with the CUDA kernels, GPU tests, compute-sanitizer, benchmarks; JSON into $OUT; a short
# table printed last. Usage: OUT=/some/dir bash scripts/gpu_check.sh [--skip-build]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
failed=0

step() {  # step NAME COMMAND...: runs it, logs to $OUT/NAME.log, records PASS/FAIL and seconds
  local name=$1; shift
  local start=$SECONDS
  echo "== $name: $*"
  if "$@" 2>&1 | tee "$OUT/$name.log"; [ "${PIPESTATUS[0]}" -eq 0 ]; then
    echo "$name PASS $((SECONDS - start))s" >> "$SUMMARY"
  else
    echo "$name FAIL $((SECONDS - start))s" >> "$SUMMARY"
    failed=1
  fi
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
if [ "${1:-}" != "--skip-build" ]; then
  step build env UDI_KERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=16 \
    python3 -m pip install --no-build-isolation --no-deps -e .
fi
step gpu_tests env UDI_KERNELS_EXPECT_CUDA=1 python3 -m pytest -q -m gpu -p no:cacheprovider tests
for script in scripts/sanitize_*.py; do
  name=$(basename "$script" .py)
  step "${name}_memcheck" compute-sanitizer --tool memcheck --error-exitcode 1 python3 "$script"
  step "${name}_racecheck" compute-sanitizer --tool racecheck --error-exitcode 1 python3 "$script"
done
for bench in srs_sample srs_attention distill_loss train_step; do
  [ -f "benchmarks/$bench.py" ] && step "bench_$bench" python3 "benchmarks/$bench.py" --quick --out "$OUT"
done

echo
echo "================ gpu_check summary ($(cat "$OUT/device.txt"), $(date -u +%F)) ================"
for bench in srs_sample srs_attention distill_loss train_step; do
  log="$OUT/bench_$bench.log"
  [ -f "$log" ] && { echo "-- $bench"; sed -n '/^wrote /,$p' "$log" | tail -n +2; }
done
cat "$SUMMARY"
exit $failed
