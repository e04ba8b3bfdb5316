// udi_kernels::srs_attention(_backward) on CUDA. fp32 accumulation for every input dtype.
//
// Forward and pass 1 of the backward: one warp per sample, kRows samples per block; the block walks
// the keys in tiles of 32 (one key per lane) held in shared memory, with an online softmax.
// Pass 2 of the backward: one block per tile of kBlockRows keys; it walks the samples in chunks and
// accumulates dk and dv for its keys. Pass 3: one block per tile of kBlockRows rows of q, accumulating dq
// through the transposed tap map. Deterministic, no atomics.
// Taps outside [0, Nq) are skipped (weight 0), as in every backend (csrc/srs_attention.h).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "blocks.cuh"
#include "checks.h"
#include "size_limits.h"
#include "srs_attention.h"
#include "srs_attention_op.h"

namespace udi::srs_attention {

namespace {

using cuda::kWarp;
using cuda::warp_max;
using cuda::warp_sum;

// Kernels are instantiated for D <= kSmallDim (attention heads) and D <= kMaxDim (SRSAttention attends over
// whole tokens, D = C): the per-thread accumulators scale with the bound.
constexpr int kSmallDim = 128;
constexpr int kMaxDim = limits::kSrsAttentionCudaMaxHeadDim;
constexpr int kRows = 8;                  // samples (warps) per block, forward and pass 1
constexpr int kTileKeys = kWarp;          // keys per tile, forward and pass 1
constexpr int kBlockRows = 16;            // rows per block: of k and v (pass 2) or of q (pass 3)
constexpr int kChunk = 16;                // samples per chunk, passes 2 and 3
constexpr int kPass2Threads = kBlockRows * kChunk;  // one thread per (sample, key) pair of a chunk
constexpr size_t kDefaultSmem = 48 * 1024;  // more dynamic shared memory needs an opt-in per kernel

template <int kDims>
constexpr int dims_per_lane() { return kDims / kWarp; }

template <int kDims>
constexpr int owned_per_thread() { return kBlockRows * kDims / kPass2Threads; }

// rows [count][D] of a head-major tensor -> shared tile [count][stride] as float, zero past `valid`.
template <typename scalar_t>
__device__ void load_rows(const scalar_t* src, int64_t first, int64_t valid, int count, int64_t D, int stride,
                          float* tile) {
  for (int e = threadIdx.x; e < count * D; e += blockDim.x) {
    const int row = e / D, d = e % D;
    tile[row * stride + d] = first + row < valid ? static_cast<float>(src[(first + row) * D + d]) : 0.f;
  }
}

// Calls f(i, row, d) for each element (row, d) of a [kBlockRows][D] tile that this thread of a pass-2/3
// block owns; i indexes the thread's accumulators.
template <int kDims, typename F>
__device__ __forceinline__ void for_owned(int64_t D, F f) {
#pragma unroll
  for (int i = 0; i < owned_per_thread<kDims>(); ++i) {
    const int e = threadIdx.x + i * kPass2Threads;
    if (e >= kBlockRows * D) break;
    f(i, e / static_cast<int>(D), e % static_cast<int>(D));
  }
}

__device__ float shared_dot(const float* a, const float* b, int64_t D) {
  float sum = 0.f;
  for (int d = 0; d < D; ++d) sum += a[d] * b[d];
  return sum;
}

// The kTileKeys keys from `start` of k and v into shared memory, once the block is done with the last tile.
template <typename scalar_t>
__device__ void load_kv_tile(const Inputs<scalar_t>& a, int64_t head_offset, int64_t start, int stride, float* k_tile,
                             float* v_tile) {
  __syncthreads();
  load_rows(a.k + head_offset, start, a.N, kTileKeys, a.D, stride, k_tile);
  load_rows(a.v + head_offset, start, a.N, kTileKeys, a.D, stride, v_tile);
  __syncthreads();
}

// acc (elements lane + 32 j of a row) += sum_key weight_key * tile[key], weight_key held by lane `key`.
template <int kDims>
__device__ __forceinline__ void accumulate_tile(float lane_weight, const float* tile, int stride, int64_t D, int lane,
                                                float (&acc)[dims_per_lane<kDims>()]) {
  for (int key = 0; key < kTileKeys; ++key) {
    const float weight = __shfl_sync(0xffffffffu, lane_weight, key);
#pragma unroll
    for (int j = 0; j < dims_per_lane<kDims>(); ++j) {
      const int d = lane + j * kWarp;
      if (d < D) acc[j] += weight * tile[key * stride + d];
    }
  }
}

template <typename scalar_t, int kDims>
__global__ void __launch_bounds__(kRows* kWarp)
    forward_kernel(Inputs<scalar_t> a, scalar_t* out, float* lse) {
  extern __shared__ float smem[];
  const int stride = a.D + 1;  // odd row stride: lanes reading one column of a tile hit distinct banks
  float* k_tile = smem;
  float* v_tile = k_tile + kTileKeys * stride;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  float* q_s = v_tile + kTileKeys * stride + warp * a.D;
  const int64_t b = blockIdx.z, head = b * a.H + blockIdx.y, sample = blockIdx.x * kRows + warp;
  const bool active = sample < a.S;
  const int64_t head_offset = head * a.N * a.D;  // of k and v
  if (active)
    for (int d = lane; d < a.D; d += kWarp) q_s[d] = tapped_query(a, b, head, sample, d);
  __syncwarp();
  const int e_q = active ? row_exponent(q_s, a.D) : 0;

  float row_max = -INFINITY, row_sum = 0.f, acc[dims_per_lane<kDims>()] = {};
  for (int64_t start = 0; start < a.N; start += kTileKeys) {
    load_kv_tile(a, head_offset, start, stride, k_tile, v_tile);
    if (!active) continue;
    const bool key_ok = start + lane < a.N;
    const float logit = key_ok ? scaled_logit(q_s, e_q, k_tile + lane * stride, a) : -INFINITY;
    const float new_max = fmaxf(row_max, warp_max(logit));
    const float p = key_ok ? expf(logit - new_max) : 0.f;
    const float rescale = expf(row_max - new_max);
    row_sum = row_sum * rescale + warp_sum(p);
    for (int j = 0; j < dims_per_lane<kDims>(); ++j) acc[j] *= rescale;
    accumulate_tile<kDims>(p, v_tile, stride, a.D, lane, acc);
    row_max = new_max;
  }
  if (!active) return;
  const int64_t row = head * a.S + sample;
  for (int j = 0; j < dims_per_lane<kDims>(); ++j) {
    const int d = lane + j * kWarp;
    if (d < a.D) out[row * a.D + d] = static_cast<scalar_t>(acc[j] / row_sum);
  }
  if (lane == 0) lse[row] = row_max + logf(row_sum);
}

// Pass 1: delta_s = <dout_s, out_s> and dq_s = scale * sum_n P_sn (dP_sn - delta_s) k_n.
template <typename scalar_t, int kDims>
__global__ void __launch_bounds__(kRows* kWarp)
    query_grad_kernel(Inputs<scalar_t> a, const scalar_t* grad_out, const scalar_t* out, const float* lse,
                      float* dq_s, float* delta) {
  extern __shared__ float smem[];
  const int stride = a.D + 1;
  float* k_tile = smem;
  float* v_tile = k_tile + kTileKeys * stride;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  float* q_s = v_tile + kTileKeys * stride + warp * a.D;
  float* d_out = q_s + kRows * a.D;
  const int64_t b = blockIdx.z, head = b * a.H + blockIdx.y, sample = blockIdx.x * kRows + warp;
  const bool active = sample < a.S;
  const int64_t head_offset = head * a.N * a.D, row = head * a.S + sample;  // head_offset: of k and v
  float row_delta = 0.f, row_lse = 0.f;
  if (active) {
    float partial = 0.f;
    for (int d = lane; d < a.D; d += kWarp) {
      q_s[d] = tapped_query(a, b, head, sample, d);
      d_out[d] = static_cast<float>(grad_out[row * a.D + d]);
      partial += d_out[d] * static_cast<float>(out[row * a.D + d]);
    }
    row_delta = warp_sum(partial);
    row_lse = lse[row];
  }
  __syncwarp();
  const int e_q = active ? row_exponent(q_s, a.D) : 0;

  float acc[dims_per_lane<kDims>()] = {};
  for (int64_t start = 0; start < a.N; start += kTileKeys) {
    load_kv_tile(a, head_offset, start, stride, k_tile, v_tile);
    if (!active) continue;
    float ds = 0.f;
    if (start + lane < a.N) {
      const float p = expf(scaled_logit(q_s, e_q, k_tile + lane * stride, a) - row_lse);
      ds = p * (shared_dot(d_out, v_tile + lane * stride, a.D) - row_delta);
    }
    accumulate_tile<kDims>(ds, k_tile, stride, a.D, lane, acc);
  }
  if (!active) return;
  for (int j = 0; j < dims_per_lane<kDims>(); ++j) {
    const int d = lane + j * kWarp;
    if (d < a.D) dq_s[row * a.D + d] = ldexpf(acc[j] * a.scale_mantissa, a.scale_exponent);
  }
  if (lane == 0) delta[row] = row_delta;
}

// Pass 2: dv_n = sum_s P_sn dout_s and dk_n = sum_s dS_sn q_s for the block's keys.
template <typename scalar_t, int kDims>
__global__ void __launch_bounds__(kPass2Threads)
    key_grad_kernel(Inputs<scalar_t> a, const scalar_t* grad_out, const float* lse, const float* delta, scalar_t* dk,
                    scalar_t* dv) {
  extern __shared__ float smem[];
  const int stride = a.D + 1;
  float* k_tile = smem;
  float* v_tile = k_tile + kBlockRows * stride;
  float* q_rows = v_tile + kBlockRows * stride;
  float* d_out = q_rows + kChunk * stride;
  float* probs = d_out + kChunk * stride;    // [kChunk][kBlockRows]
  float* dscores = probs + kChunk * kBlockRows;  // [kChunk][kBlockRows]
  const int64_t b = blockIdx.z, head = b * a.H + blockIdx.y, first_key = blockIdx.x * kBlockRows;
  const int64_t kv_offset = head * a.N * a.D, head_rows = head * a.S;
  load_rows(a.k + kv_offset, first_key, a.N, kBlockRows, a.D, stride, k_tile);
  load_rows(a.v + kv_offset, first_key, a.N, kBlockRows, a.D, stride, v_tile);

  float acc_dk[owned_per_thread<kDims>()] = {}, acc_dv[owned_per_thread<kDims>()] = {};
  for (int64_t start = 0; start < a.S; start += kChunk) {
    __syncthreads();
    for (int e = threadIdx.x; e < kChunk * a.D; e += blockDim.x) {
      const int s = e / a.D, d = e % a.D;
      const int64_t sample = start + s;
      const bool ok = sample < a.S;
      q_rows[s * stride + d] = ok ? tapped_query(a, b, head, sample, d) : 0.f;
      d_out[s * stride + d] = ok ? static_cast<float>(grad_out[(head_rows + sample) * a.D + d]) : 0.f;
    }
    __syncthreads();
    {
      const int s = threadIdx.x / kBlockRows, n = threadIdx.x % kBlockRows;
      const int64_t sample = start + s, row = head_rows + sample;
      float p = 0.f, ds = 0.f;
      if (sample < a.S && first_key + n < a.N) {
        const float* q_s = q_rows + s * stride;
        p = expf(scaled_logit(q_s, row_exponent(q_s, a.D), k_tile + n * stride, a) - lse[row]);
        ds = ldexpf(p * (shared_dot(d_out + s * stride, v_tile + n * stride, a.D) - delta[row]) * a.scale_mantissa,
                    a.scale_exponent);
      }
      probs[s * kBlockRows + n] = p;
      dscores[s * kBlockRows + n] = ds;
    }
    __syncthreads();
    for_owned<kDims>(a.D, [&](int i, int n, int d) {
      for (int s = 0; s < kChunk; ++s) {
        acc_dv[i] += probs[s * kBlockRows + n] * d_out[s * stride + d];
        acc_dk[i] += dscores[s * kBlockRows + n] * q_rows[s * stride + d];
      }
    });
  }
  for_owned<kDims>(a.D, [&](int i, int n, int d) {
    if (first_key + n >= a.N) return;
    dk[kv_offset + (first_key + n) * a.D + d] = static_cast<scalar_t>(acc_dk[i]);
    dv[kv_offset + (first_key + n) * a.D + d] = static_cast<scalar_t>(acc_dv[i]);
  });
}

// Pass 3: dq_r = sum_{s, t: idx_st = r} w_st dq_s for the block's rows of q.
template <typename scalar_t, int kDims>
__global__ void __launch_bounds__(kPass2Threads)
    token_grad_kernel(Inputs<scalar_t> a, const float* dq_s, scalar_t* dq) {
  extern __shared__ float smem[];
  const int stride = a.D + 1;
  float* dq_rows = smem;                          // [kChunk][stride]
  float* tap_map = dq_rows + kChunk * stride;     // [kChunk][kBlockRows]
  const int64_t b = blockIdx.z, head = b * a.H + blockIdx.y, first_row = blockIdx.x * kBlockRows;
  const int64_t head_rows = head * a.S, taps = b * a.S * a.T;
  float acc[owned_per_thread<kDims>()] = {};
  for (int64_t start = 0; start < a.S; start += kChunk) {
    __syncthreads();
    load_rows(dq_s + head_rows * a.D, start, a.S, kChunk, a.D, stride, dq_rows);
    {
      const int s = threadIdx.x / kBlockRows, r = threadIdx.x % kBlockRows;
      const int64_t sample = start + s;
      float tap_weight = 0.f;
      if (sample < a.S)
        for (int64_t t = 0; t < a.T; ++t)
          if (a.index[taps + sample * a.T + t] == first_row + r) tap_weight += a.weight[taps + sample * a.T + t];
      tap_map[s * kBlockRows + r] = tap_weight;
    }
    __syncthreads();
    for_owned<kDims>(a.D, [&](int i, int r, int d) {
      for (int s = 0; s < kChunk; ++s) acc[i] += tap_map[s * kBlockRows + r] * dq_rows[s * stride + d];
    });
  }
  for_owned<kDims>(a.D, [&](int i, int r, int d) {
    if (first_row + r < a.Nq) dq[(head * a.Nq + first_row + r) * a.D + d] = static_cast<scalar_t>(acc[i]);
  });
}

// After check_forward_args.
void check_cuda_inputs(const at::Tensor& q, const Shape& s) {
  UDI_CHECK_KERNEL_DEVICE(q, at::kCUDA);
  UDI_CHECK_CUDA_DTYPE(q);
  check_cuda_limit(s.D, kMaxDim, "head dims D");
  check_cuda_limit(s.H, cuda::kMaxGridY, "heads H");
  check_cuda_limit(s.B, cuda::kMaxGridY, "crops B");
}

template <typename scalar_t>
Inputs<scalar_t> inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& index,
                        const at::Tensor& weight, double scale, const Shape& s) {
  int exponent = 0;
  const double mantissa = std::frexp(scale, &exponent);
  return Inputs<scalar_t>{q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                          index.data_ptr<int32_t>(), weight.data_ptr<float>(), s.H, s.Nq, s.N, s.S, s.T, s.D,
                          static_cast<float>(mantissa), exponent};
}

dim3 sample_grid(const Shape& s) {
  return dim3(static_cast<unsigned>((s.S + kRows - 1) / kRows), static_cast<unsigned>(s.H),
              static_cast<unsigned>(s.B));
}

// Calls f(std::integral_constant<int, bound>{}) with the smallest instantiated bound >= D.
template <typename F>
void with_dim_bound(int64_t D, F f) {
  if (D <= kSmallDim) {
    f(std::integral_constant<int, kSmallDim>{});
  } else {
    f(std::integral_constant<int, kMaxDim>{});
  }
}

// Launches kernel<<<grid, threads, smem>>>(args...), opting in to more than 48 KiB of shared memory when needed.
template <typename... KernelArgs, typename... Args>
void launch(void (*kernel)(KernelArgs...), dim3 grid, int threads, size_t smem, cudaStream_t stream, Args... args) {
  if (smem > kDefaultSmem)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<grid, threads, smem, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

size_t forward_smem(const Shape& s, int rows_per_warp) {
  return sizeof(float) * (2 * kTileKeys * (s.D + 1) + rows_per_warp * kRows * s.D);
}

std::tuple<at::Tensor, at::Tensor> srs_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& index, const at::Tensor& weight,
                                                      double scale) {
  const Shape s = check_forward_args(q, k, v, index, weight);
  check_cuda_inputs(q, s);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({s.B, s.H, s.S, s.D}, q.options());
  at::Tensor lse = at::empty({s.B, s.H, s.S}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "srs_attention_cuda", [&] {
    with_dim_bound(s.D, [&](auto dims) {
      launch(forward_kernel<scalar_t, dims>, sample_grid(s), kRows * kWarp, forward_smem(s, 1),
             c10::cuda::getCurrentCUDAStream(), inputs<scalar_t>(q, k, v, index, weight, scale, s),
             out.data_ptr<scalar_t>(), lse.data_ptr<float>());
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> srs_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& index, const at::Tensor& weight, const at::Tensor& out, const at::Tensor& lse, double scale) {
  const Shape s = check_backward_args(grad_out, q, k, v, index, weight, out, lse);
  check_cuda_inputs(q, s);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (s.B * s.H == 0) return {dq, dk, dv};  // all empty; with S = 0 or Nq = 0 the passes below still write dk, dv
  at::Tensor dq_s = at::empty({s.B, s.H, s.S, s.D}, q.options().dtype(at::kFloat));
  at::Tensor delta = at::empty({s.B, s.H, s.S}, q.options().dtype(at::kFloat));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto tiles = [&](int64_t rows) {
    return dim3(static_cast<unsigned>((rows + kBlockRows - 1) / kBlockRows), static_cast<unsigned>(s.H),
                static_cast<unsigned>(s.B));
  };
  const size_t key_smem = sizeof(float) * ((2 * kBlockRows + 2 * kChunk) * (s.D + 1) + 2 * kChunk * kBlockRows);
  const size_t token_smem = sizeof(float) * (kChunk * (s.D + 1) + kChunk * kBlockRows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "srs_attention_backward_cuda", [&] {
    const auto a = inputs<scalar_t>(q, k, v, index, weight, scale, s);
    with_dim_bound(s.D, [&](auto dims) {
      if (s.S > 0)
        launch(query_grad_kernel<scalar_t, dims>, sample_grid(s), kRows * kWarp, forward_smem(s, 2), stream, a,
               grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<float>(),
               dq_s.data_ptr<float>(), delta.data_ptr<float>());
      launch(key_grad_kernel<scalar_t, dims>, tiles(s.N), kPass2Threads, key_smem, stream, a,
             grad_out.data_ptr<scalar_t>(), lse.data_ptr<float>(), delta.data_ptr<float>(), dk.data_ptr<scalar_t>(),
             dv.data_ptr<scalar_t>());
      if (s.Nq > 0)
        launch(token_grad_kernel<scalar_t, dims>, tiles(s.Nq), kPass2Threads, token_smem, stream, a,
               dq_s.data_ptr<float>(), dq.data_ptr<scalar_t>());
    });
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(udi_kernels, CUDA, m) {
  m.impl("srs_attention", &srs_attention_cuda);
  m.impl("srs_attention_backward", &srs_attention_backward_cuda);
}

}  // namespace udi::srs_attention
