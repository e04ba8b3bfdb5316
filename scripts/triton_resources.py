"""Compiles the srs_attention Triton kernels for an H100 (sm_90) without a GPU and reports what each block needs:
registers, register spills and shared memory, as ptxas and Triton see them. The tile sizes come from the same
block_sizes / launch_options the wrappers launch with.

    python scripts/triton_resources.py [--check]

--check exits 1 when a kernel spills more than MAX_SPILL_BYTES per thread or needs more shared memory than an
H100 has (tests/test_srs_attention.py runs it; not under TRITON_INTERPRET, which replaces the kernels).
"""
import glob
import os
import re
import subprocess
import sys
import tempfile
from typing import NamedTuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, when not installed
from udi_kernels.triton_kernels import srs_attention as forward  # noqa: E402
from udi_kernels.triton_kernels import srs_attention_backward as backward  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
H100_SHARED_BYTES = 227 * 1024
MAX_SPILL_BYTES = 0  # no kernel spills (key_grad reads the tapped queries that query_grad saves)
# (name, N keys, NQ rows of q, S samples, D): the student global crop per head, and SRSAttention attending over h
# (6 heads x 16 samples as the rows of one head of width D = C, identity taps)
SHAPES = [("heads D=64", 196, 196, 16, 64), ("over h D=384", 196, 96, 96, 384)]
FLOAT_ARGS = {"scale", "scale_mantissa"}
POINTERS = dict(q="*fp16", k="*fp16", v="*fp16", index="*i32", weight="*fp32", out="*fp16", lse="*fp32",
                grad_out="*fp16", dq_s="*fp32", delta="*fp32", dq="*fp16", dk="*fp16", dv="*fp16", q_op="*fp16",
                row_exp="*i32")


class Resources(NamedTuple):
    registers: int
    spill_bytes: int
    shared_bytes: int


def ptxas() -> str:
    found = glob.glob(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))
    if not found:
        raise FileNotFoundError("triton's bundled ptxas was not found")
    return found[0]


def compile_for_h100(kernel, constexprs: dict, options: dict) -> Resources:
    signature = {name: "constexpr" if name in constexprs else POINTERS.get(name)
                 or ("fp32" if name in FLOAT_ARGS else "i32") for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=TARGET,
                              options=options)
    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([ptxas(), "--gpu-name", "sm_90a", "-v", ptx, "-o", os.path.join(folder, "k.cubin")],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return Resources(registers, spills, compiled.metadata.shared)


def srs_attention_kernels(N: int, NQ: int, S: int, D: int):
    """(name, kernel, constexprs, options) of every kernel the srs_attention wrappers launch for this shape."""
    BLOCK_S, BLOCK_N, BLOCK_D = forward.block_sizes(S, N, D)
    options = forward.launch_options(BLOCK_D)
    blocks = dict(BLOCK_S=BLOCK_S, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    dots = dict(blocks, PRECISION="tf32")
    rows = dict(BLOCK_S=BLOCK_S, BLOCK_R=forward.block_sizes(S, NQ, D)[1], BLOCK_D=BLOCK_D)
    return [("forward", forward._forward_kernel, dots, options),
            ("query_grad", backward._query_grad_kernel, dots, options),
            ("key_grad", backward._key_grad_kernel, dots, options),
            ("token_grad", backward._token_grad_kernel, rows, options)]


def main():
    print(f"{'shape':>14} {'kernel':>11} {'registers':>9} {'spill B':>8} {'shared B':>9}")
    too_big = []
    for shape, *sizes in SHAPES:
        for name, kernel, constexprs, options in srs_attention_kernels(*sizes):
            r = compile_for_h100(kernel, constexprs, options)
            print(f"{shape:>14} {name:>11} {r.registers:>9} {r.spill_bytes:>8} {r.shared_bytes:>9}")
            if r.spill_bytes > MAX_SPILL_BYTES or r.shared_bytes > H100_SHARED_BYTES:
                too_big.append(f"{name} ({shape})")
    if too_big and "--check" in sys.argv[1:]:
        raise SystemExit(f"over the limits (spills > {MAX_SPILL_BYTES} B or shared > {H100_SHARED_BYTES} B): "
                         + ", ".join(too_big))


if __name__ == "__main__":
    main()
