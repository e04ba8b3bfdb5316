// Stratified random sampling (UDI_SPEC §2), shared by the CPU and CUDA kernels.
//
// Random stream: sample s of pattern `stream` (0 = the image's global pair, 1 = its local
// crops) of image b uses philox4x32(seed, {s, image_offset + b, stream, offset}) (word 1 wraps
// modulo 2**32), so that the rows of a batch slice starting at global image image_offset draw what
// the global batch draws for them (data-parallel ranks sample their own images). Words 0 and 1 pick the
// cell inside the sample's window (x % w); words 2 and 3 of sample 0 pick the corner that
// holds the n*w block when the grid is larger (bit 0 of each: bottom, right).
// Every float expression is evaluated in this exact order with correctly rounded ops.
#pragma once
#include <cmath>
#include <cstdint>

#include "host_device.h"
#include "philox.h"

namespace udi::stratified_sample {

struct Pattern {
  int grid;    // G: cells per side of the source crop's grid
  int window;  // w: cells per side of one window
};

struct Cell {
  int row, col;
};

UDI_HOST_DEVICE int windows_per_side(Pattern p) { return p.grid / p.window; }
UDI_HOST_DEVICE int samples_per_pattern(Pattern p) { return windows_per_side(p) * windows_per_side(p); }

UDI_HOST_DEVICE Cell pattern_cell(Pattern p, int s, uint64_t seed, uint32_t offset, uint32_t image, uint32_t stream) {
  const int n = windows_per_side(p);
  const int spare = p.grid - n * p.window;
  const Philox4 first = philox4x32(seed, 0u, image, stream, offset);
  const Philox4 draw = s == 0 ? first : philox4x32(seed, static_cast<uint32_t>(s), image, stream, offset);
  const int corner_row = (first.x[2] & 1u) ? spare : 0;
  const int corner_col = (first.x[3] & 1u) ? spare : 0;
  const uint32_t w = static_cast<uint32_t>(p.window);
  return Cell{corner_row + (s / n) * p.window + static_cast<int>(draw.x[0] % w),
              corner_col + (s % n) * p.window + static_cast<int>(draw.x[1] % w)};
}

// Position of grid cell `cell` along one axis of a box edge pair (lo_edge, hi_edge), signed.
UDI_HOST_DEVICE float cell_position(float edge0, float edge1, int cell, int grid) {
  const float frac = div_rn(static_cast<float>(cell), static_cast<float>(grid - 1));
  return add_rn(edge0, mul_rn(frac, sub_rn(edge1, edge0)));
}

UDI_HOST_DEVICE bool strictly_inside(float pos, float edge0, float edge1) {
  const float lo = edge0 < edge1 ? edge0 : edge1;
  const float hi = edge0 < edge1 ? edge1 : edge0;
  return lo < pos && pos < hi;
}

struct AxisTaps {
  int first;    // floor of the target coordinate, in [0, grid - 2]
  float frac;   // weight of first + 1, in [0, 1]
};

// The target grid coordinate t = (pos - edge0) * (grid - 1) / (edge1 - edge0) along one axis.
UDI_HOST_DEVICE float target_coordinate(float pos, float edge0, float edge1, int grid) {
  return div_rn(mul_rn(sub_rn(pos, edge0), static_cast<float>(grid - 1)), sub_rn(edge1, edge0));
}

// A sample counts only where both target coordinates are finite (boxes unchecked with check_boxes=False can give
// inf or NaN): NaN has no defined floor, min, max or int conversion that every backend shares.
UDI_HOST_DEVICE bool is_finite(float t) { return fabsf(t) < INFINITY; }

// Bilinear taps on the target grid along one axis from a finite t, clamped before the int conversion (a huge t
// would overflow int).
UDI_HOST_DEVICE AxisTaps axis_taps(float t, int grid) {
  const float first = fminf(fmaxf(floorf(t), 0.f), static_cast<float>(grid - 2));
  float frac = sub_rn(t, first);
  frac = frac < 0.f ? 0.f : (frac > 1.f ? 1.f : frac);
  return AxisTaps{static_cast<int>(first), frac};
}

struct PairOutput {
  int32_t* src_index;   // [S]
  int32_t* tgt_index;   // [S, 4]
  float* tgt_weight;    // [S, 4]
  int32_t* count;       // [1]
};

// All samples of one (source crop -> target crop) pair: valid samples first in sample
// order, padding (index 0, weight 0) after. Boxes are (i0, j0, i1, j1).
UDI_HOST_DEVICE void sample_pair(const float* src_box, const float* tgt_box, Pattern src, int target_grid,
                                 uint64_t seed, uint32_t offset, uint32_t image, uint32_t stream, PairOutput out) {
  const int num_samples = samples_per_pattern(src);
  int kept = 0;
  for (int s = 0; s < num_samples; ++s) {
    const Cell cell = pattern_cell(src, s, seed, offset, image, stream);
    const float pos_i = cell_position(src_box[0], src_box[2], cell.row, src.grid);
    const float pos_j = cell_position(src_box[1], src_box[3], cell.col, src.grid);
    if (!strictly_inside(pos_i, tgt_box[0], tgt_box[2]) || !strictly_inside(pos_j, tgt_box[1], tgt_box[3])) continue;
    const float t_i = target_coordinate(pos_i, tgt_box[0], tgt_box[2], target_grid);
    const float t_j = target_coordinate(pos_j, tgt_box[1], tgt_box[3], target_grid);
    if (!is_finite(t_i) || !is_finite(t_j)) continue;
    const AxisTaps ti = axis_taps(t_i, target_grid), tj = axis_taps(t_j, target_grid);
    const float ri = ti.frac, rj = tj.frac, qi = sub_rn(1.f, ri), qj = sub_rn(1.f, rj);
    const int top_left = ti.first * target_grid + tj.first;
    out.src_index[kept] = cell.row * src.grid + cell.col;
    int32_t* idx = out.tgt_index + 4 * kept;
    float* wgt = out.tgt_weight + 4 * kept;
    idx[0] = top_left;
    idx[1] = top_left + 1;
    idx[2] = top_left + target_grid;
    idx[3] = top_left + target_grid + 1;
    wgt[0] = mul_rn(qi, qj);
    wgt[1] = mul_rn(qi, rj);
    wgt[2] = mul_rn(ri, qj);
    wgt[3] = mul_rn(ri, rj);
    ++kept;
  }
  *out.count = kept;
  for (int s = kept; s < num_samples; ++s) {
    out.src_index[s] = 0;
    for (int t = 0; t < 4; ++t) {
      out.tgt_index[4 * s + t] = 0;
      out.tgt_weight[4 * s + t] = 0.f;
    }
  }
}

// The pairs of one image, in output order: q = 0 (g0 -> g1), 1 (g1 -> g0), then for local
// crop l: 2 + 2l (l -> g1), 3 + 2l (l -> g0).
struct PairPlan {
  int src_crop, tgt_crop;
  bool local;
  int64_t slot;  // pair index within the globals [B, 2] or locals [B, L, 2] outputs
};

UDI_HOST_DEVICE PairPlan plan_pair(int64_t image, int q, int num_locals) {
  if (q < 2) return PairPlan{q, 1 - q, false, image * 2 + q};
  const int l = (q - 2) / 2, k = (q - 2) % 2;
  return PairPlan{2 + l, 1 - k, true, (image * num_locals + l) * 2 + k};
}

struct SampleArgs {
  const float* boxes;  // [B, 2 + L, 4]
  int64_t num_images;
  int num_locals;
  Pattern global, local;
  int target_grid;
  uint64_t seed;
  uint32_t offset;
  uint32_t image_offset;  // global index of image 0 (the Philox word of image b is image_offset + b)
  PairOutput globals, locals;  // base pointers of the [B, 2, ...] and [B, L, 2, ...] outputs
};

UDI_HOST_DEVICE int pairs_per_image(const SampleArgs& a) { return 2 + 2 * a.num_locals; }

UDI_HOST_DEVICE void sample_one_pair(const SampleArgs& a, int64_t flat_pair) {
  const int per_image = pairs_per_image(a);
  const int64_t image = flat_pair / per_image;
  const PairPlan plan = plan_pair(image, static_cast<int>(flat_pair % per_image), a.num_locals);
  const Pattern pattern = plan.local ? a.local : a.global;
  const int64_t S = samples_per_pattern(pattern);
  const PairOutput base = plan.local ? a.locals : a.globals;
  const PairOutput out{base.src_index + plan.slot * S, base.tgt_index + plan.slot * S * 4,
                       base.tgt_weight + plan.slot * S * 4, base.count + plan.slot};
  const float* image_boxes = a.boxes + image * (2 + a.num_locals) * 4;
  sample_pair(image_boxes + 4 * plan.src_crop, image_boxes + 4 * plan.tgt_crop, pattern, a.target_grid, a.seed,
              a.offset, a.image_offset + static_cast<uint32_t>(image), plan.local ? 1u : 0u, out);
}

}  // namespace udi::stratified_sample
