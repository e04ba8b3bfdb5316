// udi_kernels::distill_cross_entropy on CUDA (plan: csrc/cuda/distill_cross_entropy.cuh): the teacher's and the
// student's chunk partials, their combination per row, and the center statistics.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "blocks.cuh"
#include "checks.h"
#include "distill_cross_entropy.cuh"
#include "distill_cross_entropy_op.h"

namespace udi::distill_cross_entropy {

namespace {

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
      mass = cuda::block_sum<kWarps>(mass, sum_scratch);
      gap = cuda::block_sum<kWarps>(gap, sum_scratch);
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
  check_cuda_limit(n_c, cuda::kMaxGridY, "centers n_c");
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
        lse_combine_kernel<<<cuda::blocks_for(Rt, kThreads), kThreads, 0, stream>>>(
            t_max, t_sum, Rt, chunks, teacher_lse.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const dim3 center_grid(static_cast<unsigned>(cuda::ceil_div(K, kCenterColumns)), static_cast<unsigned>(n_c));
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
        student_combine_kernel<<<cuda::blocks_for(Rs, kThreads), kThreads, 0, stream>>>(
            pairs, Rs, s_max, s_sum, mass, gap, student_lse.data_ptr<float>(), pair_loss.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {pair_loss, center_sum, center_count, student_lse, teacher_lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(udi_kernels, CUDA, m) { m.impl("distill_cross_entropy", &forward_cuda); }

}  // namespace udi::distill_cross_entropy
