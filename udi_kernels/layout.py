"""The row layouts of a UDI batch, from the data loader to the loss rows, and the UDI loss's input types.

A batch holds B images (per process), each cut into 2 global crops (crops 0 and 1) and L local crops (crops
2 .. 1 + L); K is the head's output size, Sg / Sl the samples of a global / local pair. One crop's way through the
package (UDI_SPEC §1, §2, §5), with the function of this module that does each step:

1. Data loader (udi.data.collate_multicrop): `views`, a list of 2 + L tensors [B, 3, s, s] (one per crop), and
   `boxes` [B, 2 + L, 4], image-major: boxes[b, c] is crop c of image b, (i0, j0, i1, j1) as in UDI_SPEC §1.
2. Crop-major rows. The networks see the crops of a level stacked crop after crop, as in DINO: row `c * B + b`
   is crop c of image b (`stack_crops(views)`: global crops [2B, ...], local crops [LB, ...]). Whatever exists per
   image ([B, n, ...]) becomes rows the same way (`crop_major`).
3. SRS pairs. udi.step.sample_pairs runs `udi_kernels.stratified_sample(boxes)` (on the boxes of the pixels the
   patch grid sees) and keeps this process's B images: SampledPairs, image-major, `globals` [B, 2] and `locals`
   [B, L, 2] PairTaps. Pair p (global or local) has the target global crop `pair_target(p) = 1 - p`: global pair
   p goes from global crop p to global crop 1 - p; local pair p of local crop l goes from l to global crop 1 - p
   (l -> g1 first, then l -> g0). Each pair holds S samples, valid ones first, then padding.
4. The loss's crop pairs (`udi_crop_pairs(L)`), numbered k:
     k = v            student global crop v against teacher global crop 1 - v (v = 0, 1), the global level;
     k = 2 + 2l + g   student local crop l (student crop 2 + l) against teacher global crop g, the local level.
   Every teacher tensor that exists per crop pair has row block k, rows `k * B + b`: UDITeacher.patch (k < 2),
   UDITeacher.local (block k - 2), UDITargets.cls_plus (every k). The loss orders a local crop's pairs by
   target crop g, the sampler by pair p = 1 - g: hence the flips of `local_pairs_by_target` and
   `split_teacher_samples`.
5. Taps, the same way for both networks. `student_taps(pairs)` -> StudentTaps: the student samples its global
   crops at the source cells of the global pairs (rows v * B + b, student global crop v = pair v's source, one
   tap each); UDIModel.forward(global crops, local crops, StudentTaps). `teacher_taps(pairs)` -> TeacherTaps: the
   teacher answers every pair on its target crop with 4 bilinear taps, running its SRS attention once per teacher
   crop for all the sample sets that target it: row block p of its input is teacher crop 1 - p
   (`teacher_rows_by_pair` of the crop-major rows), with global pair p's Sg samples first, then each local crop's
   Sl samples of pair p; UDIModel.teacher_bottleneck(global crops, TeacherTaps).
6. Outputs. The student returns UDIStudent (crop-major cls / cls_plus rows, patch rows by global pair). The
   teacher's rows by pair become UDITeacher's rows by crop pair k (`split_teacher_samples`); the targets are
   formed from them in one place, udi_kernels.losses.cls_plus_targets (in the head's bottleneck for udi.step),
   giving UDITargets.
7. Loss rows. cls: student crop `pair.student` against teacher cls block `pair.teacher`; cls+: student crop
   `pair.student` against UDITargets.cls_plus block k; patch: student patch row r against teacher patch row r.
   DINO scores `dino_crop_pairs`. udi_kernels.losses.pair_tables turns crop pairs into row pairs
   (block * B + b) and caches them.

The reference code's layout (udi_kernels.compat.UDILoss, UDI_SPEC §9) differs in two ways: its teacher rows of the
global crops come by pair ([crop 1; crop 0], `teacher_rows_by_pair`), so that student global row r meets teacher
row r; and each level is a tensor of its own (student global [2B] and local [LB] rows, crops counted from 0 in
each). Its teacher local samples [L, 2B, Sl] are local crop l's on teacher block j (teacher crop 1 - j), and its
local cls+ targets have block 2l + j: `reference_crop_pairs(L)`.
"""
import functools
from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from .ops.stratified_sample import SampledPairs
from .taps import one_hot_taps

GLOBAL_CROPS = 2


# ---- crop pairs --------------------------------------------------------------------------------------------------

class CropPair(NamedTuple):
    """A student row block scored against a teacher row block: row b of the one against row b of the other."""
    student: int
    teacher: int


def pair_target(pair: int) -> int:
    """The target global crop of SRS pair `pair` (global or local): 1 - pair."""
    return 1 - pair


@functools.cache
def udi_crop_pairs(num_local: int) -> tuple:
    """UDI's crop pairs by level, (global pairs, local pairs), numbered k in this order (module docstring, 4):
    global (v, 1 - v) for v = 0, 1; local (2 + l, g) for each local crop l and teacher global crop g = 0, 1."""
    global_pairs = tuple(CropPair(v, pair_target(v)) for v in range(GLOBAL_CROPS))
    local_pairs = tuple(CropPair(GLOBAL_CROPS + l, g) for l in range(num_local) for g in range(GLOBAL_CROPS))
    return global_pairs, local_pairs


@functools.cache
def dino_crop_pairs(student_crops: int, teacher_crops: int = GLOBAL_CROPS) -> tuple:
    """DINO's crop pairs: every teacher crop t against every student crop s != t, teacher crop after teacher crop
    (DINO's main_dino.py loop order)."""
    return tuple(CropPair(s, t) for t in range(teacher_crops) for s in range(student_crops) if s != t)


@functools.cache
def reference_crop_pairs(num_local: int) -> tuple:
    """The reference code's crop pairs (module docstring, last paragraph): (global, local cls, local cls+).
    Global: student global crop v against teacher block v (teacher crop 1 - v); local cls: local crop l against
    teacher block j; local cls+: local crop l against its cls+ targets on teacher block j, block 2l + j."""
    global_pairs = tuple(CropPair(v, v) for v in range(GLOBAL_CROPS))
    local_cls = tuple(CropPair(l, j) for l in range(num_local) for j in range(GLOBAL_CROPS))
    local_cls_plus = tuple(CropPair(l, GLOBAL_CROPS * l + j) for l in range(num_local) for j in range(GLOBAL_CROPS))
    return global_pairs, local_cls, local_cls_plus


# ---- index maps on tensors ---------------------------------------------------------------------------------------

def stack_crops(views: Sequence[Tensor]):
    """The data loader's 2 + L views [B, ...] -> (global crops [2B, ...], local crops [LB, ...] or None when L = 0),
    crop-major."""
    local_crops = torch.cat(list(views[GLOBAL_CROPS:])) if len(views) > GLOBAL_CROPS else None
    return torch.cat(list(views[:GLOBAL_CROPS])), local_crops


def crop_major(per_image: Tensor) -> Tensor:
    """[B, n, ...] (n crops or pairs per image) -> [n * B, ...], row c * B + b."""
    return per_image.transpose(0, 1).flatten(0, 1)


def teacher_rows_by_pair(rows: Tensor) -> Tensor:
    """[2B, ...] teacher rows of the global crops, crop-major -> [2B, ...] with row block p = teacher crop
    pair_target(p), the crop that answers pair p ([crop 1; crop 0], the reference's teacher order)."""
    return rows.unflatten(0, (GLOBAL_CROPS, rows.shape[0] // GLOBAL_CROPS)).flip(0).flatten(0, 1)


def teacher_rows_by_local_pair(rows: Tensor, num_local: int) -> Tensor:
    """[2B, ...] teacher rows of the global crops, crop-major -> [2LB, ...] in UDITeacher.local's order: row
    (2l + g) * B + b holds rows[g * B + b], the teacher crop g that local crop l's pair is scored against."""
    return rows.repeat(num_local, *(1,) * (rows.dim() - 1))


def local_pairs_by_target(per_image: Tensor) -> Tensor:
    """[B, L, 2, ...] SRS local pairs (pair p of local crop l of image b) -> [2LB, ...], row (2l + g) * B + b for
    target crop g = pair_target(p)."""
    return per_image.flip(2).permute(1, 2, 0, *range(3, per_image.dim())).flatten(0, 2)


def sample_mask(count: Tensor, num_samples: int) -> Tensor:
    """count [...] valid samples of each pair -> mask [..., num_samples] bool (valid samples come first)."""
    return torch.arange(num_samples, device=count.device) < count[..., None]


class StudentTaps(NamedTuple):
    """The student's SRS samples of its global crops, crop-major (row v * B + b: global crop v, the source of
    global pair v): one tap each, its source cell."""
    index: Tensor   # [2B, Sg, 1] int32, cells of the crop's grid
    weight: Tensor  # [2B, Sg, 1] float32: 1 for valid samples, 0 for padding


class TeacherTaps(NamedTuple):
    """The teacher's taps of every pair's samples on the pair's target crop, row p * B + b by pair (its input is
    teacher_rows_by_pair of the crop-major rows), and the valid-sample masks in UDITeacher's order."""
    index: Tensor        # [2B, Sg + L * Sl, 4] int32: global pair p's samples, then local crop l's at Sg + l * Sl
    weight: Tensor       # [2B, Sg + L * Sl, 4] float32 bilinear weights (0 for padding)
    global_mask: Tensor  # [2B, Sg] bool, row v * B + b (UDITeacher.patch_mask)
    local_mask: Tensor   # [2LB, Sl] bool, row (2l + g) * B + b (UDITeacher.local_mask)


def student_taps(pairs: SampledPairs) -> StudentTaps:
    """The student's taps of a batch's SampledPairs."""
    globals_ = pairs.globals
    return StudentTaps(*one_hot_taps(crop_major(globals_.src_index), crop_major(globals_.count)))


def teacher_taps(pairs: SampledPairs) -> TeacherTaps:
    """The teacher's taps of a batch's SampledPairs."""
    globals_, locals_ = pairs.globals, pairs.locals
    B, L, _, Sl = locals_.src_index.shape

    def by_pair(global_taps, local_taps):  # [B, 2, Sg, T], [B, L, 2, Sl, T] -> [2B, Sg + L * Sl, T]
        local_taps = local_taps.permute(2, 0, 1, 3, 4).reshape(GLOBAL_CROPS, B, L * Sl, local_taps.shape[-1])
        return torch.cat([global_taps.transpose(0, 1), local_taps], 2).flatten(0, 1)

    return TeacherTaps(by_pair(globals_.tgt_index, locals_.tgt_index),
                       by_pair(globals_.tgt_weight, locals_.tgt_weight),
                       sample_mask(crop_major(globals_.count), globals_.src_index.shape[-1]),
                       sample_mask(local_pairs_by_target(locals_.count), Sl))


def split_teacher_samples(rows: Tensor, taps: TeacherTaps):
    """The teacher's outputs at its taps, rows [2B, Sg + L * Sl, D] in TeacherTaps' order (by pair) -> UDITeacher's
    sample fields (patch [2B, Sg, D], patch_mask [2B, Sg], local [2LB, Sl, D], local_mask [2LB, Sl]): patch row
    v * B + b holds global pair v's samples; local row (2l + g) * B + b local crop l's samples on teacher crop g
    (pair p = 1 - g), as local_pairs_by_target orders the masks. D is any width: logits or bottleneck vectors."""
    global_samples, local_samples = taps.global_mask.shape[-1], taps.local_mask.shape[-1]
    local = rows[:, global_samples:]
    pair_rows = local.unflatten(0, (GLOBAL_CROPS, rows.shape[0] // GLOBAL_CROPS))
    num_local = local.shape[1] // local_samples
    local = pair_rows.unflatten(2, (num_local, local_samples)).flip(0).permute(2, 0, 1, 3, 4).flatten(0, 2)
    return rows[:, :global_samples], taps.global_mask, local, taps.local_mask


# ---- the UDI loss's inputs ---------------------------------------------------------------------------------------

class UDIStudent(NamedTuple):
    """The student's head outputs for one batch of B images with 2 global and L local crops.

    cls      [(2 + L)·B, K]  crop-major (global 0, global 1, local 0 .. L-1), row c·B + b
    cls_plus [(2 + L)·B, K]  the extra [CLS+] token, same order
    patch    [2·B, Sg, K]    row v·B + b: global crop v's SRS samples (global pair v, v → 1−v), valid samples first
    """
    cls: Tensor
    cls_plus: Tensor
    patch: Tensor


class UDITeacher(NamedTuple):
    """The teacher's logits (global crops only); rows by crop pair k (udi_crop_pairs).

    cls         [2·B, K]      crop-major, row c·B + b
    patch       [2·B, Sg, K]  row v·B + b, sample s: the teacher's logits (on global crop 1−v) at the target of
                              student sample (v, b, s) (crop pair k = v)
    patch_mask  [2·B, Sg] bool  valid samples
    local       [2·L·B, Sl, K]  row (2l + g)·B + b, sample s: teacher logits on global crop g at local crop l's
                                sample s (crop pair k = 2 + 2l + g), or None when L = 0
    local_mask  [2·L·B, Sl] bool
    cls_plus_targets(teacher, last_layer=...) takes the same rows in the head's bottleneck ([..., D], not K).
    """
    cls: Tensor
    patch: Tensor
    patch_mask: Tensor
    local: Optional[Tensor] = None
    local_mask: Optional[Tensor] = None


class UDITargets(NamedTuple):
    """What UDILoss needs from the teacher; can be formed in the 256-d bottleneck and projected (UDI_SPEC §6).

    cls [2·B, K]; patch [2·B, Sg, K] and patch_mask [2·B, Sg] as in UDITeacher;
    cls_plus [2·B + 2·L·B, K]: row block k = crop pair k, the targets of student crop udi_crop_pairs' `student`
      (rows v·B + b for student global v, then 2B + (2l + g)·B + b for local crop l against teacher global g);
    extra_patch_sum [K], extra_patch_count []: the sum and count of the valid local-sample teacher rows, which
      join the patch center statistics.
    """
    cls: Tensor
    patch: Tensor
    patch_mask: Tensor
    cls_plus: Tensor
    extra_patch_sum: Tensor
    extra_patch_count: Tensor
