// udi_kernels::stratified_sample on CUDA: one thread per (image, pair).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "checks.h"
#include "stratified_sample_op.h"

namespace udi::stratified_sample {

namespace {

__global__ void stratified_sample_kernel(SampleArgs args, int64_t num_pairs) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pair < num_pairs) sample_one_pair(args, pair);
}

SampleTensors stratified_sample_cuda(const at::Tensor& boxes, int64_t global_grid, int64_t global_window,
                                     int64_t local_grid, int64_t local_window, int64_t target_grid, int64_t seed,
                                     int64_t offset, int64_t image_offset) {
  UDI_CHECK_KERNEL_DEVICE(boxes, at::kCUDA);
  const c10::cuda::CUDAGuard guard(boxes.device());
  PreparedSample prepared =
      prepare_sample(boxes, global_grid, global_window, local_grid, local_window, target_grid, seed, offset,
                     image_offset);
  const int64_t num_pairs = prepared.args.num_images * pairs_per_image(prepared.args);
  if (num_pairs > 0) {
    constexpr int kThreads = 128;
    const auto blocks = static_cast<unsigned>((num_pairs + kThreads - 1) / kThreads);
    stratified_sample_kernel<<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(prepared.args, num_pairs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return prepared.outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(udi_kernels, CUDA, m) { m.impl("stratified_sample", &stratified_sample_cuda); }

}  // namespace udi::stratified_sample
