#!/usr/bin/env bash
# The whole GPU check in one run (H100/H200, torch + triton preinstalled, offline): build with the
# CUDA kernels, GPU tests, compute-sanitizer, benchmarks; a short table printed last.
#   OUT=/some/dir bash scripts/gpu_check.sh [--skip-build]
# $OUT (default benchmarks/out/gpu_check, ignored by git) receives the benchmark JSON files, summary.txt and
# gpu_check.tar.gz (every log and chart); copy what is worth recording into benchmarks/results/.
# Each step has a time limit, shortened to what is left of GPU_CHECK_BUDGET_S; with < 20 s left it is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out/gpu_check}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SUMMARY="$WORK/summary.txt"
failed=0

step() {  # step NAME LIMIT_S COMMAND...: log to $WORK/NAME.log, record PASS/FAIL/SKIP and seconds
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if (( left < 20 )); then echo "$name SKIP (${left}s left)" >> "$SUMMARY"; failed=1; return; fi
  (( limit > left )) && limit=$left
  local start=$SECONDS
  echo "== $name: $*"
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$WORK/$name.log"
  if [ $rc -eq 0 ]; then echo "$name PASS $((SECONDS - start))s" >> "$SUMMARY"
  else echo "$name FAIL(rc=$rc) $((SECONDS - start))s" >> "$SUMMARY"; failed=1; fi
}

device=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)
if [ "${1:-}" != "--skip-build" ]; then
  step build 240 env UDI_KERNELS_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=16 \
    python3 -m pip install --no-build-isolation --no-deps -e .
fi
parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")  # Triton compiles dominate: spread them
step gpu_tests 240 env UDI_KERNELS_EXPECT_CUDA=1 python3 -m pytest -q -m gpu -p no:cacheprovider $parallel tests
for script in scripts/sanitize_*.py; do
  step "$(basename "$script" .py)_memcheck" 60 compute-sanitizer --tool memcheck --error-exitcode 1 python3 "$script"
done
for script in scripts/sanitize_*.py; do
  step "$(basename "$script" .py)_racecheck" 60 compute-sanitizer --tool racecheck --error-exitcode 1 python3 "$script"
done
BENCHES="srs_attention distill_cross_entropy linear_distill_cross_entropy stratified_sample train_step"
for bench in $BENCHES; do
  limit=100
  [ "$bench" = srs_attention ] && limit=200  # compiles the CUDA-graph module provider for four shapes
  [ -f "benchmarks/$bench.py" ] && step "bench_$bench" $limit python3 -m "benchmarks.$bench" --quick --out "$WORK"
done
# the step eager against --compile (udi/compiled.py), both granularities, interleaved; --quick: no cold compile times
step bench_train_step_compile 150 python3 -m benchmarks.train_step --compile --quick --out "$WORK"

step profile 60 python3 scripts/profile_gpu.py

cp "$WORK"/*.json "$SUMMARY" "$OUT"/ 2>/dev/null
tar -czf "$OUT/gpu_check.tar.gz" -C "$WORK" .
echo
echo "================ gpu_check: $device, $(date -u +%F), ${SECONDS}s ================"
for bench in $BENCHES train_step_compile; do
  log="$WORK/bench_$bench.log"
  [ -f "$log" ] && { echo "-- $bench"; sed -n '/^wrote /,$p' "$log" | tail -n +2; }
done
cat "$SUMMARY"
exit $failed
