// Host-side plumbing of udi_kernels::linear_distill_cross_entropy / _backward shared by the CPU and CUDA kernels.
// Contract (shapes, CSR layout, saved statistics): udi_kernels/ops/linear_distill_cross_entropy.py. The pair rules
// (an index out of range skips its pair or row) are distill_cross_entropy's (distill_cross_entropy_op.h).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

#include "distill_cross_entropy_op.h"

namespace udi::linear_distill_cross_entropy {

using distill_cross_entropy::ForwardTensors;  // pair_loss, center_sum, center_count, student_lse, teacher_lse

// Shapes, dtypes, devices and contiguity of the forward's arguments (values are checked in Python).
void check_forward_args(const at::Tensor& student, const at::Tensor& weight, const at::Tensor& teacher,
                        const std::optional<at::Tensor>& teacher_weight, const at::Tensor& centers,
                        const at::Tensor& center_id, const at::Tensor& student_offsets, const at::Tensor& pair_teacher,
                        const at::Tensor& pair_weight, const at::Tensor& center_offsets, const at::Tensor& center_rows,
                        const at::Tensor& row_weight, double tau_s, double tau_t);

// The same for the backward (the saved logsumexps are in the compute dtypes of student and teacher).
void check_backward_args(const at::Tensor& grad_pair_loss, const at::Tensor& student, const at::Tensor& weight,
                         const at::Tensor& teacher, const std::optional<at::Tensor>& teacher_weight,
                         const at::Tensor& centers, const at::Tensor& center_id, const at::Tensor& student_offsets,
                         const at::Tensor& pair_teacher, const at::Tensor& pair_weight, const at::Tensor& student_lse,
                         const at::Tensor& teacher_lse, double tau_s, double tau_t);

// The teacher's logits of columns [k0, k0 + n) into `out` (contiguous [Rt, n], float or double): the GEMM
// teacher @ teacher_weight[k0 : k0 + n].T in teacher's dtype with out's accumulation and output, or teacher's
// columns when it holds logits.
void teacher_logits(const at::Tensor& teacher, const std::optional<at::Tensor>& teacher_weight, int64_t k0,
                    at::Tensor& out);

// weight[k0 : k0 + n] in `type` (a view when it already is).
at::Tensor weight_chunk(const at::Tensor& weight, int64_t k0, int64_t n, at::ScalarType type);

}  // namespace udi::linear_distill_cross_entropy
