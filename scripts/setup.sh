#!/usr/bin/env bash
# Creates .venv with torch and builds udi-kernels into it (editable, so tests run from this tree), against the
# installed torch (--no-build-isolation). CUDA kernels are compiled whenever a CUDA toolkit is found
# (UDI_KERNELS_CUDA=1 makes that mandatory). Prints a line per step and one every 30 s during the build.
# A second run reuses what is there: a .venv with the asked torch keeps it (no download), and the build is redone
# only when the sources (csrc/, setup.py, pyproject.toml, udi_kernels/limits.py), torch or the build flags changed
# since the last one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${UDI_TORCH_VERSION:-2.14.1}
STAMP=.venv/udi_kernels_build.stamp
progress() { echo "[setup $((SECONDS / 60))m$((SECONDS % 60))s] $*"; }

# what the last successful build was made from: torch ($1), the build flags and every source the build compiles
build_stamp() {
  {
    echo "torch $1 cuda=${UDI_KERNELS_CUDA:-} arch=${TORCH_CUDA_ARCH_LIST:-}"
    cat setup.py pyproject.toml udi_kernels/limits.py 2>/dev/null || true
    { find csrc -type f 2>/dev/null || true; } | LC_ALL=C sort | while read -r f; do echo "$f"; cat "$f"; done
  } | sha256sum | cut -d' ' -f1
}

if [ -x .venv/bin/python ]; then
  progress "1/4 virtual environment .venv: reusing it"
else
  progress "1/4 virtual environment .venv"
  "$PYTHON" -m venv .venv
fi
torch_version() { .venv/bin/python -c "import torch, torchvision; print(torch.__version__)" 2>/dev/null || true; }
installed=$(torch_version)
if [ -n "$installed" ] && { [ "$installed" = "$TORCH_VERSION" ] || [ "${installed%%+*}" = "$TORCH_VERSION" ]; }; then
  progress "2/4, 3/4 .venv has torch $installed and torchvision: kept (nothing downloaded)"
else
  progress "2/4 pip, setuptools, wheel, ninja"
  .venv/bin/python -m pip install -q --upgrade pip setuptools wheel ninja
  progress "3/4 torch $TORCH_VERSION and torchvision (a download of a few GB the first time)"
  # torchvision with torch, so that the resolver picks the torchvision built for this torch
  .venv/bin/python -m pip install -q "torch==$TORCH_VERSION" torchvision
fi
stamp=$(build_stamp "$(torch_version)")
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$stamp" ] && .venv/bin/python -c "import udi_kernels" 2>/dev/null; then
  progress "4/4 udi_kernels: up to date (sources, torch and build flags unchanged since the last build): not rebuilt"
else
  progress "4/4 udi_kernels and its test, bench and train extras: compiling the kernels takes several minutes"
  rm -f "$STAMP"
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
  echo "$stamp" > "$STAMP"
fi
progress "done"
.venv/bin/python -c "import udi_kernels as u; print('udi_kernels', u.__version__, '| CUDA kernels compiled:', u.cuda_compiled())"
