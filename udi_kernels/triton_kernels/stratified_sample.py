"""Stratified random sampling (UDI_SPEC §2) in Triton: one program per (image, pair).

Bit-identical to csrc/stratified_sample.h: the same Philox stream, correctly rounded division
(div_rn) and no FMA contraction (launched with enable_fp_fusion=False).

Shapes: boxes [B, 2 + L, 4] float32 -> the outputs of udi_kernels.reference.stratified_sample.output_shapes.
"""
import torch
import triton
import triton.language as tl

from ..reference.stratified_sample import output_shapes


@triton.jit
def _pattern_cells(sample, image, grid, window, seed, offset, stream):
    n = grid // window
    spare = grid - n * window
    zero = sample * 0
    x0, x1, _, _ = tl.philox(seed, sample, zero + image, zero + stream, zero + offset)
    _, _, first2, first3 = tl.philox(seed, zero, zero + image, zero + stream, zero + offset)
    w = (zero + window).to(tl.uint32)
    row = (first2 & 1).to(tl.int32) * spare + (sample // n) * window + (x0 % w).to(tl.int32)
    col = (first3 & 1).to(tl.int32) * spare + (sample % n) * window + (x1 % w).to(tl.int32)
    return row, col


@triton.jit
def _axis(cell, src_ptr, tgt_ptr, grid, target_grid):
    """Source position along one axis, whether it is strictly inside the target with a finite target coordinate
    (csrc/stratified_sample.h: NaN has no floor, min or int conversion every backend shares), and its taps."""
    s0 = tl.load(src_ptr)
    s1 = tl.load(src_ptr + 2)
    t0 = tl.load(tgt_ptr)
    t1 = tl.load(tgt_ptr + 2)
    frac = tl.math.div_rn(cell.to(tl.float32), (grid - 1).to(tl.float32))
    pos = s0 + frac * (s1 - s0)
    inside = (tl.minimum(t0, t1) < pos) & (pos < tl.maximum(t0, t1))
    t = tl.math.div_rn((pos - t0) * (target_grid - 1).to(tl.float32), t1 - t0)
    inside = inside & (tl.abs(t) < float("inf"))
    first = tl.minimum(tl.maximum(tl.floor(t), 0.0), (target_grid - 2).to(tl.float32))
    weight = tl.minimum(tl.maximum(t - first, 0.0), 1.0)
    return inside, first.to(tl.int32), weight


@triton.jit
def _store_pair(src_ptr, tgt_ptr, weight_ptr, count_ptr, slot, dest, in_range, is_valid, src_index, taps, kept,
                num_samples):
    out = slot * num_samples + dest
    tl.store(src_ptr + out, tl.where(is_valid, src_index, 0), mask=in_range)
    for t in tl.static_range(4):
        tl.store(tgt_ptr + out * 4 + t, tl.where(is_valid, taps[t][0], 0), mask=in_range)
        tl.store(weight_ptr + out * 4 + t, tl.where(is_valid, taps[t][1], 0.0), mask=in_range)
    tl.store(count_ptr + slot, kept)


@triton.jit
def _stratified_sample_kernel(boxes_ptr, g_src, g_tgt, g_weight, g_count, l_src, l_tgt, l_weight, l_count, num_crops,
                              global_grid, global_window, local_grid, local_window, target_grid, seed, offset,
                              image_offset, BLOCK: tl.constexpr):
    image = tl.program_id(0)
    pair = tl.program_id(1)  # 0 = g0->g1, 1 = g1->g0, then 2 + 2l = l->g1, 3 + 2l = l->g0
    is_local = pair >= 2
    local_pair = pair - 2
    src_crop = tl.where(is_local, 2 + local_pair // 2, pair)
    tgt_crop = 1 - pair % 2
    grid = tl.where(is_local, local_grid, global_grid)
    window = tl.where(is_local, local_window, global_window)
    n = grid // window
    num_samples = n * n
    sample = tl.arange(0, BLOCK)
    in_range = sample < num_samples
    # the Philox word of the image, modulo 2**32 (both int32 bit patterns of uint32 words)
    row, col = _pattern_cells(sample, image + image_offset, grid, window, seed, offset, is_local.to(tl.int32))

    image_boxes = boxes_ptr + image.to(tl.int64) * num_crops * 4
    inside_i, first_i, ri = _axis(row, image_boxes + src_crop * 4, image_boxes + tgt_crop * 4, grid, target_grid)
    inside_j, first_j, rj = _axis(col, image_boxes + src_crop * 4 + 1, image_boxes + tgt_crop * 4 + 1, grid,
                                  target_grid)
    valid = (inside_i & inside_j & in_range).to(tl.int32)
    kept = tl.sum(valid, 0)
    padding = (1 - valid) * in_range.to(tl.int32)
    dest = tl.where(valid == 1, tl.cumsum(valid, 0) - 1, kept + tl.cumsum(padding, 0) - 1)
    is_valid = valid == 1

    qi = 1.0 - ri
    qj = 1.0 - rj
    top_left = first_i * target_grid + first_j
    taps = ((top_left, qi * qj), (top_left + 1, qi * rj), (top_left + target_grid, ri * qj),
            (top_left + target_grid + 1, ri * rj))
    src_index = row * grid + col
    if is_local:
        slot = image.to(tl.int64) * (2 * (num_crops - 2)) + local_pair
        _store_pair(l_src, l_tgt, l_weight, l_count, slot, dest, in_range, is_valid, src_index, taps, kept,
                    num_samples)
    else:
        slot = image.to(tl.int64) * 2 + pair
        _store_pair(g_src, g_tgt, g_weight, g_count, slot, dest, in_range, is_valid, src_index, taps, kept,
                    num_samples)


def as_int32_bits(word: int) -> int:
    """A uint32 counter word as the int32 with the same bits: Triton passes ints from 2**31 as 64-bit values, which
    tl.philox cannot take as 32-bit counters."""
    return word - 2**32 if word >= 2**31 else word


def stratified_sample(boxes, global_grid, global_window, local_grid, local_window, target_grid, seed, offset,
                      image_offset):
    """Same contract as udi_kernels.stratified_sample (arguments already checked); returns 8 tensors."""
    B, L = boxes.shape[0], boxes.shape[1] - 2
    outputs = [torch.empty(shape, dtype=dtype, device=boxes.device)
               for shape, dtype in output_shapes(B, L, global_grid, global_window, local_grid, local_window)]
    globals_, locals_ = outputs[:4], outputs[4:]
    Sg, Sl = globals_[0].shape[-1], locals_[0].shape[-1]
    if B > 0:
        _stratified_sample_kernel[(B, 2 + 2 * L)](boxes, *globals_, *locals_, 2 + L, global_grid, global_window,
                                                  local_grid, local_window, target_grid, seed, as_int32_bits(offset),
                                                  as_int32_bits(image_offset),
                                                  BLOCK=triton.next_power_of_2(max(Sg, Sl)), enable_fp_fusion=False)
    return (*globals_, *locals_)
