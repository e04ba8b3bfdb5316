"""udi_kernels.layout: every index map against the pair / crop it names, written out from UDI_SPEC §2, §5."""
import pytest
import torch

from udi_kernels import SampledPairs, stratified_sample
from udi_kernels.layout import (StudentTaps, crop_major, dino_crop_pairs, local_pairs_by_target, pair_target,
                                reference_crop_pairs, split_teacher_samples, stack_crops, student_taps,
                                teacher_rows_by_local_pair, teacher_rows_by_pair, teacher_taps, udi_crop_pairs)


def random_pairs(B, L, seed=0) -> SampledPairs:
    """SampledPairs of B images with L local crops, from random boxes (global 14/3, local 6/2 grids)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.rand(B, 2 + L, 2, generator=g) * 0.4
    boxes = torch.cat([start, start + 0.3 + torch.rand(B, 2 + L, 2, generator=g) * 0.3], -1)
    return stratified_sample(boxes, global_grid=14, global_window=3, local_grid=6, local_window=2, target_grid=14,
                             seed=seed)


@pytest.mark.parametrize("B,L", [(3, 2), (2, 0), (1, 3)])
def test_taps_and_sample_rows_follow_the_pairs(B, L):
    pairs = random_pairs(B, L)
    Sg, Sl = pairs.globals.src_index.shape[-1], pairs.locals.src_index.shape[-1]
    student, teacher = student_taps(pairs), teacher_taps(pairs)
    assert isinstance(student, StudentTaps) and student.index.shape == (2 * B, Sg, 1)
    # rows of the teacher's sample outputs: here the taps themselves, so each row names its pair and sample
    patch, patch_mask, local, local_mask = split_teacher_samples(teacher.index, teacher)
    assert local.shape == (2 * L * B, Sl, 4) and local_mask.shape == (2 * L * B, Sl)
    for b in range(B):
        for v in range(2):  # student global crop v = global pair v's source; its targets on teacher crop 1 - v
            row = v * B + b
            count = int(pairs.globals.count[b, v])
            assert torch.equal(student.index[row, :, 0], pairs.globals.src_index[b, v])
            assert torch.equal(student.weight[row, :, 0], (torch.arange(Sg) < count).float())
            assert torch.equal(patch[row], pairs.globals.tgt_index[b, v])
            assert torch.equal(patch_mask[row], torch.arange(Sg) < count)
            # the teacher's input row block p is teacher crop 1 - p, the target of pair p
            assert torch.equal(teacher.index[v * B + b, :Sg], pairs.globals.tgt_index[b, v])
        for l in range(L):
            for g in range(2):  # crop pair k = 2 + 2l + g: local crop l against teacher crop g, SRS pair 1 - g
                row, p = (2 * l + g) * B + b, 1 - g
                assert pair_target(p) == g
                assert torch.equal(local[row], pairs.locals.tgt_index[b, l, p])
                assert torch.equal(local_mask[row], torch.arange(Sl) < pairs.locals.count[b, l, p])
                assert torch.equal(teacher.index[p * B + b, Sg + l * Sl:Sg + (l + 1) * Sl],
                                   pairs.locals.tgt_index[b, l, p])
    assert torch.equal(local_pairs_by_target(pairs.locals.count), local_mask.sum(1).int())


def test_crop_major_rows():
    B, L = 3, 2
    views = [torch.full((B, 1), float(c)) + torch.arange(B)[:, None] / 10 for c in range(2 + L)]
    global_crops, local_crops = stack_crops(views)
    for c in range(2 + L):
        for b in range(B):
            rows = global_crops if c < 2 else local_crops
            assert rows[(c % 2 if c < 2 else c - 2) * B + b, 0] == c + b / 10
    assert stack_crops(views[:2])[1] is None
    per_image = torch.arange(B * 4).reshape(B, 4)  # [B, n]: entry (b, c) = 4b + c
    assert crop_major(per_image).tolist() == [4 * b + c for c in range(4) for b in range(B)]
    rows = torch.arange(2 * B)
    assert teacher_rows_by_pair(rows).tolist() == [*range(B, 2 * B), *range(B)]
    # local row (2l + g) * B + b is scored against teacher crop g (UDITeacher.local)
    assert teacher_rows_by_local_pair(rows, L).tolist() == [g * B + b for l in range(L) for g in range(2)
                                                            for b in range(B)]


def test_crop_pairs():
    global_pairs, local_pairs = udi_crop_pairs(2)
    assert [tuple(p) for p in global_pairs] == [(0, 1), (1, 0)]
    assert [tuple(p) for p in local_pairs] == [(2, 0), (2, 1), (3, 0), (3, 1)]
    assert udi_crop_pairs(0)[1] == ()
    assert [tuple(p) for p in dino_crop_pairs(3)] == [(1, 0), (2, 0), (0, 1), (2, 1)]
    ref_global, ref_local_cls, ref_local_plus = reference_crop_pairs(2)
    assert [tuple(p) for p in ref_global] == [(0, 0), (1, 1)]
    assert [tuple(p) for p in ref_local_cls] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [tuple(p) for p in ref_local_plus] == [(0, 0), (0, 1), (1, 2), (1, 3)]
