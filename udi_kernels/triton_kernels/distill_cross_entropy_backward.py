"""Fused distillation cross-entropy backward (UDI_SPEC §5) in Triton; contract in
udi_kernels/ops/distill_cross_entropy.py.

One program per (student row, K chunk) (chunking as in distill_cross_entropy.py): with g_p the incoming
gradient of pair p,
  grad_s = (Σ_p g_p w_p · softmax(s/τs) - Σ_p g_p w_p · p_t,p) / τs,
from the saved student_lse [Rs] and teacher_lse [Rt]; the chunk stays in registers and is written once.
Shapes: grad_pair_loss [P] fp32, student [Rs, K], teacher [Rt, K], centers [n_c, K] fp32 -> grad [Rs, K].
"""
import torch
import triton
import triton.language as tl

from .distill_cross_entropy import (center_chunk, chunk_offsets, chunking, csr_slots, no_center, pair_counts,
                                    pair_scale, scaled_student, teacher_probs)


@triton.jit
def _student_backward_kernel(grad_pair_loss_ptr, student_ptr, teacher_ptr, centers_ptr, center_id_ptr,
                             student_offsets_ptr, pair_teacher_ptr, pair_weight_ptr, student_lse_ptr, teacher_lse_ptr,
                             grad_student_ptr, K, Rt, n_c, P, inv_tau_s, inv_tau_t, CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    k, mask = chunk_offsets(K, CHUNK)
    first, end = csr_slots(student_offsets_ptr, row, P)
    total = tl.zeros((), tl.float32)
    counted = tl.zeros((), tl.int1)
    for slot in range(first, end):
        total += pair_scale(grad_pair_loss_ptr, pair_weight_ptr, pair_teacher_ptr, center_id_ptr, slot, Rt, n_c)
        counted |= pair_counts(pair_weight_ptr, pair_teacher_ptr, center_id_ptr, slot, Rt, n_c)
    x = scaled_student(student_ptr, row, k, mask, K, inv_tau_s)
    # a row without a pair that counts gets 0 exactly, whatever its values (0 * NaN would be NaN)
    acc = tl.where(counted, total * tl.exp(x - tl.load(student_lse_ptr + row)), 0.0)
    center, c = no_center(CHUNK)
    for slot in range(first, end):
        scale = pair_scale(grad_pair_loss_ptr, pair_weight_ptr, pair_teacher_ptr, center_id_ptr, slot, Rt, n_c)
        if scale != 0:
            t_row = tl.load(pair_teacher_ptr + slot)
            center, c = center_chunk(centers_ptr, center_id_ptr, t_row, center, c, k, mask, K)
            acc -= scale * teacher_probs(teacher_ptr, teacher_lse_ptr, t_row, c, k, mask, K, inv_tau_t)
    tl.store(grad_student_ptr + row * K + k, (acc * inv_tau_s).to(grad_student_ptr.dtype.element_ty), mask=mask)


def backward(grad_pair_loss, student, teacher, centers, center_id, student_offsets, pair_teacher, pair_weight,
             student_lse, teacher_lse, tau_s, tau_t):
    """Returns grad_student [Rs, K] in the student's dtype; every element written once."""
    grad_student = torch.empty_like(student)
    Rs, K = student.shape
    chunk, num_chunks, num_warps = chunking(K)
    if Rs > 0:
        _student_backward_kernel[(Rs, num_chunks)](grad_pair_loss, student, teacher, centers, center_id,
                                                   student_offsets, pair_teacher, pair_weight, student_lse,
                                                   teacher_lse, grad_student, K, teacher.shape[0], centers.shape[0],
                                                   pair_teacher.shape[0], 1.0 / tau_s, 1.0 / tau_t, CHUNK=chunk,
                                                   num_warps=num_warps)
    return grad_student
