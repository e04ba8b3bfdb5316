#!/usr/bin/env bash
# Creates .venv with torch and builds udi-kernels into it (editable, so tests run from this tree).
# CUDA kernels are compiled whenever a CUDA toolkit is found (UDI_KERNELS_CUDA=1 makes that mandatory).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel ninja
# torchvision with torch, so that the resolver picks the torchvision built for this torch
.venv/bin/python -m pip install -q "torch==${UDI_TORCH_VERSION:-2.14.1}" torchvision
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m pip install -q --no-build-isolation -e ".[test,bench,train]"
.venv/bin/python -c "import udi_kernels as u; print('udi_kernels', u.__version__, '| CUDA kernels compiled:', u.cuda_compiled())"
