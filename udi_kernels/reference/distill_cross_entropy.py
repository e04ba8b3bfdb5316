"""Distillation cross-entropy (UDI_SPEC §5) in eager PyTorch: the semantics every kernel is tested against.

loss = Σ_p w_p · CE(softmax((t[pt_p] - c[id[pt_p]]) / τt), log_softmax(s[ps_p] / τs)), the teacher and the
centers detached; center_sum[c] = Σ_{r: id[r] = c} row_weight[r] · t[r],  center_count[c] = Σ_{r: id[r] = c}
row_weight[r].

Indices out of range (possible only with check_values=False) follow the kernels' rule: a pair whose student row,
teacher row or teacher row's center does not exist adds exactly 0 to the loss and the gradient, and a teacher row
whose center does not exist is left out of the center statistics. Every index is mapped to a sentinel row past
the end, whose contributions are masked out.
"""
import torch
from torch import Tensor

from ..dtypes import compute_dtype



def sentinel_index(index: Tensor, size: int) -> Tensor:
    """index as int64, with every value outside [0, size) replaced by `size` (one row past the end)."""
    index = index.long()
    return torch.where((index >= 0) & (index < size), index, size)


def _with_zero_row(rows: Tensor) -> Tensor:
    return torch.cat([rows, rows.new_zeros(1, rows.shape[-1])])


def centered_teacher_probs(teacher: Tensor, centers: Tensor, center_id: Tensor, tau_t: float) -> Tensor:
    """softmax((t - c[id]) / τt) per teacher row, [Rt, K]; softmax subtracts the row max. A row whose center does
    not exist is centered by 0 (no pair reads it)."""
    dtype = compute_dtype(teacher.dtype)
    center_of_row = _with_zero_row(centers.detach().to(dtype))[sentinel_index(center_id, centers.shape[0])]
    return torch.softmax((teacher.detach().to(dtype) - center_of_row) / tau_t, dim=-1)


def center_statistics(teacher: Tensor, center_id: Tensor, row_weight: Tensor, num_centers: int):
    """(center_sum [n_c, K], center_count [n_c]): weighted sums of the raw teacher rows per center. A row of weight
    0 is left out exactly, whatever its values (as the kernels skip it)."""
    dtype = compute_dtype(teacher.dtype)
    weight = row_weight.to(dtype)
    ids = sentinel_index(center_id, num_centers)
    center_sum = teacher.new_zeros(num_centers + 1, teacher.shape[-1], dtype=dtype)
    weighted = torch.where(weight[:, None] != 0, teacher.detach().to(dtype) * weight[:, None], 0)
    center_sum.index_add_(0, ids, weighted)
    center_count = weight.new_zeros(num_centers + 1).index_add_(0, ids, weight)
    return center_sum[:num_centers], center_count[:num_centers]


def _rows_read(rows: Tensor, counts: Tensor, size: int) -> Tensor:
    """[size] bool: the rows that a pair which counts reads (rows: sentinel_index'd)."""
    read = torch.zeros(size + 1, dtype=torch.int32, device=rows.device)
    return read.scatter(0, torch.where(counts, rows, size), 1)[:size] > 0


def distill_cross_entropy(student: Tensor, teacher: Tensor, centers: Tensor, center_id: Tensor, pair_student: Tensor,
                          pair_teacher: Tensor, pair_weight: Tensor, row_weight: Tensor, tau_s: float, tau_t: float):
    """Same contract as udi_kernels.distill_cross_entropy (arguments already checked).

    Gradients flow to `student` through autograd; the teacher and the centers are detached. Pairs with weight 0
    or an index out of range contribute exactly 0 (even when their rows would give a non-finite CE).
    """
    dtype = compute_dtype(student.dtype)
    Rs, Rt, num_centers = student.shape[0], teacher.shape[0], centers.shape[0]
    rows_s, rows_t = sentinel_index(pair_student, Rs), sentinel_index(pair_teacher, Rt)
    center_of_row = torch.cat([sentinel_index(center_id, num_centers), center_id.new_full((1,), num_centers).long()])
    weight = pair_weight.to(dtype)
    counts = (weight != 0) & (rows_s < Rs) & (rows_t < Rt) & (center_of_row[rows_t] < num_centers)
    # a student row without a pair that counts is zeroed: left out exactly, its gradient 0 whatever its values
    student = torch.where(_rows_read(rows_s, counts, Rs)[:, None], student.to(dtype), 0)
    log_q = _with_zero_row(torch.log_softmax(student / tau_s, dim=-1))
    p_t = _with_zero_row(centered_teacher_probs(teacher, centers, center_id, tau_t).to(dtype))
    # index_select: its backward (index_add_) sums the pairs of a row in a fixed order, unlike indexing's
    # (index_put_ with atomic adds on the CPU), so that the gradient repeats bit for bit
    # the teacher rows of pairs that do not count are zeroed too, so that no NaN of theirs reaches the gradient
    targets = torch.where(counts[:, None], p_t[rows_t], 0)
    ce = -(targets * log_q.index_select(0, rows_s)).sum(-1)
    loss = torch.where(counts, weight * ce, torch.zeros_like(ce)).sum()
    center_sum, center_count = center_statistics(teacher, center_id, row_weight, num_centers)
    return loss, center_sum, center_count
