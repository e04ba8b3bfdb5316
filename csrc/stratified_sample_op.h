// Host-side plumbing of udi_kernels::stratified_sample shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

#include "stratified_sample.h"

namespace udi::stratified_sample {

// (globals: src_index, tgt_index, tgt_weight, count, locals: the same four)
using SampleTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor>;

struct PreparedSample {
  SampleTensors outputs;
  SampleArgs args;
};

// Checks the arguments, allocates the outputs on the boxes' device and fills the kernel arguments.
PreparedSample prepare_sample(const at::Tensor& boxes, int64_t global_grid, int64_t global_window, int64_t local_grid,
                              int64_t local_window, int64_t target_grid, int64_t seed, int64_t offset,
                              int64_t image_offset);

}  // namespace udi::stratified_sample
