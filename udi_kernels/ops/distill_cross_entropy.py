"""udi_kernels.distill_cross_entropy: fused centered-teacher cross-entropy + center statistics (UDI_SPEC §5).

The kernels (native and Triton) share one pair of ops on a student-row CSR of the pairs, built here:
  distill_cross_entropy(student [Rs, K], teacher [Rt, K], centers [n_c, K] f32, center_id [Rt] i64,
                        student_offsets [Rs + 1] i64, pair_teacher [P] i64, pair_weight [P] f32,  (pairs by student)
                        center_offsets [n_c + 1] i64, center_rows [Rt] i64,             (teacher rows by center)
                        row_weight [Rt] f32, tau_s, tau_t)
      -> pair_loss [P] f32, center_sum [n_c, K] f32, center_count [n_c] f32, student_lse [Rs], teacher_lse [Rt]
  distill_cross_entropy_backward(grad_pair_loss [P], student, teacher, centers, center_id, student_offsets,
                                 pair_teacher, pair_weight, student_lse, teacher_lse, tau_s, tau_t)
      -> grad_student [Rs, K] (student dtype)
student_lse is logsumexp(s / τs), teacher_lse is logsumexp((t - c) / τt): O(rows) saved for the backward, in the
kernel's accumulation dtype (saved_stats_dtype: float64 for the native CPU kernel, which recomputes the exponents
in double, so that a rounded logsumexp cannot skew its gradient at large logits; float32 on CUDA and Triton).
Indices are never trusted by the kernels: an index out of range skips its pair or teacher row (see
distill_cross_entropy), so that the op stays memory-safe with check_values=False.
distill_cross_entropy builds the CSR (build_csr) on every call; callers with fixed pairs build it once and call
distill_cross_entropy_csr. The kernels are registered ops, called through register_kernels
(udi_kernels/ops/registration.py) like every op's.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import backends
from .._native import native_loaded
from ..checks import check_bool, check_temperature, check_tensor, require
from ..declarations import DISTILL_CROSS_ENTROPY
from ..dtypes import FLOATING, INDICES, STATISTICS, compute_dtype
from ..reference import distill_cross_entropy as reference
from .autocast import autocast_off
from .registration import Backward, register_kernels

OP = DISTILL_CROSS_ENTROPY.name


class DistillCrossEntropyResult(NamedTuple):
    """loss [] (float32; float64 for float64 inputs), center_sum [n_c, K], center_count [n_c]."""
    loss: Tensor
    center_sum: Tensor
    center_count: Tensor


class PairCSR(NamedTuple):
    """The pairs sorted (stably) by student row, and the teacher rows grouped by center: what the kernels read.
    It depends only on the pairs, so a caller whose pairs do not change builds it once (build_csr) and passes it
    to distill_cross_entropy_csr on every call."""
    student_offsets: Tensor  # [Rs + 1]: the pairs of student row r are the slots [student_offsets[r], [r + 1])
    pair_teacher: Tensor     # [P] in CSR order
    pair_weight: Tensor      # [P] in CSR order
    center_id: Tensor        # [Rt] int64
    center_offsets: Tensor   # [n_c + 1]
    center_rows: Tensor      # [Rt]


def _group(keys: Tensor, num_segments: int):
    """(order, ptr): the stable sort order of keys and the CSR offsets of each key value in it."""
    sorted_keys, order = torch.sort(keys, stable=True)
    return order, torch.searchsorted(sorted_keys, torch.arange(num_segments + 1, device=keys.device))


def build_csr(pair_student, pair_teacher, pair_weight, center_id, num_students, num_centers) -> PairCSR:
    """The PairCSR of these pairs: one stable sort and searchsorted per key, no host sync."""
    order, student_offsets = _group(pair_student.long(), num_students)
    center_rows, center_offsets = _group(center_id.long(), num_centers)
    return PairCSR(student_offsets, pair_teacher.long()[order], pair_weight[order], center_id.long().contiguous(),
                   center_offsets, center_rows)


def disjoint_offsets(offsets: Tensor, size: int) -> Tensor:
    """CSR offsets clamped into [0, size] and made non-decreasing (a running maximum): segments that never overlap,
    whatever a hand-made PairCSR holds, so that no two rows write one pair's outputs (the kernels' threads would
    race: run-to-run different garbage); the identity on a valid CSR."""
    return torch.cummax(offsets.clamp(0, size), 0).values


def csr_pair_student(csr: PairCSR) -> Tensor:
    """The student row of each CSR slot, [P] int64 (no host sync)."""
    rows = torch.arange(csr.student_offsets.shape[0] - 1, device=csr.student_offsets.device)
    return torch.repeat_interleave(rows, csr.student_offsets.diff(), output_size=csr.pair_teacher.shape[0])


# ---- fake impls, autograd --------------------------------------------------------------------------------------

def saved_stats_dtype(backend: str, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the saved logsumexps: the native CPU kernel accumulates (and saves) in float64."""
    if backend == "native" and device.type == "cpu":
        return torch.float64
    return compute_dtype(dtype)


def _make_forward_fake(backend: str):
    def fake(student, teacher, centers, center_id, student_offsets, pair_teacher, pair_weight, center_offsets,
             center_rows, row_weight, tau_s, tau_t):
        out = compute_dtype(student.dtype)
        stats = compute_dtype(teacher.dtype)
        return (student.new_empty(pair_teacher.shape[0], dtype=out), teacher.new_empty(centers.shape, dtype=stats),
                teacher.new_empty(centers.shape[0], dtype=stats),
                student.new_empty(student.shape[0], dtype=saved_stats_dtype(backend, student.device, student.dtype)),
                teacher.new_empty(teacher.shape[0], dtype=saved_stats_dtype(backend, teacher.device, teacher.dtype)))
    return fake


def _backward_fake(grad_pair_loss, student, teacher, centers, center_id, student_offsets, pair_teacher, pair_weight,
                   student_lse, teacher_lse, tau_s, tau_t):
    return torch.empty_like(student)


def _setup_context(ctx, inputs, output):
    student, teacher, centers, center_id, student_offsets, pair_teacher, pair_weight = inputs[:7]
    ctx.taus = inputs[10], inputs[11]
    ctx.save_for_backward(student, teacher, centers, center_id, student_offsets, pair_teacher, pair_weight,
                          output[3], output[4])
    # only pair_loss depends on the student: no zero gradients are made for the other outputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _autograd_through(backward_op) -> Backward:
    """The student's gradient; none to the other 11 inputs."""
    def input_grads(ctx, needs_input_grad, grad_pair_loss, *unused_grads):
        grad_student = None
        if needs_input_grad[0]:
            grad_student = backward_op(grad_pair_loss.contiguous(), *ctx.saved_tensors, *ctx.taus)
        return (grad_student,) + (None,) * 11
    return Backward(backward_op, _backward_fake, _setup_context, input_grads)


@torch.library.custom_op("udi_kernels::distill_cross_entropy_triton", mutates_args=())
def _triton_forward(student: Tensor, teacher: Tensor, centers: Tensor, center_id: Tensor, student_offsets: Tensor,
                    pair_teacher: Tensor, pair_weight: Tensor, center_offsets: Tensor, center_rows: Tensor,
                    row_weight: Tensor, tau_s: float, tau_t: float
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..triton_kernels.distill_cross_entropy import forward
    return forward(student, teacher, centers, center_id, student_offsets, pair_teacher, pair_weight, center_offsets,
                   center_rows, row_weight, tau_s, tau_t)


@torch.library.custom_op("udi_kernels::distill_cross_entropy_triton_backward", mutates_args=())
def _triton_backward(grad_pair_loss: Tensor, student: Tensor, teacher: Tensor, centers: Tensor, center_id: Tensor,
                     student_offsets: Tensor, pair_teacher: Tensor, pair_weight: Tensor, student_lse: Tensor,
                     teacher_lse: Tensor, tau_s: float, tau_t: float) -> Tensor:
    from ..triton_kernels.distill_cross_entropy_backward import backward
    return backward(grad_pair_loss, student, teacher, centers, center_id, student_offsets, pair_teacher, pair_weight,
                    student_lse, teacher_lse, tau_s, tau_t)


_KERNELS = {"triton": register_kernels(OP, _triton_forward, _make_forward_fake("triton"),
                                      _autograd_through(_triton_backward))}
if native_loaded():
    _KERNELS["native"] = register_kernels(OP, f"udi_kernels::{OP}", _make_forward_fake("native"), _autograd_through(
        torch.ops.udi_kernels.distill_cross_entropy_backward.default))


# ---- checks ----------------------------------------------------------------------------------------------------

def _check_length(value, name, length, what):
    if value.shape[0] != length:
        raise ValueError(f"{name} must have length {length} ({what}), got {value.shape[0]}")


def _check_logits(student, teacher, centers, tau_s, tau_t):
    """The [*, K] arguments (dims, dtypes, devices, a shared positive K) and the temperatures."""
    check_tensor(student, "student", dims=2, dtypes=FLOATING)
    device = student.device
    check_tensor(teacher, "teacher", device=device, dims=2, dtypes=FLOATING)
    check_tensor(centers, "centers", device=device, dims=2, dtypes=STATISTICS)
    K = student.shape[1]
    if teacher.shape[1] != K or centers.shape[1] != K:
        raise ValueError(f"student, teacher and centers must share the last dimension K, got {student.shape[1]}, "
                         f"{teacher.shape[1]} and {centers.shape[1]}")
    if K == 0 or centers.shape[0] == 0:
        raise ValueError(f"K and the number of centers must be positive, got centers of shape {list(centers.shape)}")
    check_temperatures(tau_s, tau_t)


def check_temperatures(tau_s, tau_t) -> None:
    """checks.check_temperature of both: the kernels scale the logits by 1/tau, which must not overflow where the
    logit itself is finite."""
    check_temperature(tau_s, "tau_s")
    check_temperature(tau_t, "tau_t")


def _check_shapes(student, teacher, centers, center_id, pair_student, pair_teacher, pair_weight, row_weight,
                  tau_s, tau_t):
    _check_logits(student, teacher, centers, tau_s, tau_t)
    check_pairs(student.device, teacher.shape[0], center_id, pair_student, pair_teacher, pair_weight, row_weight)


def check_pairs(device, num_teacher_rows, center_id, pair_student, pair_teacher, pair_weight, row_weight):
    """The pair arguments of distill_cross_entropy and linear_distill_cross_entropy: dims, dtypes, devices and
    lengths (one center_id and row_weight per teacher row, one of each per pair)."""
    for value, name in ((center_id, "center_id"), (pair_student, "pair_student"), (pair_teacher, "pair_teacher")):
        check_tensor(value, name, device=device, dims=1, dtypes=INDICES)
    for value, name in ((pair_weight, "pair_weight"), (row_weight, "row_weight")):
        check_tensor(value, name, device=device, dims=1, dtypes=STATISTICS)
    _check_length(center_id, "center_id", num_teacher_rows, "one per teacher row")
    _check_length(row_weight, "row_weight", num_teacher_rows, "one per teacher row")
    _check_length(pair_teacher, "pair_teacher", pair_student.shape[0], "one per pair, like pair_student")
    _check_length(pair_weight, "pair_weight", pair_student.shape[0], "one per pair, like pair_student")


def _check_csr(csr, row_weight, student, teacher, centers):
    """The shapes, dtypes and devices of a prebuilt PairCSR and row_weight (no device sync): what keeps the kernels
    in bounds whatever the values (which the kernels clamp)."""
    if not isinstance(csr, PairCSR):
        raise TypeError(f"csr must be a PairCSR (build_csr), got {type(csr).__name__}")
    device, (Rs, Rt, n_c) = student.device, (student.shape[0], teacher.shape[0], centers.shape[0])
    P = csr.pair_teacher.shape[0] if isinstance(csr.pair_teacher, Tensor) else -1
    int64, floats = (torch.int64,), STATISTICS
    for value, name, dtypes, length in ((csr.student_offsets, "csr.student_offsets", int64, Rs + 1),
                                        (csr.pair_teacher, "csr.pair_teacher", int64, P),
                                        (csr.pair_weight, "csr.pair_weight", floats, P),
                                        (csr.center_id, "csr.center_id", int64, Rt),
                                        (csr.center_offsets, "csr.center_offsets", int64, n_c + 1),
                                        (csr.center_rows, "csr.center_rows", int64, Rt),
                                        (row_weight, "row_weight", floats, Rt)):
        check_tensor(value, name, device=device, dims=1, dtypes=dtypes)
        _check_length(value, name, length, "as build_csr makes it")


def _check_values(student, teacher, centers, center_id, pair_student, pair_teacher, pair_weight, row_weight,
                  **more_finite):
    """Index ranges, finite centers and weights (and the tensors more_finite names), and finite teacher rows where
    they count (row_weight != 0, or read by a pair of nonzero weight): one device sync; asserted asynchronously
    under torch.compile (checks.require)."""
    indices = {"pair_student": _in_range(pair_student, student.shape[0]),
               "pair_teacher": _in_range(pair_teacher, teacher.shape[0]),
               "center_id": _in_range(center_id, centers.shape[0])}
    finite = {name: torch.isfinite(value).all() for name, value in
              (("centers", centers), ("pair_weight", pair_weight), ("row_weight", row_weight), *more_finite.items())}
    counted = counted_teacher_rows(teacher.shape[0], pair_teacher, pair_weight, row_weight)
    finite["teacher"] = (torch.isfinite(teacher).all(1) | ~counted).all()
    require({f"{name} must hold indices inside the range of the rows it points to": ok for name, ok in indices.items()}
            | {f"{name} must hold finite values (no NaN or inf)" + (" in the rows that count (row_weight != 0 or a "
                                                                    "pair of nonzero weight)" if name == "teacher"
                                                                    else ""): ok for name, ok in finite.items()})


def counted_teacher_rows(num_rows: int, pair_teacher: Tensor, pair_weight: Tensor, row_weight: Tensor) -> Tensor:
    """[Rt] bool: the teacher rows whose values reach a result: row_weight != 0 (center statistics) or read by a
    pair of nonzero weight (the loss). The others are left out exactly, whatever their values."""
    read = (pair_teacher >= 0) & (pair_teacher < num_rows) & (pair_weight != 0)
    slots = torch.where(read, pair_teacher.long(), num_rows)  # unread pairs land on a sentinel row past the end
    hits = torch.zeros(num_rows + 1, dtype=torch.int32, device=row_weight.device).scatter_reduce(
        0, slots, read.int(), "amax")
    return (row_weight != 0) | (hits[:num_rows] > 0)


def _in_range(index, size):
    if index.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=index.device)
    return (index.min() >= 0) & (index.max() < size)


# ---- public function -------------------------------------------------------------------------------------------

def distill_cross_entropy(student: Tensor, teacher: Tensor, centers: Tensor, center_id: Tensor, pair_student: Tensor,
                          pair_teacher: Tensor, pair_weight: Tensor, row_weight: Tensor, tau_s: float, tau_t: float,
                          *, backend: Optional[str] = None, check_values: bool = True) -> DistillCrossEntropyResult:
    """Weighted cross-entropies of student rows against centered teacher rows, and the teacher's center statistics.

    loss = Σ_p pair_weight[p] · CE(softmax((teacher[pair_teacher[p]] - centers[center_id[pair_teacher[p]]]) / tau_t),
                                   log_softmax(student[pair_student[p]] / tau_s))
    center_sum[c] = Σ_{r: center_id[r] = c} row_weight[r] · teacher[r],  center_count[c] = Σ row_weight[r].

    Args:
        student: [Rs, K] float32/float16/bfloat16 (float64: reference and native CPU only); gets the gradient
            Σ_p w_p / tau_s · (softmax(s / tau_s) - p_t).
        teacher: [Rt, K] floating; receives no gradient (treated as detached).
        centers: [n_c, K] float32 (float64 allowed with float64 inputs); center_id: [Rt] int32/int64.
        pair_student, pair_teacher: [P] int32/int64 row indices; pair_weight: [P] float. Weight-0 pairs add 0.
        row_weight: [Rt] float weight of each teacher row in the center statistics (0 leaves a row out).
        tau_s, tau_t: temperatures, finite floats >= 2**-126 (1/tau must be a finite float32).
        backend: 'auto', 'native', 'triton' or 'reference' (default: $UDI_KERNELS_BACKEND or 'auto').
        check_values: check index ranges, that centers and weights are finite, and that the teacher rows that
            count (row_weight != 0, or read by a pair of nonzero weight) are finite (one device sync; asserted
            asynchronously under torch.compile; skipped for meta tensors). Shapes, dtypes, devices and the
            temperatures are always checked.
            With check_values=False every backend still stays in bounds, writes every output and gives the same
            result on every run: a pair whose pair_student is outside [0, Rs), whose pair_teacher is outside
            [0, Rt) or whose teacher row's center_id is outside [0, n_c) adds exactly 0 to the loss and the
            gradient, and a teacher row whose center_id is outside [0, n_c) is left out of the center
            statistics. Non-finite values give non-finite results.

    Under torch.autocast the inputs keep their dtypes and every backend computes in float32 as documented here
    (udi_kernels/ops/autocast.py).

    Returns:
        DistillCrossEntropyResult(loss [], center_sum [n_c, K], center_count [n_c]); float32 (float64 for float64
        inputs).
        Memory beyond the student's gradient is O((Rs + Rt + P) · K / 4096) fp32 partials (native CPU: float64
        partials per 512 columns and an Rt × 512 float64 scratch per thread); no [*, K] probabilities are stored.

    Raises:
        TypeError / ValueError naming the argument: wrong type, dtype, shape or device, a temperature that is
        not a positive finite float, and (check_values) an index out of range or a non-finite value; the error
        of backends.resolve for a backend that cannot run the call (udi_kernels/declarations.py), e.g. TypeError
        for float64 logits with backend='triton' or with backend='native' on CUDA.

    Source: UDI_SPEC §5.
    """
    args = (student, teacher, centers, center_id, pair_student, pair_teacher, pair_weight, row_weight)
    _check_shapes(*args, tau_s, tau_t)
    if check_bool(check_values, "check_values") and student.device.type != "meta":
        _check_values(*args)
    chosen = _resolve(student, teacher, backend)
    with autocast_off(student.device):
        if chosen == "reference":
            return DistillCrossEntropyResult(*reference.distill_cross_entropy(*args, float(tau_s), float(tau_t)))
        csr = build_csr(pair_student, pair_teacher, pair_weight, center_id, student.shape[0], centers.shape[0])
        return _run_kernels(chosen, student, teacher, centers, csr, row_weight, tau_s, tau_t)


def distill_cross_entropy_csr(student: Tensor, teacher: Tensor, centers: Tensor, csr: PairCSR, row_weight: Tensor,
                              tau_s: float, tau_t: float, *,
                              backend: Optional[str] = None) -> DistillCrossEntropyResult:
    """distill_cross_entropy on pairs already in the kernels' layout (build_csr), for callers that build valid
    pairs once and reuse them (udi_kernels.losses): no sort per call and no check of the values of the pairs or
    row_weight (as check_values=False: indices out of range skip their pairs); the logits, centers and
    temperatures are checked as in distill_cross_entropy, the CSR's shapes, dtypes and devices too. The CSR must
    come from build_csr: its offsets are clamped into bounds, but offsets that decrease can give a slot to two
    student rows. The reference backend runs on the CSR-ordered pairs."""
    _check_logits(student, teacher, centers, tau_s, tau_t)
    _check_csr(csr, row_weight, student, teacher, centers)
    chosen = _resolve(student, teacher, backend)
    with autocast_off(student.device):
        if chosen == "reference":
            return DistillCrossEntropyResult(*reference.distill_cross_entropy(
                student, teacher, centers, csr.center_id, csr_pair_student(csr), csr.pair_teacher, csr.pair_weight,
                row_weight, float(tau_s), float(tau_t)))
        return _run_kernels(chosen, student, teacher, centers, csr, row_weight, tau_s, tau_t)


def _resolve(student: Tensor, teacher: Tensor, backend: Optional[str]) -> str:
    """The backend for these logits: the kernels take one dtype rule for both, so the wider of the two decides."""
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else student.dtype
    return backends.resolve(DISTILL_CROSS_ENTROPY, student.device, dtype, backend)


def _run_kernels(backend, student, teacher, centers, csr: PairCSR, row_weight, tau_s,
                 tau_t) -> DistillCrossEntropyResult:
    """The registered native or Triton op."""
    stats_dtype = compute_dtype(teacher.dtype)
    inputs = (student.contiguous(), teacher.detach().contiguous(), centers.to(stats_dtype).contiguous(), csr.center_id,
              disjoint_offsets(csr.student_offsets, csr.pair_teacher.shape[0]), csr.pair_teacher,
              csr.pair_weight.to(compute_dtype(student.dtype)),
              csr.center_offsets, csr.center_rows, row_weight.to(stats_dtype).contiguous(), float(tau_s), float(tau_t))
    pair_loss, center_sum, center_count, _, _ = _KERNELS[backend](*inputs)
    return DistillCrossEntropyResult(pair_loss.sum(), center_sum, center_count)
