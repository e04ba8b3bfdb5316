"""What each op's backends support and which one `auto` takes: the one place that says so.

udi_kernels.backends reads these declarations to resolve a backend and to say why one cannot run a call; the ops
and the tests read them too. A declaration names, per backend, the device types and input dtypes it takes (also
under the Triton interpreter, which gets bfloat16 dots wrong) and its size limits, and per (device type, shape
class) the order `auto` tries, fastest first, with the measurements that order rests on (benchmarks/results/).
The reference backend runs everything, on every device.

The idea follows xformers' per-operator declarations (ops/fmha/common.py: SUPPORTED_DEVICES, SUPPORTED_DTYPES,
SUPPORTED_MAX_K, not_supported_reasons); the code is our own.
"""
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch

HALF_AND_FLOAT = frozenset({torch.float16, torch.bfloat16, torch.float32})
FLOATING = HALF_AND_FLOAT | {torch.float64}
BOXES = frozenset({torch.float32})
ANY_DEVICE = ("*",)  # the device-type key that stands for every device type
KERNEL_DEVICES = ("cpu", "cuda")  # Triton runs CPU tensors under TRITON_INTERPRET=1 only (backends.why_unavailable)


@dataclass(frozen=True)
class BackendSupport:
    """What one backend of an op takes. dtypes: per device type ("*": any); interpreted_dtypes: under TRITON_INTERPRET=1
    (None: as on the GPU); max_sizes: per device type, named sizes (see the op's `sizes`) and their largest supported
    value."""
    dtypes: Mapping[str, frozenset]
    interpreted_dtypes: Optional[frozenset] = None
    max_sizes: Mapping[str, Mapping[str, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class OpDeclaration:
    """An op's backends, the dtype its dispatch is decided on, and `auto`'s order per (device type, shape class).

    shape_class maps the op's sizes (keyword ints) to a class name of auto_order; measured cites the numbers."""
    name: str
    support: Mapping[str, BackendSupport]
    auto_order: Mapping[tuple, tuple]
    measured: str
    shape_class: Callable[..., str] = lambda **sizes: "any"


def _on(devices, dtypes):
    return {device: frozenset(dtypes) for device in devices}


def _backends(reference: frozenset, native: Mapping, triton: frozenset, native_max_sizes: Optional[Mapping] = None,
              triton_interpreted: Optional[frozenset] = None) -> dict:
    """The support of the three backends: the reference's dtypes on any device, the native kernels' per device
    type, Triton's on CPU (interpreter) and CUDA tensors."""
    return {"native": BackendSupport(native, max_sizes=native_max_sizes or {}),
            "triton": BackendSupport(_on(KERNEL_DEVICES, triton), interpreted_dtypes=triton_interpreted),
            "reference": BackendSupport(_on(ANY_DEVICE, reference))}


def _one_shape_class(cuda: tuple, cpu: tuple) -> dict:
    """The auto order of an op whose speed ranking does not depend on the shape."""
    return {("cuda", "any"): cuda, ("cpu", "any"): cpu}


def attention_shape_class(num_samples: int, head_dim: int = 0) -> str:
    """Student crops ask 16 or 9 queries; the teacher's global crops answer 16 + L*9 at once."""
    return "few_queries" if num_samples <= 32 else "many_queries"


STRATIFIED_SAMPLE = OpDeclaration(
    name="stratified_sample",
    support=_backends(reference=BOXES, native=_on(KERNEL_DEVICES, BOXES), triton=BOXES),
    auto_order=_one_shape_class(cuda=("triton", "native", "reference"), cpu=("native", "reference")),
    measured="cuda: H100, B = 128 images, L = 10 (benchmarks/results/stratified_sample_gpu.json, 2026-11-26): "
             "Triton 10.7 us, CUDA 19.7 us, bit-identical. "
             "cpu: 2-core x86_64 shared with other jobs (load ~2.5), B = 128, L = 10, per image, unchecked "
             "(benchmarks/results/stratified_sample_cpu.json, 2026-11-30): native 9.8 us, reference 906 us.",
)

SRS_ATTENTION = OpDeclaration(
    name="srs_attention",
    support=_backends(reference=FLOATING, native={"cpu": FLOATING, "cuda": HALF_AND_FLOAT}, triton=HALF_AND_FLOAT,
                      native_max_sizes={"cuda": {"head_dim": 512}},  # kMaxDim, csrc/cuda/srs_attention.cu
                      triton_interpreted=frozenset({torch.float16, torch.float32})),
    auto_order={("cuda", "few_queries"): ("triton", "native", "reference"),
                ("cuda", "many_queries"): ("triton", "native", "reference"),
                ("cpu", "few_queries"): ("reference", "native"),  # the CPU kernel: one sample at a time,
                ("cpu", "many_queries"): ("reference", "native")},  # scalar loops; eager BLAS beats it
    measured="cuda: H100, fp16, B = 128 (benchmarks/results/srs_attention_gpu.json, 2026-11-26): few_queries "
             "(S = 16 / 9) Triton 0.044 / 0.051 ms fwd+bwd vs CUDA 0.453 / 0.491 ms; many_queries (S = 16 + 90) "
             "Triton 0.091 ms fwd vs CUDA 2.370 ms. "
             "cpu: 2-core x86_64 shared with other jobs (load ~2), fp32, B = 2, op forward summed per class "
             "(benchmarks/results/srs_attention_cpu.json, 2026-11-30): few_queries reference 3.16 ms vs native "
             "17.9 ms, many_queries 4.46 vs 28.9 ms; module fwd+bwd, student global crops: reference 15.4 ms, "
             "native 167.7 ms.",
    shape_class=attention_shape_class,
)

DISTILL_CROSS_ENTROPY = OpDeclaration(
    name="distill_cross_entropy",
    support=_backends(reference=FLOATING, native={"cpu": FLOATING, "cuda": HALF_AND_FLOAT}, triton=HALF_AND_FLOAT),
    auto_order=_one_shape_class(cuda=("native", "triton", "reference"), cpu=("native", "reference")),
    measured="cuda: not yet measured side by side; the H100 run (benchmarks/results/distill_cross_entropy_gpu.json, "
             "2026-11-26) timed auto = native only (DINO fwd+bwd 2.61 ms, UDI 13.7 ms at B = 128, K = 65536); the "
             "next GPU run records op_fwd_bwd_ms per backend and 'fastest'. "
             "cpu: 2-core x86_64 shared with other jobs (load ~4.7), fp32, DINO pairs B = 8, 12 crops, K = 2048, "
             "op fwd+bwd, median of 3 interleaved rounds (benchmarks/results/distill_cross_entropy_cpu.json, "
             "2026-11-30): native 20.9 ms, reference 240 ms.",
)

LINEAR_DISTILL_CROSS_ENTROPY = OpDeclaration(
    name="linear_distill_cross_entropy",
    support=_backends(reference=FLOATING, native={"cpu": FLOATING, "cuda": HALF_AND_FLOAT}, triton=HALF_AND_FLOAT,
                      triton_interpreted=frozenset({torch.float16, torch.float32})),
    auto_order=_one_shape_class(cuda=("native", "triton", "reference"), cpu=("native", "reference")),
    measured="not yet recorded (benchmarks/linear_distill_cross_entropy.py; prediction in benchmarks/NOTES.md). "
             "cuda: native composes cuBLAS chunk GEMMs, Triton is untimed. cpu: the native kernel's BLAS chunk "
             "GEMMs and vectorised row loops against the chunked eager reference.",
)

DECLARATIONS = {d.name: d for d in (STRATIFIED_SAMPLE, SRS_ATTENTION, DISTILL_CROSS_ENTROPY,
                                    LINEAR_DISTILL_CROSS_ENTROPY)}
