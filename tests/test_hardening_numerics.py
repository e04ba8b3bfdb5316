"""Regression tests of issue 21 (hardening round 4), numerics: no intermediate overflow where the logit is finite
(21.1), weight-0 rows, pairs, attention taps and masked-out loss samples left out exactly whatever their values
(21.4), on every backend the CPU has (Triton under the interpreter); the `gpu` ones run native and Triton on CUDA
(scripts/gpu_check.sh)."""
import math

import pytest
import torch

import udi_kernels
from udi_kernels import backends, srs_attention
from udi_kernels.compat import UDILoss as CompatUDILoss
from udi_kernels.losses import UDILoss, cls_plus_targets
from udi_kernels.testing.losses import random_udi_inputs

from test_compat import SCHEDULE, nested_outputs
from test_distill_cross_entropy import make_case
from test_hardening import attention_case, attention_forward_backward

ATTENTION = backends.available("srs_attention", "cpu")
DISTILL = backends.available("distill_cross_entropy", "cpu")
LINEAR = backends.available("linear_distill_cross_entropy", "cpu")
gpu = pytest.mark.gpu
NAN = math.nan


# ---- 21.1 scaling before the dot ---------------------------------------------------------------------------------

# (dtype, |q|, |k|, scale): every logit q_s . k * scale is finite in float32, while q_s * scale, q_s . k or the
# scale itself is not (the case first)
EXTREMES = [(torch.float32, 1e20, 1e-25, 1e19), (torch.float32, 1e-30, 1e36, 1.0),
            (torch.float32, 1e-20, 1e-20, 1e39), (torch.float32, 1e-38, 1e-38, 1e70),
            (torch.float32, 1e38, 1e38, 1e-45), (torch.float32, 3e38, 3e38, 2.0**-140),
            (torch.bfloat16, 1e20, 1e-25, 1e19), (torch.bfloat16, 1e-30, 1e36, 1.0),
            (torch.float16, 6e4, 1e-7, 1e10), (torch.float16, 1e-7, 6e4, 1e2)]


def extreme_case(dtype, q_size, k_size, device="cpu"):
    q, k, v, index, weight = attention_case(torch.float64, B=2, H=2, N=19, D=24, S=5, T=1)
    largest = torch.finfo(dtype).max
    q, k = ((t * size).clamp(-largest, largest).to(dtype) for t, size in ((q, q_size), (k, k_size)))
    return q.to(device), k.to(device), v.to(dtype).to(device), index.to(device), torch.ones_like(weight).to(device)


def natural_scales(q, k, v, scale):
    """The magnitudes out, dq, dk and dv are formed at (one-hot taps of weight 1, v and grad_out of order 1):
    rounding errors scale with them, even where the exact gradient cancels to 0 (a saturated softmax)."""
    q_top, k_top, v_top = (t.double().abs().max() for t in (q, k, v))
    return v_top, abs(scale) * k_top * v_top, abs(scale) * q_top * v_top, 1.0


def assert_extreme_logits_match_float64(backend, dtype, q_size, k_size, scale, device="cpu"):
    """out and the gradients finite, and against float64 on the same (rounded) inputs where float64's value is
    representable in dtype. Tolerance relative to natural_scales: 1e-5 for float32, 1e-2 for float16/bfloat16
    (half-precision dot operands and outputs)."""
    q, k, v, index, weight = extreme_case(dtype, q_size, k_size, device)
    if backends.why_unsupported(udi_kernels.declarations.SRS_ATTENTION, backend, q.device, dtype) is not None:
        pytest.skip(f"{backend} does not run {dtype} here")
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = srs_attention(*leaves, index, weight, scale, backend=backend)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    expected_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected = srs_attention(*expected_leaves, index, weight.double(), scale, backend="reference")
    expected_grads = torch.autograd.grad(expected, expected_leaves, torch.ones_like(expected))
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for a, e, natural in zip((out, *grads), (expected, *expected_grads), natural_scales(q, k, v, scale)):
        representable = e.abs() <= torch.finfo(dtype).max
        assert torch.isfinite(a[representable]).all()
        assert (a.double() - e)[representable].abs().max() <= tolerance * natural


@pytest.mark.parametrize("dtype,q_size,k_size,scale", EXTREMES)
@pytest.mark.parametrize("backend", ATTENTION)
def test_attention_logits_finite_where_their_factors_overflow(backend, dtype, q_size, k_size, scale):
    assert_extreme_logits_match_float64(backend, dtype, q_size, k_size, scale)


@gpu
@pytest.mark.parametrize("dtype,q_size,k_size,scale", EXTREMES)
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_gpu_attention_logits_finite_where_their_factors_overflow(backend, dtype, q_size, k_size, scale):
    assert_extreme_logits_match_float64(backend, dtype, q_size, k_size, scale, "cuda")


def test_reference_attention_keeps_its_bits_where_nothing_overflows():
    """The normalized logits are the plain product q_s k^T * scale bit for bit at ordinary magnitudes."""
    from udi_kernels.reference.srs_attention import scaled_logits
    q, k, _, _, _ = attention_case(B=2, H=3, N=30, D=32)
    q_s = q[:, :, :7] * 3.7
    assert torch.equal(scaled_logits(q_s, k, 0.37), torch.matmul(q_s, k.transpose(-1, -2)) * 0.37)


@pytest.mark.parametrize("tau", [1e-39, 2.0**-127, 5e-324])
@pytest.mark.parametrize("name", ["tau_s", "tau_t"])
@pytest.mark.parametrize("op", ["distill_cross_entropy", "linear_distill_cross_entropy"])
def test_temperature_whose_reciprocal_overflows_float32_is_refused(op, name, tau):
    case = make_case(4, 3, 8, 2, 5)
    taus = {"tau_s": 0.1, "tau_t": 0.04, name: tau}
    with pytest.raises(ValueError, match=name):
        if op == "distill_cross_entropy":
            udi_kernels.distill_cross_entropy(**case, **taus)
        else:
            udi_kernels.linear_distill_cross_entropy(torch.randn(4, 6), torch.randn(8, 6), torch.randn(3, 6),
                                                     torch.randn(8, 6), case["centers"], case["center_id"],
                                                     case["pair_student"], case["pair_teacher"], case["pair_weight"],
                                                     case["row_weight"], **taus)


def test_smallest_temperature_is_accepted():
    case = make_case(4, 3, 8, 2, 5)
    out = udi_kernels.distill_cross_entropy(**{**case, "student": case["student"] * 1e-38}, tau_s=2.0**-126,
                                            tau_t=0.04, backend="reference")
    assert torch.isfinite(out.loss)


# ---- 21.4 weight-0 rows and pairs --------------------------------------------------------------------------------

def poisoned_case(poison=NAN):
    """Teacher row 1 has row_weight 0 and only weight-0 pairs; student row 2 only weight-0 pairs; both hold
    `poison`. Also returns the same case with those rows finite: what every result must equal."""
    clean = make_case(6, 5, 40, 2, 12, seed=2)
    clean["pair_teacher"][:2] = 1
    clean["pair_student"][2:4] = 2
    unread = (clean["pair_teacher"] == 1) | (clean["pair_student"] == 2)
    clean["pair_weight"] = torch.where(unread, 0.0, clean["pair_weight"])
    clean["row_weight"][1] = 0
    poisoned = {key: value.clone() for key, value in clean.items()}
    poisoned["teacher"][1, ::3] = poison
    poisoned["student"][2, 1::2] = poison
    return poisoned, clean


def distill_results(case, backend):
    student = case["student"].detach().requires_grad_()
    out = udi_kernels.distill_cross_entropy(**{**case, "student": student}, tau_s=0.1, tau_t=0.04, backend=backend)
    return (*out, *torch.autograd.grad(out.loss, student))


@pytest.mark.parametrize("poison", [NAN, math.inf, -math.inf])
@pytest.mark.parametrize("backend", DISTILL)
def test_distill_weight_zero_rows_are_left_out_exactly(backend, poison):
    poisoned, clean = poisoned_case(poison)
    for got, expected in zip(distill_results(poisoned, backend), distill_results(clean, backend)):
        assert torch.equal(got, expected)


def linear_results(case, backend, teacher_logits=False):
    g = torch.Generator().manual_seed(4)
    student = torch.randn(6, 8, generator=g)
    student[2] = case["student"][2, :8]  # row 2 poisoned like the case's
    teacher = torch.randn(5, 8, generator=g)
    teacher[1] = case["teacher"][1, :8]
    teacher_weight = torch.randn(40, 8, generator=g)
    if teacher_logits:
        teacher, teacher_weight = case["teacher"], None
    leaves = [student.requires_grad_(), torch.randn(40, 8, generator=g).requires_grad_()]
    out = udi_kernels.linear_distill_cross_entropy(*leaves, teacher, teacher_weight, case["centers"],
                                                   case["center_id"], case["pair_student"], case["pair_teacher"],
                                                   case["pair_weight"], case["row_weight"], 0.1, 0.04, backend=backend)
    return (*out, *torch.autograd.grad(out.loss, leaves))


@pytest.mark.parametrize("teacher_logits", [False, True])
@pytest.mark.parametrize("backend", LINEAR)
def test_linear_weight_zero_rows_are_left_out_exactly(backend, teacher_logits):
    poisoned, clean = poisoned_case()
    for got, expected in zip(linear_results(poisoned, backend, teacher_logits),
                             linear_results(clean, backend, teacher_logits)):
        assert torch.equal(got, expected)


def attention_weight_zero_case(poison, device="cpu"):
    """Query row 7 is read only by taps of weight 0 and holds `poison` in the first case; the second case, with
    that row finite, is what every result must equal."""
    q, k, v, index, weight = attention_case()
    unread = 7
    index = torch.where(index == unread, unread + 1, index)
    index[0, 1, 2], index[1, 3, 0], index[1, 4, 3] = unread, unread, unread
    weight[0, 1, 2], weight[1, 3, 0], weight[1, 4, 3] = 0.0, 0.0, 0.0
    poisoned = q.clone()
    poisoned[:, :, unread, ::2] = poison
    return [[t.to(device) for t in (queries, k, v, index, weight)] for queries in (poisoned, q)]


def assert_weight_zero_taps_left_out(backend, poison, device="cpu"):
    poisoned, clean = attention_weight_zero_case(poison, device)
    for name, got, expected in zip(("out", "dq", "dk", "dv"), attention_forward_backward(*poisoned, backend),
                                   attention_forward_backward(*clean, backend)):
        assert torch.equal(got, expected), name


@pytest.mark.parametrize("poison", [NAN, math.inf])
@pytest.mark.parametrize("backend", ATTENTION)
def test_attention_weight_zero_taps_are_left_out_exactly(backend, poison):
    assert_weight_zero_taps_left_out(backend, poison)


@gpu
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_gpu_attention_weight_zero_taps_are_left_out_exactly(backend):
    assert_weight_zero_taps_left_out(backend, NAN, "cuda")


@pytest.mark.parametrize("backend", DISTILL)
def test_value_checks_look_only_at_the_rows_that_count(backend):
    poisoned, _ = poisoned_case()
    distill_results(poisoned, backend)  # check_values=True: the uncounted NaN rows are accepted
    poisoned["row_weight"][1] = 0.5  # now teacher row 1 counts
    with pytest.raises(ValueError, match="teacher"):
        distill_results(poisoned, backend)


def udi_loss_results(teacher, backend, cls_plus_target, fused):
    """UDILoss's total, parts, student gradients and centers on random_udi_inputs' student and `teacher`."""
    K, D = 23, 7
    student, _ = random_udi_inputs(2, 2, D if fused else K, 4, 3, seed=1)
    loss = UDILoss(K, 4, cls_plus_target=cls_plus_target, backend=backend)
    kwargs = {}
    if fused:
        last = torch.randn(K, D, generator=torch.Generator().manual_seed(2))
        kwargs, teacher = dict(weight=last, teacher_weight=last), cls_plus_targets(teacher)
    total, parts = loss(student, teacher, 0, **kwargs)
    grads = torch.autograd.grad(total, [t for t in student if t is not None and t.requires_grad])
    centers = [loss.center_cls.center, loss.center_cls_plus.center, loss.center_patch.center]
    return [total, *(parts[name] for name in sorted(parts)), *grads, *centers]


@pytest.mark.parametrize("poison", [NAN, math.inf])
@pytest.mark.parametrize("cls_plus_target, fused", [("logits", False), ("probabilities", False), ("logits", True)])
@pytest.mark.parametrize("backend", DISTILL)
def test_udi_loss_leaves_masked_out_teacher_samples_out_exactly(backend, cls_plus_target, fused, poison):
    """Teacher samples of mask False (global and local) hold `poison`: every result equals the finite case's."""
    _, clean = random_udi_inputs(2, 2, 7 if fused else 23, 4, 3, seed=1)
    poisoned = clean._replace(patch=clean.patch.masked_fill(~clean.patch_mask[..., None], poison),
                              local=clean.local.masked_fill(~clean.local_mask[..., None], poison))
    for got, expected in zip(udi_loss_results(poisoned, backend, cls_plus_target, fused),
                             udi_loss_results(clean, backend, cls_plus_target, fused)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("num_clt", [1, 2])
@pytest.mark.parametrize("backend", DISTILL)
def test_compat_udi_loss_leaves_padded_teacher_samples_out_exactly(backend, num_clt):
    """The reference's nested outputs with NaN in every teacher sample of mask 0 (padding): the finite case's loss,
    gradients and centers."""
    def results(poison):
        student, ((t_global, t_local), masks), leaves = nested_outputs(2, 2, 19, 4, 3, num_clt, seed=5)
        t_global[-1] = t_global[-1].masked_fill(masks[0][-1] == 0, poison)
        t_local[-1] = t_local[-1].masked_fill(masks[1][-1] == 0, poison)
        loss = CompatUDILoss(2, 19, SCHEDULE, num_clt=num_clt, backend=backend)
        total, _ = loss(student, ((t_global, t_local), masks), 1)
        return [total, *torch.autograd.grad(total, leaves), loss.centering.center]

    for got, expected in zip(results(NAN), results(0.0)):
        assert torch.equal(got, expected)
