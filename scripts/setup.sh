#!/usr/bin/env bash
# Creates .venv with torch and builds udi-kernels into it (editable, so tests run from this tree), against the
# installed torch (--no-build-isolation). CUDA kernels are compiled whenever a CUDA toolkit is found
# (UDI_KERNELS_CUDA=1 makes that mandatory). Prints a line per step and one every 30 s during the build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${UDI_TORCH_VERSION:-2.14.1}
progress() { echo "[setup $((SECONDS / 60))m$((SECONDS % 60))s] $*"; }

progress "1/4 virtual environment .venv"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
progress "2/4 pip, setuptools, wheel, ninja"
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel ninja
progress "3/4 torch $TORCH_VERSION and torchvision (a download of a few GB the first time)"
# torchvision with torch, so that the resolver picks the torchvision built for this torch
.venv/bin/python -m pip install -q "torch==$TORCH_VERSION" torchvision
progress "4/4 udi_kernels and its test, bench and train extras: compiling the kernels takes several minutes"
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m pip install -q --no-build-isolation -e ".[test,bench,train]" &
build=$!
trap 'kill "$build" 2>/dev/null || true' INT TERM
next_heartbeat=$((SECONDS + 30))
while kill -0 "$build" 2>/dev/null; do
  sleep 1
  if ((SECONDS >= next_heartbeat)); then
    progress "    still compiling"
    next_heartbeat=$((next_heartbeat + 30))
  fi
done
wait "$build"  # the build's exit status
progress "done"
.venv/bin/python -c "import udi_kernels as u; print('udi_kernels', u.__version__, '| CUDA kernels compiled:', u.cuda_compiled())"
