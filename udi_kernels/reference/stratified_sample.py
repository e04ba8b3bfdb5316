"""Stratified random sampling (UDI_SPEC §2) in eager PyTorch, bit-identical to the kernels.

Every float op is a separate full-tensor op on the boxes' device, in the order of
csrc/stratified_sample.h, so that no FMA contraction or scalar-reciprocal shortcut changes a bit.
"""
import torch

from .philox import philox4x32


def pattern_cells(num_images: int, grid: int, window: int, seed: int, offset: int, stream: int, device,
                  image_offset: int = 0):
    """Row and column [B, n*n] of each image's sampled cells (n = grid // window); image b draws as global image
    image_offset + b."""
    n = grid // window
    spare = grid - n * window
    sample = torch.arange(n * n, device=device)
    image = torch.arange(image_offset, image_offset + num_images, device=device)[:, None]
    x0, x1, _, _ = philox4x32(seed, sample, image, stream, offset)
    _, _, first2, first3 = philox4x32(seed, 0, image, stream, offset)
    row = (first2 & 1) * spare + (sample // n) * window + x0 % window
    col = (first3 & 1) * spare + (sample % n) * window + x1 % window
    return row, col


def output_shapes(batch: int, num_local: int, global_grid: int, global_window: int, local_grid: int,
                  local_window: int) -> tuple:
    """(shape, dtype) of the 8 outputs of every backend: PairTaps [B, 2, Sg] of the global pairs, then PairTaps
    [B, L, 2, Sl] of the local ones (src_index, tgt_index, tgt_weight, count), S = (grid // window)**2."""
    def pair_taps(lead: tuple, samples: int):
        return (((*lead, samples), torch.int32), ((*lead, samples, 4), torch.int32),
                ((*lead, samples, 4), torch.float32), (lead, torch.int32))
    return (*pair_taps((batch, 2), (global_grid // global_window) ** 2),
            *pair_taps((batch, num_local, 2), (local_grid // local_window) ** 2))


def _full(like: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full_like(like, value)


def _cell_position(edge0, edge1, cell, grid):
    frac = cell.to(torch.float32) / _full(edge0, grid - 1)
    return edge0 + frac * (edge1 - edge0)


def _strictly_inside(pos, edge0, edge1):
    return (torch.minimum(edge0, edge1) < pos) & (pos < torch.maximum(edge0, edge1))


def _axis_taps(pos, edge0, edge1, grid):
    """(first, frac, finite): the taps along one axis, and whether the target coordinate is finite (a sample
    counts only then, as in csrc/stratified_sample.h)."""
    t = ((pos - edge0) * _full(pos, grid - 1)) / (edge1 - edge0)
    finite = t.abs() < torch.inf
    t = torch.where(finite, t, 0)  # the taps of such samples are discarded
    first = torch.floor(t).clamp(0, grid - 2)
    frac = (t - first).clamp(0, 1)
    return first.to(torch.int32), frac, finite


def _sample_pairs(src_boxes, tgt_boxes, row, col, grid, target_grid):
    """Taps of every pair. src/tgt_boxes [B, P, 4], row/col [B, 1, S] -> packed [B, P, S, ...]."""
    src = [src_boxes[..., k, None].expand(*src_boxes.shape[:2], row.shape[-1]) for k in range(4)]
    tgt = [tgt_boxes[..., k, None].expand_as(src[0]) for k in range(4)]
    row, col = row.expand_as(src[0]), col.expand_as(src[0])
    pos_i = _cell_position(src[0], src[2], row, grid)
    pos_j = _cell_position(src[1], src[3], col, grid)
    first_i, ri, finite_i = _axis_taps(pos_i, tgt[0], tgt[2], target_grid)
    first_j, rj, finite_j = _axis_taps(pos_j, tgt[1], tgt[3], target_grid)
    valid = _strictly_inside(pos_i, tgt[0], tgt[2]) & _strictly_inside(pos_j, tgt[1], tgt[3]) & finite_i & finite_j
    qi, qj = 1 - ri, 1 - rj
    top_left = first_i * target_grid + first_j
    tgt_index = torch.stack([top_left, top_left + 1, top_left + target_grid, top_left + target_grid + 1], -1)
    tgt_weight = torch.stack([qi * qj, qi * rj, ri * qj, ri * rj], -1)
    src_index = (row * grid + col).to(torch.int32)

    order = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices
    valid = valid.gather(-1, order)
    src_index = torch.where(valid, src_index.gather(-1, order), 0)
    order4 = order[..., None].expand(*order.shape, 4)
    tgt_index = torch.where(valid[..., None], tgt_index.gather(-2, order4), 0)
    tgt_weight = torch.where(valid[..., None], tgt_weight.gather(-2, order4), 0.0)
    return src_index, tgt_index.to(torch.int32), tgt_weight, valid.sum(-1, dtype=torch.int32)


def stratified_sample(boxes, global_grid, global_window, local_grid, local_window, target_grid, seed, offset,
                      image_offset):
    """Same contract as udi_kernels.stratified_sample (arguments already checked); returns 8 tensors."""
    B, L = boxes.shape[0], boxes.shape[1] - 2
    row, col = pattern_cells(B, global_grid, global_window, seed, offset, 0, boxes.device, image_offset)
    globals_ = _sample_pairs(boxes[:, [0, 1]], boxes[:, [1, 0]], row[:, None], col[:, None], global_grid, target_grid)

    row, col = pattern_cells(B, local_grid, local_window, seed, offset, 1, boxes.device, image_offset)
    local_boxes = boxes[:, 2:, None, :].expand(B, L, 2, 4).reshape(B, 2 * L, 4)
    targets = boxes[:, [1, 0]].repeat(1, L, 1)
    locals_ = _sample_pairs(local_boxes, targets, row[:, None], col[:, None], local_grid, target_grid)
    locals_ = tuple(t.reshape(B, L, 2, *t.shape[2:]) for t in locals_)
    return (*globals_, *locals_)
