"""Loads the compiled extension udi_kernels._C, whose import registers the native kernels."""
import functools
import warnings

import torch

from . import cpu_isa

try:
    from ._build_info import TORCH_VERSION as BUILD_TORCH_VERSION  # written by setup.py
except ImportError:  # a source tree without a build
    BUILD_TORCH_VERSION = None
try:
    from ._build_info import CPU_ISA as BUILD_CPU_ISA
except ImportError:  # no build, or one from before setup.py recorded it
    BUILD_CPU_ISA = "default"
if BUILD_TORCH_VERSION not in (None, torch.__version__):
    # an extension compiled against another torch may fail to load, or load and misbehave
    raise ImportError(f"udi_kernels._C was built against torch {BUILD_TORCH_VERSION}, but torch {torch.__version__} "
                      "is installed; rebuild it against the installed torch: pip install --no-build-isolation [-e] .")


def cpu_lacks(isa: str) -> bool:
    """Whether this CPU lacks what a build for `isa` (setup.py's UDI_KERNELS_CPU_ISA) executes."""
    runs = cpu_isa.runs(isa)
    if runs is None:  # no /proc/cpuinfo: ask torch's own dispatch
        return isa != "default" and torch.backends.cpu.get_cpu_capability() not in {"avx2": ("AVX2", "AVX512"),
                                                                                    "avx512": ("AVX512",)}[isa]
    return not runs


if cpu_lacks(BUILD_CPU_ISA):  # loading it would die on the first instruction this CPU lacks
    LOAD_ERROR = ImportError(f"udi_kernels._C was built for {BUILD_CPU_ISA.upper()}, which this CPU lacks; rebuild it "
                             "here (setup.py picks what the building CPU runs) or with UDI_KERNELS_CPU_ISA=default")
else:
    try:
        from . import _C  # noqa: F401
        LOAD_ERROR = None
    except ImportError as error:  # a source tree without a build, or a broken build
        LOAD_ERROR = error


def native_loaded() -> bool:
    return LOAD_ERROR is None


@functools.cache  # the extension registers every kernel when it loads
def has_native_kernel(op: str, device_type: str) -> bool:
    """Whether udi_kernels::<op> has a compiled kernel for device_type ('cpu' or 'cuda')."""
    if not native_loaded():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"udi_kernels::{op}", device_type.upper())


def cuda_compiled() -> bool:
    """Whether this build of udi_kernels contains the CUDA kernels."""
    return has_native_kernel("stratified_sample", "cuda")


def _say_once_what_is_missing():
    if not native_loaded():
        warnings.warn(f"udi_kernels: the compiled kernels are unavailable ({LOAD_ERROR}); "
                      "using the Triton and reference paths.", stacklevel=3)
    elif torch.cuda.is_available() and not cuda_compiled():
        warnings.warn("udi_kernels: built without CUDA kernels; CUDA tensors use the Triton and reference paths.",
                      stacklevel=3)


_say_once_what_is_missing()
