// udi_kernels::stratified_sample: schema, argument checks and the CPU kernel.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "checks.h"
#include "size_limits.h"
#include "stratified_sample_op.h"

namespace udi::stratified_sample {

namespace {

void check_grid(int64_t grid, const char* name) {
  TORCH_CHECK(grid >= 2 && grid <= limits::kMaxGrid, name, " must be in [2, ", limits::kMaxGrid, "], got ", grid);
}

Pattern checked_pattern(int64_t grid, int64_t window, const char* grid_name, const char* window_name) {
  TORCH_CHECK(window >= 1, window_name, " must be >= 1, got ", window);
  check_grid(grid, grid_name);
  TORCH_CHECK(grid >= window, grid_name, " (", grid, ") must not be smaller than ", window_name, " (", window, ")");
  return Pattern{static_cast<int>(grid), static_cast<int>(window)};
}

// A Philox counter word (UDI_SPEC §2): a uint32.
void check_word(int64_t value, const char* name) {
  TORCH_CHECK(value >= 0 && value <= std::numeric_limits<uint32_t>::max(), name, " must be in [0, 2**32), got ",
              value);
}

PairOutput pair_output(const at::Tensor& src, const at::Tensor& tgt, const at::Tensor& weight,
                       const at::Tensor& count) {
  return PairOutput{src.data_ptr<int32_t>(), tgt.data_ptr<int32_t>(), weight.data_ptr<float>(),
                    count.data_ptr<int32_t>()};
}

}  // namespace

PreparedSample prepare_sample(const at::Tensor& boxes, int64_t global_grid, int64_t global_window, int64_t local_grid,
                              int64_t local_window, int64_t target_grid, int64_t seed, int64_t offset,
                              int64_t image_offset) {
  TORCH_CHECK(boxes.dim() == 3 && boxes.size(1) >= 2 && boxes.size(2) == 4,
              "boxes must have shape [B, 2 + L, 4], got ", boxes.sizes());
  TORCH_CHECK(boxes.scalar_type() == at::kFloat, "boxes must be float32, got ", boxes.scalar_type());
  UDI_CHECK_CONTIGUOUS(boxes);
  check_word(offset, "offset");
  check_word(image_offset, "image_offset");
  const Pattern global = checked_pattern(global_grid, global_window, "global_grid", "global_window");
  const Pattern local = checked_pattern(local_grid, local_window, "local_grid", "local_window");
  check_grid(target_grid, "target_grid");

  const int64_t B = boxes.size(0), L = boxes.size(1) - 2;
  const int64_t Sg = samples_per_pattern(global), Sl = samples_per_pattern(local);
  const auto ints = boxes.options().dtype(at::kInt);
  const auto floats = boxes.options();
  SampleTensors out{at::empty({B, 2, Sg}, ints),    at::empty({B, 2, Sg, 4}, ints),
                    at::empty({B, 2, Sg, 4}, floats), at::empty({B, 2}, ints),
                    at::empty({B, L, 2, Sl}, ints), at::empty({B, L, 2, Sl, 4}, ints),
                    at::empty({B, L, 2, Sl, 4}, floats), at::empty({B, L, 2}, ints)};
  SampleArgs args{boxes.data_ptr<float>(),
                  B,
                  static_cast<int>(L),
                  global,
                  local,
                  static_cast<int>(target_grid),
                  static_cast<uint64_t>(seed),
                  static_cast<uint32_t>(offset),
                  static_cast<uint32_t>(image_offset),
                  pair_output(std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out)),
                  pair_output(std::get<4>(out), std::get<5>(out), std::get<6>(out), std::get<7>(out))};
  return PreparedSample{std::move(out), args};
}

namespace {

SampleTensors stratified_sample_cpu(const at::Tensor& boxes, int64_t global_grid, int64_t global_window,
                                    int64_t local_grid, int64_t local_window, int64_t target_grid, int64_t seed,
                                    int64_t offset, int64_t image_offset) {
  UDI_CHECK_KERNEL_DEVICE(boxes, at::kCPU);
  PreparedSample prepared =
      prepare_sample(boxes, global_grid, global_window, local_grid, local_window, target_grid, seed, offset,
                     image_offset);
  const SampleArgs& args = prepared.args;
  const int64_t num_pairs = args.num_images * pairs_per_image(args);
  at::parallel_for(0, num_pairs, 64, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) sample_one_pair(args, pair);
  });
  return prepared.outputs;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(udi_kernels, m) {
  m.def(
      "stratified_sample(Tensor boxes, int global_grid, int global_window, int local_grid, int local_window, "
      "int target_grid, int seed, int offset, int image_offset) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(udi_kernels, CPU, m) { m.impl("stratified_sample", &stratified_sample_cpu); }

}  // namespace udi::stratified_sample
