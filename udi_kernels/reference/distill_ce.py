"""Distillation cross-entropy (UDI_SPEC §5) in eager PyTorch: the semantics every kernel is tested against.

loss = Σ_p w_p · CE(softmax((t[pt_p] - c[id[pt_p]]) / τt), log_softmax(s[ps_p] / τs)), the teacher detached;
center_sum[c] = Σ_{r: id[r] = c} row_weight[r] · t[r],  center_count[c] = Σ_{r: id[r] = c} row_weight[r].
"""
import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed (and returned) in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def centered_teacher_probs(teacher: Tensor, centers: Tensor, center_id: Tensor, tau_t: float) -> Tensor:
    """softmax((t - c[id]) / τt) per teacher row, [Rt, K]; softmax subtracts the row max."""
    dtype = compute_dtype(teacher.dtype)
    centered = teacher.detach().to(dtype) - centers.to(dtype)[center_id.long()]
    return torch.softmax(centered / tau_t, dim=-1)


def center_statistics(teacher: Tensor, center_id: Tensor, row_weight: Tensor, num_centers: int):
    """(center_sum [n_c, K], center_count [n_c]): weighted sums of the raw teacher rows per center."""
    dtype = compute_dtype(teacher.dtype)
    weight = row_weight.to(dtype)
    ids = center_id.long()
    center_sum = teacher.new_zeros(num_centers, teacher.shape[-1], dtype=dtype)
    center_sum.index_add_(0, ids, teacher.detach().to(dtype) * weight[:, None])
    center_count = weight.new_zeros(num_centers).index_add_(0, ids, weight)
    return center_sum, center_count


def distill_cross_entropy(student: Tensor, teacher: Tensor, centers: Tensor, center_id: Tensor, pair_student: Tensor,
                          pair_teacher: Tensor, pair_weight: Tensor, row_weight: Tensor, tau_s: float, tau_t: float):
    """Same contract as udi_kernels.distill_cross_entropy (arguments already checked).

    Gradients flow to `student` through autograd; the teacher is detached. Pairs with weight 0
    contribute exactly 0 (even when their rows would give a non-finite CE).
    """
    dtype = compute_dtype(student.dtype)
    log_q = torch.log_softmax(student.to(dtype) / tau_s, dim=-1)
    p_t = centered_teacher_probs(teacher, centers, center_id, tau_t).to(dtype)
    ce = -(p_t[pair_teacher.long()] * log_q[pair_student.long()]).sum(-1)
    weight = pair_weight.to(dtype)
    loss = torch.where(weight != 0, weight * ce, torch.zeros_like(ce)).sum()
    center_sum, center_count = center_statistics(teacher, center_id, row_weight, centers.shape[0])
    return loss, center_sum, center_count
