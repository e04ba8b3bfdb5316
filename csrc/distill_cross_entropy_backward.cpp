// udi_kernels::distill_cross_entropy_backward: the CPU kernel (plan: csrc/distill_cross_entropy_cpu.h).
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "checks.h"
#include "distill_cross_entropy_cpu.h"
#include "distill_cross_entropy_op.h"
#include "row_kernels.h"

namespace udi::distill_cross_entropy {

namespace {

using row_kernels::exp_in_place;
using row_kernels::prefetch;
using row_kernels::scaled;
using row_kernels::shifted;
using row_kernels::subtract_scaled;

// One chunk of the backward: p_t = exp(u - lse_t) of every teacher row into the scratch, then per student row
// grad = (Σ_p g_p w_p · softmax(x) - Σ_p g_p w_p · p_t) / τs, written once.
template <typename student_t, typename teacher_t, typename E>
void backward_chunk(const Rows<student_t, teacher_t>& rows, int64_t Rs, const Chunks& chunks, int64_t chunk,
                    const double* grad_pair_loss, const double* student_lse, const double* teacher_lse,
                    Scratch<E>& work, student_t* grad_student) {
  const int64_t first = chunks.first(chunk), n = chunks.columns(chunk), K = rows.K;
  double* u = work.logits.data();
  E* acc = work.row;
  for (int64_t r = 0; r < rows.num_teacher_rows; ++r) {
    rows.prefetch_teacher(r + 1, first, n);
    if (!teacher_row_ok(rows, r)) continue;
    E* p = work.teacher + r * chunks.width;
    rows.centered(r, first, n, u);
    shifted(u, teacher_lse[r], n, p);
    exp_in_place(p, n);
  }
  rows.prefetch_student(0, Rs, first, n);
  for (int64_t r = 0; r < Rs; ++r) {
    rows.prefetch_student(r + 1, Rs, first, n);
    student_t* out = grad_student + r * K + first;
    prefetch(out, n, /*write=*/true);
    const SlotRange slots = csr_slots(rows.student_offsets, r, rows.num_pairs);
    double total = 0;
    bool any = false;
    for (int64_t slot = slots.first; slot < slots.last; ++slot) {
      const double scale = rows.pair_scale(slot, grad_pair_loss);
      total += scale;
      any = any || scale != 0;
    }
    if (!any) {  // no pair of this row counts: its gradient is exactly 0
      std::fill(out, out + n, static_cast<student_t>(0));
      continue;
    }
    rows.student_exponents(r, first, n, student_lse[r], acc);
    exp_in_place(acc, n);
    scaled(acc, static_cast<E>(total), n, acc);
    for (int64_t slot = slots.first; slot < slots.last; ++slot) {
      const E scale = static_cast<E>(rows.pair_scale(slot, grad_pair_loss));
      if (scale != 0) subtract_scaled(acc, work.teacher + rows.pair_teacher[slot] * chunks.width, scale, n);
    }
    scaled(acc, static_cast<E>(rows.inv_tau_s), n, out);
  }
}

template <typename student_t, typename teacher_t>
void backward_rows(const Rows<student_t, teacher_t>& rows, int64_t Rs, const double* grad_pair_loss,
                   const double* student_lse, const double* teacher_lse, student_t* grad_student) {
  const int64_t Rt = rows.num_teacher_rows;
  const Chunks chunks(rows.K, Rt);
  at::parallel_for(0, chunks.count, 1, [&](int64_t begin, int64_t end) {
    Scratch<exp_type<student_t, teacher_t>> work(Rt, chunks.width);
    for (int64_t chunk = begin; chunk < end; ++chunk)
      backward_chunk(rows, Rs, chunks, chunk, grad_pair_loss, student_lse, teacher_lse, work, grad_student);
  });
}

at::Tensor backward_cpu(const at::Tensor& grad_pair_loss, const at::Tensor& student, const at::Tensor& teacher,
                        const at::Tensor& centers, const at::Tensor& center_id, const at::Tensor& student_offsets,
                        const at::Tensor& pair_teacher, const at::Tensor& pair_weight, const at::Tensor& student_lse,
                        const at::Tensor& teacher_lse, double tau_s, double tau_t) {
  UDI_CHECK_KERNEL_DEVICE(student, at::kCPU);
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

TORCH_LIBRARY_IMPL(udi_kernels, CPU, m) { m.impl("distill_cross_entropy_backward", &backward_cpu); }

}  // namespace udi::distill_cross_entropy
