// udi_kernels::distill_cross_entropy / distill_cross_entropy_backward on CUDA. Contract:
// udi_kernels/ops/distill_cross_entropy.py; the Triton kernels (udi_kernels/triton_kernels/distill_cross_entropy*.py)
// follow the same plan:
//   K is split into chunks of kChunk = 4096; every row kernel runs one block per (row, chunk) (rows on grid x, so
//   blocks running together share a chunk of the teacher and centers in L2), each thread holding 16 elements of
//   the chunk in registers (two groups of 8 contiguous elements, 16-byte loads when K % 8 == 0 and the rows are
//   aligned). Partials [rows or pairs, chunks] are combined by one thread per row. Every reduction has a fixed
//   order, so results are deterministic. Teacher and student may have different dtypes (fp32/fp16/bf16).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <utility>

#include "distill_cross_entropy_op.h"

namespace udi::distill_cross_entropy {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kGroup = 8;                                  // contiguous elements per thread and load group
constexpr int kGroups = 2;                                 // groups per thread and chunk
constexpr int kPerThread = kGroup * kGroups;               // 16
constexpr int64_t kChunk = int64_t{kThreads} * kPerThread;  // 4096
constexpr int kCenterColumns = 32 * kGroup;                // columns per center-sum block: a warp's width
constexpr int64_t kMaxGridY = 65535;
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

// ---- block reductions (every thread gets the result; scratch holds kWarps entries; they synchronise) ------------

__device__ OnlineLse block_lse(OnlineLse v, OnlineLse* scratch) {
  for (int offset = 16; offset > 0; offset /= 2)
    v.merge({__shfl_xor_sync(0xffffffffu, v.max, offset), __shfl_xor_sync(0xffffffffu, v.sum, offset)});
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  OnlineLse total;
  for (int w = 0; w < kWarps; ++w) total.merge(scratch[w]);
  __syncthreads();  // scratch may be reused next
  return total;
}

__device__ float block_sum(float v, float* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// ---- a thread's slice of a chunk: element j is chunk_begin + (group(j) * kThreads + threadIdx.x) * kGroup + j % 8 -

__device__ int64_t group_begin(int64_t chunk_begin, int group) {
  return chunk_begin + (int64_t{group} * kThreads + threadIdx.x) * kGroup;
}

__device__ bool in_slice(int64_t chunk_begin, int j, int64_t K) {
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

__device__ OnlineLse slice_lse(const Slice& x) {
  float top = -INFINITY;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) top = fmaxf(top, x[j]);
  float sum = 0.f;
  if (top != -INFINITY) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) sum += __expf(x[j] - top);
  }
  return {top, sum};
}

__device__ OnlineLse combined_partials(const float* part_max, const float* part_sum, int64_t row, int64_t chunks) {
  OnlineLse total;
  for (int64_t c = 0; c < chunks; ++c) total.merge({part_max[row * chunks + c], part_sum[row * chunks + c]});
  return total;
}

// g_p · w_p, exactly 0 for a pair that does not count (pair_counts).
__device__ float pair_scale(const float* grad_pair_loss, const Pairs& p, int64_t slot) {
  return pair_counts(p, slot) ? p.pair_weight[slot] * grad_pair_loss[slot] : 0.f;
}

// ---- kernels ------------------------------------------------------------------------------------------------------

// Grid (Rt, chunks): max and Σ exp(u - max) of each teacher chunk (-inf and 0 for a row without a center: its
// logsumexp is -inf and no pair reads it).
template <typename teacher_t>
__global__ void teacher_partials_kernel(const teacher_t* teacher, Pairs p, float* part_max, float* part_sum) {
  __shared__ OnlineLse scratch[kWarps];
  const int64_t row = blockIdx.x, chunk = blockIdx.y;
  if (!teacher_row_ok(p, row)) {  // uniform across the block
    if (threadIdx.x == 0) {
      part_max[row * p.num_chunks + chunk] = -INFINITY;
      part_sum[row * p.num_chunks + chunk] = 0.f;
    }
    return;
  }
  CenterSlice center;
  Slice u;
  centered_slice(teacher, p, row, chunk * kChunk, center, u);
  const OnlineLse total = block_lse(slice_lse(u), scratch);
  if (threadIdx.x == 0) {
    part_max[row * p.num_chunks + chunk] = total.max;
    part_sum[row * p.num_chunks + chunk] = total.sum;
  }
}

// One thread per row: lse[row] from its chunk partials.
__global__ void lse_combine_kernel(const float* part_max, const float* part_sum, int64_t rows, int64_t chunks,
                                   float* lse) {
  const int64_t row = int64_t{blockIdx.x} * kThreads + threadIdx.x;
  if (row < rows) lse[row] = combined_partials(part_max, part_sum, row, chunks).value();
}

// Grid (column blocks, n_c): warp w adds rows w, w + kWarps, ... of the center (lane l owns 8 columns); the warp
// partials are then added in a fixed order through shared memory. Rows outside [0, Rt) are skipped.
template <typename teacher_t>
__global__ void center_sum_kernel(const teacher_t* teacher, const int64_t* center_offsets, const int64_t* center_rows,
                                  const float* row_weight, int64_t Rt, int64_t K, bool vectorized, float* center_sum,
                                  float* center_count) {
  __shared__ float partial[kWarps][kCenterColumns];
  const int64_t center = blockIdx.y, block_begin = int64_t{blockIdx.x} * kCenterColumns;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const SlotRange slots = csr_slots(center_offsets, center, Rt);
  float acc[kGroup] = {};
  for (int64_t slot = slots.first + warp; slot < slots.last; slot += kWarps) {
    const int64_t row = row_or_none(center_rows, slot, Rt);
    if (row < 0 || row_weight[row] == 0.f) continue;  // weight-0 rows are never read
    const float weight = row_weight[row];
    float t[kGroup];
    load_group(teacher + row * K, block_begin + lane * kGroup, K, vectorized, 0.f, t);
#pragma unroll
    for (int i = 0; i < kGroup; ++i) acc[i] += weight * t[i];
  }
#pragma unroll
  for (int i = 0; i < kGroup; ++i) partial[warp][lane * kGroup + i] = acc[i];
  __syncthreads();
  const int64_t k = block_begin + threadIdx.x;
  if (k < K) {
    float sum = 0.f;
    for (int w = 0; w < kWarps; ++w) sum += partial[w][threadIdx.x];
    center_sum[center * K + k] = sum;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    float count = 0.f;
    for (int64_t slot = slots.first; slot < slots.last; ++slot) {
      const int64_t row = row_or_none(center_rows, slot, Rt);
      if (row >= 0) count += row_weight[row];
    }
    center_count[center] = count;
  }
}

// Grid (Rs, chunks): the student chunk's (max, Σ exp) partial, then per pair mass = Σ p_t and
// gap = Σ p_t (max - x) over the chunk (both >= 0; combined in student_combine_kernel).
template <typename student_t, typename teacher_t>
__global__ void student_partials_kernel(const student_t* student, const teacher_t* teacher, Pairs p, float* part_max,
                                        float* part_sum, float* pair_mass, float* pair_gap) {
  __shared__ OnlineLse lse_scratch[kWarps];
  __shared__ float sum_scratch[kWarps];
  const int64_t row = blockIdx.x, chunk = blockIdx.y, chunk_begin = chunk * kChunk;
  Slice x;
  scaled_student_slice(student, p, row, chunk_begin, x);
  const OnlineLse part = block_lse(slice_lse(x), lse_scratch);
  if (threadIdx.x == 0) {
    part_max[row * p.num_chunks + chunk] = part.max;
    part_sum[row * p.num_chunks + chunk] = part.sum;
  }
  CenterSlice center;
  const SlotRange slots = csr_slots(p.student_offsets, row, p.num_pairs);
  for (int64_t slot = slots.first; slot < slots.last; ++slot) {
    float mass = 0.f, gap = 0.f;
    if (pair_counts(p, slot)) {  // uniform across the block: every thread reaches block_sum or none
      Slice prob;
      teacher_probs_slice(teacher, p, p.pair_teacher[slot], chunk_begin, center, prob);
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        if (!in_slice(chunk_begin, j, p.K)) continue;  // prob 0 and x -inf there
        mass += prob[j];
        gap += prob[j] * (part.max - x[j]);
      }
      mass = block_sum(mass, sum_scratch);
      gap = block_sum(gap, sum_scratch);
    }
    if (threadIdx.x == 0) {
      pair_mass[slot * p.num_chunks + chunk] = mass;
      pair_gap[slot * p.num_chunks + chunk] = gap;
    }
  }
}

// One thread per student row: lse, and pair_loss = w · Σ_c (mass_c (lse - max_c) + gap_c).
__global__ void student_combine_kernel(Pairs p, int64_t Rs, const float* part_max, const float* part_sum,
                                       const float* pair_mass, const float* pair_gap, float* student_lse,
                                       float* pair_loss) {
  const int64_t row = int64_t{blockIdx.x} * kThreads + threadIdx.x;
  if (row >= Rs) return;
  const int64_t chunks = p.num_chunks;
  const float lse = combined_partials(part_max, part_sum, row, chunks).value();
  student_lse[row] = lse;
  const SlotRange slots = csr_slots(p.student_offsets, row, p.num_pairs);
  for (int64_t slot = slots.first; slot < slots.last; ++slot) {
    if (!pair_counts(p, slot)) continue;  // pair_loss starts at 0
    float ce = 0.f;
    for (int64_t c = 0; c < chunks; ++c)
      ce += pair_mass[slot * chunks + c] * (lse - part_max[row * chunks + c]) + pair_gap[slot * chunks + c];
    pair_loss[slot] = p.pair_weight[slot] * ce;
  }
}

// Grid (Rs, chunks): grad = (Σ_p g_p w_p · softmax(s/τs) - Σ_p g_p w_p · p_t,p) / τs, written once.
template <typename student_t, typename teacher_t>
__global__ void student_backward_kernel(const float* grad_pair_loss, const student_t* student,
                                        const teacher_t* teacher, Pairs p, const float* student_lse,
                                        student_t* grad_student) {
  const int64_t row = blockIdx.x, chunk_begin = int64_t{blockIdx.y} * kChunk;
  const SlotRange slots = csr_slots(p.student_offsets, row, p.num_pairs);
  float total = 0.f;
  for (int64_t slot = slots.first; slot < slots.last; ++slot) total += pair_scale(grad_pair_loss, p, slot);
  Slice acc;
  scaled_student_slice(student, p, row, chunk_begin, acc);
  const float lse = student_lse[row];
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) acc[j] = total * __expf(acc[j] - lse);  // 0 past K
  CenterSlice center;
  for (int64_t slot = slots.first; slot < slots.last; ++slot) {
    const float scale = pair_scale(grad_pair_loss, p, slot);
    if (scale == 0.f) continue;
    Slice prob;
    teacher_probs_slice(teacher, p, p.pair_teacher[slot], chunk_begin, center, prob);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) acc[j] -= scale * prob[j];
  }
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) acc[j] *= p.inv_tau_s;
  store_slice(grad_student + row * p.K, chunk_begin, p.K, p.vectorized, acc);
}

// ---- host ---------------------------------------------------------------------------------------------------------

void check_cuda_kernel_types(const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK(student.is_cuda(), "student must be a CUDA tensor for the CUDA kernel");
  for (const auto& [t, name] : {std::pair{&student, "student"}, std::pair{&teacher, "teacher"}}) {
    const auto type = t->scalar_type();
    TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, name,
                " must be float32, float16 or bfloat16 for the CUDA kernel, got ", type);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t num_chunks(int64_t K) {
  const int64_t chunks = ceil_div(K, kChunk);
  TORCH_CHECK(chunks <= kMaxGridY, "K = ", K, " is too large for the CUDA kernel (at most ", kMaxGridY * kChunk, ")");
  return chunks;
}

bool can_vectorize(int64_t K, std::initializer_list<const at::Tensor*> tensors) {
  bool aligned = K % kGroup == 0;
  for (const at::Tensor* t : tensors) aligned = aligned && reinterpret_cast<std::uintptr_t>(t->data_ptr()) % 16 == 0;
  return aligned;
}

Pairs make_pairs(const at::Tensor& centers, const at::Tensor& center_id, const at::Tensor& student_offsets,
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

unsigned row_blocks(int64_t rows) { return static_cast<unsigned>(ceil_div(rows, kThreads)); }

dim3 row_chunk_grid(int64_t rows, int64_t chunks) {
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "the CUDA kernel takes at most 2^31 - 1 rows, got ", rows);
  return dim3(static_cast<unsigned>(rows), static_cast<unsigned>(chunks));
}

#define UDI_DISPATCH_CUDA_LOGITS(TYPE, NAME, ...)                                                       \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

ForwardTensors forward_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& centers,
                            const at::Tensor& center_id, const at::Tensor& student_offsets,
                            const at::Tensor& pair_teacher, const at::Tensor& pair_weight,
                            const at::Tensor& center_offsets, const at::Tensor& center_rows,
                            const at::Tensor& row_weight, double tau_s, double tau_t) {
  check_cuda_kernel_types(student, teacher);
  check_forward_args(student, teacher, centers, center_id, student_offsets, pair_teacher, pair_weight, center_offsets,
                     center_rows, row_weight, tau_s, tau_t);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t Rs = student.size(0), Rt = teacher.size(0), K = student.size(1), n_c = centers.size(0);
  const int64_t P = pair_teacher.numel();
  TORCH_CHECK(n_c <= kMaxGridY, "the CUDA kernel takes at most ", kMaxGridY, " centers, got ", n_c);
  const auto floats = student.options().dtype(at::kFloat);
  at::Tensor pair_loss = at::zeros({P}, floats), student_lse = at::empty({Rs}, floats);
  at::Tensor teacher_lse = at::empty({Rt}, floats), center_sum = at::empty({n_c, K}, floats);
  at::Tensor center_count = at::empty({n_c}, floats);
  const bool vectorized = can_vectorize(K, {&student, &teacher, &centers});
  const Pairs pairs = make_pairs(centers, center_id, student_offsets, pair_teacher, pair_weight, teacher_lse, K, tau_s,
                                 tau_t, vectorized);
  const int64_t chunks = pairs.num_chunks;
  at::Tensor teacher_parts = at::empty({2, Rt, chunks}, floats), student_parts = at::empty({2, Rs, chunks}, floats);
  at::Tensor pair_parts = at::empty({2, P, chunks}, floats);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  UDI_DISPATCH_CUDA_LOGITS(student.scalar_type(), "distill_cross_entropy_cuda", [&] {
    using student_t = scalar_t;
    UDI_DISPATCH_CUDA_LOGITS(teacher.scalar_type(), "distill_cross_entropy_cuda", [&] {
      const scalar_t* t = teacher.data_ptr<scalar_t>();
      if (Rt > 0) {
        float* t_max = teacher_parts[0].data_ptr<float>();
        float* t_sum = teacher_parts[1].data_ptr<float>();
        teacher_partials_kernel<<<row_chunk_grid(Rt, chunks), kThreads, 0, stream>>>(t, pairs, t_max, t_sum);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        lse_combine_kernel<<<row_blocks(Rt), kThreads, 0, stream>>>(t_max, t_sum, Rt, chunks,
                                                                     teacher_lse.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const dim3 center_grid(static_cast<unsigned>(ceil_div(K, kCenterColumns)), static_cast<unsigned>(n_c));
      center_sum_kernel<<<center_grid, kThreads, 0, stream>>>(
          t, center_offsets.data_ptr<int64_t>(), center_rows.data_ptr<int64_t>(), row_weight.data_ptr<float>(), Rt, K,
          can_vectorize(K, {&teacher}), center_sum.data_ptr<float>(), center_count.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (Rs > 0) {
        float* s_max = student_parts[0].data_ptr<float>();
        float* s_sum = student_parts[1].data_ptr<float>();
        float* mass = pair_parts[0].data_ptr<float>();
        float* gap = pair_parts[1].data_ptr<float>();
        student_partials_kernel<<<row_chunk_grid(Rs, chunks), kThreads, 0, stream>>>(
            student.data_ptr<student_t>(), t, pairs, s_max, s_sum, mass, gap);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        student_combine_kernel<<<row_blocks(Rs), kThreads, 0, stream>>>(pairs, Rs, s_max, s_sum, mass, gap,
                                                                         student_lse.data_ptr<float>(),
                                                                         pair_loss.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {pair_loss, center_sum, center_count, student_lse, teacher_lse};
}

at::Tensor backward_cuda(const at::Tensor& grad_pair_loss, const at::Tensor& student, const at::Tensor& teacher,
                         const at::Tensor& centers, const at::Tensor& center_id, const at::Tensor& student_offsets,
                         const at::Tensor& pair_teacher, const at::Tensor& pair_weight, const at::Tensor& student_lse,
                         const at::Tensor& teacher_lse, double tau_s, double tau_t) {
  check_cuda_kernel_types(student, teacher);
  check_backward_args(grad_pair_loss, student, teacher, centers, center_id, student_offsets, pair_teacher, pair_weight,
                      student_lse, teacher_lse, at::kFloat);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor grad_student = at::empty_like(student);
  const int64_t Rs = student.size(0), K = student.size(1);
  if (Rs == 0) return grad_student;
  const bool vectorized = can_vectorize(K, {&student, &teacher, &centers, &grad_student});
  const Pairs pairs = make_pairs(centers, center_id, student_offsets, pair_teacher, pair_weight, teacher_lse, K, tau_s,
                                 tau_t, vectorized);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  UDI_DISPATCH_CUDA_LOGITS(student.scalar_type(), "distill_cross_entropy_backward_cuda", [&] {
    using student_t = scalar_t;
    UDI_DISPATCH_CUDA_LOGITS(teacher.scalar_type(), "distill_cross_entropy_backward_cuda", [&] {
      student_backward_kernel<<<row_chunk_grid(Rs, pairs.num_chunks), kThreads, 0, stream>>>(
          grad_pair_loss.data_ptr<float>(), student.data_ptr<student_t>(), teacher.data_ptr<scalar_t>(), pairs,
          student_lse.data_ptr<float>(), grad_student.data_ptr<student_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_student;
}

}  // namespace

TORCH_LIBRARY_IMPL(udi_kernels, CUDA, m) {
  m.impl("distill_cross_entropy", &forward_cuda);
  m.impl("distill_cross_entropy_backward", &backward_cuda);
}

}  // namespace udi::distill_cross_entropy
