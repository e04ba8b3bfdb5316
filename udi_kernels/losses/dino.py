"""DINO's [CLS] loss (DINO's main_dino.py DINOLoss) on the fused udi_kernels.distill_cross_entropy."""
from typing import Optional

import torch
from torch import Tensor, nn

from ..checks import check_float, check_int
from ..layout import GLOBAL_CROPS, dino_crop_pairs
from .centering import sinkhorn_knopp_center, update_centers
from .checks import check_backend, check_choice, check_rows, check_state_device
from .pair_tables import PairTable, crop_mean_table, cross_entropy
from .schedule import check_schedule, teacher_temperature


class DINOLoss(nn.Module):
    """DINO's [CLS] loss: teacher global view iq against every student view v ≠ iq, averaged over all terms.

    forward(student_output [ncrops·B, K], teacher_output [2·B, K], epoch) -> loss; rows are crop-major
    (crop 0 rows first), the 2 global crops first. The center (buffer `center` [1, K], state-dict key `center`
    as in DINO's main_dino.py, so a DINO checkpoint's `dino_loss` entry loads strictly) is updated after the
    loss from the exact global mean of the teacher rows. centering='sinkhorn_knopp' uses DINOv2's
    Sinkhorn-Knopp targets instead (and leaves `center` alone).
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, centering: str = "ema", sinkhorn_iterations: int = 3,
                 backend: Optional[str] = None):
        super().__init__()
        check_int(ncrops, "ncrops (two global crops, then the local ones)", 2)
        check_choice(centering, "centering", ("ema", "sinkhorn_knopp"))
        check_backend(backend)
        self.out_dim, self.ncrops = check_int(out_dim, "out_dim", 1), ncrops
        self.student_temp = check_float(student_temp, "student_temp", 0.0, low_open=True)
        self.schedule = check_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
        self.centering, self.backend = centering, backend
        self.sinkhorn_iterations = check_int(sinkhorn_iterations, "sinkhorn_iterations", 1)
        self.center_momentum = check_float(center_momentum, "center_momentum", 0.0, 1.0)
        self.register_buffer("center", torch.zeros(1, out_dim))

    @property
    def momentum(self) -> float:
        """The EMA momentum under the name update_centers reads."""
        return self.center_momentum

    def teacher_temp(self, epoch: int) -> float:
        return teacher_temperature(epoch, *self.schedule)

    def pairs(self, batch: int, device) -> PairTable:
        return crop_mean_table(dino_crop_pairs(self.ncrops), batch, self.ncrops, GLOBAL_CROPS,
                               torch.device(device))

    def forward(self, student_output: Tensor, teacher_output: Tensor, epoch: int) -> Tensor:
        if not isinstance(teacher_output, Tensor):
            raise TypeError(f"teacher_output must be a torch.Tensor, got {type(teacher_output).__name__}")
        if teacher_output.dim() != 2:
            raise ValueError(f"teacher_output must be 2-D [2 * batch, {self.out_dim}] (the global crops' rows), got "
                             f"shape {list(teacher_output.shape)}")
        batch = teacher_output.shape[0] // 2
        check_rows(teacher_output, "teacher_output", 2 * batch, self.out_dim)
        check_rows(student_output, "student_output", self.ncrops * batch, self.out_dim, teacher_output.device)
        check_state_device(self, student_output.device)
        tau_t = self.teacher_temp(epoch)
        center = self.center if self.centering == "ema" else sinkhorn_knopp_center(teacher_output, tau_t,
                                                                                  self.sinkhorn_iterations)
        out = cross_entropy(student_output, teacher_output, center, self.pairs(batch, student_output.device),
                            self.student_temp, tau_t, backend=self.backend)
        if self.centering == "ema":
            update_centers([self], [out.center_sum], [out.center_count])
        return out.loss
