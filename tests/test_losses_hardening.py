"""Hostile inputs of the losses and the compat classes (issue 21 §7, §8, §12): a teacher that carries a graph,
float64 accuracy, and the compat classes' argument checks (TypeError / ValueError naming the argument).

Every loss (udi_kernels.losses' DINOLoss, IBOTPatchLoss, UDILoss, from logits and with the last layer fused in;
compat's UDILoss and lightly's DINOLoss) is run twice on the same values: once with teacher tensors that require
grad (made from a leaf through a multiplication, as a teacher with trainable parameters gives them) and once with
plain ones; the loss, the student's gradients and the centers must be bitwise the same and no gradient may reach
the teacher's leaf. float64: against float64 eager code, 1e-12 relative (max |error| / max |expected|) for the
losses and the centers; shapes are chosen so that the mean weights (1/18, 1/30, 1/3 ...) are not float32 numbers.
"""

import numpy as np
import pytest
import torch

from test_compat import SCHEDULE, assert_close_rel, lightly_reference, nested_outputs
from test_losses import BACKENDS, _centers, dino_eager, ema, probability_mixture_loss, sinkhorn_eager, udi_eager
from udi_kernels.compat import MaskedAttention
from udi_kernels.compat import UDILoss as CompatUDILoss
from udi_kernels.compat.lightly import DINOLoss as LightlyDINOLoss
from udi_kernels.layout import UDITeacher
from udi_kernels.losses import DINOLoss, IBOTPatchLoss, UDILoss, blend_cls_plus, cls_plus_targets, teacher_temperature
from udi_kernels.testing.losses import cross_entropy_rows, random_udi_inputs

FP64 = 1e-12
BACKENDS = [b for b in BACKENDS if b != "triton"]  # float64 and the structure: reference and native CPU


# ---- a teacher that carries a graph (issue 21 §8) ---------------------------------------------------------------

def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def udi_case(backend, graph, *, targets=False, fused=False, cls_plus_target="logits"):
    B, L, K, D = 2, 2, 23, 7
    width = D if fused else K
    student, teacher = random_udi_inputs(B, L, width, 4, 3, seed=1)
    loss = UDILoss(K, 2 + L, cls_plus_target=cls_plus_target, backend=backend)
    teacher = UDITeacher(*(graph(t) if t is not None and t.is_floating_point() else t for t in teacher))
    if targets or fused:
        teacher = cls_plus_targets(teacher)
    weights = {}
    if fused:
        last = torch.randn(K, D, generator=generator(2))
        weights = dict(weight=last.clone().requires_grad_(), teacher_weight=graph(last))
    out, _ = loss(student, teacher, 0, **weights)
    return out, list(student) + list(weights.values())[:1], _centers(loss)


def dino_case(backend, graph, *, fused=False, centering="ema"):
    B, ncrops, K, D = 3, 4, 19, 5
    width = D if fused else K
    student = torch.randn(ncrops * B, width, generator=generator(3), requires_grad=True)
    teacher = graph(torch.randn(2 * B, width, generator=generator(4)))
    loss = DINOLoss(K, ncrops, 0.04, 0.07, 3, 10, centering=centering, backend=backend)
    weights = {}
    if fused:
        last = torch.randn(K, D, generator=generator(5))
        weights = dict(weight=last.clone().requires_grad_(), teacher_weight=graph(last))
    return loss(student, teacher, 0, **weights), [student] + list(weights.values())[:1], [loss.center]


def ibot_case(backend, graph):
    R, N, K = 3, 5, 17
    student = torch.randn(R, N, K, generator=generator(6), requires_grad=True)
    teacher = graph(torch.randn(R, N, K, generator=generator(7)))
    loss = IBOTPatchLoss(K, 0.04, 0.07, 2, 10, backend=backend)
    return loss(student, teacher, torch.rand(R, N, generator=generator(8)) < 0.6, 0), [student], [loss.center]


def compat_udi_case(backend, graph):
    student, ((t_global, t_local), masks), leaves = nested_outputs(2, 2, 13, 3, 2, seed=9)
    teacher = (([graph(t) if t is not None else t for t in t_global],
                [graph(t) if t is not None else t for t in t_local]), masks)
    loss = CompatUDILoss(2, 13, SCHEDULE, backend=backend)
    return loss(student, teacher, 1)[0], leaves, [loss.centering.center]


def lightly_case(backend, graph):
    teacher = [graph(torch.randn(3, 11, generator=generator(10 + i))) for i in range(2)]
    student = [torch.randn(3, 11, generator=generator(20 + i), requires_grad=True) for i in range(4)]
    loss = LightlyDINOLoss(11, backend=backend)
    return loss(teacher, student, epoch=0), student, [loss.center]


TEACHER_CASES = {
    "udi": udi_case, "udi_targets": lambda b, g: udi_case(b, g, targets=True),
    "udi_probabilities": lambda b, g: udi_case(b, g, cls_plus_target="probabilities"),
    "udi_fused": lambda b, g: udi_case(b, g, fused=True), "dino": dino_case,
    "dino_fused": lambda b, g: dino_case(b, g, fused=True),
    "dino_sinkhorn": lambda b, g: dino_case(b, g, centering="sinkhorn_knopp"), "ibot": ibot_case,
    "compat_udi": compat_udi_case, "compat_lightly": lightly_case,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(TEACHER_CASES))
def test_every_loss_treats_the_teacher_as_detached(backend, case):
    """lightly-ai/lightly-train #352: a teacher with trainable parameters hands over tensors that require grad."""
    leaf = torch.ones((), requires_grad=True)
    loss, student, centers = TEACHER_CASES[case](backend, lambda t: t * leaf)
    plain_loss, plain_student, plain_centers = TEACHER_CASES[case](backend, lambda t: t)
    assert torch.equal(loss, plain_loss)
    for center, plain in zip(centers, plain_centers):
        assert torch.equal(center, plain)
    assert torch.autograd.grad(loss, [leaf], allow_unused=True) == (None,), "a gradient reached the teacher"
    grads = torch.autograd.grad(loss, student, allow_unused=True, materialize_grads=True)
    for grad, plain in zip(grads, torch.autograd.grad(plain_loss, plain_student, materialize_grads=True)):
        assert torch.equal(grad, plain)


def test_teacher_targets_of_a_teacher_with_a_graph_carry_none():
    _, teacher = random_udi_inputs(2, 1, 9, 3, 2)
    leaf = torch.ones((), requires_grad=True)
    carried = UDITeacher(teacher.cls * leaf, teacher.patch * leaf, teacher.patch_mask, teacher.local * leaf,
                         teacher.local_mask)
    for got, plain in zip(cls_plus_targets(carried), cls_plus_targets(teacher)):
        assert not got.requires_grad and torch.equal(got, plain)
    rows, _, _ = blend_cls_plus(carried.cls, carried.patch, carried.patch_mask, carried.local, carried.local_mask, 0.5)
    assert not rows.requires_grad


# ---- float64 is float64-accurate (issue 21 §12) -----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_dino_loss_and_center(backend):
    K, ncrops, B = 31, 4, 3  # 18 terms: 1/18 is not a float32 number
    loss_fn = DINOLoss(K, ncrops, 0.04, 0.07, 3, 10, backend=backend).double()
    loss_fn.center.normal_(generator=generator(1))
    center = loss_fn.center.clone()
    student = torch.randn(ncrops * B, K, generator=generator(2), dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2 * B, K, generator=generator(3), dtype=torch.float64)
    loss = loss_fn(student, teacher, 1)
    expected, new_center = dino_eager(student, teacher, center, ncrops, 0.055)
    assert loss.dtype == torch.float64
    assert_close_rel(loss, expected, FP64)
    assert_close_rel(loss_fn.center, new_center, FP64)
    assert_close_rel(torch.autograd.grad(loss, student)[0], torch.autograd.grad(expected, student)[0], FP64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_udi_loss_and_centers(backend):
    B, L, K = 3, 1, 29  # levels of 2 and 2 pairs of 3 rows: 1/6 weights; patch 1/#valid
    loss_fn = UDILoss(K, 2 + L, backend=backend).double()
    for center in _centers(loss_fn):
        center.normal_(generator=generator(4))
    before = [c.clone() for c in _centers(loss_fn)]
    student, teacher = random_udi_inputs(B, L, K, 5, 3, dtype=torch.float64, seed=5)
    loss, parts = loss_fn(student, teacher, 2)
    expected, expected_parts, new_centers = udi_eager(student, teacher, before,
                                                      teacher_temperature(2, 0.04, 0.07, 30, 100))
    assert_close_rel(loss, expected, FP64)
    for name in parts:
        assert_close_rel(parts[name], expected_parts[name].detach(), FP64)
    for center, expected_center in zip(_centers(loss_fn), new_centers):
        assert_close_rel(center, expected_center, FP64)
    for grad, expected_grad in zip(torch.autograd.grad(loss, list(student)),
                                   torch.autograd.grad(expected, list(student))):
        assert_close_rel(grad, expected_grad, FP64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_ibot_patch_loss(backend):
    R, N, K = 3, 7, 13
    loss_fn = IBOTPatchLoss(K, 0.04, 0.07, 2, 10, backend=backend).double()
    center = loss_fn.center.clone()
    student = torch.randn(R, N, K, generator=generator(6), dtype=torch.float64)
    teacher = torch.randn(R, N, K, generator=generator(7), dtype=torch.float64)
    mask = torch.zeros(R, N, dtype=torch.bool)
    mask[:, :3] = True  # 3 masked patches per image: 1 / (3 · 3)
    loss = loss_fn(student, teacher, mask, 1)
    per_image = (cross_entropy_rows(teacher, student, center, 0.07) * mask).sum(-1) / 3
    assert_close_rel(loss, per_image.mean(), FP64)
    assert_close_rel(loss_fn.center, ema(center, teacher.mean((0, 1))[None], 1), FP64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_lightly_loss(backend):
    B, K = 3, 17
    lightly = LightlyDINOLoss(K, backend=backend).double()
    teacher_views = [torch.randn(B, K, generator=generator(30 + i), dtype=torch.float64) for i in range(2)]
    student_views = [torch.randn(B, K, generator=generator(40 + i), dtype=torch.float64) for i in range(5)]
    # lightly rounds temperatures to float32 (its temperature tensors): 0.0625 is a float32 number
    expected, center = lightly_reference(teacher_views, student_views, lightly.center.clone(), 0.0625)
    assert_close_rel(lightly(teacher_views, student_views, teacher_temp=0.0625), expected, FP64)
    assert_close_rel(lightly.center, center, FP64)


# ---- the compat classes check their inputs as the ops do (issue 21 §7) ------------------------------------------

def masked_attention_call(x=None, map=None):
    module = MaskedAttention(12, 3, qkv_bias=True)
    x = torch.randn(2, 7, 12) if x is None else x
    return module(x, torch.rand(1, 2, 3, 7) if map is None else map)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(map=torch.rand(1, 2, 3, 7).tolist()), TypeError, "map must be a torch.Tensor, got list"),
    (dict(map=torch.ones(1, 2, 3, 7, dtype=torch.int64)), TypeError, "map must be a floating tensor"),
    (dict(map=torch.ones(1, 2, 3, 7, dtype=torch.bool)), TypeError, "map must be a floating tensor"),
    (dict(map=torch.rand(1, 2, 3, 7).to(torch.complex64)), TypeError, "map must be a floating tensor"),
    (dict(map=torch.rand(1, 2, 3, 7, device="meta")), ValueError, "map must be on cpu, got meta"),
    (dict(x=torch.randn(2, 7, 12).tolist()), TypeError, "x must be a torch.Tensor, got list"),
    (dict(x=torch.ones(2, 7, 12, dtype=torch.int64)), TypeError, "x must be a floating tensor"),
    (dict(x=torch.randn(2, 7, 12, dtype=torch.float64)), TypeError, "x must have the dtype of the module's parameters"),
    (dict(x=torch.randn(2, 7, 12, device="meta"), map=torch.rand(1, 2, 3, 7, device="meta")), ValueError,
     "x must be on the device of the module's parameters"),
])
def test_masked_attention_inputs_are_checked_naming_them(kwargs, error, message):
    with pytest.raises(error, match=message):
        masked_attention_call(**kwargs)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(skip_connection="no"), TypeError, "skip_connection must be a bool"),
    (dict(compute_attention=1), TypeError, "compute_attention must be a bool"),
    (dict(num_heads=0), ValueError, "num_heads must be >= 1"),
    (dict(backend="bogus"), ValueError, "backend must be one of"),
])
def test_masked_attention_constructor_arguments_are_checked(kwargs, error, message):
    with pytest.raises(error, match=message):
        MaskedAttention(**(dict(dim=12, num_heads=3) | kwargs))


def compat_udi_inputs(change):
    """nested_outputs with one entry replaced: change(student, teacher) edits the nested lists in place."""
    student, teacher, _ = nested_outputs(2, 2, 8, 3, 2)
    change(student, teacher)
    return student, teacher


def _set(tree, path, value):
    for index in path[:-1]:
        tree = tree[index]
    tree[path[-1]] = value(tree[path[-1]])


@pytest.mark.parametrize("side, path, value, error, message", [
    ("student", (0, 0, 0), lambda t: t.long(), TypeError, "student_output global cls must be a floating tensor"),
    ("student", (0, 1, 1), lambda t: t.tolist(), TypeError, "student_output local cls\\+ must be a torch.Tensor"),
    ("teacher", (0, 0, 2), lambda t: t.to(torch.complex64), TypeError,
     "teacher_output global patch must be a floating tensor"),
    ("student", (0, 0, 0), lambda t: t.to("meta"), ValueError, "student_output global cls must be on cpu"),
    ("teacher", (1, 1, 2), lambda t: t.to(torch.complex64), TypeError,
     "the mask of teacher_output local samples must be float16, bfloat16, float32, float64 or bool"),
    ("student", (1, 0, 2), lambda t: t.to("meta"), ValueError,
     "the mask of student_output global patch must be on cpu"),
])
def test_compat_udi_loss_inputs_are_checked_naming_them(side, path, value, error, message):
    def change(student, teacher):
        _set(student if side == "student" else teacher, path, value)
    student, teacher = compat_udi_inputs(change)
    with pytest.raises(error, match=message):
        CompatUDILoss(2, 8, SCHEDULE)(student, teacher, 0)


@pytest.mark.parametrize("epoch, error, message", [
    (-1, ValueError, "epoch must be >= 0, got -1"), (1.0, TypeError, "epoch must be an int"),
    (5, ValueError, "epoch 5 is outside teacher_temp_schedule"),
])
def test_compat_udi_loss_epoch_is_checked(epoch, error, message):
    student, teacher, _ = nested_outputs(2, 2, 8, 3, 2)
    with pytest.raises(error, match=message):
        CompatUDILoss(2, 8, SCHEDULE)(student, teacher, epoch)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(dim=0), ValueError, "dim must be >= 1"), (dict(dim=8.0), TypeError, "dim must be an int"),
    (dict(alpha=1.5), ValueError, "alpha must be in"), (dict(student_temp=0.0), ValueError, "student_temp must be"),
    (dict(center_momentum=float("nan")), ValueError, "center_momentum must be a finite float"),
    (dict(weights=[0.5, float("inf"), 0.5]), ValueError, r"weights\[1\] must be a finite float"),
    (dict(teacher_temp_schedule=np.array([0.04, -0.07])), ValueError, r"teacher_temp_schedule\[1\] must be in"),
    (dict(teacher_temp_schedule=0.04), TypeError, "teacher_temp_schedule must be a sequence"),
    (dict(backend="bogus"), ValueError, "backend must be one of"),
    (dict(include_patch=1), TypeError, "include_patch must be a bool"),
    (dict(num_clt=True), ValueError, "num_clt must be 1 or 2"),
])
def test_compat_udi_loss_constructor_arguments_are_checked(kwargs, error, message):
    with pytest.raises(error, match=message):
        CompatUDILoss(**(dict(num_local_crops=2, dim=8, teacher_temp_schedule=SCHEDULE) | kwargs))


@pytest.mark.parametrize("call, error, message", [
    (lambda f: f(torch.randn(2, 3, 8), [torch.randn(3, 8)] * 3), TypeError, "teacher_out must be a list"),
    (lambda f: f([torch.randn(3, 8).tolist()] * 2, [torch.randn(3, 8)] * 3), TypeError,
     r"teacher_out\[0\] must be a torch.Tensor"),
    (lambda f: f([torch.randn(3, 8)] * 2, [torch.ones(3, 8, dtype=torch.int64)] * 3), TypeError,
     r"student_out\[0\] must be a floating tensor"),
    (lambda f: f([torch.randn(3, 8)] * 2, [torch.randn(3, 8), torch.randn(3, 8, device="meta")]), ValueError,
     r"student_out\[1\] must be on cpu"),
    (lambda f: f([torch.randn(3, 8)] * 2, [torch.randn(3, 8, device="meta")] * 3), ValueError,
     "student_out must be on cpu"),
    (lambda f: f([torch.randn(3, 8)] * 2, [torch.randn(3, 8)] * 3, teacher_temp=0.0), ValueError,
     "teacher_temp must be in"),
    (lambda f: f([torch.randn(3, 8)] * 2, [torch.randn(3, 8)] * 3, epoch=-1), ValueError, "epoch must be >= 0"),
    (lambda f: f.update_center([[1.0] * 8]), TypeError, "teacher_out must be a torch.Tensor"),
    (lambda f: f.update_center(torch.ones(2, 3, 7)), ValueError, r"teacher_out must have shape \[..., 8\]"),
])
def test_lightly_dino_loss_inputs_are_checked_naming_them(call, error, message):
    with pytest.raises(error, match=message):
        call(LightlyDINOLoss(8))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(output_dim=0), ValueError, "output_dim must be >= 1"),
    (dict(teacher_temp=-0.04), ValueError, "teacher_temp must be in"),
    (dict(warmup_teacher_temp=float("nan")), ValueError, "warmup_teacher_temp must be a finite float"),
    (dict(warmup_teacher_temp_epochs=-1), ValueError, "warmup_teacher_temp_epochs must be >= 0"),
    (dict(center_momentum=2.0), ValueError, "center_momentum must be in"),
    (dict(student_temp="0.1"), TypeError, "student_temp must be a float"),
])
def test_lightly_dino_loss_constructor_arguments_are_checked(kwargs, error, message):
    with pytest.raises(error, match=message):
        LightlyDINOLoss(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_sinkhorn_knopp_centering(backend):
    K, B = 37, 3
    loss_fn = DINOLoss(K, 3, 0.04, 0.04, 1, 10, centering="sinkhorn_knopp", backend=backend).double()
    student = torch.randn(3 * B, K, generator=generator(11), dtype=torch.float64)
    teacher = 0.1 * torch.randn(2 * B, K, generator=generator(12), dtype=torch.float64)
    q = sinkhorn_eager(teacher, 0.04, 3).chunk(2)
    s = torch.log_softmax(student / 0.1, -1).chunk(3)
    terms = [-(q[iq] * s[v]).sum(-1).mean() for iq in range(2) for v in range(3) if v != iq]
    assert_close_rel(loss_fn(student, teacher, 0), sum(terms) / 4, FP64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_probability_targets(backend):
    """cls_plus_target='probabilities' (the paper's mixture) in float64, against the mixture written out."""
    B, L, K, tau_t = 3, 1, 23, 0.04
    student, teacher = random_udi_inputs(B, L, K, 3, 3, dtype=torch.float64, seed=13)
    loss_fn = UDILoss(K, 2 + L, cls_plus_target="probabilities", backend=backend).double()
    loss_fn.center_cls_plus.center.normal_(generator=generator(14))
    center = loss_fn.center_cls_plus.center.clone()
    _, parts = loss_fn(student, teacher, 0)
    assert_close_rel(parts["cls_plus"], probability_mixture_loss(student, teacher, center, tau_t, B, L), FP64)


def test_float64_lightly_update_center():
    loss_fn = LightlyDINOLoss(9).double()
    rows = torch.randn(2, 3, 9, generator=generator(15), dtype=torch.float64) / 3
    loss_fn.update_center(rows)
    assert_close_rel(loss_fn.center[0, 0], 0.1 * rows.reshape(-1, 9).mean(0), FP64)


@pytest.mark.parametrize("side, field, targets", [("student", "patch", False), ("teacher", "patch", False),
                                                  ("teacher", "local", False), ("teacher", "extra_patch_sum", True)])
def test_udi_loss_fields_that_are_no_tensors_raise_type_errors_naming_them(side, field, targets):
    """A field of UDIStudent / UDITeacher / UDITargets that is no tensor is a TypeError naming it (it was a
    ValueError about its shape)."""
    student, teacher = random_udi_inputs(2, 2, 11, 4, 3, seed=1)
    if targets:
        teacher = cls_plus_targets(teacher)
    inputs = dict(student=student, teacher=teacher)
    inputs[side] = inputs[side]._replace(**{field: getattr(inputs[side], field).tolist()})
    name = field if targets else f"{side} {field}"
    with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor, got list"):
        UDILoss(11, 4)(inputs["student"], inputs["teacher"], 0)
