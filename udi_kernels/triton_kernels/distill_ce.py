"""Fused distillation cross-entropy (UDI_SPEC §5) in Triton; contract in udi_kernels/ops/distill_ce.py.

Shapes: student [Rs, K], teacher [Rt, K] (fp32/fp16/bf16), centers [n_c, K] fp32, pairs in a student-row CSR
(student_ptr [Rs + 1], pair_teacher [P], pair_weight [P]), teacher rows by center (center_ptr [n_c + 1],
center_rows [Rt]). Every program loops over K in BLOCK_K chunks with fp32 accumulators; no K-wide
probability is stored. Saved stats: student_lse [Rs] = lse(s/τs), teacher_lse [Rt] = lse((t - c)/τt).

  forward:  teacher rows (online max/sum), center sums (one program per (center, K-block), deterministic),
            student rows (lse, then one K pass per pair: CE = Σ_k p_t,k · (lse_s - s_k/τs) ≥ 0 termwise)
  backward: student rows, each K-block: grad = (Σ_p g_p w_p · softmax(s/τs) - Σ_p g_p w_p · p_t,p) / τs
"""
import torch
import triton
import triton.language as tl

MAX_BLOCK_K = 1024


@triton.jit
def _centered(teacher_ptr, centers_ptr, row, center, k, K, inv_tau_t):
    mask = k < K
    t = tl.load(teacher_ptr + row * K + k, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(centers_ptr + center * K + k, mask=mask, other=0.0)
    return tl.where(mask, (t - c) * inv_tau_t, float("-inf"))


@triton.jit
def _scaled_student(student_ptr, row, k, K, inv_tau_s):
    mask = k < K
    s = tl.load(student_ptr + row * K + k, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, s * inv_tau_s, float("-inf"))


@triton.jit
def _online_lse_step(x, running_max, running_sum):
    block_max = tl.maximum(running_max, tl.max(x, 0))
    running_sum = running_sum * tl.exp(running_max - block_max) + tl.sum(tl.exp(x - block_max), 0)
    return block_max, running_sum


@triton.jit
def _teacher_stats_kernel(teacher_ptr, centers_ptr, center_id_ptr, teacher_lse_ptr, K, inv_tau_t,
                          BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    center = tl.load(center_id_ptr + row)
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.zeros((), tl.float32)
    for start in range(0, K, BLOCK_K):
        u = _centered(teacher_ptr, centers_ptr, row, center, start + tl.arange(0, BLOCK_K), K, inv_tau_t)
        running_max, running_sum = _online_lse_step(u, running_max, running_sum)
    tl.store(teacher_lse_ptr + row, running_max + tl.log(running_sum))


@triton.jit
def _center_sum_kernel(teacher_ptr, center_ptr, center_rows_ptr, row_weight_ptr, center_sum_ptr, center_count_ptr,
                       K, BLOCK_K: tl.constexpr):
    center = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = k < K
    acc = tl.zeros((BLOCK_K,), tl.float32)
    count = tl.zeros((), tl.float32)
    for slot in range(tl.load(center_ptr + center), tl.load(center_ptr + center + 1)):
        row = tl.load(center_rows_ptr + slot)
        weight = tl.load(row_weight_ptr + row)
        if weight != 0:
            acc += weight * tl.load(teacher_ptr + row * K + k, mask=mask, other=0.0).to(tl.float32)
        count += weight
    tl.store(center_sum_ptr + center * K + k, acc, mask=mask)
    if tl.program_id(1) == 0:
        tl.store(center_count_ptr + center, count)


@triton.jit
def _student_forward_kernel(student_ptr, teacher_ptr, centers_ptr, center_id_ptr, student_ptr_ptr, pair_teacher_ptr,
                            pair_weight_ptr, teacher_lse_ptr, student_lse_ptr, pair_loss_ptr, K, inv_tau_s,
                            inv_tau_t, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    running_max = tl.full((), float("-inf"), tl.float32)
    running_sum = tl.zeros((), tl.float32)
    for start in range(0, K, BLOCK_K):
        x = _scaled_student(student_ptr, row, start + tl.arange(0, BLOCK_K), K, inv_tau_s)
        running_max, running_sum = _online_lse_step(x, running_max, running_sum)
    lse = running_max + tl.log(running_sum)
    tl.store(student_lse_ptr + row, lse)

    for slot in range(tl.load(student_ptr_ptr + row), tl.load(student_ptr_ptr + row + 1)):
        weight = tl.load(pair_weight_ptr + slot)
        ce = tl.zeros((), tl.float32)
        if weight != 0:
            t_row = tl.load(pair_teacher_ptr + slot)
            center = tl.load(center_id_ptr + t_row)
            t_lse = tl.load(teacher_lse_ptr + t_row)
            acc = tl.zeros((BLOCK_K,), tl.float32)
            for start in range(0, K, BLOCK_K):
                k = start + tl.arange(0, BLOCK_K)
                p = tl.exp(_centered(teacher_ptr, centers_ptr, t_row, center, k, K, inv_tau_t) - t_lse)
                x = _scaled_student(student_ptr, row, k, K, inv_tau_s)
                acc += tl.where(k < K, p * (lse - x), 0.0)
            ce = weight * tl.sum(acc, 0)
        tl.store(pair_loss_ptr + slot, ce)


@triton.jit
def _student_backward_kernel(grad_pair_loss_ptr, student_ptr, teacher_ptr, centers_ptr, center_id_ptr,
                             student_ptr_ptr, pair_teacher_ptr, pair_weight_ptr, student_lse_ptr, teacher_lse_ptr,
                             grad_student_ptr, K, inv_tau_s, inv_tau_t, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    first = tl.load(student_ptr_ptr + row)
    end = tl.load(student_ptr_ptr + row + 1)
    total = tl.zeros((), tl.float32)
    for slot in range(first, end):
        weight = tl.load(pair_weight_ptr + slot)
        total += tl.where(weight != 0, weight * tl.load(grad_pair_loss_ptr + slot).to(tl.float32), 0.0)
    lse = tl.load(student_lse_ptr + row)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K)
        acc = total * tl.exp(_scaled_student(student_ptr, row, k, K, inv_tau_s) - lse)
        for slot in range(first, end):
            scale = tl.load(pair_weight_ptr + slot) * tl.load(grad_pair_loss_ptr + slot).to(tl.float32)
            if scale != 0:
                t_row = tl.load(pair_teacher_ptr + slot)
                center = tl.load(center_id_ptr + t_row)
                u = _centered(teacher_ptr, centers_ptr, t_row, center, k, K, inv_tau_t)
                acc -= scale * tl.exp(u - tl.load(teacher_lse_ptr + t_row))
        tl.store(grad_student_ptr + row * K + k, (acc * inv_tau_s).to(grad_student_ptr.dtype.element_ty), mask=k < K)


def _block_k(K):
    return min(triton.next_power_of_2(K), MAX_BLOCK_K)


def forward(student, teacher, centers, center_id, student_ptr, pair_teacher, pair_weight, center_ptr, center_rows,
            row_weight, tau_s, tau_t):
    """Returns pair_loss [P], center_sum [n_c, K], center_count [n_c], student_lse [Rs], teacher_lse [Rt] (fp32)."""
    (Rs, K), Rt, n_c = student.shape, teacher.shape[0], centers.shape[0]
    floats = dict(dtype=torch.float32, device=student.device)
    pair_loss = torch.empty(pair_teacher.shape[0], **floats)
    center_sum, center_count = torch.empty(n_c, K, **floats), torch.empty(n_c, **floats)
    student_lse, teacher_lse = torch.empty(Rs, **floats), torch.empty(Rt, **floats)
    block = _block_k(K)
    if Rt > 0:
        _teacher_stats_kernel[(Rt,)](teacher, centers, center_id, teacher_lse, K, 1.0 / tau_t, BLOCK_K=block)
    _center_sum_kernel[(n_c, triton.cdiv(K, block))](teacher, center_ptr, center_rows, row_weight, center_sum,
                                                    center_count, K, BLOCK_K=block)
    if Rs > 0:
        _student_forward_kernel[(Rs,)](student, teacher, centers, center_id, student_ptr, pair_teacher, pair_weight,
                                       teacher_lse, student_lse, pair_loss, K, 1.0 / tau_s, 1.0 / tau_t,
                                       BLOCK_K=block)
    return pair_loss, center_sum, center_count, student_lse, teacher_lse


def backward(grad_pair_loss, student, teacher, centers, center_id, student_ptr, pair_teacher, pair_weight,
             student_lse, teacher_lse, tau_s, tau_t):
    """Returns grad_student [Rs, K] in the student's dtype; every element written once."""
    grad_student = torch.empty_like(student)
    Rs, K = student.shape
    if Rs > 0:
        _student_backward_kernel[(Rs,)](grad_pair_loss, student, teacher, centers, center_id, student_ptr,
                                        pair_teacher, pair_weight, student_lse, teacher_lse, grad_student, K,
                                        1.0 / tau_s, 1.0 / tau_t, BLOCK_K=_block_k(K))
    return grad_student
