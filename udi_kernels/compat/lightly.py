"""lightly's DINOLoss (lightly-ai/lightly, `lightly/loss/dino_loss.py`), one-line swap, on the fused op."""
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..layout import dino_crop_pairs
from ..losses import EMACenter, crop_mean_table, cross_entropy
from ..losses.centering import EMACentered, expose_center_key
from ..checks import check_int, check_tensor
from ..losses.checks import check_backend, check_device, check_state_device
from ._fused import as_temperature, check_common_arguments


class DINOLoss(EMACentered, nn.Module):
    """`lightly.loss.DINOLoss` with the same constructor, forward, state and numbers (UDI_SPEC §5's L_cls).

    DINOLoss(output_dim=65536, warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=30,
             student_temp=0.1, center_momentum=0.9, center_mode='mean', *, center_mean='global', backend=None)
      center_mode: 'mean' only (as lightly; ValueError otherwise).
      center_mean: 'global' (default) the exact mean of the teacher rows over all ranks; 'per_rank' each rank's
          mean averaged over the ranks, as lightly does. The same when every rank has as many rows.
    State: buffer `center` [1, 1, output_dim] (lightly's state-dict key and shape; an EMACenter, `centering_ema`,
    which udi_kernels.losses.defer_center_updates defers for gradient accumulation); `teacher_temp_schedule`
    (float32 linspace over the warm-up epochs, not in the state dict).

    forward(teacher_out: list of T [B, K] views, student_out: list of S [B, K] views, teacher_temp=None,
            epoch=None) -> loss []
      loss = mean over the pairs (teacher view t, student view s), s ≠ t, of the batch-mean
      CE(softmax((teacher_t − center) / τt), log_softmax(student_s / τs)); view i of both lists is the same
      crop (lightly's diagonal). τt: teacher_temp if given, else the schedule at epoch (teacher_temp once it is
      past the warm-up), else teacher_temp. lightly's positional order: the third argument is teacher_temp, so
      pass the epoch as epoch=epoch (lightly before 1.5.21 took the epoch third). The center is then updated
      from the mean teacher row. The teacher is detached, as in lightly (no gradient reaches teacher_out).
    Checks (before anything runs, naming the argument): TypeError for a view that is not a floating tensor, or
    teacher_temp / epoch / a constructor number of the wrong type, or a temperature tensor that requires grad (no
    gradient would reach it); ValueError without a cross-view pair, when views differ in shape or device (or from
    the center's), for a temperature that is not finite and >= 2**-126, a momentum outside [0, 1], a negative epoch
    or warm-up, output_dim < 1.
    Difference: B = 0 gives 0 and leaves the center alone (lightly: NaN).
    """

    def __init__(self, output_dim: int = 65536, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 30, student_temp: float = 0.1, center_momentum: float = 0.9,
                 center_mode: str = "mean", *, center_mean: str = "global", backend: Optional[str] = None):
        super().__init__()
        if center_mode != "mean":
            raise ValueError(f"Unknown mode '{center_mode}'. Valid modes are ['mean'].")
        check_int(output_dim, "output_dim", 1)
        warmup_teacher_temp = as_temperature(warmup_teacher_temp, "warmup_teacher_temp")
        teacher_temp = as_temperature(teacher_temp, "teacher_temp")
        check_int(warmup_teacher_temp_epochs, "warmup_teacher_temp_epochs", 0)
        check_common_arguments(student_temp, center_momentum, center_mean)
        check_backend(backend)
        self.teacher_temp, self.student_temp = teacher_temp, student_temp
        self.centering_ema = EMACenter(output_dim, center_momentum, "center_momentum", shape=(1, 1, output_dim),
                                       mean=center_mean)
        expose_center_key(self, "centering_ema")
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.teacher_temp_schedule = torch.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
        self.backend = backend

    @property
    def center_mean(self) -> str:
        return self.centering_ema.mean

    def teacher_temperature(self, teacher_temp: Optional[float] = None, epoch: Optional[int] = None) -> float:
        """τt as lightly picks it, rounded to float32 as lightly's temperature tensors are."""
        if teacher_temp is not None:
            teacher_temp = as_temperature(teacher_temp, "teacher_temp")
        if epoch is not None:
            check_int(epoch, "epoch", 0)
        if teacher_temp is None and epoch is not None and epoch < self.warmup_teacher_temp_epochs:
            return float(self.teacher_temp_schedule[epoch])
        return float(np.float32(self.teacher_temp if teacher_temp is None else teacher_temp))

    def forward(self, teacher_out: Sequence[Tensor], student_out: Sequence[Tensor],
                teacher_temp: Optional[float] = None, epoch: Optional[int] = None) -> Tensor:
        for views, name in ((teacher_out, "teacher_out"), (student_out, "student_out")):
            if isinstance(views, Tensor) or not isinstance(views, Sequence):
                raise TypeError(f"{name} must be a list of [B, K] view tensors, got {type(views).__name__}")
        pairs = dino_crop_pairs(len(student_out), len(teacher_out))
        if not pairs:
            raise ValueError(f"DINOLoss needs at least one pair of different views (view i of both lists is the "
                             f"same crop), got {len(teacher_out)} teacher and {len(student_out)} student view(s)")
        teacher, student = _stack_views(teacher_out, "teacher_out"), _stack_views(student_out, "student_out")
        batch, K = teacher_out[0].shape
        if student_out[0].shape != (batch, K) or K != self.center.shape[-1]:
            raise ValueError(f"every view must have shape [B, {self.center.shape[-1]}] with one B, got teacher "
                             f"{list(teacher_out[0].shape)} and student {list(student_out[0].shape)}")
        check_device(student, "student_out", teacher.device)
        check_state_device(self, teacher.device)
        table = crop_mean_table(pairs, batch, len(student_out), len(teacher_out), student.device)
        out = cross_entropy(student, teacher, self.center.view(1, K), table, self.student_temp,
                            self.teacher_temperature(teacher_temp, epoch), backend=self.backend)
        self.centering_ema.update(out.center_sum, out.center_count)
        return out.loss

    @torch.no_grad()
    def update_center(self, teacher_out: Tensor) -> None:
        """lightly's update_center: EMA step of the center from teacher_out [views, B, K]."""
        check_tensor(teacher_out, "teacher_out", device=self.center.device)
        if teacher_out.dim() == 0 or teacher_out.shape[-1] != self.center.shape[-1]:
            raise ValueError(f"teacher_out must have shape [..., {self.center.shape[-1]}], got "
                             f"{list(teacher_out.shape)}")
        rows = teacher_out.reshape(-1, teacher_out.shape[-1]).to(torch.promote_types(self.center.dtype, torch.float32))
        self.centering_ema.update(rows.sum(0, keepdim=True), rows.new_full((1, 1), rows.shape[0]))


def _stack_views(views: Sequence[Tensor], name: str) -> Tensor:
    """The views as crop-major rows [views·B, K]: floating tensors of one shape on one device."""
    for i, view in enumerate(views):
        check_tensor(view, f"{name}[{i}]", device=views[0].device if isinstance(views[0], Tensor) else None)
    if any(v.dim() != 2 or v.shape != views[0].shape for v in views):
        raise ValueError(f"{name} must be a list of [B, K] tensors of one shape, got "
                         f"{[list(v.shape) for v in views]}")
    return torch.cat(list(views))
