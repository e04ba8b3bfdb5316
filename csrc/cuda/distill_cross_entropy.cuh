// What the CUDA kernels of udi_kernels::distill_cross_entropy (csrc/cuda/distill_cross_entropy.cu) and its backward
// (csrc/cuda/distill_cross_entropy_backward.cu) share: a thread's slice of a K chunk, its loads and stores, the
// teacher's probabilities and the running logsumexp. Contract: udi_kernels/ops/distill_cross_entropy.py; the Triton
// kernels (udi_kernels/triton_kernels/distill_cross_entropy*.py) follow the same plan:
//   K is split into chunks of kChunk = 4096; every row kernel runs one block per (row, chunk) (rows on grid x, so
//   blocks running together share a chunk of the teacher and centers in L2), each thread holding 16 elements of
//   the chunk in registers (two groups of 8 contiguous elements, 16-byte loads when K % 8 == 0 and the rows are
//   aligned). Partials [rows or pairs, chunks] are combined by one thread per row. Every reduction has a fixed
//   order, so results are deterministic. Teacher and student may have different dtypes (fp32/fp16/bf16).
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "blocks.cuh"
#include "checks.h"
#include "distill_cross_entropy_op.h"

namespace udi::distill_cross_entropy {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kGroup = 8;                                  // contiguous elements per thread and load group
constexpr int kGroups = 2;                                 // groups per thread and chunk
constexpr int kPerThread = kGroup * kGroups;               // 16
constexpr int64_t kChunk = int64_t{kThreads} * kPerThread;  // 4096
constexpr int kCenterColumns = 32 * kGroup;                // columns per center-sum block: a warp's width
static_assert(kCenterColumns == kThreads, "the center-sum epilogue gives each thread one column");

using Slice = float[kPerThread];

// A running logsumexp: max and the sum of exp(x - max).
struct OnlineLse {
  float max = -INFINITY;
  float sum = 0.f;

  __device__ void merge(OnlineLse other) {
    const float m = fmaxf(max, other.max);
    if (m == -INFINITY) return;
    sum = sum * __expf(max - m) + other.sum * __expf(other.max - m);
    max = m;
  }
  __device__ float value() const { return max + logf(sum); }
};

// Everything the row kernels read besides the logits.
struct Pairs : PairArgs<float> {
  const float* teacher_lse;
  int64_t num_chunks;
  bool vectorized;  // K % kGroup == 0 and every logit/center/gradient pointer 16-byte aligned
};

// The block's running logsumexp (every thread gets it; scratch holds kWarps entries; it synchronises).
__device__ inline OnlineLse block_lse(OnlineLse v, OnlineLse* scratch) {
  for (int offset = 16; offset > 0; offset /= 2)
    v.merge({__shfl_xor_sync(0xffffffffu, v.max, offset), __shfl_xor_sync(0xffffffffu, v.sum, offset)});
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  OnlineLse total;
  for (int w = 0; w < kWarps; ++w) total.merge(scratch[w]);
  __syncthreads();  // scratch may be reused next
  return total;
}

// ---- a thread's slice of a chunk: element j is chunk_begin + (group(j) * kThreads + threadIdx.x) * kGroup + j % 8 -

__device__ inline int64_t group_begin(int64_t chunk_begin, int group) {
  return chunk_begin + (int64_t{group} * kThreads + threadIdx.x) * kGroup;
}

__device__ inline bool in_slice(int64_t chunk_begin, int j, int64_t K) {
  return group_begin(chunk_begin, j / kGroup) + j % kGroup < K;
}

template <typename T>
struct alignas(16) Pack {
  T v[16 / sizeof(T)];
};

// row[first, first + kGroup) as float, `fill` past K; 16-byte loads when allowed.
template <typename T>
__device__ void load_group(const T* row, int64_t first, int64_t K, bool vectorized, float fill, float* out) {
  constexpr int kPerPack = 16 / sizeof(T);
  if (vectorized && first + kGroup <= K) {
#pragma unroll
    for (int part = 0; part < kGroup / kPerPack; ++part) {
      const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(row + first + part * kPerPack);
#pragma unroll
      for (int i = 0; i < kPerPack; ++i) out[part * kPerPack + i] = static_cast<float>(pack.v[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kGroup; ++i) out[i] = first + i < K ? static_cast<float>(row[first + i]) : fill;
  }
}

template <typename T>
__device__ void load_slice(const T* row, int64_t chunk_begin, int64_t K, bool vectorized, float fill, Slice& out) {
#pragma unroll
  for (int g = 0; g < kGroups; ++g) load_group(row, group_begin(chunk_begin, g), K, vectorized, fill, out + g * kGroup);
}

template <typename T>
__device__ void store_slice(T* row, int64_t chunk_begin, int64_t K, bool vectorized, const Slice& in) {
  constexpr int kPerPack = 16 / sizeof(T);
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    const int64_t first = group_begin(chunk_begin, g);
    if (vectorized && first + kGroup <= K) {
#pragma unroll
      for (int part = 0; part < kGroup / kPerPack; ++part) {
        Pack<T> pack;
#pragma unroll
        for (int i = 0; i < kPerPack; ++i) pack.v[i] = static_cast<T>(in[g * kGroup + part * kPerPack + i]);
        *reinterpret_cast<Pack<T>*>(row + first + part * kPerPack) = pack;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kGroup; ++i)
        if (first + i < K) row[first + i] = static_cast<T>(in[g * kGroup + i]);
    }
  }
}

// x = s/τs, -inf past K.
template <typename student_t>
__device__ void scaled_student_slice(const student_t* student, const Pairs& p, int64_t row, int64_t chunk_begin,
                                     Slice& x) {
  load_slice(student + row * p.K, chunk_begin, p.K, p.vectorized, -INFINITY, x);
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) x[j] *= p.inv_tau_s;
}

// A center's slice of the chunk, reloaded only when the center changes (the losses use one center).
struct CenterSlice {
  int64_t center = -1;
  Slice values;

  __device__ const Slice& of(const Pairs& p, int64_t teacher_row, int64_t chunk_begin) {
    const int64_t wanted = p.center_id[teacher_row];
    if (wanted != center) {
      load_slice(p.centers + wanted * p.K, chunk_begin, p.K, p.vectorized, 0.f, values);
      center = wanted;
    }
    return values;
  }
};

// u = (t - c)/τt, -inf past K.
template <typename teacher_t>
__device__ void centered_slice(const teacher_t* teacher, const Pairs& p, int64_t row, int64_t chunk_begin,
                               CenterSlice& center, Slice& u) {
  const Slice& c = center.of(p, row, chunk_begin);
  load_slice(teacher + row * p.K, chunk_begin, p.K, p.vectorized, -INFINITY, u);
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) u[j] = (u[j] - c[j]) * p.inv_tau_t;
}

// p_t = exp(u - teacher_lse), 0 past K.
template <typename teacher_t>
__device__ void teacher_probs_slice(const teacher_t* teacher, const Pairs& p, int64_t row, int64_t chunk_begin,
                                    CenterSlice& center, Slice& prob) {
  centered_slice(teacher, p, row, chunk_begin, center, prob);
  const float lse = p.teacher_lse[row];
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) prob[j] = __expf(prob[j] - lse);
}

// g_p · w_p, exactly 0 for a pair that does not count (pair_counts).
__device__ inline float pair_scale(const float* grad_pair_loss, const Pairs& p, int64_t slot) {
  return pair_counts(p, slot) ? p.pair_weight[slot] * grad_pair_loss[slot] : 0.f;
}

// ---- host ---------------------------------------------------------------------------------------------------------

inline void check_cuda_kernel_types(const at::Tensor& student, const at::Tensor& teacher) {
  UDI_CHECK_KERNEL_DEVICE(student, at::kCUDA);
  UDI_CHECK_CUDA_DTYPE(student);
  UDI_CHECK_CUDA_DTYPE(teacher);
}

inline int64_t num_chunks(int64_t K) {
  check_cuda_limit(K, cuda::kMaxGridY * kChunk, "K");
  return cuda::ceil_div(K, kChunk);
}

inline bool can_vectorize(int64_t K, std::initializer_list<const at::Tensor*> tensors) {
  bool aligned = K % kGroup == 0;
  for (const at::Tensor* t : tensors) aligned = aligned && reinterpret_cast<std::uintptr_t>(t->data_ptr()) % 16 == 0;
  return aligned;
}

inline Pairs make_pairs(const at::Tensor& centers, const at::Tensor& center_id, const at::Tensor& student_offsets,
                        const at::Tensor& pair_teacher, const at::Tensor& pair_weight, const at::Tensor& teacher_lse,
                        int64_t K, double tau_s, double tau_t, bool vectorized) {
  const PairArgs<float> args{centers.data_ptr<float>(),       center_id.data_ptr<int64_t>(),
                             student_offsets.data_ptr<int64_t>(), pair_teacher.data_ptr<int64_t>(),
                             pair_weight.data_ptr<float>(),   K,
                             static_cast<float>(1.0 / tau_s), static_cast<float>(1.0 / tau_t),
                             center_id.numel(),               centers.size(0),
                             pair_teacher.numel()};
  return Pairs{args, teacher_lse.data_ptr<float>(), num_chunks(K), vectorized};
}

inline dim3 row_chunk_grid(int64_t rows, int64_t chunks) {
  return dim3(cuda::row_grid(rows), static_cast<unsigned>(chunks));
}

#define UDI_DISPATCH_CUDA_LOGITS(TYPE, NAME, ...)                                                                \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

}  // namespace udi::distill_cross_entropy
