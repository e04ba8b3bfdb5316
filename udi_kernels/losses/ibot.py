"""iBOT's masked-patch loss on the fused udi_kernels.distill_cross_entropy, or with the head's last layer fused in
(linear_distill_cross_entropy)."""
from typing import Optional

import torch
from torch import Tensor, nn

from ..checks import check_int, check_temperature, check_tensor
from .centering import EMACenter
from .checks import check_backend, check_last_layer, check_logits, check_mask, check_state_device, detached
from .pair_tables import cross_entropy, identity_table
from .schedule import check_schedule, teacher_temperature


class IBOTPatchLoss(nn.Module):
    """iBOT's masked-patch loss: per image, Σ_masked CE / max(#masked, 1), averaged over the images.

    forward(student_patch [R, N, K], teacher_patch [R, N, K], mask [R, N] bool, epoch, *, weight=None,
    teacher_weight=None) -> loss, with R the images (all views stacked); student patch n of image r is scored against
    teacher patch n of image r where mask is set. Own center (`center` [1, K], the global mean over all teacher patches)
    and temperature; inside udi_kernels.losses.defer_center_updates the center moves once, at the context's end, from
    the patches of all its calls. With the head's last layer fused in (keywords, UDI_SPEC §10): weight [K, D], the
    student head's effective last-layer weight (after weight norm), and student_patch [R, N, D] its input rows (the
    bottleneck), so the logits student_patch @ weight.T are never formed; gradients reach student_patch and weight.
    teacher_weight [K, D] likewise makes teacher_patch [R, N, D] the teacher's bottleneck rows (it needs weight). The
    teacher is detached (no gradient reaches teacher_patch or teacher_weight); float64 logits give float64-accurate
    results.
    """

    def __init__(self, patch_out_dim: int, warmup_teacher_temp2: float, teacher_temp2: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum2: float = 0.9, backend: Optional[str] = None):
        super().__init__()
        check_backend(backend)
        self.out_dim, self.backend = check_int(patch_out_dim, "patch_out_dim", 1), backend
        self.student_temp = check_temperature(student_temp, "student_temp")
        self.schedule = check_schedule(warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs, nepochs, "2")
        self.centering_ema = EMACenter(patch_out_dim, center_momentum2, "center_momentum2")

    @property
    def center(self) -> Tensor:
        return self.centering_ema.center

    def forward(self, student_patch: Tensor, teacher_patch: Tensor, mask: Tensor, epoch: int, *,
                weight: Optional[Tensor] = None, teacher_weight: Optional[Tensor] = None) -> Tensor:
        check_tensor(student_patch, "student_patch")
        check_tensor(teacher_patch, "teacher_patch")
        device = student_patch.device
        widths = (check_last_layer(weight, "weight", self.out_dim, device),
                  check_last_layer(teacher_weight, "teacher_weight", self.out_dim, device))
        if student_patch.dim() != 3 or teacher_patch.dim() != 3 or student_patch.shape[:2] != teacher_patch.shape[:2] \
                or (student_patch.shape[-1], teacher_patch.shape[-1]) != widths:
            raise ValueError(f"student_patch and teacher_patch must have shapes [R, N, {widths[0]}] and "
                             f"[R, N, {widths[1]}], got {list(student_patch.shape)} and {list(teacher_patch.shape)}")
        check_mask(mask, "mask", student_patch.shape[:2], device)
        check_logits(student_patch, "student_patch")
        check_logits(teacher_patch, "teacher_patch", device)
        check_state_device(self, device)
        teacher_patch, teacher_weight = detached(teacher_patch), detached(teacher_weight)
        images, tokens = mask.shape
        rows = images * tokens
        weights = mask.to(torch.promote_types(student_patch.dtype, torch.float32))  # float64 logits: float64 weights
        pair_weight = weights / weights.sum(1, keepdim=True).clamp_min(1) / max(images, 1)
        out = cross_entropy(student_patch.reshape(rows, widths[0]), teacher_patch.reshape(rows, widths[1]),
                            self.center, identity_table(pair_weight.reshape(-1)), self.student_temp,
                            teacher_temperature(epoch, *self.schedule), weight=weight, teacher_weight=teacher_weight,
                            backend=self.backend)
        self.centering_ema.update(out.center_sum, out.center_count)
        return out.loss
