"""DINO, iBOT-patch and UDI losses (UDI_SPEC §5), every one on the fused udi_kernels.distill_cross_entropy.

Centers are exact global means: the per-center weighted sum and count of the teacher rows come out of the
fused op and are all-reduced (when a torch.distributed process group exists) before the EMA step
c ← m·c + (1 − m)·sum/count; a zero count leaves the center unchanged. Statistics that are not finite (NaN or inf
teacher logits) leave the center unchanged too, and a RuntimeWarning says so: on CPU tensors at once, on CUDA at
a later update, once the device has finished (no host sync). The loss of such a step is not finite either.
An empty batch (B = 0, no rows) gives a loss of 0 with a zero gradient and leaves the centers unchanged.
"""
import functools
import warnings
from typing import NamedTuple, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .backends import BACKENDS
from .checks import check_float, check_int
from .ops.distill_cross_entropy import DistillCrossEntropyResult, PairCSR, build_csr, distill_cross_entropy_csr


# ---- shared pieces -------------------------------------------------------------------------------------------------

def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    if distributed():
        dist.all_reduce(tensor)
    return tensor


# ---- argument checks -----------------------------------------------------------------------------------------------

def _check_choice(value, name: str, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_backend(backend):
    if backend is not None:
        _check_choice(backend, "backend", BACKENDS)


def _check_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs, suffix=""):
    """The teacher temperature schedule's arguments (DINO's flag names, iBOT's with suffix '2')."""
    return (check_float(warmup_teacher_temp, f"warmup_teacher_temp{suffix}", 0.0, low_open=True),
            check_float(teacher_temp, f"teacher_temp{suffix}", 0.0, low_open=True),
            check_int(warmup_teacher_temp_epochs, "warmup_teacher_temp_epochs", 0), check_int(nepochs, "nepochs", 1))


def _check_rows(tensor: Tensor, name: str, rows: int, out_dim: int, device=None):
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2 or tensor.shape != (rows, out_dim):
        raise ValueError(f"{name} must have shape [{rows}, {out_dim}], got {list(tensor.shape)}")
    _check_logits(tensor, name, device)


def _check_logits(tensor: Tensor, name: str, device=None):
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {tensor.dtype}")
    _check_device(tensor, name, device)


def _check_device(tensor: Tensor, name: str, device=None):
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} must be on {device} (like the other inputs), got {tensor.device}")


def _check_mask(mask, name: str, shape, device):
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != shape:
        got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor of shape {list(shape)}, got {got}")
    _check_device(mask, name, device)


def _check_state_device(loss: nn.Module, device: torch.device):
    """The loss's centers (its buffers) must be where its inputs are."""
    for name, buffer in loss.named_buffers():
        if buffer.device != device:
            raise ValueError(f"{type(loss).__name__}.{name} is on {buffer.device} but the inputs are on {device}; "
                             f"move the loss there with .to({str(device)!r})")


def teacher_temperature(epoch: int, warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int,
                        nepochs: int) -> float:
    """DINO's schedule: linear warm-up over the first epochs (both ends included), then constant."""
    check_int(epoch, "epoch", 0)
    warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs = _check_schedule(
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
    if epoch >= warmup_teacher_temp_epochs or epoch >= nepochs:
        return float(teacher_temp)
    if warmup_teacher_temp_epochs == 1:
        return float(warmup_teacher_temp)
    step = (teacher_temp - warmup_teacher_temp) / (warmup_teacher_temp_epochs - 1)
    return float(warmup_teacher_temp + epoch * step)


class EMACenter(nn.Module):
    """A [1, K] center updated from (sum [1, K], count [1]) statistics; global over ranks."""

    def __init__(self, out_dim: int, momentum: float, momentum_name: str = "momentum"):
        super().__init__()
        check_int(out_dim, "out_dim", 1)
        self.momentum = check_float(momentum, momentum_name, 0.0, 1.0)
        self.register_buffer("center", torch.zeros(1, out_dim))

    def update(self, center_sum: Tensor, center_count: Tensor):
        update_centers([self], [center_sum], [center_count])


@torch.no_grad()
def update_centers(emas, sums, counts):
    """One EMA step of several centers (of one momentum) from their (sum [1, K], count [1]) statistics, as one
    batch of small ops and at most one all-reduce."""
    if not len(emas) == len(sums) == len(counts) or not emas:
        raise ValueError(f"update_centers needs one sum and one count per center, got {len(emas)} centers, "
                         f"{len(sums)} sums and {len(counts)} counts")
    momentum = emas[0].momentum
    if any(ema.momentum != momentum for ema in emas):
        raise ValueError(f"centers updated together must share one momentum, got {[ema.momentum for ema in emas]}")
    total = _stack(sums, torch.cat).float()      # [n, K]
    count = _stack(counts, torch.stack).float()  # [n, 1] ([1] for one center, which broadcasts the same)
    if distributed():
        stats = all_reduce_sum(torch.cat([total, count.reshape(-1, 1)], dim=1))
        total, count = stats[:, :-1], stats[:, -1:]
    centers = _stack([ema.center for ema in emas], torch.cat)
    # normal tensors even under inference_mode, so that a later training call can save the centers for backward
    with torch.inference_mode(False):
        mean = total / count.clamp_min(torch.finfo(torch.float32).tiny)
        finite = torch.isfinite(mean).all(dim=1, keepdim=True)  # False for NaN/inf teacher rows or counts
        # new tensors, not copy_: the loss's autograd graph saved the old centers
        updated = torch.where(finite & (count > 0), centers * momentum + mean * (1 - momentum), centers)
    _skipped_updates.report(finite)
    for ema, center in zip(emas, updated.split(1) if len(emas) > 1 else (updated,)):
        ema.center = center.to(ema.center.dtype)


class _SkippedUpdates:
    """Warns about center updates skipped for non-finite statistics without a host sync: the flags reach the host
    asynchronously and are read once the device has finished them (CPU flags at once, CUDA flags at a later
    update)."""

    def __init__(self):
        self.pending = []  # (flags on the host, CUDA event or None)

    def report(self, finite: Tensor):
        """finite: one flag per center, False where its update was skipped."""
        if torch.compiler.is_compiling():
            return
        event = None
        if finite.is_cuda:
            event = torch.cuda.Event()
            host = finite.to("cpu", non_blocking=True)
            event.record()
        else:
            host = finite
        self.pending.append((host, event))
        self.warn_finished()

    def warn_finished(self):
        while self.pending and (self.pending[0][1] is None or self.pending[0][1].query()):
            host, _ = self.pending.pop(0)
            if not host.numpy().all():  # a host read of finished memory, no dispatcher op (and no sync)
                warnings.warn("udi_kernels.losses: an EMA center update was skipped: its teacher statistics were "
                              "not finite (NaN or inf teacher logits); the center keeps its value", RuntimeWarning,
                              stacklevel=4)


_skipped_updates = _SkippedUpdates()


def _stack(tensors, join):
    return tensors[0] if len(tensors) == 1 else join(tensors)


@torch.no_grad()
def sinkhorn_knopp_center(teacher: Tensor, tau_t: float, iterations: int = 3) -> Tensor:
    """DINOv2's Sinkhorn-Knopp targets as a center: softmax((t − c)/τt) equals its assignment Q.

    Q = diag(β) exp(t/τt) diag(α) is rescaled so that prototypes have equal mass over the global batch
    (all-reduced) and each row sums to 1; the row scaling cancels in the softmax, so c = −τt·log α.
    Computed in log space (no overflow at small τt). teacher [R, K] -> center [1, K] float32; zeros for an empty
    batch (R = 0 on a single process).
    """
    if teacher.shape[0] == 0 and not distributed():
        return teacher.new_zeros(1, teacher.shape[1], dtype=torch.float32)
    u = teacher.float() / tau_t
    log_b = u.new_zeros(u.shape[0], 1)
    log_a = u.new_zeros(1, u.shape[1])
    for _ in range(iterations):
        log_a = -_global_logsumexp_over_rows(u + log_b)
        log_b = -torch.logsumexp(u + log_a, dim=1, keepdim=True)
    center = -tau_t * log_a
    return center - center.mean()  # any constant shift gives the same softmax


def _global_logsumexp_over_rows(x: Tensor) -> Tensor:
    """logsumexp over dim 0 across every rank's rows, [1, K]."""
    # a rank without rows joins the reductions with -inf maxima and zero sums
    row_max = x.amax(dim=0, keepdim=True) if x.shape[0] else x.new_full((1, x.shape[1]), -torch.inf)
    if distributed():
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
    total = all_reduce_sum(torch.exp(x - row_max).sum(dim=0, keepdim=True))
    return row_max + torch.log(total)


class ScoredPairs(NamedTuple):
    student: Tensor  # [P] int64
    teacher: Tensor  # [P] int64
    weight: Tensor   # [P] float32


class PairTable(NamedTuple):
    """A loss term's pairs in the op's layout with one center, and unit teacher-row weights [Rt] (every row counts
    once in the center): everything that depends only on the pair structure, built once per structure."""
    csr: PairCSR
    unit_rows: Tensor


def _cross_entropy(student: Tensor, teacher: Tensor, center: Tensor, table: PairTable, tau_s: float, tau_t: float,
                   backend: Optional[str], row_weight: Optional[Tensor] = None) -> DistillCrossEntropyResult:
    """One center; returns the loss and the teacher rows' (sum [1, K], count [1]); row_weight default: all 1.

    The pairs are built by the losses, valid by construction and cached with their CSR, so a call sorts nothing
    and the op's value checks (a device sync and a pass over the teacher) stay off the training path. A center kept
    in float16/bfloat16 (the loss moved with .half()) is used in float32."""
    if center.dtype not in (torch.float32, torch.float64):
        center = center.float()
    return distill_cross_entropy_csr(student, teacher, center, table.csr,
                                     table.unit_rows if row_weight is None else row_weight, tau_s, tau_t,
                                     backend=backend)


def _cat_pairs(groups) -> ScoredPairs:
    return ScoredPairs(*(torch.cat([g[i] for g in groups]) for i in range(3)))


def _mean_weight(terms: int) -> float:
    """The weight of each of `terms` terms of a mean (0 when there are none: an empty batch)."""
    return 1.0 / terms if terms else 0.0


def _crop_pairs(student_crop: int, teacher_crop: int, batch: int, weight: float, device) -> ScoredPairs:
    """Row b of student crop `student_crop` against row b of teacher crop `teacher_crop` (crop-major rows)."""
    b = torch.arange(batch, device=device)
    return ScoredPairs(student_crop * batch + b, teacher_crop * batch + b,
                       torch.full((batch,), weight, dtype=torch.float32, device=device))


def level_weighted_pairs(student_rows_of_global, student_rows_of_local, teacher_rows_for, num_local: int,
                         batch: int, device) -> ScoredPairs:
    """UDI's level weighting (2·L_global + 2L·L_local)/(2 + 2L), each level a mean over its pairs.

    Global student crop v (student crop index student_rows_of_global(v)) meets teacher crop teacher_rows_for(v, None);
    local crop l meets teacher crops teacher_rows_for(l, g) for g in 0, 1.
    """
    levels = 2 + 2 * num_local
    global_weight = 2 / levels * _mean_weight(2 * batch)
    groups = [_crop_pairs(student_rows_of_global(v), teacher_rows_for(v, None), batch, global_weight, device)
              for v in range(2)]
    if num_local:
        local_weight = 2 * num_local / levels * _mean_weight(2 * num_local * batch)
        groups += [_crop_pairs(student_rows_of_local(l), teacher_rows_for(l, g), batch, local_weight, device)
                   for l in range(num_local) for g in range(2)]
    return _cat_pairs(groups)


def scored_pairs(kind: str, crops: int, batch: int, device: torch.device) -> ScoredPairs:
    """The scored pairs of a loss term. kind 'dino' (crops = ncrops): teacher global iq against every other
    student view; 'cls' / 'cls_plus' (crops = L): UDI's level-weighted cls and cls+ terms."""
    if kind == "dino":
        terms = 2 * (crops - 1)
        return _cat_pairs([_crop_pairs(v, iq, batch, _mean_weight(terms * batch), device)
                           for iq in range(2) for v in range(crops) if v != iq])
    teacher_rows = {"cls": lambda c, g: 1 - c if g is None else g,
                    "cls_plus": lambda c, g: c if g is None else 2 + 2 * c + g}[kind]
    return level_weighted_pairs(lambda v: v, lambda l: 2 + l, teacher_rows, crops, batch, device)


def _term_crops(kind: str, crops: int):
    """(student crops, teacher crops) of a scored_pairs term."""
    if kind == "dino":
        return crops, 2
    return 2 + crops, 2 if kind == "cls" else 2 + 2 * crops


# The tables below are built outside inference mode: later calls save their tensors for the backward.

@functools.lru_cache(maxsize=64)
@torch.inference_mode(False)
def pair_table(kind: str, crops: int, batch: int, device: torch.device) -> PairTable:
    """scored_pairs(kind, crops, batch, device) as a PairTable, built once per (kind, crops, batch, device):
    rebuilding it on every step costs dozens of small launches and a sort."""
    student_crops, teacher_crops = _term_crops(kind, crops)
    return _table(scored_pairs(kind, crops, batch, device), student_crops * batch, teacher_crops * batch)


@functools.lru_cache(maxsize=64)
@torch.inference_mode(False)
def identity_table(rows: int, device: torch.device) -> PairTable:
    """Row r of the student against row r of the teacher, weight 1 (the patch losses), built once per
    (rows, device)."""
    index = torch.arange(rows, device=device)
    return _table(ScoredPairs(index, index, torch.ones(rows, device=device)), rows, rows)


def _identity_pairs(pair_weight: Tensor) -> PairTable:
    """identity_table with per-call weights pair_weight [rows] float32; they go in as they are, since the
    CSR order of identity pairs is the pair order."""
    table = identity_table(pair_weight.shape[0], pair_weight.device)
    return table._replace(csr=table.csr._replace(pair_weight=pair_weight))


def _table(pairs: ScoredPairs, student_rows: int, teacher_rows: int) -> PairTable:
    device = pairs.student.device
    center_id = torch.zeros(teacher_rows, dtype=torch.int64, device=device)
    return PairTable(build_csr(*pairs, center_id, student_rows, 1), torch.ones(teacher_rows, device=device))


# ---- DINO ----------------------------------------------------------------------------------------------------------

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
        _check_choice(centering, "centering", ("ema", "sinkhorn_knopp"))
        _check_backend(backend)
        self.out_dim, self.ncrops = check_int(out_dim, "out_dim", 1), ncrops
        self.student_temp = check_float(student_temp, "student_temp", 0.0, low_open=True)
        self.schedule = _check_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
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
        return pair_table("dino", self.ncrops, batch, torch.device(device))

    def forward(self, student_output: Tensor, teacher_output: Tensor, epoch: int) -> Tensor:
        if not isinstance(teacher_output, Tensor):
            raise TypeError(f"teacher_output must be a torch.Tensor, got {type(teacher_output).__name__}")
        batch = teacher_output.shape[0] // 2
        _check_rows(teacher_output, "teacher_output", 2 * batch, self.out_dim)
        _check_rows(student_output, "student_output", self.ncrops * batch, self.out_dim, teacher_output.device)
        _check_state_device(self, student_output.device)
        tau_t = self.teacher_temp(epoch)
        center = self.center if self.centering == "ema" else sinkhorn_knopp_center(teacher_output, tau_t,
                                                                                  self.sinkhorn_iterations)
        out = _cross_entropy(student_output, teacher_output, center, self.pairs(batch, student_output.device),
                             self.student_temp, tau_t, self.backend)
        if self.centering == "ema":
            update_centers([self], [out.center_sum], [out.center_count])
        return out.loss


# ---- iBOT ----------------------------------------------------------------------------------------------------------

class IBOTPatchLoss(nn.Module):
    """iBOT's masked-patch loss: per image, Σ_masked CE / max(#masked, 1), averaged over the images.

    forward(student_patch [R, N, K], teacher_patch [R, N, K], mask [R, N] bool, epoch) -> loss, with R the
    images (all views stacked); student patch n of image r is scored against teacher patch n of image r
    where mask is set. Own center (`center` [1, K], the global mean over all teacher patches) and temperature.
    """

    def __init__(self, patch_out_dim: int, warmup_teacher_temp2: float, teacher_temp2: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum2: float = 0.9, backend: Optional[str] = None):
        super().__init__()
        _check_backend(backend)
        self.out_dim, self.backend = check_int(patch_out_dim, "patch_out_dim", 1), backend
        self.student_temp = check_float(student_temp, "student_temp", 0.0, low_open=True)
        self.schedule = _check_schedule(warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs, nepochs, "2")
        self.centering_ema = EMACenter(patch_out_dim, center_momentum2, "center_momentum2")

    @property
    def center(self) -> Tensor:
        return self.centering_ema.center

    def forward(self, student_patch: Tensor, teacher_patch: Tensor, mask: Tensor, epoch: int) -> Tensor:
        for value, name in ((student_patch, "student_patch"), (teacher_patch, "teacher_patch")):
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if student_patch.dim() != 3 or student_patch.shape != teacher_patch.shape or \
                student_patch.shape[-1] != self.out_dim:
            raise ValueError(f"student_patch and teacher_patch must both have shape [R, N, {self.out_dim}], got "
                             f"{list(student_patch.shape)} and {list(teacher_patch.shape)}")
        device = student_patch.device
        _check_mask(mask, "mask", student_patch.shape[:2], device)
        _check_logits(student_patch, "student_patch")
        _check_logits(teacher_patch, "teacher_patch", device)
        _check_state_device(self, device)
        images, tokens = mask.shape
        weight = mask.float() / mask.sum(1, keepdim=True).clamp_min(1) / max(images, 1)
        rows = images * tokens
        out = _cross_entropy(student_patch.reshape(rows, self.out_dim), teacher_patch.reshape(rows, self.out_dim),
                             self.center, _identity_pairs(weight.reshape(-1)), self.student_temp,
                             teacher_temperature(epoch, *self.schedule), self.backend)
        self.centering_ema.update(out.center_sum, out.center_count)
        return out.loss


# ---- UDI -----------------------------------------------------------------------------------------------------------

class UDIStudent(NamedTuple):
    """The student's head outputs for one batch of B images with 2 global and L local crops.

    cls      [(2 + L)·B, K]  crop-major (global 0, global 1, local 0 .. L-1), row c·B + b
    cls_plus [(2 + L)·B, K]  the extra [CLS+] token, same order
    patch    [2·B, Sg, K]    row v·B + b: global crop v's SRS samples (pair v → 1−v), valid samples first
    """
    cls: Tensor
    cls_plus: Tensor
    patch: Tensor


class UDITeacher(NamedTuple):
    """The teacher's logits (global crops only).

    cls         [2·B, K]
    patch       [2·B, Sg, K]  row v·B + b, sample s: the teacher's logits (on global crop 1−v) at the target of
                              student sample (v, b, s)
    patch_mask  [2·B, Sg] bool  valid samples
    local       [2·L·B, Sl, K]  row (2l + g)·B + b, sample s: teacher logits on global crop g at local crop l's
                                sample s (or None when L = 0)
    local_mask  [2·L·B, Sl] bool
    """
    cls: Tensor
    patch: Tensor
    patch_mask: Tensor
    local: Optional[Tensor] = None
    local_mask: Optional[Tensor] = None


class UDITargets(NamedTuple):
    """What UDILoss needs from the teacher; can be formed in the 256-d bottleneck and projected (UDI_SPEC §6).

    cls [2·B, K]; patch [2·B, Sg, K] and patch_mask [2·B, Sg] as in UDITeacher;
    cls_plus [2·B + 2·L·B, K]: rows v·B + b target student global v, rows 2B + (2l + g)·B + b target local l
      against teacher global g;
    extra_patch_sum [K], extra_patch_count []: the sum and count of the valid local-sample teacher rows, which
      join the patch center statistics.
    """
    cls: Tensor
    patch: Tensor
    patch_mask: Tensor
    cls_plus: Tensor
    extra_patch_sum: Tensor
    extra_patch_count: Tensor


def masked_mean(rows: Tensor, mask: Tensor, eps: float = 1e-5) -> Tensor:
    """Σ_s m_s x_s / (Σ_s m_s + eps): rows [R, S, D], mask [R, S] -> [R, D] float32 (float64 for float64 rows),
    no [R, S, D] temporary."""
    weights = mask.to(rows.dtype)[:, None, :]
    dtype = torch.promote_types(rows.dtype, torch.float32)
    total = torch.bmm(weights, rows).squeeze(1).to(dtype)
    return total / (mask.sum(1, keepdim=True).to(dtype) + eps)


def _blend_into(out: Tensor, samples: Tensor, mask: Tensor, base: Tensor, alpha: float) -> Tensor:
    """out [n, R, D] = alpha * masked mean of samples [n*R, S, D] + base [R, D] (already scaled by 1 - alpha),
    without [n, R, D] temporaries; returns the masked sums [n*R, D] (dtype of samples)."""
    totals = torch.bmm(mask.to(samples.dtype)[:, None], samples).squeeze(1)
    scale = alpha / (mask.sum(1, dtype=torch.promote_types(out.dtype, torch.float32)) + 1e-5)
    torch.addcmul(base, totals.view(out.shape), scale.view(*out.shape[:2], 1), out=out)  # math in scale's dtype
    return totals


def blend_cls_plus(cls: Tensor, global_samples: Tensor, global_mask: Tensor, local_samples: Optional[Tensor],
                   local_mask: Optional[Tensor], alpha: float, dtype: torch.dtype):
    """UDI's cls+ targets T+ = alpha * masked mean of the samples + (1 - alpha) * T_cls, with eps 1e-5 (UDI_SPEC §5),
    for every cls+ student row, and the sum and count of the valid local samples (they join the patch center),
    reading the samples once. Works on logits (D = K) and on bottleneck vectors (UDI_SPEC §6).

    cls [2B, D] (row c*B + b: teacher crop c); global_samples [2B, Sg, D], global_mask [2B, Sg] (row v*B + b: the
    samples of student global v on teacher crop 1 - v); local_samples [2LB, Sl, D], local_mask [2LB, Sl] (row
    (2l + g)*B + b: local crop l's samples on teacher crop g) or None.
    Returns rows [2B + 2LB, D] in `dtype` (rows v*B + b, then 2B + (2l + g)*B + b), local_sum [D] (float32 or
    wider) and local_count [] (same dtype).
    """
    B2, D = cls.shape
    L = 0 if local_samples is None or B2 == 0 else local_samples.shape[0] // B2  # B = 0: no rows either way
    accumulate = torch.promote_types(dtype, torch.float32)
    rows = torch.empty(B2 * (1 + L), D, dtype=dtype, device=cls.device)
    base = (1 - alpha) * cls.to(dtype)
    _blend_into(rows[:B2].view(1, B2, D), global_samples, global_mask, base.roll(B2 // 2, 0), alpha)
    if L == 0:
        return rows, cls.new_zeros(D, dtype=accumulate), cls.new_zeros((), dtype=accumulate)
    local_totals = _blend_into(rows[B2:].view(L, B2, D), local_samples, local_mask, base, alpha)
    return rows, local_totals.sum(0, dtype=accumulate), local_mask.sum().to(accumulate)


def cls_plus_targets(teacher: UDITeacher, alpha: float = 0.5) -> UDITargets:
    """UDI's cls+ targets blended in logit space (blend_cls_plus): rows in the dtype of the logits (as the
    bottleneck path's last layer returns them), blended in float32, local-sample sum in float32 or wider."""
    plus, local_sum, local_count = blend_cls_plus(teacher.cls, teacher.patch, teacher.patch_mask, teacher.local,
                                                  teacher.local_mask, alpha, teacher.cls.dtype)
    return UDITargets(teacher.cls, teacher.patch, teacher.patch_mask, plus, local_sum, local_count)


class UDILoss(nn.Module):
    """UDI's loss (UDI_SPEC §5): (L_cls + L_cls+ + L_patch) / 3 with three EMA centers.

    forward(student: UDIStudent, teacher: UDITeacher | UDITargets, epoch) -> (loss, parts), parts a dict of
    the detached 'cls', 'cls_plus' and 'patch' losses. L_cls and L_cls+ use the level weighting
    (2·L_global + 2L·L_local)/(2 + 2L); L_patch is Σ_valid CE / #valid samples on this rank (0 when none).
    cls_plus_target: 'logits' (the reference: blend logits, α = 0.5) or 'probabilities' (the paper: the same
    blend of the centered softmaxes; needs UDITeacher; the cls+ center still follows the logit blend).
    """

    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.07,
                 warmup_teacher_temp_epochs: int = 30, nepochs: int = 100, student_temp: float = 0.1,
                 center_momentum: float = 0.9, alpha: float = 0.5, cls_plus_target: str = "logits",
                 backend: Optional[str] = None):
        super().__init__()
        num_local = check_int(ncrops, "ncrops (two global crops, then the local ones)", 2) - 2
        _check_choice(cls_plus_target, "cls_plus_target", ("logits", "probabilities"))
        _check_backend(backend)
        self.out_dim, self.num_local = check_int(out_dim, "out_dim", 1), num_local
        self.student_temp = check_float(student_temp, "student_temp", 0.0, low_open=True)
        self.schedule = _check_schedule(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs)
        self.alpha, self.cls_plus_target, self.backend = check_float(alpha, "alpha", 0.0, 1.0), cls_plus_target, backend
        self.center_cls = EMACenter(out_dim, center_momentum, "center_momentum")
        self.center_cls_plus = EMACenter(out_dim, center_momentum, "center_momentum")
        self.center_patch = EMACenter(out_dim, center_momentum, "center_momentum")

    def teacher_temp(self, epoch: int) -> float:
        return teacher_temperature(epoch, *self.schedule)

    def cls_pairs(self, batch: int, device) -> PairTable:
        return pair_table("cls", self.num_local, batch, torch.device(device))

    def cls_plus_pairs(self, batch: int, device) -> PairTable:
        return pair_table("cls_plus", self.num_local, batch, torch.device(device))

    def forward(self, student: UDIStudent, teacher: Union[UDITeacher, UDITargets], epoch: int):
        tau_t = self.teacher_temp(epoch)
        B = self._check(student, teacher)
        targets = teacher if isinstance(teacher, UDITargets) else cls_plus_targets(teacher, self.alpha)
        device = targets.cls.device
        cls = self._loss(student.cls, targets.cls, self.center_cls, self.cls_pairs(B, device), tau_t)
        plus_rows, plus_weight = self._cls_plus_rows(teacher, targets, tau_t)
        cls_plus = self._loss(student.cls_plus, plus_rows, self.center_cls_plus, self.cls_plus_pairs(B, device),
                              tau_t, plus_weight)
        patch = self._patch_loss(student, targets, tau_t)
        self._update_centers(cls, cls_plus, patch, targets, plus_stats_from_op=plus_weight is None)
        parts = {"cls": cls.loss.detach(), "cls_plus": cls_plus.loss.detach(), "patch": patch.loss.detach()}
        return (cls.loss + cls_plus.loss + patch.loss) / 3, parts

    def _loss(self, student, teacher, center: EMACenter, table: PairTable, tau_t, row_weight=None):
        return _cross_entropy(student, teacher, center.center, table, self.student_temp, tau_t, self.backend,
                              row_weight)

    def _cls_plus_rows(self, teacher, targets: UDITargets, tau_t):
        """Teacher rows of the cls+ loss and their center weights (None: all 1)."""
        if self.cls_plus_target == "logits":
            return targets.cls_plus, None
        if not isinstance(teacher, UDITeacher):
            raise TypeError("cls_plus_target='probabilities' needs the teacher's sample logits (a UDITeacher)")
        probs = self._probability_targets(teacher, tau_t)
        # rows whose centered softmax is exactly `probs`; the center statistics come from the logit blend instead
        rows = tau_t * torch.log(probs.clamp_min(torch.finfo(torch.float32).tiny)) + self.center_cls_plus.center
        return rows, torch.zeros(rows.shape[0], device=rows.device)

    def _probability_targets(self, teacher: UDITeacher, tau_t):
        center = self.center_cls_plus.center
        softmax = lambda x: torch.softmax((x.float() - center) / tau_t, dim=-1)
        B = teacher.cls.shape[0] // 2
        cls = softmax(teacher.cls)
        mix = [self.alpha * masked_mean(softmax(teacher.patch), teacher.patch_mask)
               + (1 - self.alpha) * torch.cat([cls[B:], cls[:B]])]
        if teacher.local is not None and teacher.local.shape[0]:
            local_cls = cls.reshape(2, B, -1).repeat(teacher.local.shape[0] // (2 * B), 1, 1).reshape(-1, cls.shape[1])
            mix.append(self.alpha * masked_mean(softmax(teacher.local), teacher.local_mask)
                       + (1 - self.alpha) * local_cls)
        mix = torch.cat(mix)
        return mix / mix.sum(-1, keepdim=True)

    def _patch_loss(self, student: UDIStudent, targets: UDITargets, tau_t):
        K = targets.patch.shape[2]
        valid = targets.patch_mask.reshape(-1).float()
        return self._loss(student.patch.reshape(-1, K), targets.patch.reshape(-1, K), self.center_patch,
                          _identity_pairs(valid / valid.sum().clamp_min(1)), tau_t, valid)

    def _update_centers(self, cls, cls_plus, patch, targets: UDITargets, plus_stats_from_op: bool):
        with torch.no_grad():
            if plus_stats_from_op:
                plus_sum, plus_count = cls_plus.center_sum, cls_plus.center_count
            else:  # probability targets: the center still follows the logit blend
                plus = targets.cls_plus.float()
                plus_sum, plus_count = plus.sum(0, keepdim=True), plus.new_full((1,), plus.shape[0])
            update_centers([self.center_cls, self.center_cls_plus, self.center_patch],
                           [cls.center_sum, plus_sum, patch.center_sum + targets.extra_patch_sum],
                           [cls.center_count, plus_count, patch.center_count + targets.extra_patch_count])

    def _check(self, student: UDIStudent, teacher: Union[UDITeacher, UDITargets]) -> int:
        """Types, shapes, dtypes and devices of every input, named as in UDIStudent / UDITeacher / UDITargets;
        returns the batch size B."""
        if not isinstance(student, UDIStudent):
            raise TypeError(f"student must be a UDIStudent, got {type(student).__name__}")
        if not isinstance(teacher, (UDITeacher, UDITargets)):
            raise TypeError(f"teacher must be a UDITeacher or UDITargets, got {type(teacher).__name__}")
        if not isinstance(teacher.cls, Tensor):
            raise TypeError(f"teacher cls must be a torch.Tensor, got {type(teacher.cls).__name__}")
        K, L, B, device = self.out_dim, self.num_local, teacher.cls.shape[0] // 2, teacher.cls.device
        _check_rows(teacher.cls, "teacher cls", 2 * B, K, device)
        _check_rows(student.cls, "student cls", (2 + L) * B, K, device)
        _check_rows(student.cls_plus, "student cls_plus", (2 + L) * B, K, device)
        self._check_samples(teacher.patch, teacher.patch_mask, "teacher patch", "patch_mask", 2 * B, device)
        if not isinstance(student.patch, Tensor) or student.patch.shape != teacher.patch.shape:
            raise ValueError(f"student patch must have the shape of teacher patch {list(teacher.patch.shape)}, got "
                             f"{list(getattr(student.patch, 'shape', []))}")
        _check_logits(student.patch, "student patch", device)
        if isinstance(teacher, UDITargets):
            _check_rows(teacher.cls_plus, "teacher cls_plus targets", (2 + 2 * L) * B, K, device)
            for value, name, shape in ((teacher.extra_patch_sum, "extra_patch_sum", (K,)),
                                       (teacher.extra_patch_count, "extra_patch_count", ())):
                if not isinstance(value, Tensor) or value.shape != shape:
                    raise ValueError(f"{name} must be a tensor of shape {list(shape)}")
                _check_logits(value, name, device)
        elif L and B:
            self._check_samples(teacher.local, teacher.local_mask, "teacher local", "local_mask", 2 * L * B, device)
        _check_state_device(self, device)
        return B

    def _check_samples(self, samples, mask, name: str, mask_name: str, rows: int, device):
        """samples [rows, S, K] floating and mask [rows, S] bool."""
        if not isinstance(samples, Tensor) or samples.dim() != 3 or samples.shape[0] != rows or \
                samples.shape[2] != self.out_dim:
            got = list(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
            raise ValueError(f"{name} must have shape [{rows}, S, {self.out_dim}], got {got}")
        _check_logits(samples, name, device)
        _check_mask(mask, mask_name, samples.shape[:2], device)
