// What the CPU kernels of udi_kernels::linear_distill_cross_entropy (csrc/linear_distill_cross_entropy_forward.cpp)
// and its backward (csrc/linear_distill_cross_entropy_backward.cpp) share: the operands and the chunk buffers.
//
// K-chunk by K-chunk (kChunk columns): BLAS GEMMs (at::mm_out into reused chunk buffers) form the chunk's logits,
// then vectorised row loops (csrc/row_kernels.h) reduce them while they are in cache, one at::parallel_for task per
// row. Forward: pass 1 the teacher's logsumexps; pass 2 the teacher's probabilities of the chunk and the student's
// online logsumexp (running max m, sum l) with, per pair, Σ_k p_tk · (m − s_k) (non-negative terms, shifted when m
// grows), so that CE = that + (lse − m) · Σ_k p_tk is exact at large logits. Backward: the chunk's logits again,
// G = (Σ_p g_p · softmax(s) − Σ_p g_p · p_t) / τs per row, grad_student += G · W_chunk,
// grad_weight_chunk = Gᵀ · student. The student side runs in blocks of kRowBlock rows.
// Computes in the student's compute dtype (float for float/half/bfloat16, double for double).
// Repeatability: every row is reduced by one task in chunk order (independent of the thread count); the GEMMs are
// BLAS's, bitwise repeatable run to run at a fixed thread count (not claimed across thread counts).
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <optional>

#include "linear_distill_cross_entropy_op.h"
#include "row_kernels.h"

namespace udi::linear_distill_cross_entropy {

using distill_cross_entropy::csr_slots;
using distill_cross_entropy::PairArgs;
using distill_cross_entropy::pair_counts;
using distill_cross_entropy::SlotRange;
using distill_cross_entropy::teacher_row_ok;

constexpr int64_t kChunk = 8192;  // K-columns per chunk: MKL runs the [R, D] x [D, 2048] chunk GEMMs 3-10x
                                  // slower per FLOP than one [R, D] x [D, K] GEMM on this CPU, [R, D] x [D, 8192]
                                  // at 0.6-1x (benchmarks/NOTES.md)
constexpr int64_t kRowBlock = 128;  // student rows per GEMM and row loop: the student buffer is [128, kChunk]
                                   // (MKL: ~20-50 GFLOP/s at 64 rows, 40-50 at 128, 50-60 at 224, loaded CPU)

// The operands of one call in the compute type T, and the chunk loop's buffers.
template <typename T>
struct Problem {
  at::Tensor centers, pair_weight;      // in T; `pairs` points into them
  at::Tensor student, weight, teacher;  // student in T; weight as given; teacher rows in T, or logits as given
  std::optional<at::Tensor> teacher_weight;
  PairArgs<T> pairs;
  int64_t Rs, Rt, K;
  at::Tensor student_chunk, teacher_chunk;  // buffers of kRowBlock · kChunk and Rt · kChunk elements

  static constexpr at::ScalarType type = c10::CppTypeToScalarType<T>::value;

  int64_t chunk_size(int64_t k0) const { return std::min(kChunk, K - k0); }

  static at::Tensor view(at::Tensor& buffer, int64_t rows, int64_t n) {
    return buffer.narrow(0, 0, rows * n).view({rows, n});
  }

  // rows[r0 : r0 + m] @ weight_chunk.T / τs, [m, n] in the student buffer.
  at::Tensor scaled_student(const at::Tensor& rows, int64_t r0, int64_t m, const at::Tensor& weight_chunk) {
    const int64_t n = weight_chunk.size(0);
    at::Tensor out = view(student_chunk, m, n);
    at::mm_out(out, rows.narrow(0, r0, m), weight_chunk.t());
    T* data = out.data_ptr<T>();
    at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) row_kernels::scaled(data + r * n, pairs.inv_tau_s, n, data + r * n);
    });
    return out;
  }

  // (x_t − c) / τt of the chunk, [Rt, n] in the teacher buffer; with lse, the teacher's probabilities
  // exp((x_t − c) / τt − lse). Rows without a center are not computed (no pair reads them).
  at::Tensor centered_teacher(int64_t k0, int64_t n, const T* lse = nullptr) {
    at::Tensor out = view(teacher_chunk, Rt, n);
    teacher_logits(teacher, teacher_weight, k0, out);
    T* data = out.data_ptr<T>();
    at::parallel_for(0, Rt, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (!teacher_row_ok(pairs, r)) continue;
        T* row = data + r * n;
        row_kernels::centered_row(row, pairs.centers + pairs.center_id[r] * K + k0, pairs.inv_tau_t, n, row);
        if (lse == nullptr) continue;
        row_kernels::shifted(row, lse[r], n, row);
        row_kernels::exp_in_place(row, n);
      }
    });
    return out;
  }
};

template <typename T>
Problem<T> make_problem(const at::Tensor& student, const at::Tensor& weight, const at::Tensor& teacher,
                        const std::optional<at::Tensor>& teacher_weight, const at::Tensor& centers,
                        const at::Tensor& center_id, const at::Tensor& student_offsets, const at::Tensor& pair_teacher,
                        const at::Tensor& pair_weight, double tau_s, double tau_t) {
  constexpr at::ScalarType type = Problem<T>::type;
  const int64_t Rs = student.size(0), Rt = teacher.size(0), K = weight.size(0);
  const auto options = student.options().dtype(type);
  Problem<T> p{centers.to(type).contiguous(), pair_weight.to(type).contiguous(), student.to(type), weight,
               teacher_weight ? teacher.to(type) : teacher,  // logits are converted chunk by chunk
               teacher_weight, {}, Rs, Rt, K,
               at::empty({std::min(Rs, kRowBlock) * std::min(kChunk, K)}, options),
               at::empty({Rt * std::min(kChunk, K)}, options)};
  p.pairs = PairArgs<T>{p.centers.template data_ptr<T>(), center_id.data_ptr<int64_t>(),
                        student_offsets.data_ptr<int64_t>(), pair_teacher.data_ptr<int64_t>(),
                        p.pair_weight.template data_ptr<T>(), K, T(1.0 / tau_s), T(1.0 / tau_t), Rt, centers.size(0),
                        pair_teacher.numel()};
  return p;
}

#define UDI_DISPATCH_COMPUTE(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(compute_dtype(TYPE), NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__))

// Calls body(problem) with the Problem in the student's compute type.
template <typename Body>
void with_problem(const at::Tensor& student, const at::Tensor& weight, const at::Tensor& teacher,
                  const std::optional<at::Tensor>& teacher_weight, const at::Tensor& centers,
                  const at::Tensor& center_id, const at::Tensor& student_offsets, const at::Tensor& pair_teacher,
                  const at::Tensor& pair_weight, double tau_s, double tau_t, const Body& body) {
  UDI_DISPATCH_COMPUTE(student.scalar_type(), "linear_distill_cross_entropy_cpu", [&] {
    auto problem = make_problem<scalar_t>(student, weight, teacher, teacher_weight, centers, center_id,
                                          student_offsets, pair_teacher, pair_weight, tau_s, tau_t);
    body(problem);
  });
}

}  // namespace udi::linear_distill_cross_entropy
