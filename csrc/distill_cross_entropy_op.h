// Host-side plumbing of udi_kernels::distill_cross_entropy / distill_cross_entropy_backward shared by the CPU and
// CUDA kernels.
// Contract (shapes, CSR layout, saved statistics): udi_kernels/ops/distill_cross_entropy.py.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

#include "dtypes.h"
#include "host_device.h"

namespace udi::distill_cross_entropy {

// pair_loss, center_sum, center_count, student_lse, teacher_lse
using ForwardTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The pairs in student-row CSR order and the centers, as raw pointers; acc_t is the accumulation type
// (double on the CPU, float on CUDA).
//
// Indices read from memory are never trusted (the public op checks them only with check_values=True): every
// kernel reads a CSR segment through csr_slots and a pair through pair_counts, so that an index out of range
// skips its pair (loss 0, no gradient) or teacher row (left out of the center statistics) instead of reading
// out of bounds. The Triton kernels and
// the reference follow the same rule (udi_kernels/ops/distill_cross_entropy.py).
template <typename acc_t>
struct PairArgs {
  const acc_t* centers;
  const int64_t* center_id;
  const int64_t* student_offsets;
  const int64_t* pair_teacher;
  const acc_t* pair_weight;
  int64_t K;
  acc_t inv_tau_s, inv_tau_t;
  int64_t num_teacher_rows, num_centers, num_pairs;  // Rt, n_c, P: the bounds of the indices above
};

struct SlotRange {
  int64_t first, last;
};

UDI_HOST_DEVICE int64_t clamp_index(int64_t value, int64_t low, int64_t high) {
  return value < low ? low : (value > high ? high : value);
}

// The slots [offsets[i], offsets[i + 1]) of CSR segment i, clamped into [0, size] (empty when the offsets decrease).
UDI_HOST_DEVICE SlotRange csr_slots(const int64_t* offsets, int64_t i, int64_t size) {
  const int64_t first = clamp_index(offsets[i], 0, size);
  return {first, clamp_index(offsets[i + 1], first, size)};
}

// rows[slot] when it lies in [0, size), else -1.
UDI_HOST_DEVICE int64_t row_or_none(const int64_t* rows, int64_t slot, int64_t size) {
  const int64_t row = rows[slot];
  return row >= 0 && row < size ? row : -1;
}

// Whether teacher row `row` exists and has a center.
template <typename acc_t>
UDI_HOST_DEVICE bool teacher_row_ok(const PairArgs<acc_t>& p, int64_t row) {
  if (row < 0 || row >= p.num_teacher_rows) return false;
  const int64_t center = p.center_id[row];
  return center >= 0 && center < p.num_centers;
}

// Whether the pair in CSR slot `slot` counts: a nonzero weight and a teacher row that exists and has a center.
// A pair that does not count adds exactly 0 to the loss and to the gradient.
template <typename acc_t>
UDI_HOST_DEVICE bool pair_counts(const PairArgs<acc_t>& p, int64_t slot) {
  return p.pair_weight[slot] != 0 && teacher_row_ok(p, p.pair_teacher[slot]);
}

// The pair arguments every kernel reads: center_id [Rt], student_offsets [Rs + 1], pair_teacher [P], pair_weight [P]
// (in the student's compute dtype); Rs, Rt are the rows of student and teacher.
void check_pair_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& center_id,
                     const at::Tensor& student_offsets, const at::Tensor& pair_teacher, const at::Tensor& pair_weight);

// The center arguments of the forward: center_offsets [n_c + 1], center_rows [Rt], row_weight [Rt] (in the teacher's
// compute dtype), on the student's device; n_c is the rows of centers.
void check_center_args(const at::Tensor& teacher, const at::Tensor& centers, const at::Tensor& center_offsets,
                       const at::Tensor& center_rows, const at::Tensor& row_weight, const at::Tensor& student);

void check_temperatures(double tau_s, double tau_t);

// CPU: (center_sum [n_c, X], center_count [n_c]) in double of the teacher rows [Rt, X] grouped by center
// (center_offsets [n_c + 1], center_rows [Rt]); a row of weight 0 or outside [0, Rt) is left out exactly.
std::tuple<at::Tensor, at::Tensor> center_statistics_cpu(const at::Tensor& teacher, const at::Tensor& center_offsets,
                                                         const at::Tensor& center_rows, const at::Tensor& row_weight);

// Shapes, dtypes, devices and contiguity of the forward's arguments (values are checked in Python).
void check_forward_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& centers,
                        const at::Tensor& center_id, const at::Tensor& student_offsets, const at::Tensor& pair_teacher,
                        const at::Tensor& pair_weight, const at::Tensor& center_offsets, const at::Tensor& center_rows,
                        const at::Tensor& row_weight, double tau_s, double tau_t);

// The same for the backward's extra arguments; the saved logsumexps are in `lse_type`, the kernel's
// accumulation type (the CPU kernel saves doubles, so that its backward, which computes in double, stays exact).
void check_backward_args(const at::Tensor& grad_pair_loss, const at::Tensor& student, const at::Tensor& teacher,
                         const at::Tensor& centers, const at::Tensor& center_id, const at::Tensor& student_offsets,
                         const at::Tensor& pair_teacher, const at::Tensor& pair_weight,
                         const at::Tensor& student_lse, const at::Tensor& teacher_lse, at::ScalarType lse_type);

}  // namespace udi::distill_cross_entropy
