"""udi_kernels/declarations.py read by backends.resolve: `auto` takes the first declared backend that supports a call,
an explicit backend that cannot run a call raises saying why, and the CPU order follows the recorded measurements.
CUDA cases are resolved with every backend made available (no GPU needed: resolve decides before any kernel runs)."""
import json
import os

import pytest
import torch

from udi_kernels import backends
from udi_kernels.declarations import DECLARATIONS, DISTILL_CROSS_ENTROPY, SRS_ATTENTION, STRATIFIED_SAMPLE

CUDA = torch.device("cuda")
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")


@pytest.fixture
def everything_built(monkeypatch):
    """Every backend available on every device, as on a GPU machine with the CUDA build and Triton; the cached
    resolutions are dropped before and after (they rest on why_unavailable)."""
    monkeypatch.setattr(backends, "why_unavailable", lambda backend, op, device: None)
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    backends.resolution.cache_clear()
    yield
    backends.resolution.cache_clear()


@pytest.mark.parametrize("declaration", DECLARATIONS.values(), ids=DECLARATIONS)
def test_auto_orders_name_declared_backends_only(declaration):
    for device, order in declaration.auto_order.items():
        assert order and len(set(order)) == len(order)
        for backend in order:
            dtypes = declaration.support[backend].dtypes
            assert device in dtypes or "*" in dtypes, (backend, device)
    assert declaration.measured


def test_float64_distill_on_cuda_under_auto_skips_the_native_kernel(everything_built):
    """The CUDA kernel refuses float64 (csrc/cuda/distill_cross_entropy.cu): auto must not pick it."""
    assert backends.resolve(DISTILL_CROSS_ENTROPY, CUDA, torch.float32) == "native"
    assert backends.resolve(DISTILL_CROSS_ENTROPY, CUDA, torch.float64) == "reference"
    with pytest.raises(TypeError, match="native backend supports bfloat16, float16, float32 inputs on cuda"):
        backends.resolve(DISTILL_CROSS_ENTROPY, CUDA, torch.float64, "native")


def test_wide_heads_on_cuda_skip_the_native_kernel(everything_built, monkeypatch):
    """The CUDA attention kernel is instantiated for D <= 512 only."""
    assert backends.resolve(SRS_ATTENTION, CUDA, torch.float16, "native", head_dim=512) == "native"
    with pytest.raises(ValueError, match=r"head_dim <= 512 \(got 640\)"):
        backends.resolve(SRS_ATTENTION, CUDA, torch.float16, "native", head_dim=640)
    monkeypatch.setattr(backends, "why_unavailable", lambda backend, op, device: "off" if backend == "triton" else None)
    backends.resolution.cache_clear()
    assert backends.resolve(SRS_ATTENTION, CUDA, torch.float16, head_dim=640) == "reference"
    assert backends.resolve(SRS_ATTENTION, CUDA, torch.float16, head_dim=64) == "native"


def test_the_device_type_picks_the_order(everything_built):
    assert backends.resolve(SRS_ATTENTION, CUDA, torch.float16, head_dim=64) == "triton"
    assert backends.resolve(STRATIFIED_SAMPLE, CUDA, torch.float32) == "triton"
    assert backends.resolve(SRS_ATTENTION, torch.device("cpu"), torch.float16, head_dim=64) == "reference"
    assert backends.resolve(SRS_ATTENTION, torch.device("meta"), torch.float16) == "reference"


def test_resolution_is_cached_per_key(everything_built, monkeypatch):
    """resolve decides once per (op, device, dtype, requested backend, exceeded limits): a repeated call asks no
    declaration, a new dtype or an exceeded limit is a new key."""
    asked = []
    why = backends.why_unsupported
    monkeypatch.setattr(backends, "why_unsupported", lambda *args: asked.append(args[1:4]) or why(*args))
    for _ in range(3):
        assert backends.resolve(SRS_ATTENTION, CUDA, torch.float16, head_dim=64) == "triton"
        assert backends.resolve(SRS_ATTENTION, CUDA, torch.float16, head_dim=128) == "triton"  # no limit exceeded
    assert asked == [("triton", CUDA, torch.float16)]
    backends.resolve(SRS_ATTENTION, CUDA, torch.float32, head_dim=64)
    assert backends.resolve(SRS_ATTENTION, CUDA, torch.float16, "native", head_dim=512) == "native"
    with pytest.raises(ValueError, match=r"head_dim <= 512 \(got 640\)"):
        backends.resolve(SRS_ATTENTION, CUDA, torch.float16, "native", head_dim=640)
    assert asked[1:] == [("triton", CUDA, torch.float32)] + [("native", CUDA, torch.float16)] * 2
    assert backends.resolution.cache_info().hits == 5


def test_auto_without_a_backend_lists_every_candidates_reason(monkeypatch):
    """When no backend of the auto order can run a call, the error names each candidate and why it cannot."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "why_unavailable", lambda backend, op, device: f"{backend} is off here"
                        if backend != "reference" else None)
    backends.resolution.cache_clear()
    try:
        with pytest.raises(TypeError) as raised:
            backends.resolve(STRATIFIED_SAMPLE, CUDA, torch.float64)
    finally:
        backends.resolution.cache_clear()
    message = str(raised.value)
    assert message.startswith("no backend can run stratified_sample on cuda (auto tried triton, native, reference)")
    for reason in ("backend 'triton': triton is off here", "backend 'native': native is off here",
                   "backend 'reference': the reference backend supports float32 inputs on cuda tensors, got "
                   "torch.float64"):
        assert reason in message


def test_explicit_unsupported_backends_say_why(everything_built, monkeypatch):
    with pytest.raises(TypeError, match="Triton backend supports bfloat16, float16, float32 .* got torch.float64"):
        backends.resolve(SRS_ATTENTION, CUDA, torch.float64, "triton", head_dim=64)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TypeError, match="Triton interpreter .* bfloat16"):
        backends.resolve(SRS_ATTENTION, torch.device("cpu"), torch.bfloat16, "triton", head_dim=64)
    with pytest.raises(RuntimeError, match="does not run meta tensors"):
        backends.resolve(DISTILL_CROSS_ENTROPY, torch.device("meta"), torch.float32, "native")


CPU_OPS = ["srs_attention", "distill_cross_entropy", "stratified_sample"]


def cited_cpu_record(op):
    with open(os.path.join(RESULTS, DECLARATIONS[op].measured["cpu"])) as f:
        return json.load(f)


@pytest.mark.parametrize("op", CPU_OPS)
def test_cpu_auto_order_starts_with_the_measured_fastest(op):
    """The recorded CPU run the declaration cites (benchmarks/results/, written by `python -m benchmarks.<op>
    --record`) names a `fastest` backend (per shape class in runs recorded before the orders became one per device
    type), and every one of them is the first of the declared CPU order."""
    declaration, recorded = DECLARATIONS[op], cited_cpu_record(op)
    assert recorded["benchmark"] == op
    assert recorded["fastest"]
    for shape_class, fastest in recorded["fastest"].items():
        assert declaration.auto_order["cpu"][0] == fastest, (shape_class, recorded["fastest"])


@pytest.mark.parametrize("op", CPU_OPS)
def test_cited_cpu_records_hold_on_a_shared_machine(op):
    """The cited CPU run was measured the way benchmarks/common.py measures since issue 25: interleaved rounds, the
    copy ceiling, the load before and after, and not on a loaded machine."""
    name, recorded = DECLARATIONS[op].measured["cpu"], cited_cpu_record(op)
    assert recorded.get("rounds", 0) >= 3 and recorded.get("copy_gb_per_s"), \
        f"benchmarks/results/{name} predates interleaved rounds and the copy ceiling: record it again " \
        f"(python -m benchmarks.{op} --record, in a quiet window)"
    assert "load_average_1min_before" in recorded and "load_average_1min_after" in recorded
    assert recorded["loaded"] is False


# Cited runs not recorded yet, with why; an entry must go once its file exists (the test below fails until then)
PENDING = {("linear_distill_cross_entropy", "cuda"): "issue 19: needs a GPU session (scripts/gpu_check.sh)"}


@pytest.mark.parametrize("declaration", DECLARATIONS.values(), ids=DECLARATIONS)
def test_every_declared_device_cites_a_recorded_run(declaration):
    devices = set(declaration.auto_order)
    assert set(declaration.measured) == devices
    for device, name in declaration.measured.items():
        recorded = os.path.isfile(os.path.join(RESULTS, name))
        assert recorded != ((declaration.name, device) in PENDING), (name, PENDING.get((declaration.name, device)))


def test_a_backend_declared_absent_on_a_device_says_why():
    """srs_attention has no native CPU kernel on purpose: the error gives the declared reason, auto skips it."""
    cpu = torch.device("cpu")
    assert "native" not in backends.available("srs_attention", cpu)
    assert backends.resolve(SRS_ATTENTION, cpu, torch.float32, head_dim=64) == "reference"
    with pytest.raises(RuntimeError, match="no CPU kernel: the eager reference"):
        backends.resolve(SRS_ATTENTION, cpu, torch.float32, "native", head_dim=64)
