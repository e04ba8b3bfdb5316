"""Collapse diagnostics of the teacher's targets softmax((t − c)/τt), formed K-chunk by K-chunk from logits or from
bottleneck rows and the head's last layer: no [R, K] tensor exists, only [R, chunk_size] ones."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dtypes import compute_dtype

CHUNK_SIZE = 4096  # columns of K per chunk


@torch.no_grad()
def teacher_entropies(teacher: Tensor, center: Tensor, tau_t: float, teacher_weight: Optional[Tensor] = None, *,
                      chunk_size: int = CHUNK_SIZE) -> dict:
    """The teacher's collapse diagnostics, in nats: `teacher_entropy`, the mean entropy of a row of
    softmax((t − c)/τt), and `teacher_batch_entropy`, the entropy of the batch-mean distribution. Both near ln K:
    collapse to uniform; both near 0: collapse to one dimension; healthy: the first well below the second.

    teacher: logits [R, K], or the last layer's input rows [R, D] with teacher_weight its weight [K, D] (t = rows
    @ teacher_weight.T, formed chunk by chunk); center [1, K]; returns two scalars, float32 (float64 for float64
    rows), NaN for R = 0. Two passes over the chunks, in that dtype without autocast: the rows' logsumexp lse,
    then per row entropy = lse − Σ_k p_k u_k (u = (t − c)/τt) and the chunks of the batch-mean p̄."""
    K, dtype = center.shape[-1], compute_dtype(teacher.dtype)
    rows, center = teacher.to(dtype), center.to(dtype)

    def scaled_logits():
        for start in range(0, K, chunk_size):
            stop = min(start + chunk_size, K)
            if teacher_weight is None:
                logits = rows[:, start:stop]
            else:
                logits = F.linear(rows, teacher_weight[start:stop].to(dtype))
            yield (logits - center[:, start:stop]) / tau_t

    with torch.autocast(teacher.device.type, enabled=False):
        lse = rows.new_full((rows.shape[0],), -torch.inf)
        for u in scaled_logits():
            lse = torch.logaddexp(lse, torch.logsumexp(u, dim=1))
        expected_u, batch_entropy = torch.zeros_like(lse), lse.new_zeros(())
        for u in scaled_logits():
            p = torch.exp(u - lse[:, None])
            expected_u += (p * u).sum(1)
            mean = p.mean(0)
            batch_entropy -= (mean * mean.clamp_min(torch.finfo(mean.dtype).tiny).log()).sum()
    return {"teacher_entropy": (lse - expected_u).mean(), "teacher_batch_entropy": batch_entropy}
