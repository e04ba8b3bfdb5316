"""linear_distill_cross_entropy (UDI_SPEC §10) in Triton; contract in udi_kernels/ops/linear_distill_cross_entropy.py.

Every kernel works on tiles of BLOCK_R rows × BLOCK_K columns of the logits, formed in registers by tl.dot over D
(fp32 accumulation; exact fp32 products for fp32 inputs) and reduced there. The partials, their layout and the
combine kernels are distill_cross_entropy's (triton_kernels/distill_cross_entropy.py), with C = cdiv(K, BLOCK_K):
  1. teacher partials [Rt, C]: max and Σ exp(u − max) of u = (x_t − c) / τt; teacher_lse by _lse_combine_kernel
  2. center statistics: _center_sum_kernel over the teacher's rows (Σ row_weight · teacher per center), then
     @ teacher_weight.T in fp32, chunk by chunk
  3. student partials [Rs, C] of x = x_s / τs, and per pair slot and chunk mass = Σ p_t, gap = Σ p_t · (m_c − x)
     (non-negative terms); the teacher tile of each row's j-th pair is formed by a tl.dot of the gathered teacher
     rows. student_lse and pair_loss by _student_combine_kernel
  4. backward, per host chunk of HOST_CHUNK columns: the tiles of G = (Σ_p g_p · softmax(x) − Σ_p g_p · p_t) / τs
     into one [Rs, HOST_CHUNK] buffer, then grad_student += G @ W_chunk and grad_weight[chunk] = Gᵀ @ student
     (torch.mm: cuBLAS on the GPU, in the input dtype with fp32 accumulation).
Indices are never trusted (csr_slots, pair_counts as in distill_cross_entropy); a student row without a pair that
counts gets G = 0 and is zeroed before the weight's GEMM, so that its values (NaN included) are left out.
"""
import torch
import triton
import triton.language as tl

from .distill_cross_entropy import (CENTER_BLOCK, CENTER_ROWS, _center_sum_kernel, _lse_combine_kernel,
                                    _student_combine_kernel)
from .srs_attention import dot_precision

BLOCK_R = 16      # rows per tile (tl.dot needs >= 16)
BLOCK_K = 64      # columns of logits per tile
BLOCK_D = 32      # of the contraction per tl.dot
HOST_CHUNK = 4096  # columns of G per backward launch (the [Rs, HOST_CHUNK] buffer)


@triton.jit
def _rows_times_weight(rows_ptr, weight_ptr, row, row_ok, k, k_ok, D, BLOCK_D: tl.constexpr,
                       PRECISION: tl.constexpr):
    """rows[row] @ weight[k].T, [rows, columns] fp32; 0 for rows not ok and columns past K."""
    acc = tl.zeros((row.shape[0], k.shape[0]), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        a = tl.load(rows_ptr + row[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(weight_ptr + k[:, None] * D + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
    return acc


@triton.jit
def _teacher_logits(teacher_ptr, teacher_weight_ptr, row, row_ok, k, k_ok, Dt, K, LOGITS: tl.constexpr,
                    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """The teacher's logits of rows × columns: teacher @ teacher_weight.T, or teacher's own (LOGITS)."""
    if LOGITS:
        return tl.load(teacher_ptr + row[:, None] * K + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                       other=0.0).to(tl.float32)
    return _rows_times_weight(teacher_ptr, teacher_weight_ptr, row, row_ok, k, k_ok, Dt, BLOCK_D, PRECISION)


@triton.jit
def _centered(x, centers_ptr, center, ok, k, k_ok, K, inv_tau_t):
    """(x − c[center]) / τt where ok and k < K, else -inf."""
    mask = ok[:, None] & k_ok[None, :]
    c = tl.load(centers_ptr + center[:, None] * K + k[None, :], mask=mask, other=0.0)
    return tl.where(mask, (x - c) * inv_tau_t, float("-inf"))


@triton.jit
def _slot_pairs(pair_teacher_ptr, pair_weight_ptr, center_id_ptr, slot, valid, Rt, n_c):
    """(teacher row, its center, whether the pair counts, its weight) of a vector of CSR slots (pair_counts)."""
    t_row = tl.load(pair_teacher_ptr + slot, mask=valid, other=-1)
    weight = tl.load(pair_weight_ptr + slot, mask=valid, other=0.0)
    t_ok = valid & (t_row >= 0) & (t_row < Rt)
    t_row = tl.where(t_ok, t_row, 0)
    center = tl.load(center_id_ptr + t_row, mask=t_ok, other=-1)
    counts = t_ok & (center >= 0) & (center < n_c) & (weight != 0)
    return t_row, tl.where(counts, center, 0), counts, weight


@triton.jit
def _pair_probs(teacher_ptr, teacher_weight_ptr, centers_ptr, teacher_lse_ptr, t_row, center, counts, k, k_ok, Dt,
                K, inv_tau_t, LOGITS: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """p_t = exp((x_t − c) / τt − teacher_lse) of each slot's teacher row over the columns; 0 where it does not
    count."""
    x = _teacher_logits(teacher_ptr, teacher_weight_ptr, t_row, counts, k, k_ok, Dt, K, LOGITS, BLOCK_D, PRECISION)
    u = _centered(x, centers_ptr, center, counts, k, k_ok, K, inv_tau_t)
    lse = tl.load(teacher_lse_ptr + t_row, mask=counts, other=0.0)
    return tl.where(counts[:, None] & k_ok[None, :], tl.exp(u - lse[:, None]), 0.0)


@triton.jit
def _row_slots(student_offsets_ptr, row, row_ok, P):
    """The clamped CSR slots [first, end) of each row (csr_slots); empty for rows past Rs."""
    first = tl.minimum(tl.maximum(tl.load(student_offsets_ptr + row, mask=row_ok, other=0), 0), P)
    end = tl.minimum(tl.maximum(tl.load(student_offsets_ptr + row + 1, mask=row_ok, other=0), first), P)
    return first, tl.where(row_ok, end, first)


@triton.jit
def _teacher_partials_kernel(teacher_ptr, teacher_weight_ptr, centers_ptr, center_id_ptr, part_max_ptr,
                             part_sum_ptr, Rt, Dt, K, n_c, num_chunks, inv_tau_t, LOGITS: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                             PRECISION: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_in, k_ok = row < Rt, k < K
    center = tl.load(center_id_ptr + row, mask=row_in, other=-1)
    ok = row_in & (center >= 0) & (center < n_c)
    x = _teacher_logits(teacher_ptr, teacher_weight_ptr, row, ok, k, k_ok, Dt, K, LOGITS, BLOCK_D, PRECISION)
    u = _centered(x, centers_ptr, tl.where(ok, center, 0), ok, k, k_ok, K, inv_tau_t)
    top = tl.max(u, 1)
    shift = tl.where(ok, top, 0.0)  # a row without a center: -inf partials, no pair reads them
    total = tl.where(ok, tl.sum(tl.exp(u - shift[:, None]), 1), 0.0)
    out = row * num_chunks + tl.program_id(1)
    tl.store(part_max_ptr + out, top, mask=row_in)
    tl.store(part_sum_ptr + out, total, mask=row_in)


@triton.jit
def _student_partials_kernel(student_ptr, weight_ptr, teacher_ptr, teacher_weight_ptr, centers_ptr, center_id_ptr,
                             student_offsets_ptr, pair_teacher_ptr, pair_weight_ptr, teacher_lse_ptr, part_max_ptr,
                             part_sum_ptr, pair_mass_ptr, pair_gap_ptr, Rs, Rt, D, Dt, K, n_c, P, num_chunks,
                             max_pairs, inv_tau_s, inv_tau_t, LOGITS: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    chunk = tl.program_id(1)
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = chunk.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok, k_ok = row < Rs, k < K
    tile = row_ok[:, None] & k_ok[None, :]
    x = tl.where(tile, _rows_times_weight(student_ptr, weight_ptr, row, row_ok, k, k_ok, D, BLOCK_D, PRECISION)
                 * inv_tau_s, float("-inf"))
    top = tl.where(row_ok, tl.max(x, 1), 0.0)
    out = row * num_chunks + chunk
    tl.store(part_max_ptr + out, top, mask=row_ok)
    tl.store(part_sum_ptr + out, tl.sum(tl.exp(x - top[:, None]), 1), mask=row_ok)
    first, end = _row_slots(student_offsets_ptr, row, row_ok, P)
    for j in range(0, max_pairs):
        slot = first + j
        valid = slot < end
        t_row, center, counts, _ = _slot_pairs(pair_teacher_ptr, pair_weight_ptr, center_id_ptr, slot, valid, Rt, n_c)
        p = _pair_probs(teacher_ptr, teacher_weight_ptr, centers_ptr, teacher_lse_ptr, t_row, center, counts, k,
                        k_ok, Dt, K, inv_tau_t, LOGITS, BLOCK_D, PRECISION)
        gap = p * tl.where(tile, top[:, None] - x, 0.0)
        tl.store(pair_mass_ptr + slot * num_chunks + chunk, tl.sum(p, 1), mask=valid)
        tl.store(pair_gap_ptr + slot * num_chunks + chunk, tl.sum(gap, 1), mask=valid)


@triton.jit
def _row_scales_kernel(grad_pair_loss_ptr, student_offsets_ptr, pair_teacher_ptr, pair_weight_ptr, center_id_ptr,
                       total_ptr, active_ptr, Rs, Rt, n_c, P, max_pairs, BLOCK_R: tl.constexpr):
    """Per student row: Σ_p g_p (g_p = w_p · grad_p over the pairs that count) and whether it has such a pair."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = row < Rs
    first, end = _row_slots(student_offsets_ptr, row, row_ok, P)
    total = tl.zeros((BLOCK_R,), tl.float32)
    active = tl.zeros((BLOCK_R,), tl.int32)
    for j in range(0, max_pairs):
        slot = first + j
        valid = slot < end
        _, _, counts, weight = _slot_pairs(pair_teacher_ptr, pair_weight_ptr, center_id_ptr, slot, valid, Rt, n_c)
        grad = tl.load(grad_pair_loss_ptr + slot, mask=counts, other=0.0)
        total += tl.where(counts, weight * grad, 0.0)
        active = tl.where(counts, 1, active)
    tl.store(total_ptr + row, total, mask=row_ok)
    tl.store(active_ptr + row, active.to(tl.int8), mask=row_ok)


@triton.jit
def _grad_logits_kernel(student_ptr, weight_ptr, teacher_ptr, teacher_weight_ptr, centers_ptr, center_id_ptr,
                        student_offsets_ptr, pair_teacher_ptr, pair_weight_ptr, grad_pair_loss_ptr, student_lse_ptr,
                        teacher_lse_ptr, total_ptr, active_ptr, grad_ptr, k_base, width, Rs, Rt, D, Dt, K, n_c, P,
                        max_pairs, inv_tau_s, inv_tau_t, LOGITS: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """∂L/∂x of columns [k_base, k_base + width) into grad [Rs, width] (fp32)."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    column = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    k = k_base + column
    row_ok, k_ok = row < Rs, (column < width) & (k < K)
    active = tl.load(active_ptr + row, mask=row_ok, other=0) != 0
    x = _rows_times_weight(student_ptr, weight_ptr, row, active, k, k_ok, D, BLOCK_D, PRECISION) * inv_tau_s
    lse = tl.load(student_lse_ptr + row, mask=active, other=0.0)
    total = tl.load(total_ptr + row, mask=active, other=0.0)
    g = tl.where(active[:, None] & k_ok[None, :], total[:, None] * tl.exp(x - lse[:, None]), 0.0)
    first, end = _row_slots(student_offsets_ptr, row, active, P)
    for j in range(0, max_pairs):
        slot = first + j
        valid = slot < end
        t_row, center, counts, weight = _slot_pairs(pair_teacher_ptr, pair_weight_ptr, center_id_ptr, slot, valid,
                                                    Rt, n_c)
        scale = tl.where(counts, weight * tl.load(grad_pair_loss_ptr + slot, mask=counts, other=0.0), 0.0)
        p = _pair_probs(teacher_ptr, teacher_weight_ptr, centers_ptr, teacher_lse_ptr, t_row, center, counts, k,
                        k_ok, Dt, K, inv_tau_t, LOGITS, BLOCK_D, PRECISION)
        g -= scale[:, None] * p
    tl.store(grad_ptr + row[:, None] * width + column[None, :], g * inv_tau_s,
             mask=row_ok[:, None] & (column < width)[None, :])


def _max_pairs(student_offsets, P):
    """The most CSR slots of one student row (the pair loop's trip count; one host sync)."""
    if student_offsets.shape[0] < 2 or P == 0:
        return 0
    return min(int(student_offsets.diff().max()), P)


def _shared(student, weight, teacher, teacher_weight):
    """The launch arguments both passes share: (teacher_weight pointer, sizes, constexprs)."""
    logits = teacher_weight is None
    sizes = dict(Rs=student.shape[0], Rt=teacher.shape[0], D=student.shape[1], Dt=0 if logits else teacher.shape[1],
                 K=weight.shape[0])
    meta = dict(LOGITS=logits, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D,
                PRECISION=dot_precision(student.dtype))
    return (teacher if logits else teacher_weight), sizes, meta


def _center_statistics(teacher, teacher_weight, center_offsets, center_rows, row_weight, n_c, K):
    """(center_sum [n_c, K], center_count [n_c]) fp32: Σ row_weight · teacher per center, then @ teacher_weight.T."""
    Rt, columns = teacher.shape
    floats = dict(dtype=torch.float32, device=teacher.device)
    sums, count = torch.empty(n_c, columns, **floats), torch.empty(n_c, **floats)
    _center_sum_kernel[(triton.cdiv(columns, CENTER_BLOCK), n_c)](teacher, center_offsets, center_rows, row_weight,
                                                                  sums, count, columns, Rt, BLOCK=CENTER_BLOCK,
                                                                  ROWS=CENTER_ROWS, num_warps=8)
    if teacher_weight is None:
        return sums, count
    center_sum = torch.empty(n_c, K, **floats)
    for k in range(0, K, HOST_CHUNK):
        torch.mm(sums, teacher_weight[k:k + HOST_CHUNK].float().T, out=center_sum[:, k:k + HOST_CHUNK])
    return center_sum, count


def forward(student, weight, teacher, teacher_weight, centers, center_id, student_offsets, pair_teacher, pair_weight,
            center_offsets, center_rows, row_weight, tau_s, tau_t):
    """Returns pair_loss [P], center_sum [n_c, K], center_count [n_c], student_lse [Rs], teacher_lse [Rt] (fp32)."""
    tw, sizes, meta = _shared(student, weight, teacher, teacher_weight)
    Rs, Rt, K, n_c, P = sizes["Rs"], sizes["Rt"], sizes["K"], centers.shape[0], pair_teacher.shape[0]
    num_chunks = triton.cdiv(K, BLOCK_K)
    chunks = triton.next_power_of_2(num_chunks)
    floats = dict(dtype=torch.float32, device=student.device)
    pair_loss, student_lse, teacher_lse = torch.zeros(P, **floats), torch.empty(Rs, **floats), torch.empty(Rt, **floats)
    if Rt > 0:
        t_max, t_sum = torch.empty(2, Rt, num_chunks, **floats)
        _teacher_partials_kernel[(triton.cdiv(Rt, BLOCK_R), num_chunks)](
            teacher, tw, centers, center_id, t_max, t_sum, Rt, sizes["Dt"], K, n_c, num_chunks, 1.0 / tau_t, **meta)
        _lse_combine_kernel[(Rt,)](t_max, t_sum, teacher_lse, num_chunks, CHUNKS=chunks)
    center_sum, center_count = _center_statistics(teacher, teacher_weight, center_offsets, center_rows, row_weight,
                                                  n_c, K)
    if Rs > 0:
        s_max, s_sum = torch.empty(2, Rs, num_chunks, **floats)
        pair_mass, pair_gap = torch.zeros(2, P, num_chunks, **floats)
        _student_partials_kernel[(triton.cdiv(Rs, BLOCK_R), num_chunks)](
            student, weight, teacher, tw, centers, center_id, student_offsets, pair_teacher, pair_weight, teacher_lse,
            s_max, s_sum, pair_mass, pair_gap, Rs, Rt, sizes["D"], sizes["Dt"], K, n_c, P, num_chunks,
            _max_pairs(student_offsets, P), 1.0 / tau_s, 1.0 / tau_t, **meta)
        _student_combine_kernel[(Rs,)](student_offsets, pair_weight, pair_teacher, center_id, s_max, s_sum, pair_mass,
                                       pair_gap, student_lse, pair_loss, Rt, n_c, P, num_chunks, CHUNKS=chunks)
    return pair_loss, center_sum, center_count, student_lse, teacher_lse


def backward(grad_pair_loss, student, weight, teacher, teacher_weight, centers, center_id, student_offsets,
             pair_teacher, pair_weight, student_lse, teacher_lse, tau_s, tau_t):
    """Returns grad_student [Rs, D], grad_weight [K, D] in their dtypes."""
    tw, sizes, meta = _shared(student, weight, teacher, teacher_weight)
    Rs, Rt, K, n_c, P = sizes["Rs"], sizes["Rt"], sizes["K"], centers.shape[0], pair_teacher.shape[0]
    max_pairs = _max_pairs(student_offsets, P)
    total = torch.empty(Rs, dtype=torch.float32, device=student.device)
    active = torch.empty(Rs, dtype=torch.int8, device=student.device)
    if Rs > 0:
        _row_scales_kernel[(triton.cdiv(Rs, BLOCK_R),)](grad_pair_loss, student_offsets, pair_teacher, pair_weight,
                                                        center_id, total, active, Rs, Rt, n_c, P, max_pairs,
                                                        BLOCK_R=BLOCK_R)
    rows = torch.where(active[:, None] != 0, student, 0)  # rows without a counting pair: out of grad_weight
    grad_student = torch.zeros(Rs, sizes["D"], dtype=torch.float32, device=student.device)
    grad_weight = torch.empty_like(weight)
    buffer = torch.empty(Rs * min(HOST_CHUNK, K), dtype=torch.float32, device=student.device)
    for k in range(0, K, HOST_CHUNK):
        width = min(HOST_CHUNK, K - k)
        g = buffer[:Rs * width].view(Rs, width)
        if Rs > 0:
            _grad_logits_kernel[(triton.cdiv(Rs, BLOCK_R), triton.cdiv(width, BLOCK_K))](
                student, weight, teacher, tw, centers, center_id, student_offsets, pair_teacher, pair_weight,
                grad_pair_loss, student_lse, teacher_lse, total, active, g, k, width, Rs, Rt, sizes["D"],
                sizes["Dt"], K, n_c, P, max_pairs, 1.0 / tau_s, 1.0 / tau_t, **meta)
        g = g.to(weight.dtype)  # the GEMMs in the input dtype (tensor cores), fp32 accumulation
        grad_student += torch.mm(g, weight[k:k + width])
        torch.mm(g.T, rows, out=grad_weight[k:k + width])
    return grad_student.to(student.dtype), grad_weight
