"""UDI's loss (UDI_SPEC §5) and its teacher targets, on the fused udi_kernels.distill_cross_entropy, or with the head's
last layer fused in (linear_distill_cross_entropy, UDI_SPEC §10).

The inputs and their row layouts are udi_kernels.layout's (UDIStudent, UDITeacher, UDITargets; crop pairs k of
udi_crop_pairs). The teacher targets are formed here, once, for both ways of forming them: from the teacher's
logits (UDILoss on a UDITeacher) and from its bottleneck vectors (udi.model, UDI_SPEC §6): cls_plus_targets.
"""
import functools
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_float, check_int, check_temperature, check_tensor
from ..layout import (GLOBAL_CROPS, UDIStudent, UDITargets, UDITeacher, teacher_rows_by_local_pair, teacher_rows_by_pair,
                      udi_crop_pairs)
from .centering import EMACenter, update_centers
from .checks import (check_backend, check_choice, check_device, check_last_layer, check_logits, check_mask,
                     check_rows, check_state_device, detached)
from .diagnostics import teacher_entropies
from .pair_tables import PairTable, crop_pair_table, cross_entropy, identity_table, mean_weight
from .schedule import check_schedule, teacher_temperature


# ---- teacher targets ---------------------------------------------------------------------------------------------

def masked_sum(rows: Tensor, mask: Tensor) -> Tensor:
    """Σ_s m_s x_s: rows [R, S, D], mask [R, S] (bool or weights) -> [R, D] in the dtype of rows. Samples of mask 0
    are left out exactly, whatever they hold (NaN, inf): selected away, not multiplied by 0."""
    kept = torch.where(mask[..., None] != 0, rows, 0)
    return torch.bmm(mask.to(rows.dtype)[:, None], kept).squeeze(1)


def masked_mean(rows: Tensor, mask: Tensor, eps: float = 1e-5) -> Tensor:
    """masked_sum / (Σ_s m_s + eps): rows [R, S, D], mask [R, S] -> [R, D] float32 (float64 for float64 rows)."""
    dtype = torch.promote_types(rows.dtype, torch.float32)
    return masked_sum(rows, mask).to(dtype) / (mask.sum(1, keepdim=True).to(dtype) + eps)


def blend_into(out: Tensor, samples: Tensor, mask: Tensor, base: Tensor, alpha: float) -> Tensor:
    """out [n, R, D] = alpha * masked mean of samples [n*R, S, D] (mask [n*R, S], eps 1e-5) + base [R, D] (already
    scaled by 1 - alpha), without [n, R, D] temporaries; returns the masked sums [n*R, D] (dtype of samples)."""
    totals = masked_sum(samples, mask)
    scale = alpha / (mask.sum(1, dtype=torch.promote_types(out.dtype, torch.float32)) + 1e-5)
    torch.addcmul(base, totals.view(out.shape), scale.view(*out.shape[:2], 1), out=out)  # math in scale's dtype
    return totals


@torch.no_grad()
def blend_cls_plus(cls: Tensor, global_samples: Tensor, global_mask: Tensor, local_samples: Optional[Tensor],
                   local_mask: Optional[Tensor], alpha: float, *, cls_by_pair: bool = False):
    """UDI's cls+ targets T+ = alpha * masked mean of the samples + (1 - alpha) * T_cls, with eps 1e-5 (UDI_SPEC §5),
    for every crop pair, and the sum and count of the valid local samples (they join the patch center), reading
    the samples once. Works on logits (D = K) and on bottleneck vectors (UDI_SPEC §6).

    cls [2B, D]: the teacher's cls rows, crop-major (udi_kernels.layout), or with cls_by_pair=True by pair (the
    reference's teacher order, layout.teacher_rows_by_pair); global_samples [2B, Sg, D], global_mask [2B, Sg]
    (block v: crop pair v); local_samples [2LB, Sl, D], local_mask [2LB, Sl] (block j of local crop l: blended
    with cls block j) or None.
    Returns rows [2B + 2LB, D] in the dtype of cls (the blocks in the order of the samples: global, then local),
    blended in float32 or wider, local_sum [D] and local_count [] (float32 or wider). Teacher targets: no graph,
    whether or not the inputs require grad.
    """
    B2, D = cls.shape
    L = 0 if local_samples is None or B2 == 0 else local_samples.shape[0] // B2  # B = 0: no rows either way
    accumulate = torch.promote_types(cls.dtype, torch.float32)
    rows = torch.empty(B2 * (1 + L), D, dtype=cls.dtype, device=cls.device)
    base = (1 - alpha) * cls
    blend_into(rows[:B2].view(1, B2, D), global_samples, global_mask, base if cls_by_pair else teacher_rows_by_pair(base),
               alpha)
    if L == 0:
        return rows, cls.new_zeros(D, dtype=accumulate), cls.new_zeros((), dtype=accumulate)
    local_totals = blend_into(rows[B2:].view(L, B2, D), local_samples, local_mask, base, alpha)
    return rows, local_totals.sum(0, dtype=accumulate), local_mask.sum(dtype=accumulate)


@torch.no_grad()
def cls_plus_targets(teacher: UDITeacher, alpha: float = 0.5, last_layer: Optional[nn.Module] = None) -> UDITargets:
    """UDILoss's teacher targets: the cls+ rows blended by blend_cls_plus (UDI_SPEC §5) and the local samples'
    patch-center statistics.

    last_layer None: `teacher` holds logits [.., K]; the rows come in their dtype. last_layer (the head's last
    layer, linear without bias, weight [K, D]): `teacher` holds bottleneck vectors [.., D], blended there and
    projected, so that only 2B(2 + L) + 2B·Sg rows reach K and the local-sample logits never exist (UDI_SPEC §6;
    exact in real arithmetic). The local-sample sum is formed in float32 or wider either way. The targets carry no
    graph: the teacher is detached.
    """
    plus, local_sum, local_count = blend_cls_plus(teacher.cls, teacher.patch, teacher.patch_mask, teacher.local,
                                                  teacher.local_mask, alpha)
    if last_layer is None:
        return UDITargets(teacher.cls.detach(), teacher.patch.detach(), teacher.patch_mask, plus, local_sum,
                          local_count)
    rows = [teacher.cls, plus, teacher.patch.flatten(0, 1)]
    cls, plus, patch = last_layer(torch.cat(rows)).split([len(r) for r in rows])
    return UDITargets(cls, patch.unflatten(0, teacher.patch.shape[:2]), teacher.patch_mask, plus,
                      project_sum(local_sum, last_layer.weight), local_count)


def project_sum(total: Tensor, weight: Tensor) -> Tensor:
    """A center statistic formed in the bottleneck, total [D] (float32 or wider), taken to K by the last layer's
    weight [K, D]: total @ weight.T [K], in total's dtype, outside autocast."""
    with torch.autocast(total.device.type, enabled=False):
        return F.linear(total, weight.to(total.dtype))


# ---- pair tables -------------------------------------------------------------------------------------------------

class UDIPairTables(NamedTuple):
    """The cls and cls+ terms' pairs: student crop pair.student against teacher cls block pair.teacher, and
    against cls+ target block k, for every crop pair k of udi_crop_pairs. Each pair of rows weighs its level's
    share: the level-weighted mean (2·L_global + 2L·L_local)/(2 + 2L), each level a mean over its pairs."""
    cls: PairTable
    cls_plus: PairTable


@functools.lru_cache(maxsize=64)
def udi_pair_tables(num_local: int, batch: int, device: torch.device) -> UDIPairTables:
    """The UDIPairTables of a batch, built once per (num_local, batch, device)."""
    levels = udi_crop_pairs(num_local)
    pairs = sum(map(len, levels))
    weighted = [(pair, len(level) / pairs * mean_weight(len(level) * batch)) for level in levels for pair in level]
    cls = tuple((pair.student, pair.teacher, weight) for pair, weight in weighted)
    cls_plus = tuple((pair.student, k, weight) for k, (pair, weight) in enumerate(weighted))
    student_crops = GLOBAL_CROPS + num_local
    return UDIPairTables(crop_pair_table(cls, batch, student_crops, GLOBAL_CROPS, device),
                         crop_pair_table(cls_plus, batch, student_crops, pairs, device))


# ---- the loss ----------------------------------------------------------------------------------------------------

def _check_patch_count(patch_count, device):
    """None, a finite number > 0 or a 0-d tensor on `device` (its value unchecked: no host sync)."""
    if isinstance(patch_count, Tensor):
        if patch_count.dim() != 0:
            raise ValueError(f"patch_count must be a number or a 0-d tensor, got shape {list(patch_count.shape)}")
        check_device(patch_count, "patch_count", device)
    elif patch_count is not None:
        check_float(patch_count, "patch_count", 0.0, low_open=True)


class UDILoss(nn.Module):
    """UDI's loss (UDI_SPEC §5): (L_cls + L_cls+ + L_patch) / 3 with three EMA centers.

    forward(student: UDIStudent, teacher: UDITeacher | UDITargets, epoch, *, weight=None, teacher_weight=None) -> (loss,
    parts), parts a dict of the detached 'cls', 'cls_plus' and 'patch' losses. With the head's last layer fused in
    (UDI_SPEC §10): weight [K, D], the student head's effective last-layer weight (after weight norm), and a UDIStudent
    of its input rows (the bottleneck: cls, cls_plus [(2 + L)·B, D], patch [2·B, Sg, D]), so that no student logits are
    formed; gradients reach the rows and weight. teacher_weight [K, D] likewise makes every teacher field the teacher's
    bottleneck rows ([.., D]; UDITargets.extra_patch_sum [D], as cls_plus_targets forms it without last_layer),
    projected chunk by chunk inside the op; it needs weight. L_cls and L_cls+ use the level weighting (2·L_global +
    2L·L_local)/(2 + 2L) (udi_pair_tables); L_patch is Σ_valid CE / #valid samples on this rank (0 when none), or
    Σ_valid CE / patch_count (a number or 0-d tensor > 0: gradient accumulation passes the mean valid count of its
    micro-batches, so that the mean over the micro-batches is the whole step's L_patch).
    cls_plus_target: 'logits' (the reference: blend logits, α = 0.5) or 'probabilities' (the paper: the same blend of
    the centered softmaxes; needs UDITeacher; the cls+ center still follows the logit blend). Centers:
    udi_kernels.losses.centering (exact global means; an empty batch leaves them unchanged; inside
    defer_center_updates, gradient accumulation, one EMA step at the context's end from the rows of all its calls).
    The teacher is detached: its fields and teacher_weight get no gradient, whether they carry a graph or not. float64
    inputs (the loss moved with .double()) give float64-accurate losses, gradients and centers.
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.07,
                 warmup_teacher_temp_epochs: int = 30, nepochs: int = 100, student_temp: float = 0.1,
                 center_momentum: float = 0.9, alpha: float = 0.5, cls_plus_target: str = "logits",
                 backend: Optional[str] = None):
        super().__init__()
        num_local = check_int(ncrops, "ncrops (two global crops, then the local ones)", 2) - 2
        check_choice(cls_plus_target, "cls_plus_target", ("logits", "probabilities"))
        check_backend(backend)
        self.out_dim, self.num_local = check_int(out_dim, "out_dim", 1), num_local
        self.student_temp = check_temperature(student_temp, "student_temp")
        self.schedule = check_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
        self.alpha, self.cls_plus_target, self.backend = check_float(alpha, "alpha", 0.0, 1.0), cls_plus_target, backend
        self.center_cls = EMACenter(out_dim, center_momentum, "center_momentum")
        self.center_cls_plus = EMACenter(out_dim, center_momentum, "center_momentum")
        self.center_patch = EMACenter(out_dim, center_momentum, "center_momentum")

    def teacher_temp(self, epoch: int) -> float:
        return teacher_temperature(epoch, *self.schedule)

    def forward(self, student: UDIStudent, teacher: Union[UDITeacher, UDITargets], epoch: int, *,
                weight: Optional[Tensor] = None, teacher_weight: Optional[Tensor] = None,
                patch_count: Optional[Union[float, Tensor]] = None):
        tau_t = self.teacher_temp(epoch)
        B = self._check(student, teacher, weight, teacher_weight)
        _check_patch_count(patch_count, teacher.cls.device)
        teacher, teacher_weight = detached(teacher), detached(teacher_weight)
        last_layers = dict(weight=weight, teacher_weight=teacher_weight)
        targets = teacher if isinstance(teacher, UDITargets) else cls_plus_targets(teacher, self.alpha)
        tables = udi_pair_tables(self.num_local, B, targets.cls.device)
        cls = cross_entropy(student.cls, targets.cls, self.center_cls.center, tables.cls, self.student_temp, tau_t,
                            backend=self.backend, **last_layers)
        plus_rows, plus_weight = self._cls_plus_rows(teacher, targets, tau_t)
        cls_plus = cross_entropy(student.cls_plus, plus_rows, self.center_cls_plus.center, tables.cls_plus,
                                 self.student_temp, tau_t, plus_weight, backend=self.backend, **last_layers)
        patch = self._patch_loss(student, targets, tau_t, patch_count=patch_count, **last_layers)
        if teacher_weight is not None:
            targets = targets._replace(extra_patch_sum=project_sum(targets.extra_patch_sum, teacher_weight))
        self._update_centers(cls, cls_plus, patch, targets, plus_stats_from_op=plus_weight is None)
        parts = {"cls": cls.loss.detach(), "cls_plus": cls_plus.loss.detach(), "patch": patch.loss.detach()}
        return (cls.loss + cls_plus.loss + patch.loss) / 3, parts

    def teacher_entropies(self, teacher: Union[UDITeacher, UDITargets], epoch: int, *,
                          teacher_weight: Optional[Tensor] = None):
        """The collapse diagnostics (udi_kernels.losses.teacher_entropies) of the teacher's cls rows (as in forward)
        against the cls center at epoch's temperature; call it before forward, which moves the centers."""
        return teacher_entropies(teacher.cls, self.center_cls.center, self.teacher_temp(epoch), teacher_weight)

    def _cls_plus_rows(self, teacher, targets: UDITargets, tau_t):
        """Teacher rows of the cls+ loss and their center weights (None: all 1)."""
        if self.cls_plus_target == "logits":
            return targets.cls_plus, None
        if not isinstance(teacher, UDITeacher):
            raise TypeError("cls_plus_target='probabilities' needs the teacher's sample logits (a UDITeacher)")
        probs = self._probability_targets(teacher, tau_t)
        # rows whose centered softmax is exactly `probs`; the center statistics come from the logit blend instead
        rows = tau_t * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny)) + self.center_cls_plus.center
        return rows, torch.zeros(rows.shape[0], device=rows.device, dtype=rows.dtype)

    def _probability_targets(self, teacher: UDITeacher, tau_t):
        """The blend of blend_cls_plus on the centered softmaxes, renormalised, in float32 (float64 for float64
        logits); rows by crop pair."""
        center, dtype = self.center_cls_plus.center, torch.promote_types(teacher.cls.dtype, torch.float32)
        softmax = lambda x: torch.softmax((x.to(dtype) - center) / tau_t, dim=-1)  # noqa: E731
        cls = softmax(teacher.cls)
        mix = [self.alpha * masked_mean(softmax(teacher.patch), teacher.patch_mask)
               + (1 - self.alpha) * teacher_rows_by_pair(cls)]
        if teacher.local is not None and teacher.local.shape[0]:
            mix.append(self.alpha * masked_mean(softmax(teacher.local), teacher.local_mask)
                       + (1 - self.alpha) * teacher_rows_by_local_pair(cls, teacher.local.shape[0] // cls.shape[0]))
        mix = torch.cat(mix)
        return mix / mix.sum(-1, keepdim=True)

    def _patch_loss(self, student: UDIStudent, targets: UDITargets, tau_t, weight=None, teacher_weight=None,
                    patch_count=None):
        valid = targets.patch_mask.reshape(-1).to(torch.promote_types(student.patch.dtype, torch.float32))
        count = valid.sum().clamp_min(1) if patch_count is None else patch_count
        return cross_entropy(student.patch.flatten(0, 1), targets.patch.flatten(0, 1), self.center_patch.center,
                             identity_table(valid / count), self.student_temp, tau_t, valid,
                             weight=weight, teacher_weight=teacher_weight, backend=self.backend)

    def _update_centers(self, cls, cls_plus, patch, targets: UDITargets, plus_stats_from_op: bool):
        with torch.no_grad():
            if plus_stats_from_op:
                plus_sum, plus_count = cls_plus.center_sum, cls_plus.center_count
            else:  # probability targets: the center still follows the logit blend
                plus = targets.cls_plus.to(torch.promote_types(targets.cls_plus.dtype, torch.float32))
                plus_sum, plus_count = plus.sum(0, keepdim=True), plus.new_full((1,), plus.shape[0])
            update_centers([self.center_cls, self.center_cls_plus, self.center_patch],
                           [cls.center_sum, plus_sum, patch.center_sum + targets.extra_patch_sum],
                           [cls.center_count, plus_count, patch.center_count + targets.extra_patch_count])

    def _check(self, student: UDIStudent, teacher: Union[UDITeacher, UDITargets], weight, teacher_weight) -> int:
        """Types, shapes, dtypes and devices of every input, named as in UDIStudent / UDITeacher / UDITargets, and
        of the last layers' weights; returns the batch size B."""
        if not isinstance(student, UDIStudent):
            raise TypeError(f"student must be a UDIStudent, got {type(student).__name__}")
        if not isinstance(teacher, (UDITeacher, UDITargets)):
            raise TypeError(f"teacher must be a UDITeacher or UDITargets, got {type(teacher).__name__}")
        check_tensor(teacher.cls, "teacher cls")
        if teacher_weight is not None and self.cls_plus_target == "probabilities":
            raise TypeError("cls_plus_target='probabilities' needs the teacher's sample logits (a UDITeacher, "
                            "without teacher_weight)")
        L, B, device = self.num_local, teacher.cls.shape[0] // 2, teacher.cls.device
        teacher_width = check_last_layer(teacher_weight, "teacher_weight", self.out_dim, device)
        width = check_last_layer(weight, "weight", self.out_dim, device)  # the student rows'
        check_rows(teacher.cls, "teacher cls", 2 * B, teacher_width, device)
        check_rows(student.cls, "student cls", (2 + L) * B, width, device)
        check_rows(student.cls_plus, "student cls_plus", (2 + L) * B, width, device)
        self._check_samples(teacher.patch, teacher.patch_mask, "teacher patch", "patch_mask", 2 * B, teacher_width,
                            device)
        shape = (*teacher.patch.shape[:2], width)
        if check_tensor(student.patch, "student patch").shape != shape:
            raise ValueError(f"student patch must have shape {list(shape)} (teacher patch's samples), got "
                             f"{list(student.patch.shape)}")
        check_logits(student.patch, "student patch", device)
        if isinstance(teacher, UDITargets):
            check_rows(teacher.cls_plus, "teacher cls_plus targets", (2 + 2 * L) * B, teacher_width, device)
            for value, name, shape in ((teacher.extra_patch_sum, "extra_patch_sum", (teacher_width,)),
                                       (teacher.extra_patch_count, "extra_patch_count", ())):
                if check_tensor(value, name).shape != shape:
                    raise ValueError(f"{name} must have shape {list(shape)}, got {list(value.shape)}")
                check_logits(value, name, device)
        elif L and B:
            self._check_samples(teacher.local, teacher.local_mask, "teacher local", "local_mask", 2 * L * B,
                                teacher_width, device)
        check_state_device(self, device)
        return B

    def _check_samples(self, samples, mask, name: str, mask_name: str, rows: int, width: int, device):
        """samples [rows, S, width] floating and mask [rows, S] bool."""
        check_tensor(samples, name)
        if samples.dim() != 3 or samples.shape[0] != rows or samples.shape[2] != width:
            raise ValueError(f"{name} must have shape [{rows}, S, {width}], got {list(samples.shape)}")
        check_logits(samples, name, device)
        check_mask(mask, mask_name, samples.shape[:2], device)
