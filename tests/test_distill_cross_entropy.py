"""udi_kernels.distill_cross_entropy: reference vs an independent float64 loop, kernels vs the reference.

Tolerances (vs the float64 reference, relative to the largest magnitude of each output):
  float32 kernels 2e-5 (grad 5e-5: the saved fp32 teacher logsumexp carries ~1e-7·|lse|, lse ~ 1e2 at τt = 0.04);
  bfloat16 / float16 inputs: the reference runs on the same rounded inputs, so only fp32 accumulation differs,
  plus the rounding of the gradient to the input dtype (bf16 1e-2, fp16 2e-3).
"""
import math

import pytest
import torch

import udi_kernels
from udi_kernels import backends
from udi_kernels.ops import distill_cross_entropy as op

TRITON = backends.why_unavailable("triton", op.OP, torch.device("cpu")) is None
NATIVE = backends.why_unavailable("native", op.OP, torch.device("cpu")) is None
CPU_KERNELS = [pytest.param("native", marks=pytest.mark.skipif(not NATIVE, reason="extension not built")),
               pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1"))]


def make_case(Rs, Rt, K, n_c, P, dtype=torch.float32, device="cpu", scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    case = dict(student=randn(Rs, K) * scale, teacher=randn(Rt, K) * scale, centers=randn(n_c, K),
                center_id=torch.randint(0, n_c, (Rt,), generator=g),
                pair_student=torch.randint(0, Rs, (P,), generator=g),
                pair_teacher=torch.randint(0, Rt, (P,), generator=g),
                pair_weight=torch.rand(P, generator=g, dtype=torch.float64) + 0.1,
                row_weight=torch.rand(Rt, generator=g, dtype=torch.float64))
    case = {k: v.to(device) for k, v in case.items()}
    for name in ("student", "teacher"):
        case[name] = case[name].to(dtype)
    if dtype != torch.float64:
        for name in ("centers", "pair_weight", "row_weight"):
            case[name] = case[name].float()
    return case


def as_float64(case):
    return {k: v.double() if v.is_floating_point() else v for k, v in case.items()}


def naive_float64(case, tau_s, tau_t):
    """Written from the spec, one pair at a time."""
    c = as_float64(case)
    loss = torch.zeros((), dtype=torch.float64)
    for ps, pt, w in zip(c["pair_student"].tolist(), c["pair_teacher"].tolist(), c["pair_weight"].tolist()):
        u = (c["teacher"][pt] - c["centers"][c["center_id"][pt]]) / tau_t
        p = torch.exp(u - u.max()) / torch.exp(u - u.max()).sum()
        x = c["student"][ps] / tau_s
        log_q = x - x.max() - torch.log(torch.exp(x - x.max()).sum())
        loss = loss + w * -(p * log_q).sum()
    n_c, K = c["centers"].shape
    sums, counts = torch.zeros(n_c, K, dtype=torch.float64), torch.zeros(n_c, dtype=torch.float64)
    for r in range(c["teacher"].shape[0]):
        sums[c["center_id"][r]] += c["row_weight"][r] * c["teacher"][r]
        counts[c["center_id"][r]] += c["row_weight"][r]
    return loss, sums, counts


def run(case, backend, tau_s=0.1, tau_t=0.04, grad=True):
    student = case["student"].detach().requires_grad_(grad)
    args = {**case, "student": student}
    out = udi_kernels.distill_cross_entropy(**args, tau_s=tau_s, tau_t=tau_t, backend=backend)
    g = torch.autograd.grad(out.loss, student)[0] if grad else None
    return out, g


def assert_close_rel(actual, expected, rel, name):
    expected = expected.to(torch.float64)
    err = (actual.to(torch.float64) - expected).abs().max().item()
    bound = rel * max(expected.abs().max().item(), 1.0)
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def test_reference_matches_naive_loop():
    case = make_case(5, 4, 37, 2, 9, dtype=torch.float64)
    out, _ = run(case, "reference", grad=False)
    loss, sums, counts = naive_float64(case, 0.1, 0.04)
    torch.testing.assert_close(out.loss, loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.center_sum, sums, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.center_count, counts, rtol=1e-12, atol=1e-12)


def test_reference_gradcheck_student_only():
    case = make_case(4, 3, 11, 2, 6, dtype=torch.float64, scale=1.0)
    student = case.pop("student").requires_grad_(True)
    teacher = case.pop("teacher").requires_grad_(True)
    fn = lambda s: udi_kernels.distill_cross_entropy(s, teacher, **case, tau_s=0.3, tau_t=0.2,
                                                     backend="reference").loss
    assert torch.autograd.gradcheck(fn, (student,))
    loss = udi_kernels.distill_cross_entropy(student, teacher, **case, tau_s=0.3, tau_t=0.2, backend="reference").loss
    assert torch.autograd.grad(loss, teacher, allow_unused=True)[0] is None  # the teacher is detached


def test_reference_gradient_formula():
    """grad = Σ_p w_p / τs · (softmax(s/τs) − p_t), written out."""
    case = make_case(3, 3, 13, 1, 5, dtype=torch.float64)
    _, grad = run(case, "reference", tau_s=0.2, tau_t=0.05)
    expected = torch.zeros_like(case["student"])
    for ps, pt, w in zip(case["pair_student"], case["pair_teacher"], case["pair_weight"]):
        p_t = torch.softmax((case["teacher"][pt] - case["centers"][0]) / 0.05, -1)
        expected[ps] += w / 0.2 * (torch.softmax(case["student"][ps] / 0.2, -1) - p_t)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def assert_float32_matches_reference(case, backend):
    """The kernel on a float32 case vs the float64 reference (tolerances in the module docstring)."""
    out, grad = run(case, backend)
    ref, ref_grad = run(as_float64(case), "reference")
    for name in ("loss", "center_sum", "center_count"):
        assert_close_rel(getattr(out, name), getattr(ref, name), 2e-5, name)
    assert_close_rel(grad, ref_grad, 5e-5, "grad")
    return out, grad


@pytest.mark.parametrize("backend", CPU_KERNELS)
@pytest.mark.parametrize("shape", [(7, 5, 333, 2, 11), (3, 2, 1031, 1, 4), (4, 6, 1, 3, 7), (6, 3, 64, 2, 0)],
                         ids=["odd", "multi_block", "K1", "no_pairs"])
def test_cpu_kernels_match_reference(backend, shape, poison_empty):
    case = make_case(*shape)
    out, grad = assert_float32_matches_reference(case, backend)
    assert out.loss.dtype == torch.float32 and grad.dtype == torch.float32


def rows_with_0_1_and_many_pairs(case):
    """Student row 0 gets no pair, row 1 one pair, row 2 every other pair (one of them weight 0)."""
    P = case["pair_student"].shape[0]
    case["pair_student"] = torch.where(torch.arange(P) % 2 == 0, 2, 3 + torch.arange(P) % 2)
    case["pair_student"][1] = 1
    case["pair_weight"][4] = 0
    return case


@pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("K,chunk", [(333, 128), (1031, 256), (256, 64), (5, 4)],
                         ids=["remainder", "many_chunks", "exact_chunks", "tiny"])
def test_triton_split_k(K, chunk, monkeypatch, poison_empty):
    """Several K chunks per row (the last one partial or full), rows with 0, 1 and many pairs: the Triton kernels
    (the native CPU kernel's chunks: test_native_cpu_chunks; its CUDA chunks of 4096 are covered by the GPU tests)."""
    from udi_kernels.triton_kernels import distill_cross_entropy as kernels
    monkeypatch.setattr(kernels, "MAX_CHUNK", chunk)
    monkeypatch.setattr(kernels, "CENTER_BLOCK", 64)
    monkeypatch.setattr(kernels, "CENTER_ROWS", 4)
    case = rows_with_0_1_and_many_pairs(make_case(6, 9, K, 2, 13, scale=4.0, seed=K))
    out, grad = assert_float32_matches_reference(case, "triton")
    assert (grad[0] == 0).all(), "a student row without pairs gets a zero gradient"


@pytest.mark.skipif(not NATIVE, reason="extension not built")
@pytest.mark.parametrize("Rt,K", [(9, 511), (9, 512), (9, 1031), (1100, 700)],
                         ids=["one_partial_chunk", "one_full_chunk", "partial_last_chunk", "narrow_chunks"])
def test_native_cpu_chunks(Rt, K, poison_empty):
    """The CPU kernel's chunks of K (512 columns; 256 once Rt x 512 doubles pass 4 MiB, as for Rt = 1100), rows with 0,
    1 and many pairs."""
    case = rows_with_0_1_and_many_pairs(make_case(6, Rt, K, 2, 13, scale=4.0, seed=K))
    out, grad = assert_float32_matches_reference(case, "native")
    assert (grad[0] == 0).all(), "a student row without pairs gets a zero gradient"


@pytest.mark.skipif(not NATIVE, reason="extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_cpu_is_bitwise_repeatable_for_any_thread_count(dtype):
    """The chunk partition depends on the shapes only and the partials are combined in chunk order."""
    case = make_case(23, 7, 1800, 2, 40, dtype=dtype, seed=3)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3, 1):
            torch.set_num_threads(count)
            out, grad = run(case, "native")
            results.append((out.loss, out.center_sum, out.center_count, grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("backend", CPU_KERNELS)
@pytest.mark.parametrize("dtype,rel", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_cpu_kernels_low_precision(backend, dtype, rel, poison_empty):
    case = make_case(5, 4, 300, 2, 9, dtype=dtype, scale=1.0)
    out, grad = run(case, backend, tau_t=0.07)
    ref, ref_grad = run(as_float64(case), "reference", tau_t=0.07)
    assert_close_rel(out.loss, ref.loss, 1e-5, "loss")
    assert_close_rel(out.center_sum, ref.center_sum, 1e-5, "center_sum")
    assert_close_rel(grad, ref_grad, rel, "grad")
    assert grad.dtype == dtype


@pytest.mark.skipif(not NATIVE, reason="extension not built")
def test_native_cpu_float64_exact():
    case = make_case(5, 4, 77, 2, 9, dtype=torch.float64)
    out, grad = run(case, "native")
    ref, ref_grad = run(case, "reference")
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference"] + CPU_KERNELS)
def test_extreme_logits_stay_finite(backend):
    case = make_case(4, 3, 257, 1, 6, scale=1.0)
    case["student"] = torch.where(case["student"] > 0, 1e4, -1e4)
    case["teacher"] = torch.where(case["teacher"] > 0.5, 1e4, -1e4)
    out, grad = run(case, backend, tau_s=0.1, tau_t=0.04)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all() and torch.isfinite(out.center_sum).all()
    ref, ref_grad = run(as_float64(case), "reference")
    # fp32 rounding of t − c at |t| = 1e4 is 1e-3, i.e. 2.5e-2 in (t − c)/τt: p_t itself is only ~1e-2 accurate
    assert_close_rel(out.loss, ref.loss, 1e-2, "loss")


@pytest.mark.parametrize("backend", ["reference"] + CPU_KERNELS)
def test_zero_weight_pairs_add_nothing(backend):
    case = make_case(4, 3, 50, 1, 6)
    case["pair_weight"][::2] = 0
    out, grad = run(case, backend)
    keep = case["pair_weight"] != 0
    kept = {**case, **{k: case[k][keep] for k in ("pair_student", "pair_teacher", "pair_weight")}}
    ref, ref_grad = run(as_float64(kept), "reference")
    assert_close_rel(out.loss, ref.loss, 2e-5, "loss")
    assert_close_rel(grad, ref_grad, 5e-5, "grad")


@pytest.mark.parametrize("backend", ["reference"] + CPU_KERNELS)
def test_prebuilt_csr_gives_the_public_result(backend):
    """distill_cross_entropy_csr on build_csr's pairs == distill_cross_entropy; only the loss has a gradient."""
    case = make_case(7, 5, 333, 2, 11)
    out, grad = run(case, backend)
    csr = op.build_csr(case["pair_student"], case["pair_teacher"], case["pair_weight"], case["center_id"],
                       case["student"].shape[0], case["centers"].shape[0])
    student = case["student"].detach().requires_grad_(True)
    prebuilt = op.distill_cross_entropy_csr(student, case["teacher"], case["centers"], csr, case["row_weight"], 0.1,
                                            0.04, backend=backend)
    for name in ("loss", "center_sum", "center_count"):
        torch.testing.assert_close(getattr(prebuilt, name), getattr(out, name), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(prebuilt.loss, student)[0], grad, rtol=1e-6, atol=1e-7)
    assert not prebuilt.center_sum.requires_grad and not prebuilt.center_count.requires_grad


def _op_args(case, tau_s=0.1, tau_t=0.04):
    csr = op.build_csr(case["pair_student"], case["pair_teacher"], case["pair_weight"], case["center_id"],
                       case["student"].shape[0], case["centers"].shape[0])
    return (case["student"].requires_grad_(True), case["teacher"], case["centers"], case["center_id"].long(),
            csr.student_offsets, csr.pair_teacher, csr.pair_weight, csr.center_offsets, csr.center_rows,
            case["row_weight"], tau_s, tau_t)


@pytest.mark.parametrize("backend", CPU_KERNELS)
def test_opcheck(backend):
    forward = torch.ops.udi_kernels.distill_cross_entropy if backend == "native" \
        else torch.ops.udi_kernels.distill_cross_entropy_triton
    torch.library.opcheck(forward, _op_args(make_case(5, 4, 37, 2, 8)))


@pytest.mark.parametrize("backend", ["reference"] + CPU_KERNELS)
def test_compile_fullgraph(backend):
    case = make_case(5, 4, 37, 2, 8)

    def loss_fn(student):
        return udi_kernels.distill_cross_entropy(student, case["teacher"], case["centers"], case["center_id"],
                                                 case["pair_student"], case["pair_teacher"], case["pair_weight"],
                                                 case["row_weight"], 0.1, 0.04, backend=backend).loss

    torch._dynamo.reset()
    student = case["student"].requires_grad_(True)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(student)
    grad, = torch.autograd.grad(loss, student)
    expected = loss_fn(student)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, torch.autograd.grad(expected, student)[0])


BAD_INPUTS = [
    ("student", lambda c: c.update(student=c["student"][0]), ValueError, "student must have 2"),
    ("teacher_K", lambda c: c.update(teacher=c["teacher"][:, :-1]), ValueError, "share the last dimension"),
    ("teacher_dtype", lambda c: c.update(teacher=c["teacher"].int()), TypeError,
     "teacher must be float16, bfloat16, float32 or"),
    ("centers_dtype", lambda c: c.update(centers=c["centers"].half()), TypeError, "centers must be float32 or float64"),
    ("center_id_len", lambda c: c.update(center_id=c["center_id"][:-1]), ValueError, "center_id must have length"),
    ("pair_teacher_len", lambda c: c.update(pair_teacher=c["pair_teacher"][:-1]), ValueError, "pair_teacher must"),
    ("pair_index_float", lambda c: c.update(pair_student=c["pair_student"].float()), TypeError, "pair_student"),
    ("pair_student_range", lambda c: c["pair_student"].__setitem__(0, 5), ValueError, "pair_student must hold"),
    ("pair_teacher_negative", lambda c: c["pair_teacher"].__setitem__(0, -1), ValueError, "pair_teacher must hold"),
    ("center_id_range", lambda c: c["center_id"].__setitem__(0, 2), ValueError, "center_id must hold"),
    ("teacher_nan", lambda c: c["teacher"].__setitem__((1, 3), math.nan), ValueError, "teacher must hold finite"),
    ("centers_inf", lambda c: c["centers"].__setitem__((0, 0), math.inf), ValueError, "centers must hold finite"),
    ("row_weight_nan", lambda c: c["row_weight"].__setitem__(0, math.nan), ValueError, "row_weight must hold"),
]


@pytest.mark.parametrize("name,mutate,error,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(name, mutate, error, message):
    case = make_case(5, 4, 37, 2, 8)
    mutate(case)
    with pytest.raises(error, match=message):
        udi_kernels.distill_cross_entropy(**case, tau_s=0.1, tau_t=0.04)


@pytest.mark.parametrize("tau", [0.0, -1.0, math.nan, math.inf])
def test_bad_temperature(tau):
    with pytest.raises(ValueError, match="tau_t must be"):
        udi_kernels.distill_cross_entropy(**make_case(3, 3, 8, 1, 2), tau_s=0.1, tau_t=tau)


def test_device_mismatch_is_named():
    case = make_case(3, 3, 8, 1, 2)
    case["teacher"] = case["teacher"].to("meta")
    with pytest.raises(ValueError, match="teacher must be on cpu"):
        udi_kernels.distill_cross_entropy(**case, tau_s=0.1, tau_t=0.04)


# ---- GPU ---------------------------------------------------------------------------------------------------------

GPU_TOL = {torch.float32: (2e-5, 5e-5), torch.bfloat16: (1e-5, 1e-2), torch.float16: (1e-5, 2e-3)}


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 5, 4099, 2, 61), (9, 7, 12296, 2, 20), (24, 4, 65536, 1, 44),
                                   (3, 2, 1, 3, 4)],
                         ids=["odd_scalar_loads", "partial_last_chunk", "dino_K", "K1"])
def test_gpu_kernels_match_reference(backend, dtype, shape, poison_empty):
    case = make_case(*shape, dtype=dtype, device="cuda", scale=1.0)
    out, grad = run(case, backend, tau_t=0.04)
    ref, ref_grad = run(as_float64(case), "reference", tau_t=0.04)
    rel, grad_rel = GPU_TOL[dtype]
    assert_close_rel(out.loss, ref.loss, max(rel, 2e-5), "loss")
    assert_close_rel(out.center_sum, ref.center_sum, 2e-5, "center_sum")
    assert_close_rel(out.center_count, ref.center_count, 2e-5, "center_count")
    assert_close_rel(grad, ref_grad, grad_rel, "grad")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_gpu_deterministic(backend):
    case = make_case(40, 6, 5000, 3, 70, device="cuda")
    first, grad1 = run(case, backend)
    second, grad2 = run(case, backend)
    assert torch.equal(first.loss, second.loss) and torch.equal(first.center_sum, second.center_sum)
    assert torch.equal(grad1, grad2)


@pytest.mark.gpu
def test_gpu_opcheck_native():
    torch.library.opcheck(torch.ops.udi_kernels.distill_cross_entropy, _op_args(make_case(5, 4, 37, 2, 8,
                                                                                        device="cuda")))
