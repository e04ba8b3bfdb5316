// The thread blocks of the CUDA kernels: warp and block reductions (in a fixed order, so results repeat bit for
// bit) and the bounds of a launch grid.
#pragma once
#include <cstdint>
#include <limits>

#include "checks.h"

namespace udi::cuda {

constexpr int kWarp = 32;
constexpr int64_t kMaxGridY = 65535;  // blocks along grid y (and z)

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// op over the threads of a block of kWarps warps, warp by warp; every thread gets the result. scratch holds kWarps
// floats; every thread must call it (it synchronises the block).
template <int kWarps, typename Op>
__device__ float block_reduce(float v, float* scratch, Op op) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  if (threadIdx.x % kWarp == 0) scratch[threadIdx.x / kWarp] = v;
  __syncthreads();
  float total = scratch[0];
  for (int w = 1; w < kWarps; ++w) total = op(total, scratch[w]);
  __syncthreads();  // scratch may be reused next
  return total;
}

template <int kWarps>
__device__ float block_sum(float v, float* scratch) {
  return block_reduce<kWarps>(v, scratch, [](float a, float b) { return a + b; });
}

template <int kWarps>
__device__ float block_max(float v, float* scratch) {
  return block_reduce<kWarps>(v, scratch, [](float a, float b) { return fmaxf(a, b); });
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of `threads` threads for `count` threads' work.
inline unsigned blocks_for(int64_t count, int threads) { return static_cast<unsigned>(ceil_div(count, threads)); }

// Grid x of one block per row.
inline unsigned row_grid(int64_t rows) {
  check_cuda_limit(rows, std::numeric_limits<int32_t>::max(), "rows");
  return static_cast<unsigned>(rows);
}

}  // namespace udi::cuda
