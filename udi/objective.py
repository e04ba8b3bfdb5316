"""The UDI objective (UDI_SPEC §5) on a StudentOutput and bottleneck-formed TeacherTargets.

SEAM: the per-row cross-entropy comes from `udi.seams.distill_cross_entropy` (the eager stand-in until the fused
`udi_kernels.losses.UDILoss` lands on main; then this module's body becomes a call to it).

Departure from the reference, on purpose: the patch loss divides by the number of valid samples over all ranks
(times the world size, since DDP averages gradients), so a run does not depend on how the batch is split;
on one rank it is the reference's number. Centers use the exact global mean (all-reduced sum and count) and a
zero count leaves a center unchanged.
"""
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .model import StudentOutput, TeacherTargets
from .seams import distill_cross_entropy

CENTERS = ("cls", "cls_plus", "patch")


def teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, epochs):
    return np.concatenate([np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                           np.full(max(epochs - warmup_teacher_temp_epochs, 0), teacher_temp)])


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: Tensor) -> Tensor:
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


class UDIObjective(nn.Module):
    def __init__(self, out_dim, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, epochs,
                 student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.teacher_temps = teacher_temp_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                                                   epochs)
        self.register_buffer("center", torch.zeros(len(CENTERS), out_dim))

    def _ce(self, student, teacher, center_name, teacher_temp):
        return distill_cross_entropy(student, teacher, self.center[CENTERS.index(center_name)], self.student_temp,
                                     teacher_temp)

    def _level(self, student_rows: Tensor, global_targets: Tensor, local_targets: Tensor, name, tau) -> Tensor:
        """(2 L_global + 2L L_local) / (2 + 2L), i.e. the mean CE over all 2B + 2LB (student, target) pairs.

        student_rows [2 + L, B, K], global_targets [2, B, K], local_targets [2, L, B, K].
        """
        terms = [self._ce(student_rows[:2], global_targets, name, tau).sum()]
        for p in range(2):
            terms.append(self._ce(student_rows[2:], local_targets[p], name, tau).sum())
        return sum(terms) / (global_targets.shape[1] * (2 + 2 * local_targets.shape[1]))

    def forward(self, student: StudentOutput, teacher: TeacherTargets, epoch: int):
        """-> (total loss, {"cls", "cls_plus", "patch"} detached parts)."""
        tau = float(self.teacher_temps[min(epoch, len(self.teacher_temps) - 1)])
        cls_locals = teacher.cls[:, None].expand(-1, student.cls.shape[0] - 2, -1, -1)
        parts = {
            "cls": self._level(student.cls, teacher.cls, cls_locals, "cls", tau),
            "cls_plus": self._level(student.cls_plus, teacher.cls_plus_global, teacher.cls_plus_local,
                                    "cls_plus", tau),
        }
        mask = teacher.patch_mask
        patch_ce = self._ce(student.patch, teacher.patch, "patch", tau)
        valid = all_reduce_sum(mask.sum().float()) / world_size()
        parts["patch"] = torch.where(mask, patch_ce, 0).sum() / valid.clamp_min(1)
        total = sum(parts.values()) / 3
        return total, {k: v.detach() for k, v in parts.items()}

    @torch.no_grad()
    def update_center(self, teacher: TeacherTargets):
        """c <- m c + (1 - m) * exact global mean of the raw teacher rows; unchanged where the count is 0."""
        def rows_sum(*tensors):
            return sum(t.flatten(0, -2).float().sum(0) for t in tensors), sum(t[..., 0].numel() for t in tensors)

        sums = [rows_sum(teacher.cls), rows_sum(teacher.cls_plus_global, teacher.cls_plus_local)]
        sums.append((teacher.patch_center_sum.float(), teacher.patch_center_count))
        total = torch.stack([s for s, _ in sums])
        counts = torch.stack([torch.as_tensor(c, dtype=torch.float32, device=total.device) for _, c in sums])
        total, counts = all_reduce_sum(total), all_reduce_sum(counts)
        mean = total / counts.clamp_min(1)[:, None]
        updated = self.center * self.center_momentum + mean * (1 - self.center_momentum)
        self.center.copy_(torch.where(counts[:, None] > 0, updated, self.center))
