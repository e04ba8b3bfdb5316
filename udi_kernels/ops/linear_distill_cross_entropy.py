"""udi_kernels.linear_distill_cross_entropy: the head's last layer fused into distill_cross_entropy (UDI_SPEC §10).

The kernels (native and Triton) share one pair of ops on distill_cross_entropy's PairCSR (build_csr):
  linear_distill_cross_entropy(student [Rs, D], weight [K, D], teacher [Rt, Dt] (or logits [Rt, K]),
                               teacher_weight [K, Dt]?, centers [n_c, K], center_id [Rt] i64,
                               student_offsets [Rs + 1] i64, pair_teacher [P] i64, pair_weight [P],
                               center_offsets [n_c + 1] i64, center_rows [Rt] i64, row_weight [Rt], tau_s, tau_t)
      -> pair_loss [P], center_sum [n_c, K], center_count [n_c], student_lse [Rs], teacher_lse [Rt]
  linear_distill_cross_entropy_backward(grad_pair_loss [P], student, weight, teacher, teacher_weight, centers,
                                        center_id, student_offsets, pair_teacher, pair_weight, student_lse,
                                        teacher_lse, tau_s, tau_t)
      -> grad_student [Rs, D], grad_weight [K, D] (their dtypes)
pair_loss and the center statistics are distill_cross_entropy's on the logits x_s = student @ weight.T and
x_t = teacher @ teacher_weight.T; student_lse = logsumexp(x_s / τs), teacher_lse = logsumexp((x_t − c) / τt), in
the compute dtype (udi_kernels.dtypes). The kernels form the logits K-chunk by K-chunk and the backward recomputes
them: no [Rs, K] or [Rt, K] tensor exists (the teacher's logits when given as such aside), only chunk buffers,
O(rows) statistics and grad_weight. center_sum = (Σ row_weight · teacher) @ teacher_weight.T. Indices are never
trusted (the rule of distill_cross_entropy); student rows without a pair that counts and teacher rows of
row_weight 0 are left out exactly, whatever their values.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .._native import native_loaded
from ..checks import check_bool, check_tensor
from ..declarations import LINEAR_DISTILL_CROSS_ENTROPY
from ..dtypes import FLOATING, STATISTICS, compute_dtype
from ..reference import linear_distill_cross_entropy as reference
from .distill_cross_entropy import (DistillCrossEntropyResult, PairCSR, _check_csr,
                                    _check_values, build_csr, check_pairs, check_temperatures, disjoint_offsets)
from .autocast import autocast_off, cast_inputs
from .registration import Backward, register_kernels

OP = LINEAR_DISTILL_CROSS_ENTROPY.name


# ---- fake impls, autograd --------------------------------------------------------------------------------------

def _forward_fake(student, weight, teacher, teacher_weight, centers, center_id, student_offsets, pair_teacher,
                  pair_weight, center_offsets, center_rows, row_weight, tau_s, tau_t):
    out, stats = compute_dtype(student.dtype), compute_dtype(teacher.dtype)
    return (student.new_empty(pair_teacher.shape[0], dtype=out), teacher.new_empty(centers.shape, dtype=stats),
            teacher.new_empty(centers.shape[0], dtype=stats), student.new_empty(student.shape[0], dtype=out),
            teacher.new_empty(teacher.shape[0], dtype=stats))


def _backward_fake(grad_pair_loss, student, weight, *unused):
    return torch.empty_like(student), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    ctx.taus = inputs[12], inputs[13]
    ctx.save_for_backward(*inputs[:9], output[3], output[4])  # student ... pair_weight, the logsumexps
    ctx.mark_non_differentiable(*output[1:])  # only pair_loss depends on student and weight
    ctx.set_materialize_grads(False)


def _autograd_through(backward_op) -> Backward:
    """The gradients of student and weight; none to the other 12 inputs."""
    def input_grads(ctx, needs_input_grad, grad_pair_loss, *unused_grads):
        grads = (None, None)
        if grad_pair_loss is not None and (needs_input_grad[0] or needs_input_grad[1]):
            grads = backward_op(grad_pair_loss.contiguous(), *ctx.saved_tensors, *ctx.taus)
        return (grads[0] if needs_input_grad[0] else None, grads[1] if needs_input_grad[1] else None) + (None,) * 12
    return Backward(backward_op, _backward_fake, _setup_context, input_grads)


@torch.library.custom_op("udi_kernels::linear_distill_cross_entropy_triton", mutates_args=())
def _triton_forward(student: Tensor, weight: Tensor, teacher: Tensor, teacher_weight: Optional[Tensor],
                    centers: Tensor, center_id: Tensor, student_offsets: Tensor, pair_teacher: Tensor,
                    pair_weight: Tensor, center_offsets: Tensor, center_rows: Tensor, row_weight: Tensor,
                    tau_s: float, tau_t: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..triton_kernels.linear_distill_cross_entropy import forward
    return forward(student, weight, teacher, teacher_weight, centers, center_id, student_offsets, pair_teacher,
                   pair_weight, center_offsets, center_rows, row_weight, tau_s, tau_t)


@torch.library.custom_op("udi_kernels::linear_distill_cross_entropy_triton_backward", mutates_args=())
def _triton_backward(grad_pair_loss: Tensor, student: Tensor, weight: Tensor, teacher: Tensor,
                     teacher_weight: Optional[Tensor], centers: Tensor, center_id: Tensor, student_offsets: Tensor,
                     pair_teacher: Tensor, pair_weight: Tensor, student_lse: Tensor, teacher_lse: Tensor,
                     tau_s: float, tau_t: float) -> tuple[Tensor, Tensor]:
    from ..triton_kernels.linear_distill_cross_entropy import backward
    return backward(grad_pair_loss, student, weight, teacher, teacher_weight, centers, center_id, student_offsets,
                    pair_teacher, pair_weight, student_lse, teacher_lse, tau_s, tau_t)


_KERNELS = {"triton": register_kernels(OP, _triton_forward, _forward_fake, _autograd_through(_triton_backward))}
if native_loaded() and hasattr(torch.ops.udi_kernels, OP):
    _KERNELS["native"] = register_kernels(OP, f"udi_kernels::{OP}", _forward_fake, _autograd_through(
        torch.ops.udi_kernels.linear_distill_cross_entropy_backward.default))


# ---- checks ----------------------------------------------------------------------------------------------------

def _check_linear(student, weight, teacher, teacher_weight, centers, tau_s, tau_t):
    """The rows, the weights and the centers: dims, dtypes, devices, one D per side, one positive K."""
    check_tensor(student, "student", dims=2, dtypes=FLOATING)
    device = student.device
    check_tensor(weight, "weight", device=device, dims=2, dtypes=(student.dtype,))
    check_tensor(teacher, "teacher", device=device, dims=2, dtypes=FLOATING)
    check_tensor(centers, "centers", device=device, dims=2, dtypes=STATISTICS)
    K, D = weight.shape
    if D != student.shape[1]:
        raise ValueError(f"weight must have shape [K, D] with student's D = {student.shape[1]}, got "
                         f"{list(weight.shape)}")
    if teacher_weight is None:
        if teacher.shape[1] != K:
            raise ValueError(f"teacher (logits, teacher_weight None) must have weight's K = {K} columns, got "
                             f"{list(teacher.shape)}")
    else:
        check_tensor(teacher_weight, "teacher_weight", device=device, dims=2, dtypes=(teacher.dtype,))
        if list(teacher_weight.shape) != [K, teacher.shape[1]]:
            raise ValueError(f"teacher_weight must have shape [K, Dt] with weight's K = {K} and teacher's "
                             f"Dt = {teacher.shape[1]}, got {list(teacher_weight.shape)}")
    if centers.shape[1] != K:
        raise ValueError(f"centers must have weight's K = {K} columns, got {list(centers.shape)}")
    if K == 0 or centers.shape[0] == 0:
        raise ValueError(f"K and the number of centers must be positive, got centers of shape {list(centers.shape)}")
    check_temperatures(tau_s, tau_t)


def _resolve(student: Tensor, teacher: Tensor, backend: Optional[str]) -> str:
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else student.dtype
    return backends.resolve(LINEAR_DISTILL_CROSS_ENTROPY, student.device, dtype, backend)


# ---- public functions ------------------------------------------------------------------------------------------

def linear_distill_cross_entropy(student: Tensor, weight: Tensor, teacher: Tensor, teacher_weight: Optional[Tensor],
                                 centers: Tensor, center_id: Tensor, pair_student: Tensor, pair_teacher: Tensor,
                                 pair_weight: Tensor, row_weight: Tensor, tau_s: float, tau_t: float, *,
                                 backend: Optional[str] = None,
                                 check_values: bool = True) -> DistillCrossEntropyResult:
    """distill_cross_entropy(student @ weight.T, teacher @ teacher_weight.T, centers, ...) without the logits.

    The DINO head's last layer (bias-free, weight-normed: `weight` is its effective weight) fused into the
    centered distillation cross-entropy (UDI_SPEC §5, §10): the same pairs, centers, weights and result as
    udi_kernels.distill_cross_entropy on the logits, formed K-chunk by K-chunk (no [Rs, K] or [Rt, K] tensor in
    the forward or the backward; the backward recomputes the chunks).

    Args:
        student: [Rs, D] float32/float16/bfloat16 (float64: reference and native CPU only), the last layer's input;
            gets a gradient. weight: [K, D], student's dtype; gets a gradient.
        teacher: [Rt, Dt] with teacher_weight [K, Dt] (teacher's dtype), or [Rt, K] logits with
            teacher_weight=None; detached (no gradient).
        centers: [n_c, K] float32 (float64 allowed with float64 inputs); center_id: [Rt] int32/int64.
        pair_student, pair_teacher: [P] int32/int64 row indices; pair_weight: [P] float. Weight-0 pairs add 0.
        row_weight: [Rt] float weight of each teacher row in the center statistics (0 leaves a row out).
        tau_s, tau_t: temperatures, finite floats >= 2**-126 (1/tau must be a finite float32).
        backend: 'auto', 'native', 'triton' or 'reference' (default: $UDI_KERNELS_BACKEND or 'auto').
        check_values: as in distill_cross_entropy (index ranges; teacher, teacher_weight, centers and the
            weights finite; one device sync). With check_values=False every backend stays in bounds and gives
            the same result on every run; indices out of range follow distill_cross_entropy's rule.

    Under torch.autocast, student, weight, teacher and teacher_weight are first cast to the autocast dtype of
    their device (float64 ones are not), as a linear layer's inputs are; every backend then computes as for those
    dtypes (udi_kernels/ops/autocast.py). centers and the weights are not cast.

    Returns:
        DistillCrossEntropyResult(loss [], center_sum [n_c, K], center_count [n_c]); float32 (float64 for
        float64 inputs); accumulation in float32 for float16/bfloat16 inputs. center_sum is
        (Σ row_weight · teacher) @ teacher_weight.T. Student rows without a pair that counts and teacher rows of
        row_weight 0 are left out exactly (their values may be NaN).

    Raises:
        TypeError / ValueError naming the argument: wrong type, dtype, shape or device (e.g. a weight whose D
        differs from student's, a teacher_weight whose K differs from weight's), a temperature that is not a
        positive finite float, and (check_values) an index out of range or a non-finite value; the error of
        backends.resolve for a backend that cannot run the call (udi_kernels/declarations.py).

    Source: UDI_SPEC §10; the fused-linear cross-entropies of Liger-Kernel and Apple's Cut Cross-Entropy.
    """
    student, weight, teacher, teacher_weight = _autocast(student, weight, teacher, teacher_weight)
    _check_linear(student, weight, teacher, teacher_weight, centers, tau_s, tau_t)
    check_pairs(student.device, teacher.shape[0], center_id, pair_student, pair_teacher, pair_weight, row_weight)
    if check_bool(check_values, "check_values") and student.device.type != "meta":
        more = {} if teacher_weight is None else {"teacher_weight": teacher_weight}
        _check_values(student, teacher, centers, center_id, pair_student, pair_teacher, pair_weight, row_weight,
                      **more)
    csr = build_csr(pair_student, pair_teacher, pair_weight, center_id, student.shape[0], centers.shape[0])
    return _run(student, weight, teacher, teacher_weight, centers, csr, row_weight, tau_s, tau_t, backend)


def linear_distill_cross_entropy_csr(student: Tensor, weight: Tensor, teacher: Tensor,
                                     teacher_weight: Optional[Tensor], centers: Tensor, csr: PairCSR,
                                     row_weight: Tensor, tau_s: float, tau_t: float, *,
                                     backend: Optional[str] = None) -> DistillCrossEntropyResult:
    """linear_distill_cross_entropy on pairs already in the kernels' layout (build_csr), as
    distill_cross_entropy_csr is to distill_cross_entropy: no sort per call, no check of the pairs' values."""
    student, weight, teacher, teacher_weight = _autocast(student, weight, teacher, teacher_weight)
    _check_linear(student, weight, teacher, teacher_weight, centers, tau_s, tau_t)
    _check_csr(csr, row_weight, student, teacher, centers)
    return _run(student, weight, teacher, teacher_weight, centers, csr, row_weight, tau_s, tau_t, backend)


def _autocast(student, weight, teacher, teacher_weight):
    """The linear layer's inputs under autocast's rule (udi_kernels/ops/autocast.py)."""
    if not isinstance(student, Tensor):
        return student, weight, teacher, teacher_weight
    return cast_inputs(student.device, student, weight, teacher, teacher_weight)


def _run(student, weight, teacher, teacher_weight, centers, csr: PairCSR, row_weight, tau_s, tau_t,
         backend) -> DistillCrossEntropyResult:
    with autocast_off(student.device):
        return _run_backend(student, weight, teacher, teacher_weight, centers, csr, row_weight, tau_s, tau_t, backend)


def _run_backend(student, weight, teacher, teacher_weight, centers, csr: PairCSR, row_weight, tau_s, tau_t,
                 backend) -> DistillCrossEntropyResult:
    chosen = _resolve(student, teacher, backend)
    if chosen == "reference":
        return DistillCrossEntropyResult(*reference.linear_distill_cross_entropy(
            student, weight, teacher, teacher_weight, centers, csr, row_weight, float(tau_s), float(tau_t)))
    stats_dtype = compute_dtype(teacher.dtype)
    detached = lambda t: None if t is None else t.detach().contiguous()  # noqa: E731
    inputs = (student.contiguous(), weight.contiguous(), detached(teacher), detached(teacher_weight),
              centers.to(stats_dtype).contiguous(), csr.center_id,
              disjoint_offsets(csr.student_offsets, csr.pair_teacher.shape[0]), csr.pair_teacher,
              csr.pair_weight.to(compute_dtype(student.dtype)), csr.center_offsets, csr.center_rows,
              row_weight.to(stats_dtype).contiguous(), float(tau_s), float(tau_t))
    pair_loss, center_sum, center_count, _, _ = _KERNELS[chosen](*inputs)
    return DistillCrossEntropyResult(pair_loss.sum(), center_sum, center_count)
