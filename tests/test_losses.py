"""DINOLoss, IBOTPatchLoss, UDILoss and the Sinkhorn-Knopp center vs independent float64 eager code from the spec.

Inputs are float32; the eager implementations run in float64 on the same values. Tolerance: 1e-5 relative
(fp32 kernels, τt ≥ 0.04 with logits ~ N(0, 1)), 1e-12 for the float64 reference backend.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from udi_kernels import backends
from udi_kernels.layout import UDIStudent, UDITeacher, dino_crop_pairs, teacher_rows_by_pair
from udi_kernels.losses import (DINOLoss, EMACenter, IBOTPatchLoss, UDILoss, blend_cls_plus, cls_plus_targets,
                                crop_mean_table, identity_table, sinkhorn_knopp_center, teacher_entropies,
                                teacher_temperature, udi_pair_tables, update_centers)
from udi_kernels.ops.distill_cross_entropy import csr_pair_student
from udi_kernels.testing.losses import cross_entropy_rows as H
from udi_kernels.testing.losses import random_udi_inputs, udi_centers_eager, udi_loss_eager

BACKENDS = ["reference"]
if backends.why_unavailable("native", "distill_cross_entropy", torch.device("cpu")) is None:
    BACKENDS.append("native")
if backends.why_unavailable("triton", "distill_cross_entropy", torch.device("cpu")) is None:
    BACKENDS.append("triton")


def ema(center, mean, count):
    return center if count == 0 else 0.9 * center + 0.1 * mean


# ---- DINO ----------------------------------------------------------------------------------------------------------

def dino_eager(student, teacher, center, ncrops, tau_t):
    s, t = student.double().chunk(ncrops), teacher.double().chunk(2)
    terms = [H(t[iq], s[v], center, tau_t).mean() for iq in range(2) for v in range(ncrops) if v != iq]
    return sum(terms) / len(terms), ema(center, teacher.double().mean(0, keepdim=True), 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dino_loss_matches_eager(backend):
    K, ncrops, B = 301, 5, 3
    loss_fn = DINOLoss(K, ncrops, 0.04, 0.07, 3, 10, backend=backend)
    loss_fn.center.normal_()
    for epoch in (0, 1, 5):
        student = torch.randn(ncrops * B, K, requires_grad=True)
        teacher = torch.randn(2 * B, K)
        center = loss_fn.center.double().clone()
        loss = loss_fn(student, teacher, epoch)
        expected, new_center = dino_eager(student, teacher, center, ncrops, [0.04, 0.055, 0.07][min(epoch, 2)])
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss_fn.center.double(), new_center, rtol=1e-5, atol=1e-6)
        grad, = torch.autograd.grad(loss, student)
        expected_grad, = torch.autograd.grad(expected, student)
        torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-4, atol=1e-6)


def test_teacher_temperature_schedule():
    assert teacher_temperature(0, 0.04, 0.07, 30, 100) == pytest.approx(0.04)
    assert teacher_temperature(29, 0.04, 0.07, 30, 100) == pytest.approx(0.07)
    assert teacher_temperature(15, 0.04, 0.07, 31, 100) == pytest.approx(0.055)
    assert teacher_temperature(500, 0.04, 0.07, 30, 100) == pytest.approx(0.07)


# ---- iBOT ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_ibot_patch_loss_matches_eager(backend):
    R, N, K = 4, 7, 129
    loss_fn = IBOTPatchLoss(K, 0.04, 0.07, 2, 10, backend=backend)
    loss_fn.center.normal_()
    center = loss_fn.center.double().clone()
    student, teacher = torch.randn(R, N, K, requires_grad=True), torch.randn(R, N, K)
    mask = torch.rand(R, N) < 0.5
    mask[1] = False  # an image with no masked patch adds 0
    loss = loss_fn(student, teacher, mask, epoch=1)
    per_image = (H(teacher.double(), student.double(), center, 0.07) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    torch.testing.assert_close(loss.double(), per_image.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_fn.center.double(), ema(center, teacher.double().mean((0, 1))[None], 1),
                               rtol=1e-5, atol=1e-6)


# ---- Sinkhorn-Knopp -----------------------------------------------------------------------------------------------

def sinkhorn_eager(teacher, tau, iterations):
    """DINOv2's algorithm, float64, exp form."""
    Q = torch.exp(teacher.double() / tau).t()
    K, B = Q.shape
    Q /= Q.sum()
    for _ in range(iterations):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    return (Q * B).t()


def test_sinkhorn_center_reproduces_dinov2_targets():
    teacher = torch.randn(13, 97) * 0.5
    center = sinkhorn_knopp_center(teacher, 0.1, iterations=3)
    probs = torch.softmax((teacher.double() - center.double()) / 0.1, -1)
    torch.testing.assert_close(probs, sinkhorn_eager(teacher, 0.1, 3), rtol=1e-4, atol=1e-7)


def test_sinkhorn_center_finite_at_extreme_logits():
    teacher = torch.randn(8, 64) * 1e3
    assert torch.isfinite(sinkhorn_knopp_center(teacher, 0.04)).all()


def test_dino_loss_with_sinkhorn_centering():
    K, B = 64, 3
    loss_fn = DINOLoss(K, 3, 0.04, 0.04, 1, 10, centering="sinkhorn_knopp")
    student, teacher = torch.randn(3 * B, K), torch.randn(2 * B, K) * 0.1
    q = sinkhorn_eager(teacher, 0.04, 3).chunk(2)
    s = F.log_softmax(student.double() / 0.1, -1).chunk(3)
    terms = [-(q[iq] * s[v]).sum(-1).mean() for iq in range(2) for v in range(3) if v != iq]
    torch.testing.assert_close(loss_fn(student, teacher, 0).double(), sum(terms) / 4, rtol=1e-4, atol=1e-6)
    assert not loss_fn.center.any()


# ---- UDI -----------------------------------------------------------------------------------------------------------

def udi_eager(student: UDIStudent, teacher: UDITeacher, centers, tau_t):
    """The float64 eager loss, its parts and the centers after the step (udi_kernels.testing.losses)."""
    loss, parts = udi_loss_eager(student, teacher, centers, tau_t)
    return loss, parts, udi_centers_eager(teacher, centers)


def _centers(loss_fn):
    return [loss_fn.center_cls.center, loss_fn.center_cls_plus.center, loss_fn.center_patch.center]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,all_masked", [(3, False), (0, False), (2, True)], ids=["L3", "L0", "all_masked"])
def test_udi_loss_matches_eager(backend, L, all_masked):
    B, K, Sg, Sl = 3, 211, 5, 4
    loss_fn = UDILoss(K, 2 + L, backend=backend)
    for center in _centers(loss_fn):
        center.normal_()
    before = [c.clone() for c in _centers(loss_fn)]
    student, teacher = random_udi_inputs(B, L, K, Sg, Sl, all_masked_patches=all_masked)
    if L == 0:
        teacher = teacher._replace(local=None, local_mask=None)
        teacher_eager = teacher._replace(local=torch.zeros(0, Sl, K), local_mask=torch.zeros(0, Sl, dtype=torch.bool))
    else:
        teacher_eager = teacher
    loss, parts = loss_fn(student, teacher, epoch=3)
    expected, expected_parts, new_centers = udi_eager(student, teacher_eager, before,
                                                      teacher_temperature(3, 0.04, 0.07, 30, 100))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for name in parts:
        torch.testing.assert_close(parts[name].double(), expected_parts[name].detach(), rtol=1e-5, atol=1e-6)
    for center, expected_center in zip(_centers(loss_fn), new_centers):
        torch.testing.assert_close(center.double(), expected_center, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, list(student))
    expected_grads = torch.autograd.grad(expected, list(student))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad.double(), expected_grad.double(), rtol=1e-4, atol=1e-6)
    if all_masked:
        assert parts["patch"] == 0


def test_udi_targets_input_gives_the_same_loss():
    """The bottleneck-friendly UDITargets input path equals the sample-logit path."""
    B, L, K = 2, 2, 97
    student, teacher = random_udi_inputs(B, L, K, 4, 4)
    first, second = UDILoss(K, 2 + L), UDILoss(K, 2 + L)
    loss_a, _ = first(student, teacher, 0)
    loss_b, _ = second(student, cls_plus_targets(teacher), 0)
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(_centers(first), _centers(second)):
        torch.testing.assert_close(a, b)


def blend_eager(cls, global_samples, global_mask, local_samples, local_mask, alpha=0.5):
    """UDI_SPEC §5 row by row, float64: T+ = α Σ_s m_s T_s / (Σ_s m_s + 1e-5) + (1 − α) T_cls."""
    B = cls.shape[0] // 2
    blend = lambda samples, mask, base: (alpha * (mask[:, None].double() * samples.double()).sum(0)
                                         / (mask.sum().double() + 1e-5) + (1 - alpha) * base.double())
    rows = [blend(global_samples[r], global_mask[r], cls[(r + B) % (2 * B)]) for r in range(2 * B)]
    rows += [blend(local_samples[r], local_mask[r], cls[r % (2 * B)]) for r in range(local_samples.shape[0])]
    valid = local_samples.double()[local_mask]
    return torch.stack(rows), valid.sum(0), float(local_mask.sum())


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.float16, 2e-3)])
def test_blend_cls_plus_matches_the_spec_row_by_row(dtype, tolerance):
    # tolerance: relative to the largest |row|; float16 rows are rounded once after a float32 blend.
    B, L, Sg, Sl, D = 3, 2, 5, 4, 37
    g = torch.Generator().manual_seed(21)
    cls, global_samples, local_samples = (torch.randn(*shape, generator=g).to(dtype) for shape in
                                          ((2 * B, D), (2 * B, Sg, D), (2 * L * B, Sl, D)))
    global_mask, local_mask = torch.rand(2 * B, Sg, generator=g) < 0.6, torch.rand(2 * L * B, Sl, generator=g) < 0.6
    global_mask[1], local_mask[-1] = False, False  # rows without a valid sample keep (1 − α) T_cls
    rows, local_sum, local_count = blend_cls_plus(cls, global_samples, global_mask, local_samples, local_mask, 0.5)
    want_rows, want_sum, want_count = blend_eager(cls, global_samples, global_mask, local_samples, local_mask)
    assert rows.dtype == dtype and local_sum.dtype == torch.promote_types(dtype, torch.float32)
    scale = want_rows.abs().max()
    assert ((rows.double() - want_rows).abs().max() / scale).item() <= tolerance
    assert ((local_sum.double() - want_sum).abs().max() / want_sum.abs().max()).item() <= tolerance
    assert float(local_count) == want_count
    no_locals = blend_cls_plus(cls, global_samples, global_mask, None, None, 0.5)
    torch.testing.assert_close(no_locals[0], rows[:2 * B], rtol=0, atol=0)
    assert float(no_locals[1].abs().sum()) == 0 and float(no_locals[2]) == 0
    by_pair = blend_cls_plus(teacher_rows_by_pair(cls), global_samples, global_mask, None, None, 0.5, cls_by_pair=True)
    torch.testing.assert_close(by_pair[0], rows[:2 * B], rtol=0, atol=0)


def probability_mixture_loss(student, teacher, center, tau_t, B, L):
    """The cls+ loss with the paper's mixture of probabilities as target (cls_plus_target='probabilities'), in
    float64: each global crop's target mixes the other crop's cls with its own sampled patches, each local crop's
    its own cls with its patches."""
    softmax = lambda x: torch.softmax((x.double() - center.double()) / tau_t, -1)  # noqa: E731

    def mix(samples, mask, cls):
        p = 0.5 * (mask[:, :, None] * softmax(samples)).sum(1) / (mask.sum(1, keepdim=True) + 1e-5) + 0.5 * softmax(cls)
        return p / p.sum(-1, keepdim=True)

    t_cls = teacher.cls.reshape(2, B, -1)
    glob = mix(teacher.patch, teacher.patch_mask.double(), torch.cat([t_cls[1], t_cls[0]]))
    loc = mix(teacher.local, teacher.local_mask.double(), teacher.cls)
    logq = torch.log_softmax(student.cls_plus.detach().double() / 0.1, -1)
    ce_global = -(glob * logq[:2 * B]).sum(-1).mean()
    ce_local = -(loc * logq[2 * B:].repeat(2, 1)).sum(-1).mean()
    return (2 * ce_global + 2 * L * ce_local) / (2 + 2 * L)


def test_udi_probability_mixture_option():
    B, L, K = 2, 1, 61
    student, teacher = random_udi_inputs(B, L, K, 3, 3)
    loss_fn = UDILoss(K, 2 + L, cls_plus_target="probabilities")
    loss_fn.center_cls_plus.center.normal_()
    center = loss_fn.center_cls_plus.center.double().clone()
    _, parts = loss_fn(student, teacher, 0)
    expected = probability_mixture_loss(student, teacher, center, 0.04, B, L)
    torch.testing.assert_close(parts["cls_plus"].double(), expected, rtol=1e-4, atol=1e-6)


def test_zero_count_leaves_center_unchanged():
    B, K = 2, 33
    student, teacher = random_udi_inputs(B, 1, K, 3, 3, all_masked_patches=True)
    teacher = teacher._replace(local_mask=torch.zeros_like(teacher.local_mask))
    loss_fn = UDILoss(K, 3)
    loss_fn.center_patch.center.normal_()
    before = loss_fn.center_patch.center.clone()
    loss_fn(student, teacher, 0)
    assert torch.equal(loss_fn.center_patch.center, before)


def test_udi_bad_shapes_are_named():
    student, teacher = random_udi_inputs(2, 1, 33, 3, 3)
    with pytest.raises(ValueError, match="student cls must have shape"):
        UDILoss(33, 4)(student, teacher, 0)


# ---- cached pair structure, host work per call ------------------------------------------------------------------

def _table(kind: str, crops: int, batch: int, device):
    """The cached table of a loss term: 'dino' (crops = ncrops) or UDI's 'cls' / 'cls_plus' (crops = L)."""
    if kind == "dino":
        return crop_mean_table(dino_crop_pairs(crops), batch, crops, 2, torch.device(device))
    return getattr(udi_pair_tables(crops, batch, torch.device(device)), kind)


def test_pair_tables_are_cached_per_structure_and_device():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    table = _table("dino", 4, 3, cpu)
    assert _table("dino", 4, 3, cpu) is table and _table("cls", 4, 3, cpu) is _table("cls", 4, 3, cpu)
    others = [_table("dino", 4, 2, cpu), _table("dino", 5, 3, cpu), _table("cls", 4, 3, cpu),
              _table("cls_plus", 4, 3, cpu), _table("dino", 4, 3, meta)]
    assert all(other is not table for other in others)
    assert {t.device for t in (*table.csr, table.unit_rows)} == {cpu}
    assert {t.device for t in (*others[-1].csr, others[-1].unit_rows)} == {meta}
    structure = lambda rows, device: identity_table(torch.ones(rows, device=device)).csr.student_offsets  # noqa: E731
    assert structure(7, cpu) is structure(7, cpu) and structure(7, meta) is not structure(7, cpu)


def spec_pairs(kind: str, crops: int, B: int):
    """The (student row, teacher row, weight) pairs of a loss term, written from UDI_SPEC §5 and DINO's loop."""
    if kind == "dino":
        blocks = [(v, iq, 1 / (2 * (crops - 1) * B)) for iq in range(2) for v in range(crops) if v != iq]
    else:
        L = crops
        global_weight, local_weight = 2 / (2 + 2 * L) / (2 * B), 2 * L / (2 + 2 * L) / (2 * L * B) if L else 0
        if kind == "cls":  # student global v meets teacher crop 1 - v; local crop l meets teacher crop g
            blocks = [(v, 1 - v, global_weight) for v in range(2)]
            blocks += [(2 + l, g, local_weight) for l in range(L) for g in range(2)]
        else:  # ... and their cls+ targets, one block per crop pair
            blocks = [(v, v, global_weight) for v in range(2)]
            blocks += [(2 + l, 2 + 2 * l + g, local_weight) for l in range(L) for g in range(2)]
    return sorted((s * B + b, t * B + b, w) for s, t, w in blocks for b in range(B))


@pytest.mark.parametrize("kind,crops,rows", [("dino", 5, (5, 2)), ("cls", 3, (5, 2)), ("cls_plus", 3, (5, 8)),
                                             ("cls_plus", 0, (2, 2))])
def test_pair_table_is_the_csr_of_its_pairs(kind, crops, rows):
    B = 3
    table = _table(kind, crops, B, "cpu")
    csr = table.csr
    pair_student = csr_pair_student(csr)
    got = sorted(zip(pair_student.tolist(), csr.pair_teacher.tolist(), csr.pair_weight.tolist()))
    want = spec_pairs(kind, crops, B)
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert [g[2] for g in got] == pytest.approx([w[2] for w in want], rel=1e-6)
    assert csr.student_offsets[-1] == len(pair_student) and (pair_student.diff() >= 0).all()
    assert torch.equal(csr.student_offsets, torch.searchsorted(pair_student, torch.arange(rows[0] * B + 1)))
    assert torch.equal(csr.center_id, torch.zeros(rows[1] * B, dtype=torch.int64))
    assert torch.equal(csr.center_offsets, torch.tensor([0, rows[1] * B]))
    assert torch.equal(table.unit_rows, torch.ones(rows[1] * B))


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_follow_a_changed_structure(backend):
    """Alternating batch sizes, crops and masks: every call matches the eager loss (no stale cached table)."""
    K = 37
    dino = DINOLoss(K, 4, 0.04, 0.04, 1, 10, backend=backend)
    ibot = IBOTPatchLoss(K, 0.04, 0.04, 1, 10, backend=backend)
    for B, tokens in ((3, 5), (2, 4), (3, 5)):
        student, teacher = torch.randn(4 * B, K), torch.randn(2 * B, K)
        expected, _ = dino_eager(student, teacher, dino.center.double().clone(), 4, 0.04)
        torch.testing.assert_close(dino(student, teacher, 0).double(), expected, rtol=1e-5, atol=1e-6)
        s, t, mask = torch.randn(B, tokens, K), torch.randn(B, tokens, K), torch.rand(B, tokens) < 0.5
        center = ibot.center.double().clone()
        per_image = (H(t.double(), s.double(), center, 0.04) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        torch.testing.assert_close(ibot(s, t, mask, 0).double(), per_image.mean(), rtol=1e-5, atol=1e-6)
    udi = UDILoss(K, 4, backend=backend)
    for B, L, seed in ((3, 2, 0), (2, 2, 1), (3, 2, 2)):
        student, teacher = random_udi_inputs(B, L, K, 4, 3, seed=seed)
        centers = [c.clone() for c in _centers(udi)]
        expected, _, _ = udi_eager(student, teacher, centers, teacher_temperature(0, 0.04, 0.07, 30, 100))
        torch.testing.assert_close(udi(student, teacher, 0)[0].double(), expected, rtol=1e-5, atol=1e-6)


FORBIDDEN_ON_THE_HOT_PATH = {"aten::sort", "aten::searchsorted", "aten::arange", "aten::_local_scalar_dense"}


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_a_call_with_a_cached_structure_sorts_nothing_and_never_syncs(backend):
    """After the first call, on the kernels' path: no sort/searchsorted/arange (the CSR is cached), no
    .item()/.tolist() (host sync)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.overloadpacket._qualified_op_name)
            return func(*args, **(kwargs or {}))

    K, B, L = 33, 2, 2
    dino = DINOLoss(K, 2 + L, 0.04, 0.07, 30, 100, backend=backend)
    ibot = IBOTPatchLoss(K, 0.04, 0.07, 30, 100, backend=backend)
    udi = UDILoss(K, 2 + L, backend=backend)
    student, teacher = random_udi_inputs(B, L, K, 4, 3)
    patch_mask = teacher.patch_mask
    calls = [lambda: dino(student.cls, teacher.cls, 0), lambda: ibot(student.patch, teacher.patch, patch_mask, 0),
             lambda: udi(student, teacher, 0)[0]]
    for call in calls:
        call().backward()  # builds the tables
        with Ops() as ops:
            call().backward()
        assert not ops.names & FORBIDDEN_ON_THE_HOT_PATH


def test_a_loss_called_under_inference_mode_still_trains():
    """Tables first built and centers first updated under inference_mode serve a later training call."""
    K, B = 19, 5  # a structure no other test builds
    teacher = [torch.randn(2 * B, K) for _ in range(2)]
    evaluated, plain = DINOLoss(K, 3, 0.04, 0.07, 30, 100), DINOLoss(K, 3, 0.04, 0.07, 30, 100)
    with torch.inference_mode():
        evaluated(torch.randn(3 * B, K), teacher[0], 0)
    with torch.no_grad():
        plain(torch.randn(3 * B, K), teacher[0], 0)
    assert not evaluated.center.is_inference()
    student = torch.randn(3 * B, K, requires_grad=True)
    losses = [loss_fn(student, teacher[1], 0) for loss_fn in (evaluated, plain)]
    grads = [torch.autograd.grad(loss, student)[0] for loss in losses]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_centers_updated_together_equal_one_by_one():
    K = 16
    together, alone = [EMACenter(K, 0.9) for _ in range(3)], [EMACenter(K, 0.9) for _ in range(3)]
    for a, b in zip(together, alone):
        a.center.normal_()
        b.center.copy_(a.center)
    sums = [torch.randn(1, K) for _ in range(3)]
    counts = [torch.tensor([4.0]), torch.tensor([0.0]), torch.tensor([2.5])]
    update_centers(together, sums, counts)
    for ema, total, count in zip(alone, sums, counts):
        ema.update(total, count)
    for a, b in zip(together, alone):
        assert torch.equal(a.center, b.center) and a.center.shape == (1, K)
    with pytest.raises(ValueError, match="share one momentum"):
        update_centers([EMACenter(K, 0.9), EMACenter(K, 0.99)], sums[:2], counts[:2])


# ---- 2-process gloo ------------------------------------------------------------------------------------------------

def _halves(tensor, crops, rank):
    """Rank `rank`'s half of every crop's B rows (crop-major rows)."""
    chunks = tensor.reshape(crops, -1, *tensor.shape[1:]).chunk(2, dim=1)[rank]
    return chunks.reshape(-1, *tensor.shape[1:]).contiguous()


def _run_losses(rank, world, B, L, K, parts_out):
    torch.manual_seed(0)
    dino_student, dino_teacher = torch.randn((2 + L) * B, K), torch.randn(2 * B, K)
    student, teacher = random_udi_inputs(B, L, K, 4, 3, seed=1)
    if world == 2:
        dino_student, dino_teacher = _halves(dino_student, 2 + L, rank), _halves(dino_teacher, 2, rank)
        student = UDIStudent(_halves(student.cls, 2 + L, rank), _halves(student.cls_plus, 2 + L, rank),
                             _halves(student.patch, 2, rank))
        teacher = UDITeacher(_halves(teacher.cls, 2, rank), _halves(teacher.patch, 2, rank),
                             _halves(teacher.patch_mask, 2, rank), _halves(teacher.local, 2 * L, rank),
                             _halves(teacher.local_mask, 2 * L, rank))
    dino = DINOLoss(K, 2 + L, 0.04, 0.07, 2, 10)
    udi = UDILoss(K, 2 + L)
    dino_loss = dino(dino_student, dino_teacher, 1)
    udi_loss, parts = udi(student, teacher, 1)
    sk = sinkhorn_knopp_center(dino_teacher, 0.05)
    n_valid = teacher.patch_mask.sum().item()
    parts_out.update(dino=dino_loss.detach(), udi=udi_loss.detach(), n_valid=n_valid,
                     sk=sk, centers=[dino.center.clone()] + [c.clone() for c in _centers(udi)],
                     **{k: v.detach() for k, v in parts.items()})


def _gloo_worker(rank, init_file, out_dir, B, L, K):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        result = {}
        _run_losses(rank, 2, B, L, K, result)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_rank(tmp_path):
    import torch.multiprocessing as mp
    B, L, K = 4, 2, 67
    mp.spawn(_gloo_worker, args=(str(tmp_path / "init"), str(tmp_path), B, L, K), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    single = {}
    _run_losses(0, 1, B, L, K, single)
    tol = dict(rtol=1e-5, atol=1e-6)
    for key in ("dino", "cls", "cls_plus"):  # per-rank means over equal halves
        torch.testing.assert_close((ranks[0][key] + ranks[1][key]) / 2, single[key], **tol)
    n = [r["n_valid"] for r in ranks]  # L_patch is a mean over this rank's valid samples
    torch.testing.assert_close((n[0] * ranks[0]["patch"] + n[1] * ranks[1]["patch"]) / sum(n), single["patch"], **tol)
    for rank in ranks:
        for center, expected in zip(rank["centers"], single["centers"]):
            torch.testing.assert_close(center, expected, **tol)
        torch.testing.assert_close(torch.softmax(-rank["sk"] / 0.05, -1), torch.softmax(-single["sk"] / 0.05, -1),
                                   rtol=1e-4, atol=1e-7)


# ---- the head's last layer fused in (issue 19 §4): bottleneck rows with weight= / teacher_weight= ------------------

def _bottleneck(*shape, D, generator):
    return F.normalize(torch.randn(*shape, D, generator=generator, dtype=torch.float64), dim=-1)


def _last_layers(K, D, generator):
    """A student weight [K, D] that takes a gradient and a teacher weight [K, D], float64, rows of norm ~ 1-3."""
    weight = (torch.randn(K, D, generator=generator, dtype=torch.float64) * 0.6).requires_grad_()
    return weight, torch.randn(K, D, generator=generator, dtype=torch.float64) * 0.6


def _logits(rows, weight):
    return rows @ weight.T


def _assert_same_step(fused_call, logits_call, inputs, loss_fns):
    """fused_call() and logits_call() on fresh loss modules: the same loss, centers and gradients of `inputs`."""
    fused, logits = fused_call(loss_fns[0]), logits_call(loss_fns[1])
    torch.testing.assert_close(fused, logits, rtol=1e-10, atol=1e-12)
    for a, b in zip(loss_fns[0].buffers(), loss_fns[1].buffers()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fused, inputs), torch.autograd.grad(logits, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("teacher_side", ["bottleneck", "logits"])
def test_dino_and_ibot_losses_with_the_last_layer_equal_their_logits(teacher_side):
    """Float64, K = 211 and D = 7: loss, center and the gradients of the rows and of the weight."""
    g = torch.Generator().manual_seed(3)
    K, D, ncrops, B, N = 211, 7, 5, 3, 6
    weight, teacher_weight = _last_layers(K, D, g)
    student = _bottleneck(ncrops * B, D=D, generator=g).requires_grad_()
    teacher = _bottleneck(2 * B, D=D, generator=g)
    as_teacher = (lambda rows: (rows, teacher_weight)) if teacher_side == "bottleneck" else \
        (lambda rows: (_logits(rows, teacher_weight), None))  # noqa: E731
    t_rows, t_weight = as_teacher(teacher)
    dino = [DINOLoss(K, ncrops, 0.04, 0.07, 3, 10) for _ in range(2)]
    for loss_fn in dino:
        loss_fn.double().center.normal_(generator=torch.Generator().manual_seed(0))
    _assert_same_step(lambda fn: fn(student, t_rows, 1, weight=weight, teacher_weight=t_weight),
                      lambda fn: fn(_logits(student, weight), _logits(teacher, teacher_weight), 1), (student, weight),
                      dino)
    s_patch = _bottleneck(B, N, D=D, generator=g).requires_grad_()
    t_patch, t_weight = as_teacher(_bottleneck(B, N, D=D, generator=g))
    mask = torch.rand(B, N, generator=g) < 0.5
    mask[1] = False
    ibot = [IBOTPatchLoss(K, 0.04, 0.07, 2, 10).double() for _ in range(2)]
    t_patch_logits = t_patch if t_weight is None else _logits(t_patch, t_weight)
    _assert_same_step(lambda fn: fn(s_patch, t_patch, mask, 1, weight=weight, teacher_weight=t_weight),
                      lambda fn: fn(_logits(s_patch, weight), t_patch_logits, mask, 1), (s_patch, weight), ibot)


@pytest.mark.parametrize("teacher_type", ["UDITeacher", "UDITargets"])
def test_udi_loss_with_the_last_layer_equals_its_logits(teacher_type):
    """Float64, K = 211, D = 7, L = 2: the bottleneck UDIStudent with weight, the teacher's bottleneck rows (samples,
    or targets blended there) with teacher_weight, against the same rows taken to logits first."""
    g = torch.Generator().manual_seed(4)
    K, D, B, L, Sg, Sl = 211, 7, 3, 2, 5, 4
    weight, teacher_weight = _last_layers(K, D, g)
    student = UDIStudent(*(_bottleneck(*shape, D=D, generator=g).requires_grad_()
                           for shape in (((2 + L) * B,), ((2 + L) * B,), (2 * B, Sg))))
    _, masks = random_udi_inputs(B, L, 1, Sg, Sl, seed=5)
    teacher = UDITeacher(_bottleneck(2 * B, D=D, generator=g), _bottleneck(2 * B, Sg, D=D, generator=g),
                         masks.patch_mask, _bottleneck(2 * L * B, Sl, D=D, generator=g), masks.local_mask)
    if teacher_type == "UDITargets":
        teacher = cls_plus_targets(teacher)
    logits = lambda rows, w: type(rows)(*(_logits(x, w) if x.dtype.is_floating_point and x.dim() > 1 else x  # noqa
                                          for x in rows))
    teacher_logits = logits(teacher, teacher_weight)
    if teacher_type == "UDITargets":
        teacher_logits = teacher_logits._replace(extra_patch_sum=teacher_weight @ teacher.extra_patch_sum)
    udi = [UDILoss(K, 2 + L).double() for _ in range(2)]
    _assert_same_step(lambda fn: fn(student, teacher, 3, weight=weight, teacher_weight=teacher_weight)[0],
                      lambda fn: fn(logits(student, weight), teacher_logits, 3)[0], (*student, weight), udi)


def test_last_layer_arguments_are_checked_naming_them():
    K, D, B = 33, 5, 2
    student, teacher = torch.randn(3 * B, D), torch.randn(2 * B, D)
    dino = DINOLoss(K, 3, 0.04, 0.07, 3, 10)
    with pytest.raises(ValueError, match=r"weight must have shape \[33, D\]"):
        dino(student, teacher, 0, weight=torch.randn(K + 1, D), teacher_weight=torch.randn(K, D))
    with pytest.raises(TypeError, match="teacher_weight must be a torch.Tensor"):
        dino(student, teacher, 0, weight=torch.randn(K, D), teacher_weight=[1.0])
    with pytest.raises(ValueError, match=r"student_output must have shape \[6, 5\]"):
        dino(torch.randn(3 * B, K), teacher, 0, weight=torch.randn(K, D), teacher_weight=torch.randn(K, D))
    with pytest.raises(ValueError, match="teacher_weight .* needs weight"):
        dino(torch.randn(3 * B, K), teacher, 0, teacher_weight=torch.randn(K, D))
    s, t = random_udi_inputs(B, 1, K, 3, 3)
    with pytest.raises(ValueError, match=r"student cls must have shape \[6, 5\]"):
        UDILoss(K, 3)(s, t, 0, weight=torch.randn(K, D))
    bottleneck = UDITeacher(torch.randn(2 * B, D), torch.randn(2 * B, 3, D), t.patch_mask, torch.randn(2 * B, 3, D),
                            t.local_mask)
    with pytest.raises(TypeError, match="probabilities"):
        UDILoss(K, 3, cls_plus_target="probabilities")(s, bottleneck, 0, teacher_weight=torch.randn(K, D))


def entropies_eager(logits, center, tau_t):
    """float64: the mean row entropy of softmax((t − c)/τt) and the entropy of the rows' mean."""
    p = torch.softmax((logits.double() - center.double()) / tau_t, -1)
    mean = p.mean(0)
    return -(p * p.log()).sum(-1).mean(), -(mean * mean.log()).sum()


@pytest.mark.parametrize("chunk_size", [5, 64, 4096])
def test_teacher_entropies_chunk_by_chunk_equal_the_eager_ones(chunk_size):
    """K = 23 (not a multiple of 5 or 64): from logits and from bottleneck rows with their last layer, float64 to
    1e-12 and float32 rows to 1e-4 (u = (t − c)/τt reaches ~100 here: float32 rounds it by ~1e-5)."""
    g = torch.Generator().manual_seed(6)
    K, D, R = 23, 6, 9
    rows, weight = torch.randn(R, D, generator=g, dtype=torch.float64), torch.randn(K, D, generator=g,
                                                                                   dtype=torch.float64)
    center = torch.randn(1, K, generator=g)
    want = entropies_eager(rows @ weight.T, center, 0.07)
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
        for got in (teacher_entropies(rows.to(dtype) @ weight.T.to(dtype), center, 0.07, chunk_size=chunk_size),
                    teacher_entropies(rows.to(dtype), center, 0.07, weight.to(dtype), chunk_size=chunk_size)):
            assert got["teacher_entropy"].dtype == dtype
            torch.testing.assert_close(got["teacher_entropy"].double(), want[0], rtol=tolerance, atol=tolerance)
            torch.testing.assert_close(got["teacher_batch_entropy"].double(), want[1], rtol=tolerance, atol=tolerance)

