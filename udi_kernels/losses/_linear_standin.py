"""TEMPORARY stand-in for udi_kernels.ops.linear_distill_cross_entropy.linear_distill_cross_entropy_csr (issue 19,
branch ldce-op), same signature and semantics, composed from the matmuls and distill_cross_entropy_csr: it forms
the [R, K] logits. Deleted when the real op is merged."""
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from ..ops.distill_cross_entropy import DistillCrossEntropyResult, PairCSR, distill_cross_entropy_csr


def linear_distill_cross_entropy_csr(student: Tensor, weight: Tensor, teacher: Tensor,
                                     teacher_weight: Optional[Tensor], centers: Tensor, csr: PairCSR,
                                     row_weight: Tensor, tau_s: float, tau_t: float, *,
                                     backend: Optional[str] = None) -> DistillCrossEntropyResult:
    teacher = teacher.detach()
    if teacher_weight is not None:
        teacher = F.linear(teacher, teacher_weight.detach())
    return distill_cross_entropy_csr(F.linear(student, weight), teacher, centers, csr, row_weight, tau_s, tau_t,
                                     backend=backend)
