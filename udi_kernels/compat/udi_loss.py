"""UDILoss: the reference UDI code's loss (`main_udi.UDILoss`, UDI_SPEC §5, §9), one-line swap, on the fused op."""
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from ..layout import GLOBAL_CROPS, reference_crop_pairs
from ..losses import EMACenter, blend_cls_plus, crop_mean_table, cross_entropy, identity_table
from ..checks import check_bool, check_float, check_int, check_tensor
from ..losses.checks import check_backend, check_state_device
from ..losses.udi import masked_sum
from ..ops.distill_cross_entropy import DistillCrossEntropyResult
from ._fused import as_temperature, check_common_arguments, check_mask_tensor


class Centering(EMACenter):
    """The reference's `centering` state, an EMACenter of one center per row: buffers `center` [num_centers, K]
    (cls, cls+ if any, patch if any) and `count` [num_centers, 1] (never used by the reference either; kept so state
    dicts load strictly); center_mean 'global' or 'per_rank' as UDILoss's."""

    def __init__(self, num_centers: int, out_dim: int = 65536, center_momentum: float = 0.9,
                 center_mean: str = "global"):
        super().__init__(out_dim, center_momentum, "center_momentum", shape=(num_centers, out_dim), mean=center_mean)
        self.num_centers = num_centers
        self.register_buffer("count", torch.zeros(num_centers, 1))

    @property
    def center_momentum(self) -> float:
        return self.momentum


class UDILoss(nn.Module):
    """The reference's `main_udi.UDILoss` (github ISL-CV/udi, commit 133c2cb): same constructor, inputs, outputs,
    state and numbers; every cross-entropy and center sum runs in the fused udi_kernels distillation op.

    UDILoss(num_local_crops, dim, teacher_temp_schedule, include_cls=True, include_patch=True, num_clt=2,
            alpha=0.5, student_temp=0.1, center_momentum=0.9, weights=None, *, center_mean='global', backend=None)
      teacher_temp_schedule: indexed by epoch (numpy array, list or tensor), as the reference's.
      num_clt 2 (cls and cls+; UDI) or 1 (cls only), include_patch True or False (num_clt 2 needs it: the cls+
      targets blend patch samples), include_cls True; other values raise ValueError naming the value.
      weights: one per level, cls, cls+ (num_clt 2), patch (include_patch); default 1 / num_ctr each.
      center_mean: 'global' (default) the exact mean of the teacher rows over all ranks; 'per_rank' each rank's
      mean averaged over the ranks, as the reference does. One process: the same.

    forward(student_output, teacher_output, epoch) -> (total, parts), the multi-crop wrapper's outputs as
    (pred, mask) pairs of [global, local] lists, B images, L = num_local_crops, K = dim:
      student pred  global [cls [2B, 1, K], cls+ [2B, 1, K], patch [1, 2B, Sg, K]], local [cls [LB, 1, K], cls+]
      student mask  global [None, None, patch sample weights [1, 2B, Sg, 1]], local [None, None]
      teacher pred  global [cls [2B, 1, K], None, patch [1, 2B, Sg, K]], local [None, None, [L, 2B, Sl, K]]
      teacher mask  global [None, None, [1, 2B, Sg, 1]], local [None, None, [L, 2B, Sl, 1]]
      (without cls+ or patch, those entries are absent). Teacher rows hold the global crops reversed, crop 1
      first, so student row r pairs with teacher row r; masks are the sample maps' row sums (1 valid, 0 padding)
      and weigh their samples as in the reference.
      total = Σ weights · levels, level = (2·global + 2L·local) / (2 + 2L) for cls and cls+, the patch term for
      patch; parts = [[global cls, global cls+, patch], [local cls, local cls+]] (scalar float32 tensors in the
      graph, logged by index by the reference's training loop).
    The centers (`centering.center`) are updated after the loss (inside udi_kernels.losses.defer_center_updates:
    once, at the context's end, from the rows of all its calls) from the raw teacher rows: cls over the 2B
    global rows, cls+ over its 2B + 2LB blended targets, patch over every valid sample, global and local.

    Checks (before anything runs, TypeError / ValueError naming the argument): the constructor's numbers
    (num_local_crops >= 0, dim >= 1, alpha in [0, 1], student_temp >= 2**-126, center_momentum in [0, 1], finite
    weights, a schedule of finite temperatures >= 2**-126 and no tensors that require grad, backend); every pred a
    floating tensor and every patch mask a floating or bool tensor, all on the device of the teacher's cls rows and
    of the centers; epoch an int in the schedule. The teacher is detached, as in the reference's training loop (no
    gradient reaches teacher_output). float64 inputs (the loss moved with .double()) give float64-accurate results.

    Differences from the reference, all where it returns NaN or crashes: a patch term without valid samples is 0;
    a center without rows keeps its value; L = 0 gives the global terms (local terms 0); B = 0 gives 0 and leaves
    the centers alone; it runs without a process group. Under autocast the blends and center sums accumulate in
    float32 (the reference: float16).
    """

    def __init__(self, num_local_crops: int, dim: int, teacher_temp_schedule, include_cls: bool = True,
                 include_patch: bool = True, num_clt: int = 2, alpha: float = 0.5, student_temp: float = 0.1,
                 center_momentum: float = 0.9, weights: Optional[Sequence[float]] = None, *,
                 center_mean: str = "global", backend: Optional[str] = None):
        super().__init__()
        _check_levels(include_cls, include_patch, num_clt)
        check_int(num_local_crops, "num_local_crops", 0)
        check_int(dim, "dim", 1)
        check_float(alpha, "alpha", 0.0, 1.0)
        check_common_arguments(student_temp, center_momentum, center_mean)
        _check_schedule(teacher_temp_schedule)
        check_backend(backend)
        self.student_temp, self.num_clt, self.dim, self.num_local_crops = student_temp, num_clt, dim, num_local_crops
        self.teacher_temp_schedule, self.alpha = teacher_temp_schedule, alpha
        self.include_cls, self.include_patch = include_cls, include_patch
        self.num_ctr = num_clt + include_patch
        self.weights = list(weights) if weights else [1 / self.num_ctr] * self.num_ctr
        if len(self.weights) != self.num_ctr:
            raise ValueError(f"weights must hold one weight per level ({self.num_ctr}), got {weights!r}")
        for i, weight in enumerate(self.weights):
            check_float(weight, f"weights[{i}]")
        self.centering = Centering(self.num_ctr, dim, center_momentum, center_mean)
        self.backend = backend

    @property
    def center_mean(self) -> str:
        return self.centering.mean

    def teacher_temp(self, epoch: int) -> float:
        check_int(epoch, "epoch", 0)
        if epoch >= len(self.teacher_temp_schedule):
            raise ValueError(f"epoch {epoch} is outside teacher_temp_schedule (length "
                             f"{len(self.teacher_temp_schedule)})")
        return as_temperature(self.teacher_temp_schedule[epoch], f"teacher_temp_schedule[{epoch}]")

    def forward(self, student_output, teacher_output, epoch: int):
        tau_t = self.teacher_temp(epoch)
        inputs = _Inputs.parse(student_output, teacher_output, self)
        L = self.num_local_crops
        global_pairs, local_cls_pairs, local_cls_plus_pairs = reference_crop_pairs(L)
        cls = self._cls_terms(0, inputs.student_cls, inputs.teacher_cls, inputs.teacher_cls, global_pairs,
                              local_cls_pairs, tau_t)
        levels, stats = [cls], [_stats(cls[0])]
        local_sum, local_count = None, None
        if self.num_clt == 2:
            plus_global, plus_local, local_sum, local_count = self._cls_plus_targets(inputs)
            plus = self._cls_terms(1, inputs.student_cls_plus, plus_global, plus_local, global_pairs,
                                   local_cls_plus_pairs, tau_t)
            levels.append(plus)
            stats.append(_stats(*plus))
        parts = [[g.loss for g, _ in levels], [l.loss for _, l in levels]]
        totals = [(2 * g.loss + 2 * L * l.loss) / (2 + 2 * L) for g, l in levels]
        if self.include_patch:
            patch = self._patch_term(inputs, tau_t)
            if local_sum is None:
                local_sum, local_count = _masked_sum(inputs.teacher_local, inputs.teacher_local_mask)
            parts[0].append(patch.loss)
            totals.append(patch.loss)
            stats.append((patch.center_sum + local_sum, patch.center_count + local_count))
        self.centering.update(torch.cat([s for s, _ in stats]), torch.stack([c.reshape(()) for _, c in stats]))
        return sum(w * level for w, level in zip(self.weights, totals)), parts

    def _cross_entropy(self, student: Tensor, teacher: Tensor, center_row: int, table, tau_t: float,
                       row_weight: Optional[Tensor] = None) -> DistillCrossEntropyResult:
        """One term on center row `center_row`: its loss and its teacher rows' center statistics (sum [1, K],
        count [1])."""
        center = self.centering.center[center_row:center_row + 1]
        return cross_entropy(student, teacher, center, table, self.student_temp, tau_t, row_weight,
                             backend=self.backend)

    def _cls_terms(self, center_row: int, student: tuple, teacher_global: Tensor, teacher_local: Tensor,
                   global_pairs: tuple, local_pairs: tuple, tau_t: float):
        """(global term, local term) of a cls-type level: student = (global rows [2B, K], local rows [LB, K]),
        teacher_global [2B, K] and teacher_local [T·B, K] scored as the crop pairs of reference_crop_pairs."""
        B, L, device = student[0].shape[0] // 2, self.num_local_crops, student[0].device
        local_teacher_crops = teacher_local.shape[0] // B if B else 0
        global_term = self._cross_entropy(student[0], teacher_global, center_row,
                                          crop_mean_table(global_pairs, B, GLOBAL_CROPS, GLOBAL_CROPS, device), tau_t)
        local_term = self._cross_entropy(student[1], teacher_local, center_row,
                                         crop_mean_table(local_pairs, B, L, local_teacher_crops, device), tau_t)
        return global_term, local_term

    @torch.no_grad()
    def _cls_plus_targets(self, inputs: "_Inputs"):
        """The reference's cls+ targets α·(masked sample mean) + (1 − α)·teacher cls, in logit space, eps 1e-5:
        global rows [2B, K] (row r: teacher image r), local rows [2LB, K] (row l·2B + r), and the sum [K] and
        count [] of the masked local samples, which join the patch center."""
        B2 = inputs.teacher_cls.shape[0]
        rows, local_sum, local_count = blend_cls_plus(inputs.teacher_cls, inputs.teacher_patch,
                                                      inputs.teacher_patch_mask, inputs.teacher_local,
                                                      inputs.teacher_local_mask, self.alpha, cls_by_pair=True)
        return rows[:B2], rows[B2:], local_sum, local_count

    def _patch_term(self, inputs: "_Inputs", tau_t: float) -> DistillCrossEntropyResult:
        """Σ m_s·CE / Σ m_s over the global samples (student mask m_s); the teacher's mask weighs the center rows."""
        K, dtype = self.dim, torch.promote_types(inputs.student_patch.dtype, torch.float32)
        as_weights = lambda mask: mask.reshape(-1).to(dtype)  # noqa: E731
        weight = as_weights(inputs.student_patch_mask)
        total = weight.sum()
        return self._cross_entropy(inputs.student_patch.reshape(-1, K), inputs.teacher_patch.reshape(-1, K),
                                   self.num_ctr - 1, identity_table(weight / total.masked_fill(total == 0, 1)),
                                   tau_t, as_weights(inputs.teacher_patch_mask))


def _stats(*terms: DistillCrossEntropyResult):
    return sum(t.center_sum for t in terms), sum(t.center_count for t in terms)


@torch.no_grad()
def _masked_sum(rows: Tensor, mask: Tensor):
    """Σ m_s·x_s over every row and sample (masked_sum: samples of mask 0 left out exactly): rows [R, S, K],
    mask [R, S] -> ([1, K] float32, [] float32)."""
    dtype = torch.promote_types(rows.dtype, torch.float32)
    total = masked_sum(rows.reshape(1, -1, rows.shape[-1]), mask.reshape(1, -1)).to(dtype)
    return total, mask.sum(dtype=dtype)


def _check_schedule(schedule):
    """An indexable sequence of teacher temperatures, one per epoch, each as_temperature."""
    try:
        entries = list(schedule)
    except TypeError:
        raise TypeError("teacher_temp_schedule must be a sequence of numbers (one per epoch), got "
                        f"{type(schedule).__name__}") from None
    if not entries:
        raise ValueError("teacher_temp_schedule must hold one temperature per epoch, got none")
    for epoch, value in enumerate(entries):
        as_temperature(value, f"teacher_temp_schedule[{epoch}]")


def _check_levels(include_cls: bool, include_patch: bool, num_clt: int):
    if include_cls is not True:
        raise ValueError(f"include_cls={include_cls!r} is not supported (the reference's training script always "
                         "distils the [CLS] token)")
    check_bool(include_patch, "include_patch")
    if num_clt not in (1, 2) or isinstance(num_clt, bool):
        raise ValueError(f"num_clt must be 1 or 2, got {num_clt!r}")
    if num_clt == 2 and not include_patch:
        raise ValueError(f"num_clt=2 needs include_patch=True (the cls+ targets blend the teacher's patch "
                         f"samples), got include_patch={include_patch!r}")


class _Inputs(NamedTuple):
    """The nested inputs as rows: cls-type pairs (global [2B, K], local [LB, K]); patch [2B, Sg, K] with masks
    [2B, Sg]; teacher local samples [L·2B, Sl, K] with masks [L·2B, Sl]. Absent entries are None."""
    student_cls: tuple
    student_cls_plus: Optional[tuple]
    student_patch: Optional[Tensor]
    student_patch_mask: Optional[Tensor]
    teacher_cls: Tensor
    teacher_patch: Optional[Tensor]
    teacher_patch_mask: Optional[Tensor]
    teacher_local: Optional[Tensor]
    teacher_local_mask: Optional[Tensor]

    @staticmethod
    def parse(student_output, teacher_output, loss: UDILoss) -> "_Inputs":
        (s_global, s_local), (s_global_mask, _) = _levels(student_output, "student_output")
        (t_global, t_local), (t_global_mask, t_local_mask) = _levels(teacher_output, "teacher_output")
        K, L, patch = loss.dim, loss.num_local_crops, loss.num_clt
        teacher_cls = _rows(t_global[0], "teacher_output global cls", K)
        device = teacher_cls.device
        check_state_device(loss.centering, device)
        B2 = teacher_cls.shape[0]
        if B2 % 2:
            raise ValueError(f"teacher_output global cls must hold 2·B rows (both global crops), got {B2}")

        def cls_pair(index: int, name: str):
            return (_rows(s_global[index], f"student_output global {name}", K, B2, device),
                    _rows(s_local[index], f"student_output local {name}", K, L * B2 // 2, device))

        inputs = _Inputs(cls_pair(0, "cls"), cls_pair(1, "cls+") if loss.num_clt == 2 else None,
                         None, None, teacher_cls, None, None, None, None)
        if not loss.include_patch:
            return inputs
        student_patch, student_mask = _samples(s_global[patch], s_global_mask[patch], "student_output global patch",
                                               K, (1, B2), device)
        teacher_patch, teacher_mask = _samples(t_global[patch], t_global_mask[patch], "teacher_output global patch",
                                               K, (1, B2), device)
        if student_patch.shape != teacher_patch.shape:
            raise ValueError(f"student and teacher global patch must have the same shape, got "
                             f"{list(student_patch.shape)} and {list(teacher_patch.shape)}")
        local, local_mask = _samples(t_local[patch], t_local_mask[patch], "teacher_output local samples", K, (L, B2),
                                     device)
        return inputs._replace(student_patch=student_patch, student_patch_mask=student_mask,
                               teacher_patch=teacher_patch, teacher_patch_mask=teacher_mask, teacher_local=local,
                               teacher_local_mask=local_mask)


def _levels(output, name: str):
    """(pred, mask) of [global, local] lists, as the reference's MultiCropWrapper returns them."""
    try:
        (pred_global, pred_local), (mask_global, mask_local) = output
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (pred, mask), each a [global, local] pair of lists (the multi-crop "
                         "wrapper's output)") from None
    return (pred_global, pred_local), (mask_global, mask_local)


def _rows(tensor, name: str, K: int, rows: Optional[int] = None, device=None) -> Tensor:
    """tensor [..., K] (floating, on `device`) as [rows, K]."""
    check_tensor(tensor, name, device=device)
    if tensor.shape[-1:] != (K,) or (rows is not None and tensor.numel() != rows * K):
        what = f"{rows} rows of {K}" if rows is not None else f"rows of {K}"
        raise ValueError(f"{name} must hold {what} logits, got {list(tensor.shape)}")
    return tensor.reshape(-1, K)


def _samples(pred, mask, name: str, K: int, leading: tuple, device):
    """pred [*leading, S, K] (floating) and its mask [*leading, S, 1] (floating or bool), both on `device`, as
    [R, S, K] and [R, S], R = prod(leading)."""
    check_tensor(pred, name, device=device)
    if pred.dim() != 4 or pred.shape[:2] != leading or pred.shape[3] != K:
        raise ValueError(f"{name} must have shape [{leading[0]}, {leading[1]}, S, {K}], got {list(pred.shape)}")
    S = pred.shape[2]
    if not isinstance(mask, Tensor) or mask.shape != (*leading, S, 1):  # None: the wrong entry of the mask lists
        shape = list(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"the mask of {name} must have shape [{leading[0]}, {leading[1]}, {S}, 1], got {shape}")
    check_mask_tensor(mask, f"the mask of {name}", device)
    rows = leading[0] * leading[1]
    return pred.reshape(rows, S, K), mask.reshape(rows, S)
