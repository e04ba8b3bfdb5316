"""Which implementation runs an op: `backend=` per call, else UDI_KERNELS_BACKEND, else 'auto'.

- native:    the compiled C++ (CPU) or CUDA kernel for the tensor's device
- triton:    the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)
- reference: the eager PyTorch implementation (any device)
- auto:      the fastest available one (each op states its order)
Asking for an unavailable backend raises; nothing falls back silently.
"""
import functools
import importlib.util
import os

import torch

from ._native import has_native_kernel

BACKENDS = ("auto", "native", "triton", "reference")
ENV_VAR = "UDI_KERNELS_BACKEND"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def why_unavailable(backend: str, op: str, device: torch.device):
    """None when `backend` can run `op` on `device`, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "native":
        if device.type not in ("cpu", "cuda"):
            return f"no native kernels for {device.type} tensors"
        if not has_native_kernel(op, device.type):
            return f"this build of udi_kernels has no {device.type.upper()} kernel for {op}"
        return None
    if backend == "triton":
        if not triton_installed():
            return "triton is not installed"
        if device.type == "cpu" and not triton_interpreted():
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before importing udi_kernels)"
        if device.type not in ("cpu", "cuda"):
            return f"Triton does not run {device.type} tensors"
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def default_auto_order(device: torch.device):
    return ("native", "triton", "reference") if device.type == "cuda" else ("native", "reference")


@torch.compiler.assume_constant_result
def resolve(op: str, device: torch.device, backend=None, auto_order=None) -> str:
    """The backend that runs `op` for tensors on `device` (a constant to torch.compile)."""
    requested = backend or os.environ.get(ENV_VAR) or "auto"
    if requested not in BACKENDS:
        source = "backend" if backend else ENV_VAR
        raise ValueError(f"{source} must be one of {BACKENDS}, got {requested!r}")
    if requested == "auto":
        for candidate in auto_order or default_auto_order(device):
            if why_unavailable(candidate, op, device) is None:
                return candidate
        raise RuntimeError(f"no backend can run {op} on {device}")
    reason = why_unavailable(requested, op, device)
    if reason is not None:
        raise RuntimeError(f"backend {requested!r} cannot run {op} on {device}: {reason}")
    return requested
