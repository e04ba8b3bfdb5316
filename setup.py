"""Build udi_kernels._C: C++ CPU kernels always, CUDA kernels when a toolkit and a CUDA torch exist.

Environment:
  UDI_KERNELS_CUDA=1   build the CUDA kernels or fail (CI uses this)
  UDI_KERNELS_CUDA=0   skip them
  (unset)              build them when possible, otherwise say why once and go on without
  UDI_KERNELS_CPU_ISA  the instruction set of the CPU kernels (at::vec vectorises with it): "avx512", "avx2"
                       (AVX2 + FMA + F16C) or "default" (portable, not vectorised by at::vec); unset: the widest
                       the building CPU runs (udi_kernels/cpu_isa.py)
  TORCH_CUDA_ARCH_LIST architectures to compile for (default "8.0;9.0")
  CUDA_HOME            toolkit root; when unset and `nvcc` on PATH is a wrapper script that
                       execs the real compiler, the root is read from that script.

The torch version and the CPU instruction set compiled for are written to udi_kernels/_build_info.py beside the
extension; udi_kernels refuses to load an extension built for another torch, or for an instruction set this CPU
lacks (udi_kernels/_native.py). Build with
`pip install --no-build-isolation`, so that it is the installed torch.
"""
import glob
import importlib.util
import os
import platform
import re
import shutil

from setuptools import find_packages, setup


def _toolkit_behind_nvcc_wrapper():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with open(nvcc, "rb") as f:
        head = f.read(4096)
    match = re.search(rb"exec\s+(\S+)/bin/nvcc\b", head)
    return match.group(1).decode() if match else None


if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    toolkit = _toolkit_behind_nvcc_wrapper()
    if toolkit:
        os.environ["CUDA_HOME"] = toolkit
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402  (CUDA_HOME must be set before cpp_extension reads it)
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _cuda_build_decision():
    wish = os.environ.get("UDI_KERNELS_CUDA", "").strip().lower()
    if wish in ("0", "false", "no", "off"):
        return False, "UDI_KERNELS_CUDA=0"
    missing = []
    if torch.version.cuda is None:
        missing.append("torch is a CPU-only build")
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        missing.append("no CUDA toolkit found (set CUDA_HOME)")
    if missing and wish in ("1", "true", "yes", "on"):
        raise RuntimeError("UDI_KERNELS_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(missing))
    return not missing, "; ".join(missing)


CPU_ISA_FLAGS = {
    # CPU_CAPABILITY_AVX2 / _AVX512 select at::vec's Vectorized (Sleef exp from libtorch_cpu); CPU_CAPABILITY stays
    # undefined, so that these at::vec types live in a namespace of their own, apart from libtorch's
    "avx512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "default": [],
}


def _plain_module(name):
    """udi_kernels/<name>.py, loaded without importing udi_kernels (which would load the extension)."""
    spec = importlib.util.spec_from_file_location(f"udi_kernels_{name}", os.path.join("udi_kernels", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _limit_flags():
    """-DUDI_<NAME>=<value> for each limit of udi_kernels/limits.py (csrc/size_limits.h reads them)."""
    limits = vars(_plain_module("limits"))
    return [f"-DUDI_{name}={value}" for name, value in sorted(limits.items())
            if name.isupper() and isinstance(value, int)]


def _cpu_isa():
    on_x86 = platform.machine().lower() in ("x86_64", "amd64")
    isa = os.environ.get("UDI_KERNELS_CPU_ISA", "").strip().lower() or \
        (_plain_module("cpu_isa").widest_isa() if on_x86 else "default")
    if isa not in CPU_ISA_FLAGS or (isa != "default" and not on_x86):
        raise RuntimeError(f"UDI_KERNELS_CPU_ISA must be one of {sorted(CPU_ISA_FLAGS)} (x86-64 only but "
                           f"'default'), got {isa!r}")
    return isa


def _extension():
    build_cuda, why_not = _cuda_build_decision()
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    # -ffp-contract=off: no FMA contraction, so that stratified_sample's host arithmetic equals CUDA's and Triton's
    # bit for bit (csrc/host_device.h); explicit at::vec fmadd is unaffected. -fopenmp: at::parallel_for is inline
    # and runs serially where _OPENMP is undefined; libgomp resolves to the one torch has loaded (same soname)
    cxx_flags = ["-O3", "-ffp-contract=off", "-fopenmp"] + CPU_ISA_FLAGS[_cpu_isa()] + _limit_flags()
    link_flags = ["-fopenmp"]
    if not build_cuda:
        print(f"udi_kernels: building the CPU kernels only ({why_not}); CUDA tensors use Triton or the reference.")
        return CppExtension("udi_kernels._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
                            extra_link_args=link_flags)
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + _limit_flags()
    return CUDAExtension(
        "udi_kernels._C",
        cpp_sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


class BuildExtensionRecordingTorch(BuildExtension):
    """BuildExtension that also writes udi_kernels/_build_info.py (TORCH_VERSION) where the extension goes: the
    source tree for in-place and editable builds, the build directory (hence the wheel) otherwise."""

    def run(self):
        super().run()
        path = os.path.join(os.path.dirname(self.get_ext_fullpath("udi_kernels._C")), "_build_info.py")
        with open(path, "w") as f:
            f.write(f'"""Written by setup.py: the torch that udi_kernels._C was compiled against, and the CPU '
                    f'instruction set of its CPU kernels."""\n'
                    f'TORCH_VERSION = "{torch.__version__}"\n'
                    f'CPU_ISA = "{_cpu_isa()}"\n')


setup(
    packages=find_packages(include=["udi_kernels*", "udi*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtensionRecordingTorch},
)
