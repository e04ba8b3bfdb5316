"""Fused distillation cross-entropy forward (UDI_SPEC §5) in Triton; contract in
udi_kernels/ops/distill_cross_entropy.py.

Shapes: student [Rs, K], teacher [Rt, K] (fp32/fp16/bf16), centers [n_c, K] fp32, pairs in a student-row CSR
(student_offsets [Rs + 1], pair_teacher [P], pair_weight [P]), teacher rows by center (center_offsets [n_c + 1],
center_rows [Rt]). K is split into C = cdiv(K, CHUNK) chunks; every row kernel runs one program per
(row, chunk) with rows on grid axis 0 (programs running together share a chunk of the teacher and centers in
L2) and holds its chunk in registers: the student is read from HBM once per pass, thousands of programs run,
and each program reduces across warps once per quantity, not once per block of K.
Partials are O((rows + P) × C) fp32; no K-wide probability is stored.

  1. teacher partials [Rt, C]: max and Σ exp(u - max) of u = (t - c)/τt over the chunk
  2. teacher_lse [Rt] = logsumexp(u), combined from the partials
  3. center sums, one program per (K-block, center) over [CENTER_ROWS, CENTER_BLOCK] tiles of its rows
  4. student partials [Rs, C]: m_c = max of x = s/τs and Σ exp(x - m_c) over the chunk; per pair and chunk
     mass = Σ p_t and gap = Σ p_t·(m_c - x), both >= 0, with p_t = exp(u - teacher_lse)
  5. student_lse [Rs]; pair_loss [P] = w · Σ_c (mass_c·(lse - m_c) + gap_c) = w · Σ_k p_t,k·(lse - x_k),
     a sum of non-negative terms (no cancellation at large logits)
Indices read from memory are never trusted (as in csrc/distill_cross_entropy_op.h): CSR segments are clamped into bounds
(csr_slots), a pair counts only with a nonzero weight and a teacher row that exists and has a center
(pair_counts); one that does not adds exactly 0 to the loss and the gradient.
"""
import torch
import triton
import triton.language as tl

MAX_CHUNK = 4096       # K elements per (row, chunk) program, held in registers
CENTER_BLOCK = 128     # K elements per center-sum program
CENTER_ROWS = 32       # teacher rows per center-sum tile


@triton.jit
def chunk_offsets(K, CHUNK: tl.constexpr):
    k = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    return k, k < K


@triton.jit
def scaled_student(student_ptr, row, k, mask, K, inv_tau_s):
    """x = s/τs over the chunk, -inf past K."""
    s = tl.load(student_ptr + row * K + k, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, s * inv_tau_s, float("-inf"))


@triton.jit
def csr_slots(offsets_ptr, i, size):
    """The slots [offsets[i], offsets[i + 1]) of CSR segment i, clamped into [0, size] (empty when the offsets
    decrease)."""
    first = tl.minimum(tl.maximum(tl.load(offsets_ptr + i), 0), size)
    return first, tl.minimum(tl.maximum(tl.load(offsets_ptr + i + 1), first), size)


@triton.jit
def teacher_row_ok(center_id_ptr, row, Rt, n_c):
    """Whether teacher row `row` exists and has a center."""
    in_rows = (row >= 0) & (row < Rt)
    center = tl.load(center_id_ptr + row, mask=in_rows, other=-1)
    return in_rows & (center >= 0) & (center < n_c)


@triton.jit
def pair_counts(pair_weight_ptr, pair_teacher_ptr, center_id_ptr, slot, Rt, n_c):
    """Whether the pair in CSR slot `slot` counts: a nonzero weight and a teacher row with a center."""
    t_row = tl.load(pair_teacher_ptr + slot)
    return (tl.load(pair_weight_ptr + slot) != 0) & teacher_row_ok(center_id_ptr, t_row, Rt, n_c)


@triton.jit
def center_chunk(centers_ptr, center_id_ptr, t_row, cached, c, k, mask, K):
    """(center of teacher row t_row, its chunk); c is reused when that center is `cached` (the losses use one)."""
    center = tl.load(center_id_ptr + t_row)
    if center != cached:
        c = _load_center(centers_ptr, center, k, mask, K)
    return center, c


@triton.jit
def _load_center(centers_ptr, center, k, mask, K):
    return tl.load(centers_ptr + center * K + k, mask=mask, other=0.0)


@triton.jit
def teacher_probs(teacher_ptr, teacher_lse_ptr, t_row, c, k, mask, K, inv_tau_t):
    """p_t = exp((t - c)/τt - teacher_lse) of teacher row t_row over the chunk (c: its center's), 0 past K."""
    return tl.exp(_centered(teacher_ptr, t_row, c, k, mask, K, inv_tau_t) - tl.load(teacher_lse_ptr + t_row))


@triton.jit
def pair_scale(grad_pair_loss_ptr, pair_weight_ptr, pair_teacher_ptr, center_id_ptr, slot, Rt, n_c):
    """g_p · w_p, exactly 0 for a pair that does not count (pair_counts)."""
    counts = pair_counts(pair_weight_ptr, pair_teacher_ptr, center_id_ptr, slot, Rt, n_c)
    scale = tl.load(pair_weight_ptr + slot) * tl.load(grad_pair_loss_ptr + slot).to(tl.float32)
    return tl.where(counts, scale, 0.0)


@triton.jit
def no_center(CHUNK: tl.constexpr):
    """An empty center cache for center_chunk."""
    return tl.full((), -1, tl.int64), tl.zeros((CHUNK,), tl.float32)


@triton.jit
def _centered(teacher_ptr, row, c, k, mask, K, inv_tau_t):
    t = tl.load(teacher_ptr + row * K + k, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, (t - c) * inv_tau_t, float("-inf"))


@triton.jit
def _combined_lse(part_max_ptr, part_sum_ptr, row, num_chunks, CHUNKS: tl.constexpr):
    """logsumexp of a row from its per-chunk (max, Σ exp(x - max)) partials."""
    chunk = tl.arange(0, CHUNKS)
    mask = chunk < num_chunks
    part_max = tl.load(part_max_ptr + row * num_chunks + chunk, mask=mask, other=float("-inf"))
    part_sum = tl.load(part_sum_ptr + row * num_chunks + chunk, mask=mask, other=0.0)
    top = tl.max(part_max, 0)
    shift = tl.where(top == float("-inf"), 0.0, top)  # a row of -inf partials (no center) gives -inf, not NaN
    return top + tl.log(tl.sum(part_sum * tl.exp(part_max - shift), 0))


@triton.jit
def _store_lse_partials(part_max_ptr, part_sum_ptr, row, num_chunks, x):
    top = tl.max(x, 0)
    tl.store(part_max_ptr + row * num_chunks + tl.program_id(1), top)
    tl.store(part_sum_ptr + row * num_chunks + tl.program_id(1), tl.sum(tl.exp(x - top), 0))
    return top


@triton.jit
def _teacher_partials_kernel(teacher_ptr, centers_ptr, center_id_ptr, part_max_ptr, part_sum_ptr, K, Rt, n_c,
                             num_chunks, inv_tau_t, CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    k, mask = chunk_offsets(K, CHUNK)
    if teacher_row_ok(center_id_ptr, row, Rt, n_c):
        c = _load_center(centers_ptr, tl.load(center_id_ptr + row), k, mask, K)
        u = _centered(teacher_ptr, row, c, k, mask, K, inv_tau_t)
        _store_lse_partials(part_max_ptr, part_sum_ptr, row, num_chunks, u)
    else:  # no pair reads this row's logsumexp: -inf
        tl.store(part_max_ptr + row * num_chunks + tl.program_id(1), float("-inf"))
        tl.store(part_sum_ptr + row * num_chunks + tl.program_id(1), 0.0)


@triton.jit
def _lse_combine_kernel(part_max_ptr, part_sum_ptr, lse_ptr, num_chunks, CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    tl.store(lse_ptr + row, _combined_lse(part_max_ptr, part_sum_ptr, row, num_chunks, CHUNKS))


@triton.jit
def _center_sum_kernel(teacher_ptr, center_offsets_ptr, center_rows_ptr, row_weight_ptr, center_sum_ptr,
                       center_count_ptr, K, Rt, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    center = tl.program_id(1).to(tl.int64)
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    k_mask = k < K
    begin, end = csr_slots(center_offsets_ptr, center, Rt)
    acc = tl.zeros((ROWS, BLOCK), tl.float32)  # reduced over rows once, at the end
    weights = tl.zeros((ROWS,), tl.float32)
    for first in range(begin, end, ROWS):
        slot = first + tl.arange(0, ROWS)
        row = tl.load(center_rows_ptr + slot, mask=slot < end, other=-1)
        row_ok = (row >= 0) & (row < Rt)  # other rows are skipped
        weight = tl.load(row_weight_ptr + row, mask=row_ok, other=0.0)
        tile_mask = (weight != 0)[:, None] & k_mask[None, :]  # weight-0 rows are never read
        t = tl.load(teacher_ptr + row[:, None] * K + k[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        acc += weight[:, None] * t
        weights += weight
    tl.store(center_sum_ptr + center * K + k, tl.sum(acc, 0), mask=k_mask)
    if tl.program_id(0) == 0:
        tl.store(center_count_ptr + center, tl.sum(weights, 0))


@triton.jit
def _student_partials_kernel(student_ptr, teacher_ptr, centers_ptr, center_id_ptr, student_offsets_ptr,
                             pair_teacher_ptr, pair_weight_ptr, teacher_lse_ptr, part_max_ptr, part_sum_ptr,
                             pair_mass_ptr, pair_gap_ptr, K, Rt, n_c, P, num_chunks, inv_tau_s, inv_tau_t,
                             CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    k, mask = chunk_offsets(K, CHUNK)
    x = scaled_student(student_ptr, row, k, mask, K, inv_tau_s)
    top = _store_lse_partials(part_max_ptr, part_sum_ptr, row, num_chunks, x)
    center, c = no_center(CHUNK)
    first, end = csr_slots(student_offsets_ptr, row, P)
    for slot in range(first, end):
        mass = tl.zeros((), tl.float32)
        gap = tl.zeros((), tl.float32)
        if pair_counts(pair_weight_ptr, pair_teacher_ptr, center_id_ptr, slot, Rt, n_c):
            t_row = tl.load(pair_teacher_ptr + slot)
            center, c = center_chunk(centers_ptr, center_id_ptr, t_row, center, c, k, mask, K)
            p = teacher_probs(teacher_ptr, teacher_lse_ptr, t_row, c, k, mask, K, inv_tau_t)
            mass = tl.sum(p, 0)
            gap = tl.sum(tl.where(mask, p * (top - x), 0.0), 0)
        tl.store(pair_mass_ptr + slot * num_chunks + chunk, mass)
        tl.store(pair_gap_ptr + slot * num_chunks + chunk, gap)


@triton.jit
def _student_combine_kernel(student_offsets_ptr, pair_weight_ptr, pair_teacher_ptr, center_id_ptr, part_max_ptr,
                            part_sum_ptr, pair_mass_ptr, pair_gap_ptr, student_lse_ptr, pair_loss_ptr, Rt, n_c, P,
                            num_chunks, CHUNKS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lse = _combined_lse(part_max_ptr, part_sum_ptr, row, num_chunks, CHUNKS)
    tl.store(student_lse_ptr + row, lse)
    chunk = tl.arange(0, CHUNKS)
    mask = chunk < num_chunks
    top = tl.load(part_max_ptr + row * num_chunks + chunk, mask=mask, other=0.0)
    first, end = csr_slots(student_offsets_ptr, row, P)
    for slot in range(first, end):
        mass = tl.load(pair_mass_ptr + slot * num_chunks + chunk, mask=mask, other=0.0)
        gap = tl.load(pair_gap_ptr + slot * num_chunks + chunk, mask=mask, other=0.0)
        ce = tl.sum(mass * (lse - top) + gap, 0)
        counts = pair_counts(pair_weight_ptr, pair_teacher_ptr, center_id_ptr, slot, Rt, n_c)
        tl.store(pair_loss_ptr + slot, tl.where(counts, tl.load(pair_weight_ptr + slot) * ce, 0.0))


def chunking(K):
    """(CHUNK, number of chunks, num_warps) of the (row, chunk) kernels."""
    chunk = min(triton.next_power_of_2(K), MAX_CHUNK)
    return chunk, triton.cdiv(K, chunk), 8 if chunk >= 2048 else 4


def forward(student, teacher, centers, center_id, student_offsets, pair_teacher, pair_weight, center_offsets,
            center_rows, row_weight, tau_s, tau_t):
    """Returns pair_loss [P], center_sum [n_c, K], center_count [n_c], student_lse [Rs], teacher_lse [Rt] (fp32)."""
    (Rs, K), Rt, n_c, P = student.shape, teacher.shape[0], centers.shape[0], pair_teacher.shape[0]
    chunk, num_chunks, num_warps = chunking(K)
    chunks = triton.next_power_of_2(num_chunks)
    floats = dict(dtype=torch.float32, device=student.device)
    pair_loss, student_lse, teacher_lse = torch.zeros(P, **floats), torch.empty(Rs, **floats), torch.empty(Rt, **floats)
    center_sum, center_count = torch.empty(n_c, K, **floats), torch.empty(n_c, **floats)
    if Rt > 0:
        t_max, t_sum = torch.empty(2, Rt, num_chunks, **floats)
        _teacher_partials_kernel[(Rt, num_chunks)](teacher, centers, center_id, t_max, t_sum, K, Rt, n_c, num_chunks,
                                                   1.0 / tau_t, CHUNK=chunk, num_warps=num_warps)
        _lse_combine_kernel[(Rt,)](t_max, t_sum, teacher_lse, num_chunks, CHUNKS=chunks)
    _center_sum_kernel[(triton.cdiv(K, CENTER_BLOCK), n_c)](teacher, center_offsets, center_rows, row_weight,
                                                            center_sum, center_count, K, Rt, BLOCK=CENTER_BLOCK,
                                                            ROWS=CENTER_ROWS, num_warps=8)
    if Rs > 0:
        s_max, s_sum = torch.empty(2, Rs, num_chunks, **floats)
        pair_mass, pair_gap = torch.empty(2, P, num_chunks, **floats)
        _student_partials_kernel[(Rs, num_chunks)](student, teacher, centers, center_id, student_offsets,
                                                   pair_teacher, pair_weight, teacher_lse, s_max, s_sum, pair_mass,
                                                   pair_gap, K, Rt, n_c, P, num_chunks, 1.0 / tau_s, 1.0 / tau_t,
                                                   CHUNK=chunk, num_warps=num_warps)
        _student_combine_kernel[(Rs,)](student_offsets, pair_weight, pair_teacher, center_id, s_max, s_sum, pair_mass,
                                       pair_gap, student_lse, pair_loss, Rt, n_c, P, num_chunks, CHUNKS=chunks)
    return pair_loss, center_sum, center_count, student_lse, teacher_lse
