// udi_kernels::distill_cross_entropy / distill_cross_entropy_backward: schemas, argument checks and the center
// statistics. The CPU kernels: csrc/distill_cross_entropy_forward.cpp and csrc/distill_cross_entropy_backward.cpp.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "distill_cross_entropy_cpu.h"
#include "distill_cross_entropy_op.h"

namespace udi::distill_cross_entropy {

namespace {

void check_logits(const at::Tensor& t, const char* name, const at::Tensor& student) {
  check_dim(t, name, 2, "[rows, K]");
  check_floating(t, name);
  check_like(t, name, student, "student");
}

// student, teacher, centers: 2-d with one positive K, on the student's device, contiguous; centers in the
// teacher's compute dtype with at least one row.
void check_logit_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& centers) {
  check_logits(student, "student", student);
  check_logits(teacher, "teacher", student);
  check_logits(centers, "centers", student);
  const int64_t K = student.size(1);
  TORCH_CHECK(K > 0 && teacher.size(1) == K && centers.size(1) == K,
              "student, teacher and centers must share a positive K, got ", student.sizes(), ", ", teacher.sizes(),
              " and ", centers.sizes());
  TORCH_CHECK(centers.size(0) > 0, "centers must have at least one row");
  UDI_CHECK_DTYPE(centers, compute_dtype(teacher.scalar_type()));
}

}  // namespace

void check_pair_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& center_id,
                     const at::Tensor& student_offsets, const at::Tensor& pair_teacher, const at::Tensor& pair_weight) {
  const int64_t P = pair_teacher.numel();
  UDI_CHECK_VECTOR(center_id, at::kLong, teacher.size(0), student);
  UDI_CHECK_VECTOR(student_offsets, at::kLong, student.size(0) + 1, student);
  UDI_CHECK_VECTOR(pair_teacher, at::kLong, P, student);
  UDI_CHECK_VECTOR(pair_weight, compute_dtype(student.scalar_type()), P, student);
}

void check_center_args(const at::Tensor& teacher, const at::Tensor& centers, const at::Tensor& center_offsets,
                       const at::Tensor& center_rows, const at::Tensor& row_weight, const at::Tensor& student) {
  const int64_t Rt = teacher.size(0);
  UDI_CHECK_VECTOR(center_offsets, at::kLong, centers.size(0) + 1, student);
  UDI_CHECK_VECTOR(center_rows, at::kLong, Rt, student);
  UDI_CHECK_VECTOR(row_weight, compute_dtype(teacher.scalar_type()), Rt, student);
}

void check_temperatures(double tau_s, double tau_t) {
  TORCH_CHECK(tau_s > 0 && tau_t > 0, "tau_s and tau_t must be positive, got ", tau_s, " and ", tau_t);
}

void check_forward_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& centers,
                        const at::Tensor& center_id, const at::Tensor& student_offsets, const at::Tensor& pair_teacher,
                        const at::Tensor& pair_weight, const at::Tensor& center_offsets, const at::Tensor& center_rows,
                        const at::Tensor& row_weight, double tau_s, double tau_t) {
  check_logit_args(student, teacher, centers);
  check_pair_args(student, teacher, center_id, student_offsets, pair_teacher, pair_weight);
  check_center_args(teacher, centers, center_offsets, center_rows, row_weight, student);
  check_temperatures(tau_s, tau_t);
}

void check_backward_args(const at::Tensor& grad_pair_loss, const at::Tensor& student, const at::Tensor& teacher,
                         const at::Tensor& centers, const at::Tensor& center_id, const at::Tensor& student_offsets,
                         const at::Tensor& pair_teacher, const at::Tensor& pair_weight,
                         const at::Tensor& student_lse, const at::Tensor& teacher_lse, at::ScalarType lse_type) {
  check_logit_args(student, teacher, centers);
  check_pair_args(student, teacher, center_id, student_offsets, pair_teacher, pair_weight);
  UDI_CHECK_VECTOR(grad_pair_loss, compute_dtype(student.scalar_type()), pair_teacher.numel(), student);
  UDI_CHECK_VECTOR(student_lse, lse_type, student.size(0), student);
  UDI_CHECK_VECTOR(teacher_lse, lse_type, teacher.size(0), student);
}

std::tuple<at::Tensor, at::Tensor> center_statistics_cpu(const at::Tensor& teacher, const at::Tensor& center_offsets,
                                                         const at::Tensor& center_rows, const at::Tensor& row_weight) {
  const int64_t n_c = center_offsets.size(0) - 1, Rt = teacher.size(0), K = teacher.size(1);
  const auto doubles = teacher.options().dtype(at::kDouble);
  at::Tensor center_sum = at::empty({n_c, K}, doubles), center_count = at::empty({n_c}, doubles);
  const at::Tensor row_weight64 = as_double(row_weight);
  center_counts(center_offsets.data_ptr<int64_t>(), center_rows.data_ptr<int64_t>(), row_weight64.data_ptr<double>(),
                n_c, Rt, center_count.data_ptr<double>());
  UDI_DISPATCH_LOGITS(teacher.scalar_type(), "center_statistics_cpu", [&] {
    center_sums(teacher.data_ptr<scalar_t>(), center_offsets.data_ptr<int64_t>(), center_rows.data_ptr<int64_t>(),
                row_weight64.data_ptr<double>(), n_c, Rt, K, 0, K, center_sum.data_ptr<double>());
  });
  return {center_sum, center_count};
}

TORCH_LIBRARY_FRAGMENT(udi_kernels, m) {
  m.def(
      "distill_cross_entropy(Tensor student, Tensor teacher, Tensor centers, Tensor center_id, Tensor student_offsets, "
      "Tensor pair_teacher, Tensor pair_weight, Tensor center_offsets, Tensor center_rows, Tensor row_weight, "
      "float tau_s, float tau_t) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "distill_cross_entropy_backward(Tensor grad_pair_loss, Tensor student, Tensor teacher, Tensor centers, "
      "Tensor center_id, Tensor student_offsets, Tensor pair_teacher, Tensor pair_weight, Tensor student_lse, "
      "Tensor teacher_lse, float tau_s, float tau_t) -> Tensor");
}

}  // namespace udi::distill_cross_entropy
