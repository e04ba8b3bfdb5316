// udi_kernels::linear_distill_cross_entropy / _backward: schemas, argument checks and the chunk GEMMs' operands.
// The CPU kernels (plan: csrc/linear_distill_cross_entropy_cpu.h): csrc/linear_distill_cross_entropy_forward.cpp
// and csrc/linear_distill_cross_entropy_backward.cpp.
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "checks.h"
#include "linear_distill_cross_entropy_op.h"

namespace udi::linear_distill_cross_entropy {

using distill_cross_entropy::check_center_args;
using distill_cross_entropy::check_pair_args;
using distill_cross_entropy::check_temperatures;

namespace {

// student [Rs, D], weight [K, D], teacher [Rt, Dt] with teacher_weight [K, Dt] or logits [Rt, K], centers [n_c, K].
void check_linear_args(const at::Tensor& student, const at::Tensor& weight, const at::Tensor& teacher,
                       const std::optional<at::Tensor>& teacher_weight, const at::Tensor& centers) {
  UDI_CHECK_FLOATING(student);
  UDI_CHECK_FLOATING(teacher);
  UDI_CHECK_MATRIX(student, student.scalar_type(), student);
  UDI_CHECK_MATRIX(weight, student.scalar_type(), student);
  UDI_CHECK_MATRIX(teacher, teacher.scalar_type(), student);
  UDI_CHECK_MATRIX(centers, compute_dtype(teacher.scalar_type()), student);
  const int64_t K = weight.size(0);
  TORCH_CHECK(weight.size(1) == student.size(1), "weight must have student's D = ", student.size(1), ", got ",
              weight.sizes());
  if (teacher_weight) {
    check_matrix(*teacher_weight, "teacher_weight", teacher.scalar_type(), student, "student");
    TORCH_CHECK(teacher_weight->size(0) == K && teacher_weight->size(1) == teacher.size(1),
                "teacher_weight must have shape [K, Dt] = [", K, ", ", teacher.size(1), "], got ",
                teacher_weight->sizes());
  } else {
    TORCH_CHECK(teacher.size(1) == K, "teacher (logits) must have weight's K = ", K, " columns, got ", teacher.sizes());
  }
  TORCH_CHECK(K > 0 && centers.size(1) == K && centers.size(0) > 0,
              "centers must have shape [n_c > 0, K = ", K, "], got ", centers.sizes());
}

}  // namespace

void check_forward_args(const at::Tensor& student, const at::Tensor& weight, const at::Tensor& teacher,
                        const std::optional<at::Tensor>& teacher_weight, const at::Tensor& centers,
                        const at::Tensor& center_id, const at::Tensor& student_offsets, const at::Tensor& pair_teacher,
                        const at::Tensor& pair_weight, const at::Tensor& center_offsets, const at::Tensor& center_rows,
                        const at::Tensor& row_weight, double tau_s, double tau_t) {
  check_linear_args(student, weight, teacher, teacher_weight, centers);
  check_pair_args(student, teacher, center_id, student_offsets, pair_teacher, pair_weight);
  check_center_args(teacher, centers, center_offsets, center_rows, row_weight, student);
  check_temperatures(tau_s, tau_t);
}

void check_backward_args(const at::Tensor& grad_pair_loss, const at::Tensor& student, const at::Tensor& weight,
                         const at::Tensor& teacher, const std::optional<at::Tensor>& teacher_weight,
                         const at::Tensor& centers, const at::Tensor& center_id, const at::Tensor& student_offsets,
                         const at::Tensor& pair_teacher, const at::Tensor& pair_weight, const at::Tensor& student_lse,
                         const at::Tensor& teacher_lse, double tau_s, double tau_t) {
  check_linear_args(student, weight, teacher, teacher_weight, centers);
  check_pair_args(student, teacher, center_id, student_offsets, pair_teacher, pair_weight);
  const at::ScalarType out = compute_dtype(student.scalar_type());
  UDI_CHECK_VECTOR(grad_pair_loss, out, pair_teacher.numel(), student);
  UDI_CHECK_VECTOR(student_lse, out, student.size(0), student);
  UDI_CHECK_VECTOR(teacher_lse, compute_dtype(teacher.scalar_type()), teacher.size(0), student);
  check_temperatures(tau_s, tau_t);
}

at::Tensor weight_chunk(const at::Tensor& weight, int64_t k0, int64_t n, at::ScalarType type) {
  return weight.narrow(0, k0, n).to(type);
}

void teacher_logits(const at::Tensor& teacher, const std::optional<at::Tensor>& teacher_weight, int64_t k0,
                    at::Tensor& out) {
  const int64_t n = out.size(1);
  if (!teacher_weight) {
    out.copy_(teacher.narrow(1, k0, n));
    return;
  }
  const at::Tensor weight = weight_chunk(*teacher_weight, k0, n, teacher.scalar_type()).t();
  if (teacher.scalar_type() == out.scalar_type())
    at::mm_out(out, teacher, weight);
  else  // half inputs, float output (CUDA)
    at::mm_out(out, teacher, weight, out.scalar_type());
}

TORCH_LIBRARY_FRAGMENT(udi_kernels, m) {
  m.def(
      "linear_distill_cross_entropy(Tensor student, Tensor weight, Tensor teacher, Tensor? teacher_weight, "
      "Tensor centers, Tensor center_id, Tensor student_offsets, Tensor pair_teacher, Tensor pair_weight, "
      "Tensor center_offsets, Tensor center_rows, Tensor row_weight, float tau_s, float tau_t) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_distill_cross_entropy_backward(Tensor grad_pair_loss, Tensor student, Tensor weight, Tensor teacher, "
      "Tensor? teacher_weight, Tensor centers, Tensor center_id, Tensor student_offsets, Tensor pair_teacher, "
      "Tensor pair_weight, Tensor student_lse, Tensor teacher_lse, float tau_s, float tau_t) -> (Tensor, Tensor)");
}

}  // namespace udi::linear_distill_cross_entropy
