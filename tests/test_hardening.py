"""Regression tests of the hostile inputs of issue 11, on every backend (CPU here; the `gpu` ones on CUDA):
indices out of range with the value checks off, 32-bit counters, float16 range, float64 accuracy of the CPU
gradient, empty batches, argument messages, non-finite teacher statistics, the Triton interpreter's bf16 dots,
and which inputs get a gradient.

Defined behaviour with checks off (documented in the ops): an index out of range skips its pair / tap / teacher
row; every backend gives the reference's answer for it, writes every output and repeats itself bit for bit.
"""
import math
import warnings

import pytest
import torch

import udi_kernels
from udi_kernels import backends, srs_attention, stratified_sample
from udi_kernels.losses import DINOLoss, IBOTPatchLoss, UDILoss
from udi_kernels.nn import SRSAttention
from udi_kernels.reference import distill_cross_entropy as distill_reference
from udi_kernels.testing.losses import random_udi_inputs

from test_distill_cross_entropy import as_float64, assert_close_rel, make_case


DISTILL = backends.available("distill_cross_entropy", "cpu")
ATTENTION = backends.available("srs_attention", "cpu")
SAMPLE = backends.available("stratified_sample", "cpu")
gpu = pytest.mark.gpu


# ---- 1. distill_cross_entropy: indices out of range with check_values=False ---------------------------------------

def distill(case, backend, check_values=False, tau_s=0.1, tau_t=0.04):
    student = case["student"].detach().requires_grad_(True)
    out = udi_kernels.distill_cross_entropy(**{**case, "student": student}, tau_s=tau_s, tau_t=tau_t,
                                            backend=backend, check_values=check_values)
    grad, = torch.autograd.grad(out.loss, student)
    return out, grad


def valid_equivalent(case):
    """The same case with every pair that touches an invalid index at weight 0 and every teacher row without a
    center at row weight 0 (its center_id then any valid one): what the defined behaviour must give."""
    Rs, Rt, n_c = case["student"].shape[0], case["teacher"].shape[0], case["centers"].shape[0]
    center_ok = (case["center_id"] >= 0) & (case["center_id"] < n_c)
    ps, pt = case["pair_student"], case["pair_teacher"]
    pair_ok = (ps >= 0) & (ps < Rs) & (pt >= 0) & (pt < Rt)
    pair_ok &= center_ok[torch.where(pair_ok, pt, 0)] if Rt else torch.zeros_like(pair_ok)
    return {**case, "pair_student": torch.where(pair_ok, ps, 0), "pair_teacher": torch.where(pair_ok, pt, 0),
            "pair_weight": torch.where(pair_ok, case["pair_weight"], 0), "center_id": torch.where(center_ok,
                                                                                                case["center_id"], 0),
            "row_weight": torch.where(center_ok, case["row_weight"], 0)}


BAD_INDEX_FIELDS = {"pair_student": 0, "pair_teacher": 1, "center_id": 2}  # which size bounds them: Rs, Rt, n_c


def bad_values(size):
    return [10**9, -10**12, size, -1]


def assert_defined_distill_behaviour(case, backend):
    first, grad = distill(case, backend)
    again, grad_again = distill(case, backend)
    for a, b in zip((*first, grad), (*again, grad_again)):
        assert torch.equal(a, b), "run-to-run identical"
    expected, expected_grad = distill(as_float64(valid_equivalent(case)), "reference", check_values=True)
    for name in ("loss", "center_sum", "center_count"):
        assert_close_rel(getattr(first, name), getattr(expected, name), 2e-5, name)
    assert_close_rel(grad, expected_grad, 5e-5, "grad")


def with_bad_indices(case, field):
    """Rows 0-3 of `field` set to 1e9, -1e12, the size it indexes and -1."""
    size = (case["student"].shape[0], case["teacher"].shape[0], case["centers"].shape[0])[BAD_INDEX_FIELDS[field]]
    for position, value in enumerate(bad_values(size)):
        case[field][position] = value
    return case


@pytest.mark.parametrize("backend", DISTILL)
def test_distill_index_out_of_range_skips_the_pair(backend, poison_empty):
    """pair_student, pair_teacher and center_id each hold 1e9, -1e12, their size and -1 (at different pairs)."""
    case = make_case(5, 9, 37, 2, 14)
    for field in BAD_INDEX_FIELDS:
        case[field] = case[field].roll(-4)
        with_bad_indices(case, field)
        case[field] = case[field].roll(4)
    assert_defined_distill_behaviour(case, backend)


@pytest.mark.parametrize("backend", DISTILL)
def test_distill_every_index_out_of_range_and_no_teacher_rows(backend, poison_empty):
    case = make_case(3, 2, 9, 1, 6)
    case["pair_teacher"][:] = 7
    assert_defined_distill_behaviour(case, backend)
    case["teacher"], case["center_id"], case["row_weight"] = case["teacher"][:0], case["center_id"][:0], \
        case["row_weight"][:0]
    case["pair_teacher"] = torch.tensor([0, -1, 5, 2, 0, 1])
    out, grad = distill(case, backend)
    assert out.loss.item() == 0 and not grad.any() and not out.center_sum.any() and not out.center_count.any()


@gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("field", BAD_INDEX_FIELDS)
def test_gpu_distill_index_out_of_range_skips_the_pair(backend, field, poison_empty):
    case = with_bad_indices(make_case(5, 6, 4099, 2, 10, device="cuda"), field)
    first, grad = distill(case, backend)
    again, grad_again = distill(case, backend)
    assert all(torch.equal(a, b) for a, b in zip((*first, grad), (*again, grad_again)))
    expected, expected_grad = distill(as_float64(valid_equivalent(case)), "reference", check_values=True)
    for name in ("loss", "center_sum", "center_count"):
        assert_close_rel(getattr(first, name), getattr(expected, name), 2e-5, name)
    assert_close_rel(grad, expected_grad, 5e-5, "grad")


REPEATS = 30  # runs of a racy kernel that agree by luck: a race at 2 threads showed within a few


@pytest.mark.parametrize("backend", [b for b in DISTILL if b != "reference"])
def test_distill_csr_with_decreasing_offsets_stays_in_bounds(backend):
    """A hand-made CSR whose offsets leave [0, P] or decrease: clamped, no crash, the same result every time (the
    overlapping segments of such offsets once let two threads write one pair's loss)."""
    from udi_kernels.ops import distill_cross_entropy as op
    case = make_case(4, 3, 21, 1, 5)
    csr = op.build_csr(case["pair_student"], case["pair_teacher"], case["pair_weight"], case["center_id"], 4, 1)
    csr = csr._replace(student_offsets=torch.tensor([-7, 3, 1, 99, 2]), center_offsets=torch.tensor([2, -5]),
                       center_rows=torch.tensor([0, 9, -2]))
    runs = [op.distill_cross_entropy_csr(case["student"], case["teacher"], case["centers"], csr, case["row_weight"],
                                         0.1, 0.04, backend=backend) for _ in range(REPEATS)]
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))


def test_distill_csr_shapes_are_checked():
    from udi_kernels.ops import distill_cross_entropy as op
    case = make_case(4, 3, 21, 1, 5)
    csr = op.build_csr(case["pair_student"], case["pair_teacher"], case["pair_weight"], case["center_id"], 4, 1)
    with pytest.raises(ValueError, match="csr.student_offsets must have length 5"):
        op.distill_cross_entropy_csr(case["student"], case["teacher"], case["centers"],
                                     csr._replace(student_offsets=csr.student_offsets[:-1]), case["row_weight"], 0.1,
                                     0.04)


# ---- 2. srs_attention: taps out of range with check_taps=False ----------------------------------------------------

def attention_case(dtype=torch.float32, device="cpu", B=2, H=2, N=19, D=24, S=5, T=4):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, N, D, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    index = torch.randint(0, N, (B, S, T), generator=g, dtype=torch.int32).to(device)
    weight = (torch.rand(B, S, T, generator=g) + 0.1).to(device)
    return q, k, v, index, weight


def attention_forward_backward(q, k, v, index, weight, backend, check_taps=False, scale=None):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = srs_attention(q, k, v, index, weight, scale, backend=backend, check_taps=check_taps)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return (out, *grads)


@pytest.mark.parametrize("backend", ATTENTION)
def test_attention_tap_out_of_range_is_skipped(backend, poison_empty):
    q, k, v, index, weight = attention_case()
    index[0, 1, 2], index[1, 4, 0], index[1, 2, 1], index[0, 0, 3] = -1, 19, 2**31 - 1, -2**31
    actual = attention_forward_backward(q, k, v, index, weight, backend)
    skipped = (index < 0) | (index >= 19)
    expected = attention_forward_backward(q.double(), k.double(), v.double(), torch.where(skipped, 0, index),
                                          torch.where(skipped, 0, weight).double(), "reference", check_taps=True)
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), e, rtol=2e-5, atol=2e-5, msg=name)
    assert all(torch.equal(a, b) for a, b in zip(actual, attention_forward_backward(q, k, v, index, weight, backend)))


@gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_gpu_attention_tap_out_of_range_is_skipped(backend):
    q, k, v, index, weight = attention_case(device="cuda")
    index[0, 1, 2], index[1, 4, 0], index[1, 0, 3] = -1, 19, 2**31 - 1
    actual = attention_forward_backward(q, k, v, index, weight, backend)
    skipped = (index < 0) | (index >= 19)
    expected = attention_forward_backward(q.double(), k.double(), v.double(), torch.where(skipped, 0, index),
                                          torch.where(skipped, 0, weight).double(), "reference", check_taps=True)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double(), e, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ATTENTION)
def test_attention_nonfinite_weight_of_a_skipped_tap_is_not_read(backend):
    q, k, v, index, weight = attention_case()
    index[0, 0, 0], weight[0, 0, 0] = -1, math.nan
    index[1, 2, 3], weight[1, 2, 3] = 19, math.inf
    out = attention_forward_backward(q, k, v, index, weight, backend)
    assert all(torch.isfinite(t).all() for t in out)


@pytest.mark.parametrize("check_taps", [False, True])
@pytest.mark.parametrize("bad", [2**31, -2**31 - 1, 2**40])
def test_attention_int64_index_outside_int32_is_refused(bad, check_taps):
    q, k, v, index, weight = attention_case()
    index = index.long()
    index[0, 0, 0] = bad
    for backend in ATTENTION:
        with pytest.raises(ValueError, match="index must lie in"):
            srs_attention(q, k, v, index, weight, backend=backend, check_taps=check_taps)


# ---- 3. stratified_sample: offsets past 2**31 ---------------------------------------------------------------------

@pytest.mark.parametrize("offset", [2**31 - 1, 2**31, 3 * 2**30, 2**32 - 1])
def test_sample_offsets_past_int32_agree_on_every_backend(offset):
    boxes = torch.tensor([[[0.1, 0.1, 0.9, 0.9], [0.2, 0.9, 0.8, 0.1], [0.3, 0.3, 0.5, 0.5], [0.0, 0.2, 0.6, 0.7]],
                          [[0.0, 0.0, 0.7, 0.7], [0.3, 0.3, 1.0, 1.0], [0.1, 0.6, 0.4, 0.9], [0.5, 0.5, 0.9, 0.9]]])
    runs = [stratified_sample(boxes, seed=-987654321987, offset=offset, backend=b) for b in SAMPLE]
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip([*runs[0].globals, *runs[0].locals], [*run.globals, *run.locals]))
    other = stratified_sample(boxes, seed=-987654321987, offset=offset ^ 2**31, backend="reference")
    assert not torch.equal(other.globals.src_index, runs[0].globals.src_index), "the offset's high bit counts"


@gpu
@pytest.mark.parametrize("offset", [2**31, 2**32 - 1])
def test_gpu_sample_offsets_past_int32_agree_with_the_cpu(offset):
    boxes = torch.tensor([[[0.1, 0.1, 0.9, 0.9], [0.2, 0.9, 0.8, 0.1], [0.3, 0.3, 0.5, 0.5]]])
    expected = stratified_sample(boxes, seed=-5, offset=offset, backend="reference")
    for backend in ("native", "triton"):
        got = stratified_sample(boxes.cuda(), seed=-5, offset=offset, backend=backend)
        assert all(torch.equal(a.cpu(), b) for a, b in zip([*got.globals, *got.locals],
                                                           [*expected.globals, *expected.locals]))


def unchecked_boxes():
    """Boxes that check_boxes would refuse: NaN, ±inf, huge and tiny extents, edges outside [0, 1]."""
    boxes = torch.tensor([[[0.1, 0.1, 0.9, 0.9], [0.2, 0.9, 0.8, 0.1], [0.3, 0.3, 0.5, 0.5]]]).repeat(6, 1, 1)
    boxes[0, 0, 0] = math.nan
    boxes[1, 1, 0] = -math.inf
    boxes[2, 1] = torch.tensor([-3e38, -3e38, 3e38, 3e38])
    boxes[3, 1, 2] = boxes[3, 1, 0] + 1e-30
    boxes[4] = boxes[4] * 7 - 3
    boxes[5, 2, 1] = math.inf
    return boxes


@pytest.mark.parametrize("backend", [b for b in SAMPLE if b != "reference"])
def test_sample_unchecked_boxes_give_the_same_bits_on_every_backend(backend, poison_empty):
    """A sample counts only where its target coordinates are finite: nothing backend-specific (NaN floor,
    min/max or int conversion) reaches the outputs."""
    boxes = unchecked_boxes()
    expected = stratified_sample(boxes, seed=11, backend="reference", check_boxes=False)
    got = stratified_sample(boxes, seed=11, backend=backend, check_boxes=False)
    for a, e in zip([*got.globals, *got.locals], [*expected.globals, *expected.locals]):
        assert torch.equal(a, e)
    taps = expected.globals.tgt_index
    assert ((taps >= 0) & (taps < 14 * 14)).all()


@gpu
def test_gpu_sample_unchecked_boxes_give_the_same_bits_on_every_backend():
    boxes = unchecked_boxes()
    expected = stratified_sample(boxes, seed=11, backend="reference", check_boxes=False)
    for backend in ("native", "triton"):
        got = stratified_sample(boxes.cuda(), seed=11, backend=backend, check_boxes=False)
        assert all(torch.equal(a.cpu(), e) for a, e in zip([*got.globals, *got.locals],
                                                           [*expected.globals, *expected.locals]))


# ---- 4. Triton srs_attention in float16: q_s * scale past 65504 ---------------------------------------------------

def large_query_case(device="cpu"):
    """q near the float16 limit and tap weights summing to ~5: q_s * scale (2) ~ 1e6, far past 65504, while the
    logits stay moderate (k ~ 5e-6), so that float16 dot operands can match the float64 reference."""
    q, k, v, index, weight = attention_case(torch.float16, device, D=32)
    q = (q.float() * 1.5e4).clamp(-6e4, 6e4).half()
    return q, (k.float() * 5e-6).half(), v, index, weight * 2


def assert_float16_queries_match_float64(backend, device="cpu"):
    """Forward and backward against float64; dk of this case truly exceeds 65504 in places (inf in float16 is
    its correct rounding there), so gradients are compared where the float64 value is representable. Tolerance
    relative to the largest magnitude: 5e-3 for out, 1e-2 for the gradients (float16 dot operands, 2^-11 each, in
    sums of terms of both signs)."""
    q, k, v, index, weight = large_query_case(device)
    actual = attention_forward_backward(q, k, v, index, weight, backend, scale=2.0)
    expected = attention_forward_backward(q.double(), k.double(), v.double(), index, weight.double(), "reference",
                                          scale=2.0)
    assert torch.isfinite(actual[0]).all()
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected):
        representable = e.abs() < 6e4
        error = (a.double() - e)[representable].abs().max()
        assert error <= (5e-3 if name == "out" else 1e-2) * e[representable].abs().max(), name


@pytest.mark.parametrize("backend", ATTENTION)
def test_float16_queries_past_the_float16_range_stay_finite(backend):
    assert_float16_queries_match_float64(backend)


@gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_gpu_float16_queries_past_the_float16_range_stay_finite(backend):
    assert_float16_queries_match_float64(backend, "cuda")


# ---- 5. native CPU distill_cross_entropy gradient in float32 at large logits ---------------------------------------

@pytest.mark.skipif("native" not in DISTILL, reason="extension not built")
@pytest.mark.parametrize("logit_scale", [1e2, 1e3, 1e4])
def test_native_float32_gradient_stays_exact_at_large_logits(logit_scale):
    """The CPU kernel computes in double from the float32 inputs: its float32 gradient must be the float64 one,
    rounded (the fp32 kernels round (t - c) / tau_t itself, ~|u| * 6e-8, and are held to the usual tolerances)."""
    case = make_case(6, 4, 300, 1, 10, scale=logit_scale)
    out, grad = distill(case, "native", check_values=True, tau_s=0.1, tau_t=0.04)
    ref, ref_grad = distill(as_float64(case), "reference", check_values=True, tau_s=0.1, tau_t=0.04)
    # was 0.0016 / 0.026 / 0.34 on a gradient of norm ~37 (native CPU, saved float32 logsumexp)
    assert (grad.double() - ref_grad).abs().max() <= 2e-5 * ref_grad.abs().max()


# ---- 6. empty batches ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", DISTILL)
def test_empty_batches_give_zero_losses_and_leave_the_centers(backend):
    K = 17
    dino = DINOLoss(K, 4, 0.04, 0.07, 3, 10, backend=backend)
    dino.center.normal_()
    before = dino.center.clone()
    student = torch.randn(0, K, requires_grad=True)
    loss = dino(student, torch.randn(0, K), 0)
    assert loss.item() == 0 and torch.autograd.grad(loss, student)[0].shape == (0, K)
    assert torch.equal(dino.center, before)
    ibot = IBOTPatchLoss(K, 0.04, 0.07, 3, 10, backend=backend)
    for shape in ((0, 5), (3, 0)):
        patches = torch.randn(*shape, K, requires_grad=True)
        loss = ibot(patches, torch.randn(*shape, K), torch.zeros(shape, dtype=torch.bool), 0)
        assert loss.item() == 0 and torch.autograd.grad(loss, patches)[0].shape == (*shape, K)
    assert not ibot.center.any()
    udi = UDILoss(K, 4, backend=backend)
    student, teacher = random_udi_inputs(0, 2, K, 4, 3)
    loss, parts = udi(student, teacher, 0)
    assert loss.item() == 0 and all(p.item() == 0 for p in parts.values())
    assert torch.autograd.grad(loss, student.cls)[0].shape == (0, K)
    assert not any(c.center.any() for c in (udi.center_cls, udi.center_cls_plus, udi.center_patch))


@pytest.mark.parametrize("backend", ATTENTION)
@pytest.mark.parametrize("B,S,T", [(0, 3, 4), (2, 0, 4), (0, 40, 1), (2, 0, 1)])
def test_srs_attention_module_on_empty_batches(backend, B, S, T):
    module = SRSAttention(32, 4, backend=backend)
    x = torch.randn(B, 10, 32, requires_grad=True)
    out = module(x, torch.randint(0, 10, (B, S, T)), torch.rand(B, S, T))
    assert out.shape == (B, S, 32)
    out.sum().backward()
    assert x.grad.shape == x.shape and not x.grad.any()


@pytest.mark.parametrize("backend", ATTENTION)
def test_srs_attention_op_without_query_rows(backend):
    """q may have no rows: every tap lies outside it, q_s = 0 and each sample attends uniformly."""
    q, k, v, index, weight = attention_case()
    out = srs_attention(q[:, :, :0], k, v, index, weight, backend=backend, check_taps=False)
    torch.testing.assert_close(out, v.mean(2, keepdim=True).expand_as(out), rtol=1e-5, atol=1e-6)


@gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_gpu_attention_without_query_rows_or_samples(backend):
    """Nq = 0 (every tap outside q) and S = 0: defined outputs, and dk, dv fully written (zeros for S = 0)."""
    q, k, v, index, weight = attention_case(device="cuda")
    out, dq, dk, dv = attention_forward_backward(q[:, :, :0], k, v, index, weight, backend)
    torch.testing.assert_close(out, v.mean(2, keepdim=True).expand_as(out), rtol=1e-5, atol=1e-6)
    assert dq.shape == (2, 2, 0, 24) and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    _, dq, dk, dv = attention_forward_backward(q, k, v, index[:, :0], weight[:, :0], backend)
    assert not dq.any() and not dk.any() and not dv.any()


# ---- 7. messages that name the argument -------------------------------------------------------------------------

@pytest.mark.parametrize("backend", SAMPLE)
@pytest.mark.parametrize("seed", [torch.tensor(7), 1.5, True, "7"], ids=["tensor", "float", "bool", "str"])
def test_sample_seed_of_the_wrong_type(backend, seed):
    boxes = torch.tensor([[[0.1, 0.1, 0.9, 0.9], [0.2, 0.9, 0.8, 0.1]]])
    with pytest.raises(TypeError, match="seed must be an int, got"):
        stratified_sample(boxes, seed=seed, backend=backend)


@pytest.mark.parametrize("name,value,error", [("offset", 2.0, TypeError), ("offset", 2**32, ValueError),
                                              ("generator", 5, TypeError), ("global_window", True, TypeError)])
def test_sample_other_arguments_are_named(name, value, error):
    boxes = torch.tensor([[[0.1, 0.1, 0.9, 0.9], [0.2, 0.9, 0.8, 0.1]]])
    with pytest.raises(error, match=name):
        stratified_sample(boxes, **{name: value})


@pytest.mark.parametrize("call", [
    lambda: udi_kernels.distill_cross_entropy(**make_case(3, 3, 8, 1, 2), tau_s=0.1, tau_t=0.04, check_values="no"),
    lambda: srs_attention(*attention_case(), check_taps=None),
    lambda: stratified_sample(torch.tensor([[[0.1, 0.1, 0.9, 0.9], [0.2, 0.9, 0.8, 0.1]]]), check_boxes=1),
    lambda: SRSAttention(32, 4, check_taps="yes"),
], ids=["check_values", "check_taps", "check_boxes", "module_check_taps"])
def test_check_flags_must_be_bools(call):
    with pytest.raises(TypeError, match=r"check_\w+ must be a bool"):
        call()


def test_attention_wrong_k_batch_names_k():
    q, k, v, index, weight = attention_case()
    with pytest.raises(ValueError, match=r"k must have shape \[B=2"):
        srs_attention(q, k[:1], v[:1], index, weight)


@pytest.mark.parametrize("scale,error", [(float("nan"), ValueError), (math.inf, ValueError), ("1", TypeError)])
def test_attention_scale_is_named(scale, error):
    q, k, v, index, weight = attention_case()
    with pytest.raises(error, match="scale must be"):
        srs_attention(q, k, v, index, weight, scale=scale)


def test_srs_attention_module_names_wrong_inputs():
    module = SRSAttention(32, 4)
    x, index = torch.randn(2, 10, 32), torch.randint(0, 10, (2, 3, 4))
    with pytest.raises(ValueError, match=r"weight must have the shape of index \[2, 3, 4\]"):
        module(x, index, torch.rand(2, 3, 3))
    with pytest.raises(ValueError, match=r"x must have shape \[B, N >= 1, C=32\]"):
        module(x[..., :31], index)
    with pytest.raises(TypeError, match="index must be int32 or int64"):
        module(x, index.float())
    with pytest.raises(TypeError, match="num_heads must be an int"):
        SRSAttention(32, 4.0)
    with pytest.raises(ValueError, match="dim must be >= 1"):
        SRSAttention(-4, 2)
    with pytest.raises(TypeError, match=r"x must have the dtype of the module's parameters \(torch.float32"):
        module(x.double(), index)
    with pytest.raises(ValueError, match=r"index must lie in \[0, 10\).*\(the tokens\)"):
        SRSAttention(32, 4, check_taps=True)(x, index + 5)


@pytest.mark.parametrize("backend", DISTILL)
def test_half_loss_uses_its_center_in_float32(backend):
    K = 9
    loss_fn = DINOLoss(K, 3, 0.04, 0.07, 3, 10, backend=backend).half()
    reference = DINOLoss(K, 3, 0.04, 0.07, 3, 10, backend="reference")
    student, teacher = torch.randn(6, K), torch.randn(4, K)
    torch.testing.assert_close(loss_fn(student, teacher, 0), reference(student, teacher, 0))
    assert loss_fn.center.dtype == torch.float16


def test_sinkhorn_centering_on_an_empty_batch():
    loss_fn = DINOLoss(9, 3, 0.04, 0.07, 3, 10, centering="sinkhorn_knopp")
    student = torch.randn(0, 9, requires_grad=True)
    loss = loss_fn(student, torch.randn(0, 9), 0)
    assert loss.item() == 0 and torch.autograd.grad(loss, student)[0].shape == (0, 9)


def test_loss_on_another_device_names_the_center():
    loss_fn = DINOLoss(9, 3, 0.04, 0.07, 3, 10).to("meta")
    with pytest.raises(ValueError, match=r"DINOLoss.* is on meta but the inputs are on cpu"):
        loss_fn(torch.randn(6, 9), torch.randn(4, 9), 0)


@pytest.mark.parametrize("make,message", [
    (lambda: DINOLoss(9, 3, 0.04, 0.07, 3, 10, center_momentum=5), r"center_momentum must be in \[0.0, 1.0\]"),
    (lambda: DINOLoss(9, 3, 0.04, 0.07, 3, 10, center_momentum=-0.1), r"center_momentum must be in"),
    (lambda: IBOTPatchLoss(9, 0.04, 0.07, 3, 10, center_momentum2=1.5), r"center_momentum2 must be in"),
    (lambda: UDILoss(9, 4, center_momentum=float("nan")), "center_momentum must be a finite float"),
    (lambda: DINOLoss(9, 3, 0.04, 0.07, 3, 10, student_temp=0), r"student_temp must be in \(0.0, inf\)"),
    (lambda: DINOLoss(9, 1, 0.04, 0.07, 3, 10), "ncrops .* must be >= 2"),
    (lambda: UDILoss(9, 4, alpha=2), r"alpha must be in \[0.0, 1.0\]"),
    (lambda: UDILoss(9, 4, backend="cuda"), "backend must be one of"),
    (lambda: IBOTPatchLoss(9, -0.04, 0.07, 3, 10), r"warmup_teacher_temp2 must be in"),
    # temperatures whose reciprocal is no float32 (the ops refuse them): refused by the constructor, by name
    (lambda: DINOLoss(9, 3, 1e-40, 0.07, 3, 10), r"warmup_teacher_temp must be >= 2\*\*-126"),
    (lambda: DINOLoss(9, 3, 0.04, 0.07, 3, 10, student_temp=1e-39), r"student_temp must be >= 2\*\*-126"),
    (lambda: IBOTPatchLoss(9, 0.04, 2.0 ** -127, 3, 10), r"teacher_temp2 must be >= 2\*\*-126"),
    (lambda: UDILoss(9, 4, student_temp=1e-45), r"student_temp must be >= 2\*\*-126"),
])
def test_loss_arguments_are_checked(make, message):
    with pytest.raises((TypeError, ValueError), match=message):
        make()


# ---- 8. non-finite teacher statistics ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", DISTILL)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_teacher_skips_the_center_update_with_a_warning(backend, bad):
    K = 9
    loss_fn = DINOLoss(K, 3, 0.04, 0.07, 3, 10, backend=backend)
    loss_fn(torch.randn(6, K), torch.randn(4, K), 0)
    before = loss_fn.center.clone()
    teacher = torch.randn(4, K)
    teacher[2, 3] = bad
    with pytest.warns(RuntimeWarning, match="center update was skipped"):
        loss_fn(torch.randn(6, K), teacher, 0)
    assert torch.equal(loss_fn.center, before)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*center update was skipped")
        loss_fn(torch.randn(6, K), torch.randn(4, K), 0)  # finite again: updates, no warning
    assert not torch.equal(loss_fn.center, before) and torch.isfinite(loss_fn.center).all()


def test_nonfinite_udi_teacher_leaves_all_three_centers():
    K = 17
    udi = UDILoss(K, 4)
    student, teacher = random_udi_inputs(2, 2, K, 4, 3)
    teacher.patch[0, 0, 0] = math.nan
    with pytest.warns(RuntimeWarning, match="center update was skipped"):
        udi(student, teacher, 0)
    assert not udi.center_patch.center.any() and torch.isfinite(udi.center_cls_plus.center).all()


@gpu
def test_gpu_nonfinite_teacher_warns_at_a_later_update_without_a_sync():
    K = 9
    loss_fn = DINOLoss(K, 3, 0.04, 0.07, 3, 10).cuda()
    teacher = torch.randn(4, K, device="cuda")
    teacher[0, 0] = math.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_fn(torch.randn(6, K, device="cuda"), teacher, 0)
        torch.cuda.synchronize()
        loss_fn(torch.randn(6, K, device="cuda"), torch.randn(4, K, device="cuda"), 0)
    assert any("center update was skipped" in str(w.message) for w in caught)
    assert torch.isfinite(loss_fn.center).all()


# ---- 10. the Triton interpreter's bfloat16 dots ---------------------------------------------------------------------

@pytest.mark.skipif("triton" not in ATTENTION, reason="needs TRITON_INTERPRET=1")
def test_interpreter_refuses_bfloat16_attention():
    q, k, v, index, weight = attention_case(torch.bfloat16)
    with pytest.raises(TypeError, match="Triton interpreter .* bfloat16"):
        srs_attention(q, k, v, index, weight, backend="triton")


# ---- 11. gradients: none to weight (srs_attention) or centers (distill_cross_entropy) on any backend -----------------

@pytest.mark.parametrize("backend", ATTENTION)
def test_attention_weight_gets_no_gradient(backend):
    q, k, v, index, weight = attention_case()
    q.requires_grad_(True)
    weight.requires_grad_(True)
    out = srs_attention(q, k, v, index, weight, backend=backend)
    assert torch.autograd.grad(out.sum(), (q, weight), allow_unused=True)[1] is None


@pytest.mark.parametrize("backend", DISTILL)
def test_distill_cross_entropynters_and_teacher_get_no_gradient(backend):
    case = make_case(5, 4, 37, 2, 8)
    case["centers"].requires_grad_(True)
    case["teacher"].requires_grad_(True)
    case["student"].requires_grad_(True)
    loss = udi_kernels.distill_cross_entropy(**case, tau_s=0.1, tau_t=0.04, backend=backend).loss
    grads = torch.autograd.grad(loss, (case["student"], case["teacher"], case["centers"]), allow_unused=True)
    assert grads[0] is not None and grads[1] is None and grads[2] is None


def test_reference_index_rule_is_the_kernels_rule():
    """The reference's sentinel rows: an index out of range maps past the end, whatever its value."""
    index = torch.tensor([-2**40, -1, 0, 3, 4, 2**40])
    assert distill_reference.sentinel_index(index, 4).tolist() == [4, 4, 0, 3, 4, 4]


def test_dino_loss_names_the_expected_rank_of_its_inputs():
    loss = DINOLoss(32, 4, 0.04, 0.07, 2, 10)
    with pytest.raises(ValueError, match=r"teacher_output must be 2-D \[2 \* batch, 32\].*got shape \[1, 4, 32\]"):
        loss(torch.randn(1, 8, 32), torch.randn(1, 4, 32), 0)


def test_compat_masked_attention_names_an_input_of_another_dtype():
    from udi_kernels.compat import MaskedAttention
    x, maps = torch.randn(2, 10, 16, dtype=torch.float64), torch.rand(3, 2, 5, 10, dtype=torch.float64)
    with pytest.raises(TypeError, match="x must have the dtype of the module's parameters"):
        MaskedAttention(16, 2)(x, maps)
    assert MaskedAttention(16, 2).double()(x, maps)[0].dtype == torch.float64


# ---- 12. linear_distill_cross_entropy: indices out of range, hand-made CSRs (issue 19) ------------------------------

LINEAR = backends.available("linear_distill_cross_entropy", "cpu")


@pytest.mark.parametrize("backend", LINEAR)
def test_linear_distill_index_out_of_range_skips_the_pair(backend, poison_empty):
    """The rule of distill_cross_entropy (section 1) on the fused head: each index field holds 1e9, -1e12, its size
    and -1 at different pairs; every backend gives the composed float64 answer of the valid equivalent, twice."""
    import test_linear_distill_cross_entropy as linear
    case = linear.make_case(5, 9, 24, 300, 2, 14)
    for field in BAD_INDEX_FIELDS:
        case[field] = case[field].roll(-4)
        with_bad_indices(case, field)
        case[field] = case[field].roll(4)
    first, again = linear.fused(case, backend, check_values=False), linear.fused(case, backend, check_values=False)
    for a, b in zip((*first[0], *first[1]), (*again[0], *again[1])):
        assert torch.equal(a, b), "run-to-run identical"
    expected, expected_grads = linear.composed(valid_equivalent(case))
    for name in ("loss", "center_sum", "center_count"):
        assert_close_rel(getattr(first[0], name), getattr(expected, name), 2e-5, name)
    for grad, expected_grad, name in zip(first[1], expected_grads, ("grad student", "grad weight")):
        assert_close_rel(grad, expected_grad, 1e-4, name)


@pytest.mark.parametrize("backend", [b for b in LINEAR if b != "reference"])
def test_linear_distill_csr_with_decreasing_offsets_stays_in_bounds(backend):
    """As test_distill_csr_with_decreasing_offsets_stays_in_bounds, for the fused head and loss."""
    import test_linear_distill_cross_entropy as linear
    from udi_kernels.ops import distill_cross_entropy as distill_op
    from udi_kernels.ops.linear_distill_cross_entropy import linear_distill_cross_entropy_csr
    case = linear.make_case(4, 3, 8, 21, 1, 5)
    csr = distill_op.build_csr(case["pair_student"], case["pair_teacher"], case["pair_weight"], case["center_id"], 4, 1)
    csr = csr._replace(student_offsets=torch.tensor([-7, 3, 1, 99, 2]), center_offsets=torch.tensor([2, -5]),
                       center_rows=torch.tensor([0, 9, -2]))
    runs = [linear_distill_cross_entropy_csr(case["student"], case["weight"], case["teacher"], case["teacher_weight"],
                                             case["centers"], csr, case["row_weight"], 0.1, 0.04, backend=backend)
            for _ in range(REPEATS)]
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
