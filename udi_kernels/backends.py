"""Which implementation runs an op: `backend=` per call, else UDI_KERNELS_BACKEND, else 'auto'.

- native:    the compiled C++ (CPU) or CUDA kernel for the tensor's device
- triton:    the Triton kernel (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)
- reference: the eager PyTorch implementation (any device)
- auto:      the fastest backend that supports the call, in the order of the op's declaration
             (udi_kernels/declarations.py, with the measurements it rests on)
Asking for a backend that cannot run a call raises, saying why; nothing falls back silently.
"""
import functools
import importlib.util
import os
from typing import NamedTuple, Optional

import torch

from ._native import has_native_kernel
from .declarations import DECLARATIONS, OpDeclaration

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
    support = DECLARATIONS[op].support.get(backend) if op in DECLARATIONS else None
    if support is not None and device.type in support.not_on:
        return support.not_on[device.type]
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


def available(op: str, device) -> list:
    """The declared backends of `op` that this installation can run on `device` (built, installed, enabled)."""
    device = torch.device(device)
    return [b for b in DECLARATIONS[op].support if why_unavailable(b, op, device) is None]


class Unsupported(NamedTuple):
    """Why a backend cannot run a call, and the error to raise for it."""
    error: type
    reason: str


_LABELS = {"native": "native", "triton": "Triton", "reference": "reference"}


def _dtype_names(dtypes) -> str:
    return ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))


def size_limit_exceeded(declaration: OpDeclaration, backend: str, device_type: str, **sizes: int) -> str:
    """The first declared size limit of `backend` on `device_type` that these sizes exceed, as
    "name <= limit (got value)", or ""."""
    for name, limit in declaration.support[backend].max_sizes.get(device_type, {}).items():
        if sizes.get(name, 0) > limit:
            return f"{name} <= {limit} (got {sizes[name]})"
    return ""


def why_unsupported(declaration: OpDeclaration, backend: str, device: torch.device, dtype: torch.dtype,
                    exceeded_limit: str = "") -> Optional[Unsupported]:
    """None when `backend` can run a call of the declared op on inputs of `dtype` on `device` whose sizes exceed no
    limit of it (exceeded_limit: size_limit_exceeded's answer), else why not: RuntimeError (not built, installed or
    enabled), TypeError (dtype), ValueError (size)."""
    reason = why_unavailable(backend, declaration.name, device)
    if reason is not None:
        return Unsupported(RuntimeError, reason)
    support = declaration.support[backend]
    label = _LABELS[backend]
    dtypes = support.dtypes.get(device.type, support.dtypes.get("*"))
    if dtypes is None:
        return Unsupported(RuntimeError, f"the {label} backend of {declaration.name} does not run {device.type} "
                                         "tensors")
    if dtype not in dtypes:
        return Unsupported(TypeError, f"the {label} backend supports {_dtype_names(dtypes)} inputs on "
                                      f"{device.type} tensors, got {dtype}")
    if backend == "triton" and triton_interpreted() and support.interpreted_dtypes is not None \
            and dtype not in support.interpreted_dtypes:
        name = str(dtype).removeprefix("torch.")
        return Unsupported(TypeError, f"the Triton interpreter (TRITON_INTERPRET=1) computes {name} tl.dot wrongly: "
                                      f"run {name} {declaration.name} with backend='triton' on a GPU, or use "
                                      "backend='native' or 'reference'")
    if exceeded_limit:
        return Unsupported(ValueError, f"the {label} kernel supports {exceeded_limit} only")
    return None


def resolve(declaration: OpDeclaration, device: torch.device, dtype: torch.dtype, backend: Optional[str] = None,
            **sizes: int) -> str:
    """The backend that runs this call of the declared op (sizes: the ints its limits name): `backend` (None: not
    given; any other value must name a backend, "" included), else $UDI_KERNELS_BACKEND (empty: unset), else the
    first of the declared auto order for the device type that supports the call (the reference alone on other
    devices). Decided once per (op, device, dtype, requested backend, exceeded limits) and cached (resolution).
    Raises ValueError for an unknown name, the Unsupported error of a requested backend that cannot run the call,
    and under `auto`, when no candidate can, the last candidate's error listing every candidate's reason."""
    if backend is not None and backend not in BACKENDS:  # "" included: only None means "not given"
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return _resolve(declaration.name, device, dtype, backend, exceeded_limits(declaration, device.type, sizes))


def exceeded_limits(declaration: OpDeclaration, device_type: str, sizes: dict) -> str:
    """The declared limits these sizes exceed, one "backend=name <= limit (got value)" line each ("" for none): a
    string, so that torch.compile takes it as a constant of _resolve (the sizes may be symbolic; the comparisons
    become guards)."""
    return "\n".join(f"{backend}={exceeded}" for backend in declaration.support
                     if (exceeded := size_limit_exceeded(declaration, backend, device_type, **sizes)))


@torch.compiler.assume_constant_result  # the dispatcher query inside is not traceable
def _resolve(op: str, device: torch.device, dtype: torch.dtype, backend: Optional[str], exceeded: str) -> str:
    requested = backend or os.environ.get(ENV_VAR) or "auto"  # an empty $UDI_KERNELS_BACKEND counts as unset
    return resolution(op, device, dtype, requested, exceeded, triton_interpreted())


@functools.lru_cache(maxsize=4096)
def resolution(op: str, device: torch.device, dtype: torch.dtype, requested: str, exceeded: str,
               interpreted: bool) -> str:
    """resolve's answer for one key (interpreted: TRITON_INTERPRET=1, which decides what Triton runs); raises
    without caching. The environment and the build it reads are fixed for a process; a test that changes what
    why_unavailable answers clears the cache (resolution.cache_clear())."""
    if requested not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS} (or empty: unset), got {requested!r}")
    declaration = DECLARATIONS[op]
    limits = dict(line.split("=", 1) for line in exceeded.split("\n") if line)
    candidates = (requested,) if requested != "auto" else declaration.auto_order.get(device.type, ("reference",))
    reasons = {}
    for candidate in candidates:
        unsupported = why_unsupported(declaration, candidate, device, dtype, limits.get(candidate, ""))
        if unsupported is None:
            return candidate
        reasons[candidate] = unsupported.reason
    if requested != "auto":
        raise unsupported.error(f"backend {requested!r} cannot run {op} on {device}: {unsupported.reason}")
    raise unsupported.error(f"no backend can run {op} on {device} (auto tried {', '.join(candidates)}): "
                            + "; ".join(f"backend {name!r}: {reason}" for name, reason in reasons.items()))
