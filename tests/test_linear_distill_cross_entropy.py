"""udi_kernels.linear_distill_cross_entropy against the composed eager path in float64: the logits
`student @ weight.T`, `teacher @ teacher_weight.T` formed whole, then the distill_cross_entropy reference, with
autograd giving the gradients of student and weight.

Tolerances (relative to the largest magnitude of each expected output, at least 1):
  float64 (reference, native CPU): 1e-10 (chunked vs whole-row logsumexps and GEMMs: ~1e-14 measured).
  float32 (native CPU, Triton): loss, center statistics and logsumexps 2e-5, gradients 1e-4 (fp32 chunk GEMMs over
    D and fp32 logsumexps of |x / τ| up to ~1e2).
  float16 / bfloat16 inputs: the oracle runs on the same rounded inputs, so only the fp32 accumulation and the
    rounding of the gradients to the input dtype differ: loss 2e-5, gradients 2e-3 (fp16) / 1e-2 (bf16);
    bfloat16 is not run on the Triton interpreter (its bf16 dots are wrong).
"""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import udi_kernels
from udi_kernels import backends
from udi_kernels.ops import distill_cross_entropy as distill_op
from udi_kernels.ops import linear_distill_cross_entropy as op
from udi_kernels.reference import linear_distill_cross_entropy as reference

CPU = torch.device("cpu")
NATIVE = backends.why_unavailable("native", op.OP, CPU) is None
TRITON = backends.why_unavailable("triton", op.OP, CPU) is None
native = pytest.param("native", marks=pytest.mark.skipif(not NATIVE, reason="extension not built"))
triton = pytest.param("triton", marks=pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1"))
FLOAT64_BACKENDS = ["reference", native]
KERNELS = [native, triton]
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 1e-4), torch.float16: (2e-5, 2e-3),
       torch.bfloat16: (2e-5, 1e-2)}
TAU_S, TAU_T = 0.1, 0.04


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Several K-chunks in the reference and in the Triton backward at the tests' small K (the native kernel's
    chunk is 8192 columns: SHAPES has a K of three of them; the Triton tiles' 64)."""
    monkeypatch.setattr(reference, "CHUNK", 64)
    if TRITON:
        from udi_kernels.triton_kernels import linear_distill_cross_entropy as kernels
        monkeypatch.setattr(kernels, "HOST_CHUNK", 256)


def make_case(Rs, Rt, D, K, n_c, P, dtype=torch.float32, teacher_logits=False, scale=1.0, seed=0, device="cpu"):
    """Random rows and weights (student and teacher rows of norm ~scale·sqrt(D): logits up to ~1e2 / τ), random
    pairs with positive weights."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    teacher, teacher_weight = randn(Rt, D) * scale, randn(K, D) / math.sqrt(D)
    case = dict(student=randn(Rs, D) * scale, weight=randn(K, D) / math.sqrt(D) * 3,
                teacher=teacher @ teacher_weight.T if teacher_logits else teacher,
                teacher_weight=None if teacher_logits else teacher_weight, centers=randn(n_c, K).to(stats),
                center_id=torch.randint(0, n_c, (Rt,), generator=g),
                pair_student=torch.randint(0, max(Rs, 1), (P,), generator=g),
                pair_teacher=torch.randint(0, max(Rt, 1), (P,), generator=g),
                pair_weight=(torch.rand(P, generator=g, dtype=torch.float64) + 0.1).to(stats),
                row_weight=torch.rand(Rt, generator=g, dtype=torch.float64).to(stats))
    for name in ("student", "weight", "teacher", "teacher_weight"):
        if case[name] is not None:
            case[name] = case[name].to(dtype)
    return {k: v if v is None else v.to(device) for k, v in case.items()}


def as_float64(case):
    return {k: v.double() if v is not None and v.is_floating_point() else v for k, v in case.items()}


def fused(case, backend, check_values=True):
    student = case["student"].detach().requires_grad_(True)
    weight = case["weight"].detach().requires_grad_(True)
    out = udi_kernels.linear_distill_cross_entropy(**{**case, "student": student, "weight": weight}, tau_s=TAU_S,
                                                   tau_t=TAU_T, backend=backend, check_values=check_values)
    return out, torch.autograd.grad(out.loss, (student, weight))


def composed(case):
    """The oracle: float64 logits formed whole, the distill_cross_entropy reference, autograd."""
    c = as_float64(case)
    student, weight = c["student"].requires_grad_(True), c["weight"].requires_grad_(True)
    teacher = c["teacher"] if c["teacher_weight"] is None else c["teacher"] @ c["teacher_weight"].T
    out = udi_kernels.distill_cross_entropy(student @ weight.T, teacher, c["centers"], c["center_id"],
                                            c["pair_student"], c["pair_teacher"], c["pair_weight"], c["row_weight"],
                                            TAU_S, TAU_T, backend="reference")
    return out, torch.autograd.grad(out.loss, (student, weight))


def assert_close_rel(actual, expected, rel, name):
    expected = expected.to(torch.float64)
    err = (actual.to(torch.float64) - expected).abs().max().item() if expected.numel() else 0.0
    bound = rel * max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def assert_matches_composed(case, backend, check_values=True):
    out, (grad_student, grad_weight) = fused(case, backend, check_values)
    ref, (ref_student, ref_weight) = composed(case)
    rel, grad_rel = TOL[case["student"].dtype]
    for name in ("loss", "center_sum", "center_count"):
        assert_close_rel(getattr(out, name), getattr(ref, name), rel, name)
    assert_close_rel(grad_student, ref_student, grad_rel, "grad student")
    assert_close_rel(grad_weight, ref_weight, grad_rel, "grad weight")
    assert grad_student.dtype == case["student"].dtype and grad_weight.dtype == case["weight"].dtype
    return out, (grad_student, grad_weight)


def with_special_rows(case):
    """Student row 0 without pairs, row 1 with only a weight-0 pair; teacher row 0 of row weight 0."""
    Rs = case["student"].shape[0]
    case["pair_student"] = torch.where(case["pair_student"] < 2, 2 + case["pair_student"] % max(Rs - 2, 1),
                                       case["pair_student"])
    case["pair_student"][0], case["pair_weight"][0] = 1, 0
    case["pair_weight"][3] = 0
    case["row_weight"][0] = 0
    return case


# Rs, Rt, D, K, n_c, P: K prime or 1000 (not a multiple of any chunk), D = 72, Rs >> Rt, no pairs
SHAPES = {"odd": (9, 5, 72, 1031, 2, 17), "K1000": (6, 4, 24, 1000, 3, 11), "K_below_chunk": (5, 3, 7, 61, 2, 8),
          "three_native_chunks": (5, 3, 16, 16411, 2, 9),
          "Rs_much_larger": (300, 3, 16, 131, 1, 340), "no_pairs": (4, 3, 8, 67, 2, 0)}  # 3 native row blocks


@pytest.mark.parametrize("teacher_logits", [False, True], ids=["teacher_rows", "teacher_logits"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES)
@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_float64_equals_composed(backend, shape, teacher_logits, poison_empty):
    case = make_case(*shape, dtype=torch.float64, teacher_logits=teacher_logits, seed=sum(shape), scale=0.3)
    if shape[5] >= 8:
        case = with_special_rows(case)
    out, (grad_student, _) = assert_matches_composed(case, backend)
    if shape[5] >= 8:
        assert not grad_student[:2].any(), "rows without a counting pair get no gradient"


@pytest.mark.parametrize("scale", [0.05, 1.5], ids=["flat", "peaked"])  # |x / τs| ~ 1 or ~ 50
@pytest.mark.parametrize("teacher_logits", [False, True], ids=["teacher_rows", "teacher_logits"])
@pytest.mark.parametrize("backend", KERNELS)
def test_float32_kernels(backend, teacher_logits, scale, poison_empty):
    case = with_special_rows(make_case(9, 5, 72, 1031, 2, 17, teacher_logits=teacher_logits, scale=scale))
    assert_matches_composed(case, backend)


LOW_PRECISION = [pytest.param("native", dtype, marks=pytest.mark.skipif(not NATIVE, reason="extension not built"))
                 for dtype in (torch.float16, torch.bfloat16)] + \
    [pytest.param("triton", torch.float16, marks=pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1"))]


@pytest.mark.parametrize("backend,dtype", LOW_PRECISION)
def test_low_precision_inputs_accumulate_in_float32(backend, dtype, poison_empty):
    case = with_special_rows(make_case(7, 4, 40, 613, 2, 12, dtype=dtype))
    out, _ = assert_matches_composed(case, backend)
    assert out.loss.dtype == torch.float32 and out.center_sum.dtype == torch.float32


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_empty_batches(backend):
    """No student rows, no teacher rows, no pairs: a zero loss, zero center statistics, empty or zero gradients."""
    dtype = torch.float64 if backend != "triton" else torch.float32
    for Rs, Rt in ((0, 3), (4, 0), (0, 0)):
        case = make_case(Rs, Rt, 8, 67, 2, 0, dtype=dtype)
        out, (grad_student, grad_weight) = assert_matches_composed(case, backend)
        assert out.loss.item() == 0 and grad_student.shape == (Rs, 8) and not grad_weight.any()
        assert Rt or not (out.center_sum.any() or out.center_count.any())


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_left_out_rows_may_hold_nan(backend, poison_empty):
    """Student rows without a counting pair and teacher rows of row weight 0 that no pair reads may hold NaN (a
    padding row): they are left out exactly, the result is the finite case's."""
    dtype = torch.float64 if backend != "triton" else torch.float32
    case = with_special_rows(make_case(9, 5, 24, 300, 2, 17, dtype=dtype))
    case["pair_teacher"] = torch.where(case["pair_teacher"] == 0, 1, case["pair_teacher"])
    expected, expected_grads = fused(case, backend)
    poisoned = {**case, "student": case["student"].clone(), "teacher": case["teacher"].clone()}
    poisoned["student"][:2] = math.nan
    poisoned["teacher"][0] = math.nan
    out, grads = fused(poisoned, backend, check_values=False)  # check_values refuses a NaN teacher
    for a, b in zip((*out, *grads), (*expected, *expected_grads)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_run_to_run_identical(backend):
    case = make_case(9, 5, 24, 1031, 2, 17, dtype=torch.float32)
    first, second = fused(case, backend), fused(case, backend)
    for a, b in zip((*first[0], *first[1]), (*second[0], *second[1])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_large_logits(backend):
    """Unnormalised rows (|x / τ| ~ 1e3): float32 stays close to the float64 oracle (max-subtraction, online
    logsumexp, the cross-entropy accumulated as non-negative terms)."""
    case = make_case(6, 4, 32, 600, 1, 10, scale=20.0)
    out, _ = fused(case, backend)
    ref, _ = composed(case)
    assert torch.isfinite(out.loss)
    assert_close_rel(out.loss, ref.loss, 2e-5, "loss")


def op_args(case):
    csr = distill_op.build_csr(case["pair_student"], case["pair_teacher"], case["pair_weight"], case["center_id"],
                               case["student"].shape[0], case["centers"].shape[0])
    return (case["student"].requires_grad_(True), case["weight"].requires_grad_(True), case["teacher"],
            case["teacher_weight"], case["centers"], csr.center_id, csr.student_offsets, csr.pair_teacher,
            csr.pair_weight, csr.center_offsets, csr.center_rows, case["row_weight"], TAU_S, TAU_T)


@pytest.mark.parametrize("backend", KERNELS)
def test_logsumexp_and_pair_outputs(backend, poison_empty):
    """The registered op's outputs: per-pair losses and the saved logsumexps, against the float64 logits."""
    case = with_special_rows(make_case(9, 5, 24, 1031, 2, 17))
    forward = torch.ops.udi_kernels.linear_distill_cross_entropy if backend == "native" \
        else torch.ops.udi_kernels.linear_distill_cross_entropy_triton
    args = op_args(case)
    pair_loss, _, _, student_lse, teacher_lse = forward(*args)
    c = as_float64(case)
    student_logits, teacher_logits = c["student"] @ c["weight"].T, c["teacher"] @ c["teacher_weight"].T
    centered = (teacher_logits - c["centers"][c["center_id"]]) / TAU_T
    assert_close_rel(student_lse, torch.logsumexp(student_logits / TAU_S, -1), 2e-5, "student_lse")
    assert_close_rel(teacher_lse, torch.logsumexp(centered, -1), 2e-5, "teacher_lse")
    csr = distill_op.build_csr(case["pair_student"], case["pair_teacher"], case["pair_weight"], case["center_id"], 9, 2)
    rows = torch.log_softmax(student_logits / TAU_S, -1)[distill_op.csr_pair_student(csr)]
    ce = -(torch.softmax(centered, -1)[csr.pair_teacher] * rows).sum(-1)
    assert_close_rel(pair_loss, csr.pair_weight.double() * ce, 2e-5, "pair_loss")


@pytest.mark.parametrize("teacher_logits", [False, True], ids=["teacher_rows", "teacher_logits"])
@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(backend, teacher_logits):
    forward = torch.ops.udi_kernels.linear_distill_cross_entropy if backend == "native" \
        else torch.ops.udi_kernels.linear_distill_cross_entropy_triton
    torch.library.opcheck(forward, op_args(make_case(5, 4, 8, 37, 2, 8, teacher_logits=teacher_logits)))


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_compile_fullgraph(backend):
    case = make_case(5, 4, 8, 37, 2, 8)
    rest = {k: v for k, v in case.items() if k not in ("student", "weight")}

    def loss_fn(student, weight):
        return udi_kernels.linear_distill_cross_entropy(student, weight, **rest, tau_s=TAU_S, tau_t=TAU_T,
                                                        backend=backend).loss

    torch._dynamo.reset()
    student, weight = case["student"].requires_grad_(True), case["weight"].requires_grad_(True)
    loss = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(student, weight)
    expected = loss_fn(student, weight)
    torch.testing.assert_close(loss, expected)
    for a, b in zip(torch.autograd.grad(loss, (student, weight)), torch.autograd.grad(expected, (student, weight))):
        torch.testing.assert_close(a, b)


class WideTensorWatch(TorchDispatchMode):
    """Records every op output with K columns and more rows than n_centers in new memory (views such as
    weight.T, which share an input's storage, allocate nothing)."""

    def __init__(self, K, n_centers):
        super().__init__()
        self.K, self.n_centers, self.seen = K, n_centers, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.K and \
                    t.numel() // self.K > self.n_centers and t.untyped_storage().data_ptr() not in inputs:
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_no_tensor_of_K_columns_in_forward_and_backward(backend):
    """At K = 1009 (no other size equals it) no op of the forward or the backward makes a tensor [R, K] with R
    above n_centers. The watch sees every op the Python layers dispatch (the reference's and the Triton path's
    chunk ops, autograd's); the native kernel's own ATen calls run below it (its chunk buffers are [rows, 8192])."""
    case = make_case(40, 30, 24, 1009, 2, 50)
    with WideTensorWatch(K=1009, n_centers=2) as watch:
        fused(case, backend)
    assert not watch.seen, watch.seen


def test_the_watch_sees_the_composed_logits():
    """The watch above can fail: the composed path (matmul + distill_cross_entropy) makes [Rs, K] tensors."""
    case = make_case(40, 30, 24, 1009, 2, 50)
    with WideTensorWatch(K=1009, n_centers=2) as watch:
        composed(case)
    assert (40, 1009) in [shape for _, shape in watch.seen]


BAD_INPUTS = [
    ("weight_D", lambda c: c.update(weight=c["weight"][:, :-1]), ValueError, "weight must have shape"),
    ("weight_dtype", lambda c: c.update(weight=c["weight"].double()), TypeError, "weight must be float32, got"),
    ("weight_1d", lambda c: c.update(weight=c["weight"][0]), ValueError, "weight must have 2"),
    ("teacher_weight_K", lambda c: c.update(teacher_weight=c["teacher_weight"][:-1]), ValueError,
     "teacher_weight must have shape"),
    ("teacher_weight_D", lambda c: c.update(teacher_weight=c["teacher_weight"][:, :-1]), ValueError,
     "teacher_weight must have shape"),
    ("teacher_weight_dtype", lambda c: c.update(teacher_weight=c["teacher_weight"].half()), TypeError,
     "teacher_weight must be float32, got torch.float16"),
    ("teacher_logits_K", lambda c: c.update(teacher=torch.randn(4, 36), teacher_weight=None), ValueError,
     "teacher .logits, teacher_weight None. must have"),
    ("centers_K", lambda c: c.update(centers=c["centers"][:, :-1]), ValueError, "centers must have weight's K"),
    ("student_dtype", lambda c: c.update(student=c["student"].int()), TypeError,
     "student must be float16, bfloat16, float32 or"),
    ("center_id_len", lambda c: c.update(center_id=c["center_id"][:-1]), ValueError, "center_id must have length"),
    ("pair_student_range", lambda c: c["pair_student"].__setitem__(0, 5), ValueError, "pair_student must hold"),
    ("teacher_weight_nan", lambda c: c["teacher_weight"].__setitem__((1, 3), math.nan), ValueError,
     "teacher_weight must hold finite"),
    ("teacher_nan", lambda c: c["teacher"].__setitem__((1, 3), math.nan), ValueError, "teacher must hold finite"),
]


@pytest.mark.parametrize("name,mutate,error,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(name, mutate, error, message):
    case = make_case(5, 4, 8, 37, 2, 8)
    mutate(case)
    with pytest.raises(error, match=message):
        udi_kernels.linear_distill_cross_entropy(**case, tau_s=TAU_S, tau_t=TAU_T)


def test_bad_temperature_and_device():
    with pytest.raises(ValueError, match="tau_s must be"):
        udi_kernels.linear_distill_cross_entropy(**make_case(3, 3, 4, 8, 1, 2), tau_s=0.0, tau_t=TAU_T)
    case = make_case(3, 3, 4, 8, 1, 2)
    case["teacher_weight"] = case["teacher_weight"].to("meta")
    with pytest.raises(ValueError, match="teacher_weight must be on cpu"):
        udi_kernels.linear_distill_cross_entropy(**case, tau_s=TAU_S, tau_t=TAU_T)


@pytest.mark.parametrize("backend", ["reference", *KERNELS])
def test_prebuilt_csr_gives_the_public_result(backend):
    case = make_case(7, 5, 8, 333, 2, 11)
    out, grads = fused(case, backend)
    csr = distill_op.build_csr(case["pair_student"], case["pair_teacher"], case["pair_weight"], case["center_id"],
                               7, 2)
    student, weight = case["student"].requires_grad_(True), case["weight"].requires_grad_(True)
    prebuilt = op.linear_distill_cross_entropy_csr(student, weight, case["teacher"], case["teacher_weight"],
                                                   case["centers"], csr, case["row_weight"], TAU_S, TAU_T,
                                                   backend=backend)
    for a, b in zip((*prebuilt, *torch.autograd.grad(prebuilt.loss, (student, weight))), (*out, *grads)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ---- GPU ---------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("teacher_logits", [False, True], ids=["teacher_rows", "teacher_logits"])
@pytest.mark.parametrize("shape", [(37, 5, 72, 4099, 2, 61), (300, 40, 256, 65536, 3, 500)], ids=["odd", "dino_K"])
def test_gpu_kernels_match_composed(backend, dtype, teacher_logits, shape, poison_empty):
    case = with_special_rows(make_case(*shape, dtype=dtype, teacher_logits=teacher_logits, device="cuda"))
    assert_matches_composed(case, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_gpu_run_to_run_identical(backend):
    case = make_case(40, 6, 64, 5000, 3, 70, device="cuda")
    first, second = fused(case, backend), fused(case, backend)
    for a, b in zip((*first[0], *first[1]), (*second[0], *second[1])):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_opcheck_native():
    torch.library.opcheck(torch.ops.udi_kernels.linear_distill_cross_entropy,
                          op_args(make_case(5, 4, 8, 37, 2, 8, device="cuda")))
