"""linear_distill_cross_entropy (UDI_SPEC §10) in eager PyTorch, K-chunk by K-chunk: the kernels' float64 oracle.

The semantics are distill_cross_entropy's (udi_kernels/reference/distill_cross_entropy.py) on the logits
`student @ weight.T` and `teacher @ teacher_weight.T` (or `teacher` itself when teacher_weight is None), computed
without any [rows, K] tensor: every K-chunk of the logits is formed inside a torch.utils.checkpoint, so that the
backward recomputes it; autograd gives the gradients of `student` and `weight`. Per student row r the pairs enter
through T_r = Σ_{p of r} w_p · p_t[pair_teacher[p]] (a segment sum over the pairs' CSR, no scatter), so that
loss = Σ_r Σ_k T_rk · (lse_s(r) − x_rk / τs) is distill_cross_entropy's Σ_p w_p · Σ_k p_tk · (−log q_rk).
Only gathers and fixed-order reductions: bitwise repeatable run to run on every device.

Student rows without a pair that counts (weight 0, or an index out of range: the kernels' rule) and teacher rows
with row_weight 0 are left out exactly, whatever their values (NaN included).
"""
from typing import Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..dtypes import compute_dtype
from .distill_cross_entropy import center_statistics

CHUNK = 1024  # K-columns of logits formed at a time


def _segment_sum(rows: Tensor, offsets: Tensor) -> Tensor:
    """Σ of rows[offsets[i]:offsets[i + 1]] per segment i, [len(offsets) - 1, ...] (0 for an empty segment)."""
    return torch.segment_reduce(rows, "sum", offsets=offsets, axis=0, unsafe=True)


class _Pairs:
    """The pairs in CSR order (PairCSR): which count, their weights, and the student rows that have one."""

    def __init__(self, csr, num_students: int, num_teachers: int, num_centers: int, dtype: torch.dtype):
        teacher = csr.pair_teacher
        in_range = (teacher >= 0) & (teacher < num_teachers)
        self.teacher = torch.where(in_range, teacher, 0)
        center = csr.center_id[self.teacher]
        self.counts = in_range & (center >= 0) & (center < num_centers) & (csr.pair_weight != 0)
        self.weight = torch.where(self.counts, csr.pair_weight.to(dtype), 0)
        self.offsets = csr.student_offsets
        self.row_weight = _segment_sum(self.weight, self.offsets)  # Σ_p w_p per student row
        self.row_active = _segment_sum(self.counts.to(dtype), self.offsets) > 0

    def targets(self, teacher_probs: Tensor) -> Tensor:
        """T = Σ_{p of r} w_p · teacher_probs[pair_teacher[p]] per student row, [Rs, C]."""
        rows = torch.where(self.counts[:, None], self.weight[:, None] * teacher_probs[self.teacher], 0)
        return _segment_sum(rows, self.offsets)


def _teacher_chunks(teacher: Tensor, teacher_weight: Optional[Tensor], dtype: torch.dtype, K: int):
    """The teacher's logits chunk by chunk, [Rt, CHUNK] each (the last one narrower)."""
    teacher = teacher.detach().to(dtype)
    if teacher_weight is None:
        return [teacher[:, k:k + CHUNK] for k in range(0, K, CHUNK)]
    weight = teacher_weight.detach().to(dtype)
    return [teacher @ weight[k:k + CHUNK].T for k in range(0, K, CHUNK)]


def _centered(teacher_chunk: Tensor, centers_chunk: Tensor, center_of_row: Tensor, valid_row: Tensor, tau_t: float):
    """(t − c[id]) / τt of one chunk; rows without a center are centered by 0 (no pair reads them)."""
    center = torch.where(valid_row[:, None], centers_chunk[center_of_row], 0)
    return (teacher_chunk - center) / tau_t


def _recomputed(function, *args):
    """function(*args) inside a torch.utils.checkpoint (its backward recomputes the chunk); called directly under
    torch.func transforms, which do not support checkpoint's saved-tensor hooks (the same values, kept)."""
    if torch._C._are_functorch_transforms_active():
        return function(*args)
    return checkpoint(function, *args, use_reentrant=False)


def linear_distill_cross_entropy(student: Tensor, weight: Tensor, teacher: Tensor, teacher_weight: Optional[Tensor],
                                 centers: Tensor, csr, row_weight: Tensor, tau_s: float, tau_t: float):
    """Same contract as udi_kernels.linear_distill_cross_entropy, on the pairs' PairCSR (build_csr) (arguments
    already checked): (loss, center_sum, center_count)."""
    dtype = compute_dtype(student.dtype)
    t_dtype = compute_dtype(teacher.dtype)
    Rs, Rt, (n_c, K) = student.shape[0], teacher.shape[0], centers.shape
    pairs = _Pairs(csr, Rs, Rt, n_c, dtype)
    valid_row = (csr.center_id >= 0) & (csr.center_id < n_c)
    center_of_row = torch.where(valid_row, csr.center_id, 0)
    centers = centers.detach().to(t_dtype)

    teacher_chunks = _teacher_chunks(teacher, teacher_weight, t_dtype, K)
    centered = [_centered(chunk, centers[:, k:k + CHUNK], center_of_row, valid_row, tau_t)
                for chunk, k in zip(teacher_chunks, range(0, K, CHUNK))]
    teacher_lse = torch.logsumexp(torch.stack([torch.logsumexp(u, -1) for u in centered], -1), -1)
    teacher_probs = [torch.exp(u - teacher_lse[:, None]).to(dtype) for u in centered]

    # a row without a counting pair is left out of the loss and, zeroed, out of weight's gradient
    rows = torch.where(pairs.row_active[:, None], student.to(dtype), 0)
    weight_chunks = torch.split(weight.to(dtype), CHUNK)

    def chunk_lse(rows, weight_chunk):
        return torch.logsumexp(rows @ weight_chunk.T / tau_s, -1)

    def chunk_cross_entropy(rows, weight_chunk, probs, lse):
        return (pairs.targets(probs) * (lse[:, None] - rows @ weight_chunk.T / tau_s)).sum(-1)

    lse = torch.logsumexp(torch.stack([_recomputed(chunk_lse, rows, w) for w in weight_chunks], -1), -1)
    saved_lse = lse.detach()
    cross_entropy = sum(_recomputed(chunk_cross_entropy, rows, w, p, saved_lse)
                        for w, p in zip(weight_chunks, teacher_probs))
    # cross_entropy holds Σ_k T_rk · lse_s(r) with lse_s detached; its gradient Σ_p w_p · softmax comes from here
    per_row = cross_entropy + pairs.row_weight * (lse - saved_lse)
    loss = torch.where(pairs.row_active, per_row, 0).sum()
    center_sum, center_count = center_statistics(teacher, csr.center_id, row_weight, n_c)
    if teacher_weight is not None:
        center_sum = center_sum @ teacher_weight.detach().to(t_dtype).T
    return loss, center_sum, center_count
