// udi_kernels::distill_ce_forward / distill_ce_backward on CUDA: one block per row, fp32 accumulation,
// block reductions through warp shuffles; center sums one thread per (center, k), so results are deterministic.
// Contract: udi_kernels/ops/distill_ce.py. Teacher and student may have different dtypes (fp32/fp16/bf16).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>

#include "distill_ce_op.h"

namespace udi::distill {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// A running logsumexp: max and the sum of exp(x - max).
struct OnlineLse {
  float max = -INFINITY;
  float sum = 0.f;

  __device__ void add(float x) {
    if (x > max) {
      sum = sum * __expf(max - x) + 1.f;
      max = x;
    } else {
      sum += __expf(x - max);
    }
  }
  __device__ void merge(OnlineLse other) {
    const float m = fmaxf(max, other.max);
    if (m == -INFINITY) return;
    sum = sum * __expf(max - m) + other.sum * __expf(other.max - m);
    max = m;
  }
  __device__ float value() const { return max + logf(sum); }
};

__device__ OnlineLse warp_merge(OnlineLse v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    OnlineLse other{__shfl_xor_sync(0xffffffffu, v.max, offset), __shfl_xor_sync(0xffffffffu, v.sum, offset)};
    v.merge(other);
  }
  return v;
}

__device__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Every thread gets the block's logsumexp. `scratch` holds kWarps entries; synchronises.
__device__ float block_lse(OnlineLse v, OnlineLse* scratch) {
  v = warp_merge(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  OnlineLse total;
  for (int w = 0; w < kWarps; ++w) total.merge(scratch[w]);
  __syncthreads();  // scratch may be reused next
  return total.value();
}

// Every thread gets the block's sum, in a fixed order. Synchronises.
__device__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

struct Pairs : PairArgs<float> {
  const float* teacher_lse;
};

template <typename teacher_t>
__device__ float centered(const teacher_t* teacher, const Pairs& p, int64_t row, int64_t k) {
  return (static_cast<float>(teacher[row * p.K + k]) - p.centers[p.center_id[row] * p.K + k]) * p.inv_tau_t;
}

template <typename teacher_t>
__global__ void teacher_stats_kernel(const teacher_t* teacher, Pairs p, float* teacher_lse) {
  __shared__ OnlineLse scratch[kWarps];
  const int64_t row = blockIdx.x;
  OnlineLse lse;
  for (int64_t k = threadIdx.x; k < p.K; k += kThreads) lse.add(centered(teacher, p, row, k));
  const float value = block_lse(lse, scratch);
  if (threadIdx.x == 0) teacher_lse[row] = value;
}

template <typename teacher_t>
__global__ void center_sum_kernel(const teacher_t* teacher, const int64_t* center_ptr, const int64_t* center_rows,
                                  const float* row_weight, int64_t K, float* center_sum, float* center_count) {
  const int64_t center = blockIdx.y;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t first = center_ptr[center], last = center_ptr[center + 1];
  if (k < K) {
    float acc = 0.f;
    for (int64_t slot = first; slot < last; ++slot) {
      const int64_t row = center_rows[slot];
      const float weight = row_weight[row];
      if (weight != 0.f) acc += weight * static_cast<float>(teacher[row * K + k]);
    }
    center_sum[center * K + k] = acc;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    float count = 0.f;
    for (int64_t slot = first; slot < last; ++slot) count += row_weight[center_rows[slot]];
    center_count[center] = count;
  }
}

template <typename student_t, typename teacher_t>
__global__ void student_forward_kernel(const student_t* student, const teacher_t* teacher, Pairs p, float* student_lse,
                                       float* pair_loss) {
  __shared__ OnlineLse lse_scratch[kWarps];
  __shared__ float sum_scratch[kWarps];
  const int64_t row = blockIdx.x;
  const student_t* s = student + row * p.K;
  OnlineLse running;
  for (int64_t k = threadIdx.x; k < p.K; k += kThreads) running.add(static_cast<float>(s[k]) * p.inv_tau_s);
  const float lse = block_lse(running, lse_scratch);
  if (threadIdx.x == 0) student_lse[row] = lse;

  for (int64_t slot = p.student_ptr[row]; slot < p.student_ptr[row + 1]; ++slot) {
    const float weight = p.pair_weight[slot];
    if (weight == 0.f) {  // uniform across the block: no thread reaches block_sum
      if (threadIdx.x == 0) pair_loss[slot] = 0.f;
      continue;
    }
    const int64_t t_row = p.pair_teacher[slot];
    const float t_lse = p.teacher_lse[t_row];
    float partial = 0.f;
    for (int64_t k = threadIdx.x; k < p.K; k += kThreads)
      partial += __expf(centered(teacher, p, t_row, k) - t_lse) * (lse - static_cast<float>(s[k]) * p.inv_tau_s);
    const float ce = block_sum(partial, sum_scratch);
    if (threadIdx.x == 0) pair_loss[slot] = weight * ce;
  }
}

template <typename student_t, typename teacher_t>
__global__ void student_backward_kernel(const float* grad_pair_loss, const student_t* student,
                                        const teacher_t* teacher, Pairs p, const float* student_lse,
                                        student_t* grad_student) {
  const int64_t row = blockIdx.x;
  const int64_t first = p.student_ptr[row], last = p.student_ptr[row + 1];
  float total = 0.f;
  for (int64_t slot = first; slot < last; ++slot)
    if (p.pair_weight[slot] != 0.f) total += p.pair_weight[slot] * grad_pair_loss[slot];
  const float lse = student_lse[row];
  for (int64_t k = threadIdx.x; k < p.K; k += kThreads) {
    float acc = total * __expf(static_cast<float>(student[row * p.K + k]) * p.inv_tau_s - lse);
    for (int64_t slot = first; slot < last; ++slot) {
      const float scale = p.pair_weight[slot] * grad_pair_loss[slot];
      if (scale == 0.f) continue;
      const int64_t t_row = p.pair_teacher[slot];
      acc -= scale * __expf(centered(teacher, p, t_row, k) - p.teacher_lse[t_row]);
    }
    grad_student[row * p.K + k] = static_cast<student_t>(acc * p.inv_tau_s);
  }
}

void check_cuda_kernel_types(const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK(student.is_cuda(), "student must be a CUDA tensor for the CUDA kernel");
  for (const auto& [t, name] : {std::pair{&student, "student"}, std::pair{&teacher, "teacher"}}) {
    const auto type = t->scalar_type();
    TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, name,
                " must be float32, float16 or bfloat16 for the CUDA kernel, got ", type);
  }
}

Pairs make_pairs(const at::Tensor& centers, const at::Tensor& center_id, const at::Tensor& student_ptr,
                 const at::Tensor& pair_teacher, const at::Tensor& pair_weight, const at::Tensor& teacher_lse,
                 int64_t K, double tau_s, double tau_t) {
  const PairArgs<float> args{centers.data_ptr<float>(),       center_id.data_ptr<int64_t>(),
                             student_ptr.data_ptr<int64_t>(), pair_teacher.data_ptr<int64_t>(),
                             pair_weight.data_ptr<float>(),   K,
                             static_cast<float>(1.0 / tau_s), static_cast<float>(1.0 / tau_t)};
  return Pairs{args, teacher_lse.data_ptr<float>()};
}

#define UDI_DISPATCH_CUDA_LOGITS(TYPE, NAME, ...)                                                       \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

ForwardTensors forward_cuda(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& centers,
                            const at::Tensor& center_id, const at::Tensor& student_ptr,
                            const at::Tensor& pair_teacher, const at::Tensor& pair_weight,
                            const at::Tensor& center_ptr, const at::Tensor& center_rows, const at::Tensor& row_weight,
                            double tau_s, double tau_t) {
  check_cuda_kernel_types(student, teacher);
  check_forward_args(student, teacher, centers, center_id, student_ptr, pair_teacher, pair_weight, center_ptr,
                     center_rows, row_weight, tau_s, tau_t);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t Rs = student.size(0), Rt = teacher.size(0), K = student.size(1), n_c = centers.size(0);
  const auto floats = student.options().dtype(at::kFloat);
  at::Tensor pair_loss = at::empty({pair_teacher.numel()}, floats), student_lse = at::empty({Rs}, floats);
  at::Tensor teacher_lse = at::empty({Rt}, floats), center_sum = at::empty({n_c, K}, floats);
  at::Tensor center_count = at::empty({n_c}, floats);
  const Pairs pairs = make_pairs(centers, center_id, student_ptr, pair_teacher, pair_weight, teacher_lse, K, tau_s,
                                 tau_t);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  UDI_DISPATCH_CUDA_LOGITS(student.scalar_type(), "distill_ce_forward_cuda", [&] {
    using student_t = scalar_t;
    UDI_DISPATCH_CUDA_LOGITS(teacher.scalar_type(), "distill_ce_forward_cuda", [&] {
      const scalar_t* t = teacher.data_ptr<scalar_t>();
      if (Rt > 0) {
        teacher_stats_kernel<<<Rt, kThreads, 0, stream>>>(t, pairs, teacher_lse.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const dim3 grid((K + kThreads - 1) / kThreads, n_c);
      center_sum_kernel<<<grid, kThreads, 0, stream>>>(t, center_ptr.data_ptr<int64_t>(),
                                                       center_rows.data_ptr<int64_t>(), row_weight.data_ptr<float>(),
                                                       K, center_sum.data_ptr<float>(),
                                                       center_count.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (Rs > 0) {
        student_forward_kernel<<<Rs, kThreads, 0, stream>>>(student.data_ptr<student_t>(), t, pairs,
                                                            student_lse.data_ptr<float>(),
                                                            pair_loss.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {pair_loss, center_sum, center_count, student_lse, teacher_lse};
}

at::Tensor backward_cuda(const at::Tensor& grad_pair_loss, const at::Tensor& student, const at::Tensor& teacher,
                         const at::Tensor& centers, const at::Tensor& center_id, const at::Tensor& student_ptr,
                         const at::Tensor& pair_teacher, const at::Tensor& pair_weight, const at::Tensor& student_lse,
                         const at::Tensor& teacher_lse, double tau_s, double tau_t) {
  check_cuda_kernel_types(student, teacher);
  check_backward_args(grad_pair_loss, student, teacher, student_ptr, pair_teacher, student_lse, teacher_lse);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor grad_student = at::empty_like(student);
  const int64_t Rs = student.size(0);
  if (Rs == 0) return grad_student;
  const Pairs pairs = make_pairs(centers, center_id, student_ptr, pair_teacher, pair_weight, teacher_lse,
                                 student.size(1), tau_s, tau_t);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  UDI_DISPATCH_CUDA_LOGITS(student.scalar_type(), "distill_ce_backward_cuda", [&] {
    using student_t = scalar_t;
    UDI_DISPATCH_CUDA_LOGITS(teacher.scalar_type(), "distill_ce_backward_cuda", [&] {
      student_backward_kernel<<<Rs, kThreads, 0, stream>>>(
          grad_pair_loss.data_ptr<float>(), student.data_ptr<student_t>(), teacher.data_ptr<scalar_t>(), pairs,
          student_lse.data_ptr<float>(), grad_student.data_ptr<student_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_student;
}

}  // namespace

TORCH_LIBRARY_IMPL(udi_kernels, CUDA, m) {
  m.impl("distill_ce_forward", &forward_cuda);
  m.impl("distill_ce_backward", &backward_cuda);
}

}  // namespace udi::distill
