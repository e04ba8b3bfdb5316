"""DINO's [CLS] loss (DINO's main_dino.py DINOLoss) on the fused udi_kernels.distill_cross_entropy, or with the head's
last layer fused in (linear_distill_cross_entropy)."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_int, check_temperature, check_tensor
from ..layout import GLOBAL_CROPS, dino_crop_pairs
from .centering import EMACenter, EMACentered, expose_center_key, sinkhorn_knopp_center
from .checks import check_backend, check_choice, check_last_layer, check_rows, check_state_device, detached
from .diagnostics import teacher_entropies
from .pair_tables import PairTable, crop_mean_table, cross_entropy
from .schedule import check_schedule, teacher_temperature


class DINOLoss(EMACentered, nn.Module):
    """DINO's [CLS] loss: teacher global view iq against every student view v ≠ iq, averaged over all terms.

    forward(student_output [ncrops·B, K], teacher_output [2·B, K], epoch, *, weight=None, teacher_weight=None) -> loss;
    rows are crop-major (crop 0 rows first), the 2 global crops first. With the head's last layer fused in (UDI_SPEC
    §10): weight [K, D], the student head's effective last-layer weight (after weight norm), and student_output
    [ncrops·B, D] its input rows (the L2-normalised bottleneck), so the logits are student_output @ weight.T, never
    formed; gradients reach student_output and weight. teacher_weight [K, D] likewise makes teacher_output [2·B, D] the
    teacher's bottleneck rows (it needs weight; None: teacher logits). Sinkhorn-Knopp centering forms the teacher's
    [2·B, K] logits. The center (buffer `center` [1, K], state-dict key `center` as in DINO's main_dino.py, so a DINO
    checkpoint's `dino_loss` entry loads strictly; an EMACenter, `centering_ema`) is updated after the loss from the
    exact global mean of the teacher rows, or, inside udi_kernels.losses.defer_center_updates (gradient accumulation),
    once at the context's end from the rows of all its calls. centering='sinkhorn_knopp' uses DINOv2's
    Sinkhorn-Knopp targets instead (and leaves `center` alone).
    The teacher is detached (no gradient reaches teacher_output or teacher_weight). float64 logits (with the loss
    moved to float64, `.double()`) give float64-accurate losses, gradients and centers (EMA and Sinkhorn-Knopp).
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
        self.student_temp = check_temperature(student_temp, "student_temp")
        self.schedule = check_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
        self.centering, self.backend = centering, backend
        self.sinkhorn_iterations = check_int(sinkhorn_iterations, "sinkhorn_iterations", 1)
        self.centering_ema = EMACenter(out_dim, center_momentum, "center_momentum")
        expose_center_key(self, "centering_ema")

    def teacher_temp(self, epoch: int) -> float:
        return teacher_temperature(epoch, *self.schedule)

    def pairs(self, batch: int, device) -> PairTable:
        return crop_mean_table(dino_crop_pairs(self.ncrops), batch, self.ncrops, GLOBAL_CROPS,
                               torch.device(device))

    def forward(self, student_output: Tensor, teacher_output: Tensor, epoch: int, *, weight: Optional[Tensor] = None,
                teacher_weight: Optional[Tensor] = None) -> Tensor:
        check_tensor(teacher_output, "teacher_output")
        teacher_width = check_last_layer(teacher_weight, "teacher_weight", self.out_dim, teacher_output.device)
        if teacher_output.dim() != 2:
            raise ValueError(f"teacher_output must be 2-D [2 * batch, {teacher_width}] (the global crops' rows), got "
                             f"shape {list(teacher_output.shape)}")
        batch = teacher_output.shape[0] // 2
        check_rows(teacher_output, "teacher_output", 2 * batch, teacher_width)
        student_width = check_last_layer(weight, "weight", self.out_dim, teacher_output.device)
        check_rows(student_output, "student_output", self.ncrops * batch, student_width, teacher_output.device)
        check_state_device(self, student_output.device)
        teacher_output, teacher_weight = detached(teacher_output), detached(teacher_weight)
        tau_t = self.teacher_temp(epoch)
        if self.centering == "ema":
            center = self.center
        else:
            if teacher_weight is not None:
                teacher_output, teacher_weight = F.linear(teacher_output, teacher_weight), None
            center = sinkhorn_knopp_center(teacher_output, tau_t, self.sinkhorn_iterations)
        out = cross_entropy(student_output, teacher_output, center, self.pairs(batch, student_output.device),
                            self.student_temp, tau_t, weight=weight, teacher_weight=teacher_weight,
                            backend=self.backend)
        if self.centering == "ema":
            self.centering_ema.update(out.center_sum, out.center_count)
        return out.loss

    def teacher_entropies(self, teacher_output: Tensor, epoch: int, *, teacher_weight: Optional[Tensor] = None):
        """The collapse diagnostics (udi_kernels.losses.teacher_entropies) of teacher_output (as in forward) against
        the EMA center at epoch's temperature; call it before forward, which moves the center."""
        return teacher_entropies(teacher_output, self.center, self.teacher_temp(epoch), teacher_weight)
