// Host-side plumbing of udi_kernels::distill_ce_forward / distill_ce_backward shared by the CPU and CUDA kernels.
// Contract (shapes, CSR layout, saved statistics): udi_kernels/ops/distill_ce.py.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

namespace udi::distill {

// pair_loss, center_sum, center_count, student_lse, teacher_lse
using ForwardTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The pairs in student-row CSR order and the centers, as raw pointers; acc_t is the accumulation type
// (double on the CPU, float on CUDA).
template <typename acc_t>
struct PairArgs {
  const acc_t* centers;
  const int64_t* center_id;
  const int64_t* student_ptr;
  const int64_t* pair_teacher;
  const acc_t* pair_weight;
  int64_t K;
  acc_t inv_tau_s, inv_tau_t;
};

// float64 stays float64; other floating dtypes compute and return float32.
inline at::ScalarType compute_type(at::ScalarType type) {
  return type == at::kDouble ? at::kDouble : at::kFloat;
}

// Shapes, dtypes, devices and contiguity of the forward's arguments (values are checked in Python).
void check_forward_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& centers,
                        const at::Tensor& center_id, const at::Tensor& student_ptr, const at::Tensor& pair_teacher,
                        const at::Tensor& pair_weight, const at::Tensor& center_ptr, const at::Tensor& center_rows,
                        const at::Tensor& row_weight, double tau_s, double tau_t);

// The same for the backward's extra arguments.
void check_backward_args(const at::Tensor& grad_pair_loss, const at::Tensor& student, const at::Tensor& teacher,
                         const at::Tensor& student_ptr, const at::Tensor& pair_teacher,
                         const at::Tensor& student_lse, const at::Tensor& teacher_lse);

}  // namespace udi::distill
