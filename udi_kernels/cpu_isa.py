"""The x86-64 instruction sets the CPU kernels can be built for (setup.py, UDI_KERNELS_CPU_ISA) and whether this CPU
runs them. Imports nothing from torch or udi_kernels: setup.py loads this file on its own."""
from typing import Optional

# what each build executes (the compiler flags are setup.py's CPU_ISA_FLAGS), widest first
REQUIRED_CPU_FLAGS = {"avx512": frozenset({"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx2", "fma", "f16c"}),
                      "avx2": frozenset({"avx2", "fma", "f16c"}),
                      "default": frozenset()}


def cpu_flags() -> Optional[frozenset]:
    """The flags of the first CPU in /proc/cpuinfo, or None where that cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def runs(isa: str) -> Optional[bool]:
    """Whether this CPU runs a build for `isa`; None when its flags cannot be read."""
    flags = cpu_flags()
    return None if flags is None else REQUIRED_CPU_FLAGS[isa] <= flags


def widest_isa() -> str:
    """The widest instruction set this CPU runs ("default" when its flags cannot be read)."""
    return next((isa for isa in REQUIRED_CPU_FLAGS if runs(isa)), "default")
