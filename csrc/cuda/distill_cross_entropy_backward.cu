// udi_kernels::distill_cross_entropy_backward on CUDA (plan: csrc/cuda/distill_cross_entropy.cuh).
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "distill_cross_entropy.cuh"
#include "distill_cross_entropy_op.h"

namespace udi::distill_cross_entropy {

namespace {

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

TORCH_LIBRARY_IMPL(udi_kernels, CUDA, m) { m.impl("distill_cross_entropy_backward", &backward_cuda); }

}  // namespace udi::distill_cross_entropy
