"""Property-based tests (hypothesis) of every op on every CPU backend: drawn shapes (0 and 1 included), dtypes,
strides and views, index ranges and extreme values.

- valid draws: every backend against the float64 reference on the same (rounded) inputs; stratified_sample bit
  for bit against the reference and against the float64 spec (tests/test_stratified_sample.py);
- indices out of range with the value checks off: the defined behaviour (the pair / tap is skipped), compared
  with the reference on the equivalent valid input;
- invalid arguments: a TypeError / ValueError whose message names the argument.

Tolerances are relative to the largest magnitude of each expected output: the dtype's base tolerance (as in the
op's own tests) plus the rounding of the exponents, 8 · eps · max|exponent| (float32 (t - c) / τt, or the
float16 / bfloat16 dot operands of the logits), which grows with the logits' scale.
Example counts come from the hypothesis profile (tests/conftest.py: 'ci' by default, HYPOTHESIS_PROFILE=thorough
for ten times more), scaled per test by its cost (the Triton interpreter is the slow part).
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import udi_kernels
from udi_kernels.declarations import HALF_AND_FLOAT, SRS_ATTENTION
from udi_kernels.testing.inputs import random_boxes
from udi_kernels import srs_attention, stratified_sample
from udi_kernels.reference import srs_attention as attention_reference

from test_hardening import ATTENTION, DISTILL, SAMPLE, valid_equivalent
from test_stratified_sample import assert_matches_spec

# 'ci': the same examples on every run (derandomized), sized to keep the suite fast; 'thorough': ten times more,
# random. No deadline: the first Triton interpreter call of a shape is slow.
settings.register_profile("ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
EXAMPLE_FACTOR = 10 if PROFILE == "thorough" else 1

EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def examples(n: int):
    return settings(max_examples=n * EXAMPLE_FACTOR)


NATIVE_MAX_HEAD_DIM = SRS_ATTENTION.support["native"].max_sizes["cuda"]["head_dim"]


def gpu_property(cases):
    """A GPU property test over `cases` in the kernels' floating dtypes: six examples, because each new shape
    compiles Triton kernels and scripts/gpu_check.sh has a time budget."""
    def decorate(test):
        return pytest.mark.gpu(examples(6)(given(cases(dtypes=sorted(HALF_AND_FLOAT, key=str)))(test)))
    return decorate


def view_of(tensor: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values as a non-contiguous view: 'strided' (every other row of a larger tensor), 'transposed'
    (the transpose of a contiguous transpose), or the tensor itself ('contiguous')."""
    if kind == "strided":
        wide = torch.zeros(tensor.shape[0] * 2, *tensor.shape[1:], dtype=tensor.dtype)
        wide[::2] = tensor
        return wide[::2]
    if kind == "transposed" and tensor.dim() >= 2:
        return tensor.transpose(-1, -2).contiguous().transpose(-1, -2)
    return tensor


def assert_close_scaled(actual, expected, tolerance, name):
    expected = expected.double()
    error = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    bound = tolerance * max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g}"


def raises_naming(name: str):
    return pytest.raises((TypeError, ValueError), match=name)


# ---- distill_cross_entropy -----------------------------------------------------------------------------------------

INDEX_FIELDS = ("pair_student", "pair_teacher", "center_id")


@st.composite
def distill_cases(draw, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64)):
    Rs, Rt = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    K, n_c = draw(st.integers(1, 40)), draw(st.integers(1, 3))
    P = draw(st.integers(0, 6)) if Rs and Rt else 0
    dtype, scale = draw(st.sampled_from(dtypes)), draw(st.sampled_from([1e-3, 1.0, 30.0]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    index = draw(st.sampled_from([torch.int32, torch.int64]))
    weight = lambda n: torch.where(torch.rand(n, generator=g) < 0.2, 0.0, torch.rand(n, generator=g) + 0.1)
    case = dict(student=(torch.randn(Rs, K, generator=g) * scale).to(dtype),
                teacher=(torch.randn(Rt, K, generator=g) * scale).to(dtype),
                centers=torch.randn(n_c, K, generator=g).to(torch.float64 if dtype == torch.float64 else torch.float32),
                center_id=torch.randint(0, n_c, (Rt,), generator=g).to(index),
                pair_student=torch.randint(0, max(Rs, 1), (P,), generator=g).to(index),
                pair_teacher=torch.randint(0, max(Rt, 1), (P,), generator=g).to(index),
                pair_weight=weight(P), row_weight=weight(Rt))
    for name in ("student", "teacher"):
        case[name] = view_of(case[name], draw(st.sampled_from(["contiguous", "strided", "transposed"])))
    taus = draw(st.sampled_from([(0.1, 0.04), (1.0, 0.5), (0.05, 2.0)]))
    return case, taus


def distill_run(case, taus, backend, check_values=True):
    student = case["student"].detach().requires_grad_(True)
    out = udi_kernels.distill_cross_entropy(**{**case, "student": student}, tau_s=taus[0], tau_t=taus[1],
                                            backend=backend, check_values=check_values)
    grad = torch.autograd.grad(out.loss, student)[0] if student.shape[0] else torch.zeros_like(student)
    return out, grad


def distill_tolerances(case, taus):
    """(loss and center statistics, gradient) tolerances: see the module docstring."""
    dtype = case["student"].dtype
    base = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 5e-5), torch.float16: (2e-5, 2e-3),
            torch.bfloat16: (2e-5, 1e-2)}[dtype]
    exponents = [case["student"].double().abs().amax() / taus[0] if case["student"].numel() else 0.0,
                 (case["teacher"].double().abs().amax() + case["centers"].double().abs().amax()) / taus[1]
                 if case["teacher"].numel() else 0.0]
    rounding = 8 * EPS[torch.float64 if dtype == torch.float64 else torch.float32] * float(max(exponents))
    return base[0] + rounding, base[1] + rounding


def backends_for(dtype, available):
    return [b for b in available if not (b == "triton" and dtype == torch.float64)]


def check_distill_against_float64(case, taus, backend, check_values=True):
    expected_case = valid_equivalent(case) if not check_values else case
    expected, expected_grad = distill_run({k: v.double() if v.is_floating_point() else v
                                           for k, v in expected_case.items()}, taus, "reference")
    out, grad = distill_run(case, taus, backend, check_values)
    tolerance, grad_tolerance = distill_tolerances(case, taus)
    for name in ("loss", "center_sum", "center_count"):
        assert_close_scaled(getattr(out, name), getattr(expected, name), tolerance, name)
    assert_close_scaled(grad, expected_grad, grad_tolerance, "grad")
    assert grad.dtype == case["student"].dtype and grad.shape == case["student"].shape


@examples(12)
@given(distill_cases())
def test_distill_native_and_reference_match_float64(drawn):
    case, taus = drawn
    for backend in backends_for(case["student"].dtype, [b for b in DISTILL if b != "triton"]):
        check_distill_against_float64(case, taus, backend)


@pytest.mark.skipif("triton" not in DISTILL, reason="needs TRITON_INTERPRET=1")
@examples(5)
@given(distill_cases(dtypes=(torch.float32, torch.float16, torch.bfloat16)))
def test_distill_triton_matches_float64(drawn):
    check_distill_against_float64(*drawn, "triton")


@gpu_property(distill_cases)
def test_gpu_distill_kernels_match_float64(drawn):
    case, taus = drawn
    on_gpu = {name: value.cuda() for name, value in case.items()}
    for backend in ("native", "triton"):
        check_distill_against_float64(on_gpu, taus, backend)


@st.composite
def distill_cases_with_bad_indices(draw):
    case, taus = draw(distill_cases(dtypes=(torch.float32,)))
    sizes = dict(pair_student=case["student"].shape[0], pair_teacher=case["teacher"].shape[0],
                 center_id=case["centers"].shape[0])
    fields = [f for f in INDEX_FIELDS if case[f].numel()]
    if not fields:
        return case, taus, None
    field = draw(st.sampled_from(fields))
    position = draw(st.integers(0, case[field].numel() - 1))
    limit = 2**31 - 1 if case[field].dtype == torch.int32 else 2**62
    bad = draw(st.one_of(st.integers(-limit, -1), st.integers(sizes[field], limit)))
    case[field] = case[field].clone()
    case[field][position] = bad
    return case, taus, field


@examples(12)
@given(distill_cases_with_bad_indices())
def test_distill_bad_indices_raise_or_are_skipped(drawn):
    case, taus, field = drawn
    if field is not None:
        with raises_naming(f"{field} must hold indices"):
            distill_run(case, taus, "reference")
    for backend in [b for b in DISTILL if b != "triton"]:
        check_distill_against_float64(case, taus, backend, check_values=False)


DISTILL_MUTATIONS = {
    "student": [lambda t: t.int(), lambda t: t[0], lambda t: t.tolist()],
    "teacher": [lambda t: t[:, :-1] if t.shape[1] > 1 else t[:, :0], lambda t: t.to("meta"), lambda t: t.int()],
    "centers": [lambda t: t.half(), lambda t: t[:, None]],
    "center_id": [lambda t: t.float(), lambda t: t[:-1] if t.numel() else t[None]],
    "pair_teacher": [lambda t: t.float(), lambda t: torch.cat([t, t[:1]]) if t.numel() else t[None]],
    "pair_weight": [lambda t: t.long(), lambda t: t.to("meta")],
    "row_weight": [lambda t: t[None], lambda t: t.half()],
    "tau_s": [lambda t: 0.0, lambda t: math.nan, lambda t: "0.1", lambda t: torch.tensor(0.1)],
    "tau_t": [lambda t: -1.0, lambda t: math.inf],
}


@examples(20)
@given(distill_cases(dtypes=(torch.float32,)), st.sampled_from(sorted(DISTILL_MUTATIONS)), st.integers(0, 3))
def test_distill_invalid_arguments_are_named(drawn, name, which):
    case, taus = drawn
    arguments = {**case, "tau_s": taus[0], "tau_t": taus[1]}
    mutations = DISTILL_MUTATIONS[name]
    arguments[name] = mutations[which % len(mutations)](arguments[name])
    named = {"student": "student|share the last dimension", "teacher": "teacher|share the last dimension",
             "centers": "centers|share the last dimension"}.get(name, name)
    with raises_naming(named):
        udi_kernels.distill_cross_entropy(**arguments)


# ---- srs_attention -------------------------------------------------------------------------------------------------

@st.composite
def attention_cases(draw, dtypes=(torch.float32, torch.float64, torch.float16, torch.bfloat16), min_rows=1):
    """q, k, v, index, weight, scale; q has Nq >= min_rows rows (Nq = 0: every tap out of range)."""
    B, H, N, D = draw(st.integers(0, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 24)), draw(st.integers(1, 40))
    Nq = draw(st.sampled_from([N, draw(st.integers(min_rows, 24))]))
    S, T = draw(st.integers(0, 10)), draw(st.integers(1, 4))
    dtype, value_scale = draw(st.sampled_from(dtypes)), draw(st.sampled_from([1e-2, 1.0, 6.0]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    q = (torch.randn(B, H, Nq, D, generator=g) * value_scale).to(dtype)
    k, v = ((torch.randn(B, H, N, D, generator=g) * value_scale).to(dtype) for _ in range(2))
    index = torch.randint(0, max(Nq, 1), (B, S, T), generator=g).to(draw(st.sampled_from([torch.int32, torch.int64])))
    weight = None
    if draw(st.booleans()):
        weight = torch.rand(B, S, T, generator=g) + 0.05
        weight[:, ::3] = 0  # padding samples
        weight = weight.to(draw(st.sampled_from([torch.float32, torch.float64])))
    q, k = (view_of(t, draw(st.sampled_from(["contiguous", "strided", "transposed"]))) for t in (q, k))
    scale = draw(st.sampled_from([None, 0.05, 1.0, 3.0]))
    return q, k, v, index, weight, scale


def attention_run(q, k, v, index, weight, scale, backend, check_taps=True):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = srs_attention(q, k, v, index, weight, scale, backend=backend, check_taps=check_taps)
    grad_out = torch.linspace(-1, 1, out.numel(), dtype=torch.float64, device=out.device).reshape(out.shape)
    grad_out = grad_out.to(out.dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out) if out.numel() else [torch.zeros_like(t) for t in (q, k, v)]
    return (out, *grads)


def attention_tolerance(q, k, index, weight, scale):
    """Base tolerance of the dtype plus 8 · eps(dot operands) · max|logit| (the logits' own rounding; float16 /
    bfloat16 dots round q_s to the input dtype)."""
    base = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[q.dtype]
    scale = attention_reference.default_scale(q.shape[-1]) if scale is None else scale
    weight = torch.ones(index.shape, dtype=torch.float64, device=index.device) if weight is None else weight.double()
    q_s = attention_reference.tapped_queries(q.double(), index, weight)
    logits = q_s @ k.double().transpose(-1, -2) * scale
    return base + 8 * EPS[q.dtype] * (logits.abs().max().item() if logits.numel() else 0.0)


def check_attention_against_float64(q, k, v, index, weight, scale, backend, check_taps=True):
    inside = (index >= 0) & (index < q.shape[2])
    ones = torch.ones(index.shape, dtype=torch.float64, device=index.device)
    kept = torch.where(inside, ones if weight is None else weight.double(), 0)
    expected = attention_run(q.double(), k.double(), v.double(), torch.where(inside, index, 0), kept, scale,
                             "reference", check_taps=False)  # Nq = 0: index 0 lies outside q too
    actual = attention_run(q, k, v, index, weight, scale, backend, check_taps)
    tolerance = attention_tolerance(q, k, index, weight, scale)
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert a.dtype == q.dtype and a.shape == e.shape, name
        assert_close_scaled(a, e, tolerance * (1 if name == "out" else 4), name)


@examples(15)
@given(attention_cases())
def test_attention_cpu_backends_match_float64(drawn):
    for backend in [b for b in ATTENTION if b != "triton"]:
        check_attention_against_float64(*drawn, backend)


@pytest.mark.skipif("triton" not in ATTENTION, reason="needs TRITON_INTERPRET=1")
@examples(8)
@given(attention_cases(dtypes=(torch.float32, torch.float16)))  # bfloat16 is refused by the interpreter
def test_attention_triton_matches_float64(drawn):
    check_attention_against_float64(*drawn, "triton")


@gpu_property(attention_cases)
def test_gpu_attention_kernels_match_float64(drawn):
    on_gpu = [t.cuda() if isinstance(t, torch.Tensor) else t for t in drawn]
    for backend in ("native", "triton"):
        if backend == "triton" or on_gpu[0].shape[-1] <= NATIVE_MAX_HEAD_DIM:
            check_attention_against_float64(*on_gpu, backend)


@st.composite
def attention_cases_with_bad_taps(draw):
    q, k, v, index, weight, scale = draw(attention_cases(dtypes=(torch.float32,), min_rows=0))
    if index.numel():
        index = index.clone()
        limit = 2**31 - 1
        bad = draw(st.one_of(st.integers(-limit - 1, -1), st.integers(q.shape[2], limit)))
        index.view(-1)[draw(st.integers(0, index.numel() - 1))] = bad
    return q, k, v, index, weight, scale


@examples(12)
@given(attention_cases_with_bad_taps())
def test_attention_bad_taps_raise_or_are_skipped(drawn):
    q, k, v, index, weight, scale = drawn
    bad = bool(((index < 0) | (index >= q.shape[2])).any())
    for backend in [b for b in ATTENTION if b != "triton"]:
        if bad:
            with raises_naming("index must lie in"):
                srs_attention(q, k, v, index, weight, scale, backend=backend)
        check_attention_against_float64(q, k, v, index, weight, scale, backend, check_taps=False)


ATTENTION_MUTATIONS = {
    "q": [lambda t: t[0], lambda t: t.int(), lambda t: t.tolist()],
    "k": [lambda t: torch.cat([t, t], dim=1), lambda t: t.to("meta"), lambda t: t[..., :0]],
    "v": [lambda t: t.double() if t.dtype != torch.float64 else t.float(), lambda t: t[:, :, :, None]],
    "index": [lambda t: t.float(), lambda t: t[..., :0], lambda t: t[None]],
    "weight": [lambda t: torch.ones(t.shape[0] + 1, *t.shape[1:]), lambda t: torch.ones(t.shape, dtype=torch.int32)],
    "scale": [lambda s: math.nan, lambda s: "1"],
}


@examples(20)
@given(attention_cases(dtypes=(torch.float32,)), st.sampled_from(sorted(ATTENTION_MUTATIONS)), st.integers(0, 2))
def test_attention_invalid_arguments_are_named(drawn, name, which):
    arguments = dict(zip(("q", "k", "v", "index", "weight", "scale"), drawn))
    if name == "weight" and arguments["weight"] is None:
        arguments["weight"] = torch.ones(arguments["index"].shape)
    mutations = ATTENTION_MUTATIONS[name]
    arguments[name] = mutations[which % len(mutations)](arguments[name])
    named = {"q": "q must|k must", "v": "v must|k must"}.get(name, name)
    with raises_naming(named):
        srs_attention(**arguments)


# ---- stratified_sample --------------------------------------------------------------------------------------------

@st.composite
def sample_cases(draw):
    B, L = draw(st.sampled_from([1, 2, 3, 0])), draw(st.integers(0, 3))
    boxes = random_boxes(B, L, torch.Generator().manual_seed(draw(st.integers(0, 2**31))), flip_i=draw(st.booleans()))
    global_grid = draw(st.integers(2, 20))
    local_grid = draw(st.integers(2, 12))
    grids = dict(global_grid=global_grid, global_window=draw(st.integers(1, global_grid)), local_grid=local_grid,
                 local_window=draw(st.integers(1, local_grid)), target_grid=draw(st.integers(2, 20)))
    seed = draw(st.one_of(st.integers(-2**31, 2**31 - 1), st.integers(-2**63, 2**63 - 1)))
    offset = draw(st.one_of(st.integers(0, 2**31 - 1), st.integers(2**31, 2**32 - 1)))  # both int32 halves
    return boxes, grids, seed, offset


@examples(10)
@given(sample_cases())
def test_sample_backends_agree_bit_for_bit_and_match_the_spec(drawn):
    boxes, grids, seed, offset = drawn
    expected = stratified_sample(boxes, seed=seed, offset=offset, backend="reference", **grids)
    for backend in SAMPLE:
        got = stratified_sample(boxes, seed=seed, offset=offset, backend=backend, **grids)
        for a, e in zip([*got.globals, *got.locals], [*expected.globals, *expected.locals]):
            assert a.dtype == e.dtype and torch.equal(a, e), backend
    assert_matches_spec(expected, boxes, seed, offset, **grids)


@pytest.mark.gpu
@examples(6)  # each new shape compiles Triton kernels: keep scripts/gpu_check.sh in its budget
@given(sample_cases())
def test_gpu_sample_backends_agree_bit_for_bit(drawn):
    boxes, grids, seed, offset = drawn
    expected = stratified_sample(boxes, seed=seed, offset=offset, backend="reference", **grids)
    for backend in ("native", "triton"):
        got = stratified_sample(boxes.cuda(), seed=seed, offset=offset, backend=backend, **grids)
        assert all(torch.equal(a.cpu(), e) for a, e in zip([*got.globals, *got.locals],
                                                           [*expected.globals, *expected.locals])), backend


SAMPLE_MUTATIONS = [("seed", 2**63), ("seed", 1.5), ("offset", -1), ("offset", 2**32), ("global_window", 0),
                    ("local_grid", 1), ("target_grid", 4097), ("global_grid", torch.tensor(14)), ("generator", "g"),
                    ("backend", "gpu")]


@examples(12)
@given(sample_cases(), st.sampled_from(SAMPLE_MUTATIONS))
def test_sample_invalid_arguments_are_named(drawn, mutation):
    boxes, grids, seed, offset = drawn
    arguments = dict(grids, seed=seed, offset=offset)
    name, value = mutation
    arguments[name] = value
    with raises_naming(name):
        stratified_sample(boxes, **arguments)
