"""The reference's UDILoss interface on top of udi_kernels.losses.UDILoss (same numbers, fused op inside).

The reference code was not available when this was written; the nested structure below is our reading of
UDI_SPEC §5 and the SRS pair order of udi_kernels.stratified_sample (locals: l→g1 first, then l→g0):

  student_output = [cls, cls_plus, patch]
      cls, cls_plus  [(2 + L)·B, K]   crop-major, the two global crops first
      patch          [patch_0, patch_1], patch_v [B, Sg, K]: student global v's samples (pair v → 1−v)
  teacher_output = [cls, patch, patch_mask, local, local_mask]
      cls            [2·B, K]
      patch          [patch_0, patch_1], patch_v [B, Sg, K]: teacher logits (crop 1−v) at those samples
      patch_mask     [mask_0, mask_1], mask_v [B, Sg] bool
      local          L lists [to_g1, to_g0], each [B, Sl, K]: teacher logits at local crop l's samples
      local_mask     the same nesting of [B, Sl] bool

forward(student_output, teacher_output, epoch) -> (loss, parts) with parts {'cls', 'cls_plus', 'patch'}.
`centering.center` is a [3, K] buffer holding the cls, cls+ and patch centers, in that order.
"""
import torch
from torch import nn

from .. import losses


class _Centering(nn.Module):
    def __init__(self, out_dim: int):
        super().__init__()
        self.register_buffer("center", torch.zeros(3, out_dim))


class UDILoss(nn.Module):
    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, alpha: float = 0.5, backend=None):
        super().__init__()
        self.loss = losses.UDILoss(out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
                                   nepochs, student_temp, center_momentum, alpha, backend=backend)
        self.centering = _Centering(out_dim)

    def _centers(self):
        return (self.loss.center_cls, self.loss.center_cls_plus, self.loss.center_patch)

    def forward(self, student_output, teacher_output, epoch: int):
        for row, ema in enumerate(self._centers()):
            ema.center = self.centering.center[row:row + 1].clone()
        cls, cls_plus, patch = student_output
        t_cls, t_patch, t_patch_mask, local, local_mask = teacher_output
        student = losses.UDIStudent(cls, cls_plus, torch.cat(list(patch)))
        teacher = losses.UDITeacher(t_cls, torch.cat(list(t_patch)), torch.cat(list(t_patch_mask)),
                                    *_local_rows(local, local_mask))
        loss, parts = self.loss(student, teacher, epoch)
        with torch.no_grad():
            self.centering.center.copy_(torch.cat([ema.center for ema in self._centers()]))
        return loss, parts


def _local_rows(local, local_mask):
    """L lists [to_g1, to_g0] -> UDITeacher's rows (2l + g)·B + b, i.e. teacher global g in index order."""
    if not local:
        return None, None
    rows = torch.cat([pair[g] for pair in local for g in (1, 0)])
    masks = torch.cat([pair[g] for pair in local_mask for g in (1, 0)])
    return rows, masks
