"""TEMPORARY stand-in for udi_kernels.linear_distill_cross_entropy (issue 19, branch ldce-op), same signature and
semantics, composed from the matmuls and distill_cross_entropy: it forms the [R, K] logits. Deleted when the real
op is merged."""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from ..ops.distill_cross_entropy import DistillCrossEntropyResult, distill_cross_entropy


def linear_distill_cross_entropy(student: Tensor, weight: Tensor, teacher: Tensor, teacher_weight: Optional[Tensor],
                                 centers: Tensor, center_id: Tensor, pair_student: Tensor, pair_teacher: Tensor,
                                 pair_weight: Tensor, row_weight: Tensor, tau_s: float, tau_t: float, *,
                                 backend: Optional[str] = None, check_values: bool = True) -> DistillCrossEntropyResult:
    teacher = teacher.detach()
    if teacher_weight is not None:
        teacher = F.linear(teacher, teacher_weight.detach())
    return distill_cross_entropy(F.linear(student, weight), teacher, centers, center_id, pair_student, pair_teacher,
                                 pair_weight, row_weight, tau_s, tau_t, backend=backend, check_values=check_values)
