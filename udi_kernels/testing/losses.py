"""The UDI loss written out eagerly, crop pair by crop pair, and random UDI loss inputs, for tests and benchmarks.

`udi_loss_eager` follows UDI_SPEC §5 the reference's way (one cross-entropy per crop pair, materialised targets and
probabilities); in float64 it is the tests' reference for udi_kernels.losses.UDILoss, in float32 the benchmarks'
eager baseline. The crop pairs are udi_kernels.layout's (udi_crop_pairs): pair k = student crop `pair.student`
against teacher global crop `pair.teacher`, teacher sample rows by pair.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layout import GLOBAL_CROPS, UDIStudent, UDITeacher, udi_crop_pairs


def cross_entropy_rows(teacher: Tensor, student: Tensor, center: Tensor, tau_t: float, tau_s: float = 0.1) -> Tensor:
    """CE(softmax((t − c)/τt), log_softmax(s/τs)) per row: teacher, student [..., K], center [1, K] -> [...]."""
    return torch.sum(-F.softmax((teacher - center) / tau_t, -1) * F.log_softmax(student / tau_s, -1), -1)


def random_udi_inputs(B: int, L: int, K: int, Sg: int, Sl: int, *, dtype: torch.dtype = torch.float32,
                      device="cpu", seed: Optional[int] = 0, valid_fraction: float = 0.6,
                      all_masked_patches: bool = False):
    """(UDIStudent, UDITeacher) of N(0, 1) logits in `dtype` for B images, L local crops, K outputs, Sg global and
    Sl local samples per pair; student tensors require grad. A sample is valid with probability valid_fraction;
    the first local pair has no valid sample (all_masked_patches: no global one either). seed None: the global
    generator."""
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    new = lambda *shape: torch.randn(*shape, generator=generator, device=device, dtype=dtype)  # noqa: E731
    valid = lambda *shape: torch.rand(*shape, generator=generator, device=device) < valid_fraction  # noqa: E731
    student = UDIStudent(new((2 + L) * B, K).requires_grad_(), new((2 + L) * B, K).requires_grad_(),
                         new(2 * B, Sg, K).requires_grad_())
    patch_mask = valid(2 * B, Sg)
    if all_masked_patches:
        patch_mask[:] = False
    local_mask = valid(2 * L * B, Sl)
    local_mask[:1] = False
    teacher = UDITeacher(new(2 * B, K), new(2 * B, Sg, K), patch_mask, new(2 * L * B, Sl, K), local_mask)
    return student, teacher


def _by_crop(rows: Tensor, crops: int, dtype: torch.dtype) -> Tensor:
    """Crop-major rows [crops * B, ...] -> [crops, B, ...] in dtype."""
    return rows.to(dtype).unflatten(0, (crops, rows.shape[0] // crops))


class _EagerTeacher:
    """The teacher's cls rows by crop ([2, B, K]) and its cls+ targets by crop pair ([B, K] each), in one dtype."""

    def __init__(self, teacher: UDITeacher, num_local: int, alpha: float, dtype: torch.dtype):
        self.pairs = sum(udi_crop_pairs(num_local), ())
        self.cls = _by_crop(teacher.cls, GLOBAL_CROPS, dtype)
        self.cls_plus = [alpha * masked_mean + (1 - alpha) * self.cls[pair.teacher]
                         for pair, masked_mean in zip(self.pairs, self._masked_means(teacher, num_local, dtype))]

    def _masked_means(self, teacher, num_local, dtype):
        """Σ_s m_s T_s / (Σ_s m_s + 1e-5) of each crop pair's samples, [B, K] each."""
        blocks = [(_by_crop(teacher.patch, GLOBAL_CROPS, dtype), _by_crop(teacher.patch_mask, GLOBAL_CROPS, dtype))]
        if num_local:
            blocks.append((_by_crop(teacher.local, 2 * num_local, dtype),
                           _by_crop(teacher.local_mask, 2 * num_local, dtype)))
        return [(mask[k][..., None] * samples[k]).sum(-2) / (mask[k].sum(-1)[..., None] + 1e-5)
                for samples, mask in blocks for k in range(samples.shape[0])]


def udi_loss_eager(student: UDIStudent, teacher: UDITeacher, centers: Sequence[Tensor], tau_t: float,
                   alpha: float = 0.5, tau_s: float = 0.1, dtype: torch.dtype = torch.float64):
    """UDI_SPEC §5 crop pair by crop pair in `dtype`: (loss, parts {'cls', 'cls_plus', 'patch'}).

    centers (c_cls, c_cls_plus, c_patch) [1, K]; teacher.local may be None when L = 0. L_cls and L_cls+ weigh
    the global level (2 pairs) and the local level (2L pairs) as (2·L_global + 2L·L_local)/(2 + 2L), each a mean
    over its pairs; L_patch = Σ_valid CE / max(#valid, 1) over the global samples."""
    B = teacher.cls.shape[0] // GLOBAL_CROPS
    L = student.cls.shape[0] // B - GLOBAL_CROPS
    c_cls, c_plus, c_patch = (c.to(dtype) for c in centers)
    eager = _EagerTeacher(teacher, L, alpha, dtype)
    s_cls, s_plus = _by_crop(student.cls, 2 + L, dtype), _by_crop(student.cls_plus, 2 + L, dtype)

    def level_weighted(student_rows, targets, center):
        terms = [cross_entropy_rows(target, student_rows[pair.student], center, tau_t, tau_s).mean()
                 for pair, target in zip(eager.pairs, targets)]
        global_loss = sum(terms[:GLOBAL_CROPS]) / GLOBAL_CROPS
        if L == 0:
            return global_loss
        local_loss = sum(terms[GLOBAL_CROPS:]) / (2 * L)
        return (2 * global_loss + 2 * L * local_loss) / (2 + 2 * L)

    loss_cls = level_weighted(s_cls, [eager.cls[pair.teacher] for pair in eager.pairs], c_cls)
    loss_plus = level_weighted(s_plus, eager.cls_plus, c_plus)
    mask = teacher.patch_mask.to(dtype)
    ce_patch = cross_entropy_rows(teacher.patch.to(dtype), student.patch.to(dtype), c_patch, tau_t, tau_s)
    loss_patch = (ce_patch * mask).sum() / mask.sum().clamp(min=1)
    parts = {"cls": loss_cls, "cls_plus": loss_plus, "patch": loss_patch}
    return (loss_cls + loss_plus + loss_patch) / 3, parts


def udi_centers_eager(teacher: UDITeacher, centers: Sequence[Tensor], alpha: float = 0.5, momentum: float = 0.9,
                      dtype: torch.dtype = torch.float64):
    """The centers after one UDILoss step (UDI_SPEC §5), in `dtype`: cls over the 2B teacher cls rows, cls+ over
    every crop pair's blended targets, patch over every valid sample, global and local; a center without rows
    keeps its value. c ← m·c + (1 − m)·mean."""
    B = teacher.cls.shape[0] // GLOBAL_CROPS
    L = 0 if teacher.local is None or B == 0 else teacher.local.shape[0] // (2 * B)
    eager = _EagerTeacher(teacher, L, alpha, dtype)
    samples, masks = [teacher.patch.to(dtype)], [teacher.patch_mask.to(dtype)]
    if L:
        samples.append(teacher.local.to(dtype))
        masks.append(teacher.local_mask.to(dtype))
    patch_sum = sum((s * m[..., None]).sum((0, 1)) for s, m in zip(samples, masks))
    patch_count = sum(m.sum() for m in masks).item()
    means = [(eager.cls.flatten(0, 1).mean(0), 1), (torch.cat(eager.cls_plus).mean(0), 1),
             (patch_sum / max(patch_count, 1), patch_count)]
    return tuple(c.to(dtype) if count == 0 else momentum * c.to(dtype) + (1 - momentum) * mean[None]
                 for c, (mean, count) in zip(centers, means))
