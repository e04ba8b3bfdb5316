// udi_kernels::distill_cross_entropy / distill_cross_entropy_backward: schemas, argument checks and the CPU kernels.
// CPU kernels accumulate in double; one parallel task per row (forward, backward) or per K range (center sums).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "distill_cross_entropy_op.h"

namespace udi::distill_cross_entropy {

void check_vector(const at::Tensor& t, const char* name, at::ScalarType type, int64_t length, const at::Device& device) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length, name, " must have shape [", length, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == type, name, " must be ", type, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, name, " must be on ", device, " like student, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

namespace {

void check_logits(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.dim() == 2, name, " must have shape [rows, K], got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be floating, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, name, " must be on ", device, " like student, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

namespace {

// student, teacher, centers: 2-d with one positive K, on the student's device, contiguous; centers in the
// teacher's compute dtype with at least one row.
void check_logit_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& centers) {
  const at::Device device = student.device();
  check_logits(student, "student", device);
  check_logits(teacher, "teacher", device);
  check_logits(centers, "centers", device);
  const int64_t K = student.size(1);
  TORCH_CHECK(K > 0 && teacher.size(1) == K && centers.size(1) == K,
              "student, teacher and centers must share a positive K, got ", student.sizes(), ", ", teacher.sizes(),
              " and ", centers.sizes());
  TORCH_CHECK(centers.size(0) > 0, "centers must have at least one row");
  TORCH_CHECK(centers.scalar_type() == compute_dtype(teacher.scalar_type()), "centers must be ",
              compute_dtype(teacher.scalar_type()), ", got ", centers.scalar_type());
}

}  // namespace

void check_pair_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& center_id,
                     const at::Tensor& student_offsets, const at::Tensor& pair_teacher, const at::Tensor& pair_weight) {
  const at::Device device = student.device();
  const int64_t P = pair_teacher.numel();
  check_vector(center_id, "center_id", at::kLong, teacher.size(0), device);
  check_vector(student_offsets, "student_offsets", at::kLong, student.size(0) + 1, device);
  check_vector(pair_teacher, "pair_teacher", at::kLong, P, device);
  check_vector(pair_weight, "pair_weight", compute_dtype(student.scalar_type()), P, device);
}

void check_temperatures(double tau_s, double tau_t) {
  TORCH_CHECK(tau_s > 0 && tau_t > 0, "tau_s and tau_t must be positive, got ", tau_s, " and ", tau_t);
}

void check_forward_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& centers,
                        const at::Tensor& center_id, const at::Tensor& student_offsets, const at::Tensor& pair_teacher,
                        const at::Tensor& pair_weight, const at::Tensor& center_offsets, const at::Tensor& center_rows,
                        const at::Tensor& row_weight, double tau_s, double tau_t) {
  const at::Device device = student.device();
  check_logit_args(student, teacher, centers);
  check_pair_args(student, teacher, center_id, student_offsets, pair_teacher, pair_weight);
  const int64_t Rt = teacher.size(0);
  check_vector(center_offsets, "center_offsets", at::kLong, centers.size(0) + 1, device);
  check_vector(center_rows, "center_rows", at::kLong, Rt, device);
  check_vector(row_weight, "row_weight", compute_dtype(teacher.scalar_type()), Rt, device);
  check_temperatures(tau_s, tau_t);
}

void check_backward_args(const at::Tensor& grad_pair_loss, const at::Tensor& student, const at::Tensor& teacher,
                         const at::Tensor& centers, const at::Tensor& center_id, const at::Tensor& student_offsets,
                         const at::Tensor& pair_teacher, const at::Tensor& pair_weight,
                         const at::Tensor& student_lse, const at::Tensor& teacher_lse, at::ScalarType lse_type) {
  const at::Device device = student.device();
  check_logit_args(student, teacher, centers);
  check_pair_args(student, teacher, center_id, student_offsets, pair_teacher, pair_weight);
  check_vector(grad_pair_loss, "grad_pair_loss", compute_dtype(student.scalar_type()), pair_teacher.numel(), device);
  check_vector(student_lse, "student_lse", lse_type, student.size(0), device);
  check_vector(teacher_lse, "teacher_lse", lse_type, teacher.size(0), device);
}

namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Everything a CPU kernel reads, as raw pointers; the logits keep their dtypes.
template <typename student_t, typename teacher_t>
struct Rows : PairArgs<double> {
  const student_t* student;
  const teacher_t* teacher;

  double scaled_student(int64_t row, int64_t k) const { return static_cast<double>(student[row * K + k]) * inv_tau_s; }
  double centered(int64_t row, int64_t k) const {
    return (static_cast<double>(teacher[row * K + k]) - centers[center_id[row] * K + k]) * inv_tau_t;
  }
};

template <typename F>
double log_sum_exp(int64_t K, F value) {
  double max = kNegInf;
  for (int64_t k = 0; k < K; ++k) max = std::max(max, value(k));
  double sum = 0;
  for (int64_t k = 0; k < K; ++k) sum += std::exp(value(k) - max);
  return max + std::log(sum);
}

at::Tensor as_double(const at::Tensor& t) { return t.to(at::kDouble).contiguous(); }

template <typename student_t, typename teacher_t>
void forward_rows(const Rows<student_t, teacher_t>& rows, int64_t Rs, int64_t Rt, double* pair_loss,
                  double* student_lse, double* teacher_lse) {
  at::parallel_for(0, Rt, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)  // -inf for a row without a center: no pair reads it
      teacher_lse[r] = teacher_row_ok(rows, r) ? log_sum_exp(rows.K, [&](int64_t k) { return rows.centered(r, k); })
                                               : kNegInf;
  });
  at::parallel_for(0, Rs, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const double lse = log_sum_exp(rows.K, [&](int64_t k) { return rows.scaled_student(r, k); });
      student_lse[r] = lse;
      const SlotRange slots = csr_slots(rows.student_offsets, r, rows.num_pairs);
      for (int64_t slot = slots.first; slot < slots.last; ++slot) {
        if (!pair_counts(rows, slot)) continue;  // pair_loss starts at 0
        const int64_t t_row = rows.pair_teacher[slot];
        double ce = 0;
        for (int64_t k = 0; k < rows.K; ++k)
          ce += std::exp(rows.centered(t_row, k) - teacher_lse[t_row]) * (lse - rows.scaled_student(r, k));
        pair_loss[slot] = rows.pair_weight[slot] * ce;
      }
    }
  });
}

// Rows of center_rows outside [0, Rt) are skipped, like the rows of a center_id out of range (build_csr leaves
// those out of every segment).
template <typename teacher_t>
void center_sums(const teacher_t* teacher, const int64_t* center_offsets, const int64_t* center_rows,
                 const double* row_weight, int64_t n_c, int64_t Rt, int64_t K, double* center_sum,
                 double* center_count) {
  for (int64_t c = 0; c < n_c; ++c) {
    double count = 0;
    const SlotRange slots = csr_slots(center_offsets, c, Rt);
    for (int64_t slot = slots.first; slot < slots.last; ++slot) {
      const int64_t row = row_or_none(center_rows, slot, Rt);
      if (row >= 0) count += row_weight[row];
    }
    center_count[c] = count;
  }
  at::parallel_for(0, K, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t c = 0; c < n_c; ++c) {
      double* out = center_sum + c * K;
      for (int64_t k = begin; k < end; ++k) out[k] = 0;
      const SlotRange slots = csr_slots(center_offsets, c, Rt);
      for (int64_t slot = slots.first; slot < slots.last; ++slot) {
        const int64_t row = row_or_none(center_rows, slot, Rt);
        if (row < 0 || row_weight[row] == 0) continue;
        const double weight = row_weight[row];
        for (int64_t k = begin; k < end; ++k) out[k] += weight * static_cast<double>(teacher[row * K + k]);
      }
    }
  });
}

}  // namespace

#define UDI_DISPATCH_LOGITS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> center_statistics_cpu(const at::Tensor& teacher, const at::Tensor& center_offsets,
                                                         const at::Tensor& center_rows, const at::Tensor& row_weight) {
  const int64_t n_c = center_offsets.size(0) - 1, Rt = teacher.size(0), K = teacher.size(1);
  const auto doubles = teacher.options().dtype(at::kDouble);
  at::Tensor center_sum = at::empty({n_c, K}, doubles), center_count = at::empty({n_c}, doubles);
  const at::Tensor row_weight64 = as_double(row_weight);
  UDI_DISPATCH_LOGITS(teacher.scalar_type(), "center_statistics_cpu", [&] {
    center_sums(teacher.data_ptr<scalar_t>(), center_offsets.data_ptr<int64_t>(), center_rows.data_ptr<int64_t>(),
                row_weight64.data_ptr<double>(), n_c, Rt, K, center_sum.data_ptr<double>(),
                center_count.data_ptr<double>());
  });
  return {center_sum, center_count};
}

namespace {

template <typename student_t, typename teacher_t>
Rows<student_t, teacher_t> make_rows(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& centers,
                                     const at::Tensor& center_id, const at::Tensor& student_offsets,
                                     const at::Tensor& pair_teacher, const at::Tensor& pair_weight, double tau_s,
                                     double tau_t) {
  const PairArgs<double> pairs{centers.data_ptr<double>(),       center_id.data_ptr<int64_t>(),
                               student_offsets.data_ptr<int64_t>(), pair_teacher.data_ptr<int64_t>(),
                               pair_weight.data_ptr<double>(),  student.size(1),
                               1.0 / tau_s,                     1.0 / tau_t,
                               teacher.size(0),                 centers.size(0),
                               pair_teacher.numel()};
  return Rows<student_t, teacher_t>{pairs, student.data_ptr<student_t>(), teacher.data_ptr<teacher_t>()};
}

// Calls body(rows) with the Rows of the student's and the teacher's dtypes.
template <typename Body>
void with_rows(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& centers64,
               const at::Tensor& center_id, const at::Tensor& student_offsets, const at::Tensor& pair_teacher,
               const at::Tensor& pair_weight64, double tau_s, double tau_t, const Body& body) {
  UDI_DISPATCH_LOGITS(student.scalar_type(), "distill_cross_entropy_cpu", [&] {
    using student_t = scalar_t;
    UDI_DISPATCH_LOGITS(teacher.scalar_type(), "distill_cross_entropy_cpu", [&] {
      body(make_rows<student_t, scalar_t>(student, teacher, centers64, center_id, student_offsets, pair_teacher,
                                          pair_weight64, tau_s, tau_t));
    });
  });
}

ForwardTensors forward_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& centers,
                           const at::Tensor& center_id, const at::Tensor& student_offsets,
                           const at::Tensor& pair_teacher, const at::Tensor& pair_weight,
                           const at::Tensor& center_offsets, const at::Tensor& center_rows,
                           const at::Tensor& row_weight, double tau_s, double tau_t) {
  TORCH_CHECK(student.device().is_cpu(), "student must be a CPU tensor for the CPU kernel");
  check_forward_args(student, teacher, centers, center_id, student_offsets, pair_teacher, pair_weight, center_offsets,
                     center_rows, row_weight, tau_s, tau_t);
  const int64_t Rs = student.size(0), Rt = teacher.size(0), K = student.size(1), n_c = centers.size(0);
  const auto doubles = student.options().dtype(at::kDouble);
  at::Tensor pair_loss = at::zeros({pair_teacher.numel()}, doubles), student_lse = at::empty({Rs}, doubles);
  at::Tensor teacher_lse = at::empty({Rt}, doubles);
  const at::Tensor centers64 = as_double(centers), pair_weight64 = as_double(pair_weight);
  with_rows(student, teacher, centers64, center_id, student_offsets, pair_teacher, pair_weight64, tau_s, tau_t,
            [&](const auto& rows) {
              forward_rows(rows, Rs, Rt, pair_loss.data_ptr<double>(), student_lse.data_ptr<double>(),
                           teacher_lse.data_ptr<double>());
            });
  const auto [center_sum, center_count] = center_statistics_cpu(teacher, center_offsets, center_rows, row_weight);
  const at::ScalarType out = compute_dtype(student.scalar_type()), stats = compute_dtype(teacher.scalar_type());
  // the logsumexps stay double: the backward recomputes the exponents in double against them
  return {pair_loss.to(out), center_sum.to(stats), center_count.to(stats), student_lse, teacher_lse};
}

template <typename student_t, typename teacher_t>
void backward_rows(const Rows<student_t, teacher_t>& rows, int64_t Rs, const double* grad_pair_loss,
                   const double* student_lse, const double* teacher_lse, student_t* grad_student) {
  at::parallel_for(0, Rs, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> acc(rows.K);
    for (int64_t r = begin; r < end; ++r) {
      const SlotRange slots = csr_slots(rows.student_offsets, r, rows.num_pairs);
      const auto scale_of = [&](int64_t slot) {
        return pair_counts(rows, slot) ? rows.pair_weight[slot] * grad_pair_loss[slot] : 0.0;
      };
      double total = 0;
      for (int64_t slot = slots.first; slot < slots.last; ++slot) total += scale_of(slot);
      for (int64_t k = 0; k < rows.K; ++k) acc[k] = total * std::exp(rows.scaled_student(r, k) - student_lse[r]);
      for (int64_t slot = slots.first; slot < slots.last; ++slot) {
        const double scale = scale_of(slot);
        if (scale == 0) continue;
        const int64_t t_row = rows.pair_teacher[slot];
        for (int64_t k = 0; k < rows.K; ++k) acc[k] -= scale * std::exp(rows.centered(t_row, k) - teacher_lse[t_row]);
      }
      for (int64_t k = 0; k < rows.K; ++k) grad_student[r * rows.K + k] = static_cast<student_t>(acc[k] * rows.inv_tau_s);
    }
  });
}

at::Tensor backward_cpu(const at::Tensor& grad_pair_loss, const at::Tensor& student, const at::Tensor& teacher,
                        const at::Tensor& centers, const at::Tensor& center_id, const at::Tensor& student_offsets,
                        const at::Tensor& pair_teacher, const at::Tensor& pair_weight, const at::Tensor& student_lse,
                        const at::Tensor& teacher_lse, double tau_s, double tau_t) {
  TORCH_CHECK(student.device().is_cpu(), "student must be a CPU tensor for the CPU kernel");
  check_backward_args(grad_pair_loss, student, teacher, centers, center_id, student_offsets, pair_teacher, pair_weight,
                      student_lse, teacher_lse, at::kDouble);
  at::Tensor grad_student = at::empty_like(student);
  const at::Tensor centers64 = as_double(centers), pair_weight64 = as_double(pair_weight);
  const at::Tensor grad64 = as_double(grad_pair_loss);
  with_rows(student, teacher, centers64, center_id, student_offsets, pair_teacher, pair_weight64, tau_s, tau_t,
            [&](const auto& rows) {
              using student_t = std::remove_cv_t<std::remove_pointer_t<decltype(rows.student)>>;
              backward_rows(rows, student.size(0), grad64.data_ptr<double>(), student_lse.data_ptr<double>(),
                            teacher_lse.data_ptr<double>(), grad_student.data_ptr<student_t>());
            });
  return grad_student;
}

}  // namespace

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

TORCH_LIBRARY_IMPL(udi_kernels, CPU, m) {
  m.impl("distill_cross_entropy", &forward_cpu);
  m.impl("distill_cross_entropy_backward", &backward_cpu);
}

}  // namespace udi::distill_cross_entropy
