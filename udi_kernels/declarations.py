"""What each op's backends support and which one `auto` takes: the one place that says so.

udi_kernels.backends reads these declarations to resolve a backend and to say why one cannot run a call; the ops
and the tests read them too. A declaration names, per backend, the device types and input dtypes it takes (also
under the Triton interpreter, which gets bfloat16 dots wrong) and its size limits, and per device type the order
`auto` tries, fastest first, with the recorded run that order rests on (a file of benchmarks/results/, written by
`python -m benchmarks.<op> --record`; tests/test_declarations.py checks that the CPU orders start with the `fastest`
backend of those files).
The reference backend runs everything, on every device.

Repeatability: every backend (auto included) gives bitwise identical results run after run at a fixed thread count
(torch.get_num_threads()); BackendSupport.across_thread_counts says whether they also hold from one thread count to
another (tests/test_hardening_determinism.py checks 1 and 2 threads on the CPU backends).

The idea follows xformers' per-operator declarations (ops/fmha/common.py: SUPPORTED_DEVICES, SUPPORTED_DTYPES,
SUPPORTED_MAX_K, not_supported_reasons); the code is our own.
"""
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

from . import dtypes
from .limits import SRS_ATTENTION_CUDA_MAX_HEAD_DIM

HALF_AND_FLOAT = frozenset(dtypes.HALF_AND_FLOAT)
FLOATING = frozenset(dtypes.FLOATING)
BOXES = frozenset({torch.float32})
ANY_DEVICE = ("*",)  # the device-type key that stands for every device type
KERNEL_DEVICES = ("cpu", "cuda")  # Triton runs CPU tensors under TRITON_INTERPRET=1 only (backends.why_unavailable)


@dataclass(frozen=True)
class BackendSupport:
    """What one backend of an op takes. dtypes: per device type ("*": any); interpreted_dtypes: under TRITON_INTERPRET=1
    (None: as on the GPU); max_sizes: per device type, named sizes (see the op's `sizes`) and their largest supported
    value; not_on: device types the backend deliberately has no kernel for, with the reason (the error says it);
    across_thread_counts: None when results are the same bits at every thread count, else why not (they still
    repeat bit for bit at a fixed one)."""
    dtypes: Mapping[str, frozenset]
    interpreted_dtypes: Optional[frozenset] = None
    max_sizes: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    not_on: Mapping[str, str] = field(default_factory=dict)
    across_thread_counts: Optional[str] = None


@dataclass(frozen=True)
class OpDeclaration:
    """An op's backends and `auto`'s order per device type, fastest first; measured names, per device type, the
    recorded run (a file in benchmarks/results/) that order rests on. No recorded run has ranked the backends of
    an op differently by shape, so the order depends on the device type alone (sizes only meet max_sizes)."""
    name: str
    support: Mapping[str, BackendSupport]
    auto_order: Mapping[str, tuple]
    measured: Mapping[str, str]


def _on(devices, dtypes):
    return {device: frozenset(dtypes) for device in devices}


def _backends(reference: frozenset, native: Mapping, triton: frozenset, native_max_sizes: Optional[Mapping] = None,
              triton_max_sizes: Optional[Mapping] = None, triton_interpreted: Optional[frozenset] = None,
              native_not_on: Optional[Mapping] = None,
              across_thread_counts: Optional[Mapping] = None) -> dict:
    """The support of the three backends: the reference's dtypes on any device, the native kernels' per device
    type, Triton's on CPU (interpreter) and CUDA tensors. across_thread_counts: per backend, why its results differ
    from one thread count to another (absent: they do not; the row kernels split their sums the same way at every
    thread count, fixed chunks and no atomics)."""
    why = across_thread_counts or {}
    return {"native": BackendSupport(native, max_sizes=native_max_sizes or {}, not_on=native_not_on or {},
                                     across_thread_counts=why.get("native")),
            "triton": BackendSupport(_on(KERNEL_DEVICES, triton), max_sizes=triton_max_sizes or {},
                                     interpreted_dtypes=triton_interpreted, across_thread_counts=why.get("triton")),
            "reference": BackendSupport(_on(ANY_DEVICE, reference), across_thread_counts=why.get("reference"))}


def _recorded(op: str) -> dict:
    """The recorded runs of `op` (benchmarks/results/<op>_<gpu|cpu>.json) its auto orders rest on."""
    return {"cuda": f"{op}_gpu.json", "cpu": f"{op}_cpu.json"}


TRITON_MAX_BLOCK = 2 ** 20  # Triton's largest tensor (elements): the Triton sampler holds a crop's samples in one

STRATIFIED_SAMPLE = OpDeclaration(
    name="stratified_sample",
    support=_backends(reference=BOXES, native=_on(KERNEL_DEVICES, BOXES), triton=BOXES,
                      triton_max_sizes={device: {"samples_per_crop": TRITON_MAX_BLOCK} for device in KERNEL_DEVICES}),
    auto_order=dict(cuda=("triton", "native", "reference"), cpu=("native", "reference")),
    measured=_recorded("stratified_sample"),
)

SRS_ATTENTION = OpDeclaration(
    name="srs_attention",
    support=_backends(reference=FLOATING, native={"cuda": HALF_AND_FLOAT}, triton=HALF_AND_FLOAT,
                      native_max_sizes={"cuda": {"head_dim": SRS_ATTENTION_CUDA_MAX_HEAD_DIM}},
                      triton_interpreted=frozenset({torch.float16, torch.float32}),
                      native_not_on={"cpu": "there is no CPU kernel: the eager reference (gathered queries, BLAS "
                                            "matmuls, softmax) was faster than the one there was "
                                            "(benchmarks/NOTES.md, srs_attention on the CPU); use backend='reference'"},
                      across_thread_counts={"reference": "the gradients' BLAS matmuls (MKL) and the scatter of dq "
                                                         "split their sums by thread count: dq, dk differ in the "
                                                         "last bits between 1 and 2 threads (out does not)"}),
    auto_order=dict(cuda=("triton", "native", "reference"), cpu=("reference",)),
    measured=_recorded("srs_attention"),
)

DISTILL_CROSS_ENTROPY = OpDeclaration(
    name="distill_cross_entropy",
    support=_backends(reference=FLOATING, native={"cpu": FLOATING, "cuda": HALF_AND_FLOAT}, triton=HALF_AND_FLOAT),
    # cuda: the recorded H100 run timed auto = native only; the next GPU run records op_fwd_bwd_ms per backend
    auto_order=dict(cuda=("native", "triton", "reference"), cpu=("native", "reference")),
    measured=_recorded("distill_cross_entropy"),
)

LINEAR_DISTILL_CROSS_ENTROPY = OpDeclaration(
    name="linear_distill_cross_entropy",
    support=_backends(reference=FLOATING, native={"cpu": FLOATING, "cuda": HALF_AND_FLOAT}, triton=HALF_AND_FLOAT,
                      triton_interpreted=frozenset({torch.float16, torch.float32}),
                      across_thread_counts={
                          "reference": "the logits' and gradients' BLAS matmuls split their sums by thread count at "
                                       "some shapes: the gradients differ in the last bits between 1 and 2 threads",
                          "native": "its chunk GEMMs on the CPU are BLAS matmuls (at::mm), which split their sums by "
                                    "thread count at some shapes: the gradients differ in the last bits between 1 "
                                    "and 2 threads (the row kernels do not)",
                          "triton": "under the interpreter (CPU tensors) tl.dot is numpy's BLAS matmul, which splits "
                                    "its sums by thread count: grad student differs in the last bits between 1 and 2 "
                                    "threads (on CUDA the tiles fix the order)"}),
    auto_order=dict(cuda=("native", "triton", "reference"), cpu=("native", "reference")),
    measured=_recorded("linear_distill_cross_entropy"),  # cuda not yet recorded: tests/test_declarations.py PENDING
)

DECLARATIONS = {d.name: d for d in (STRATIFIED_SAMPLE, SRS_ATTENTION, DISTILL_CROSS_ENTROPY,
                                    LINEAR_DISTILL_CROSS_ENTROPY)}
