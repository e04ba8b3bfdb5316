// udi_kernels::distill_cross_entropy: the CPU kernel (plan: csrc/distill_cross_entropy_cpu.h).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "distill_cross_entropy_cpu.h"
#include "distill_cross_entropy_op.h"
#include "row_kernels.h"

namespace udi::distill_cross_entropy {

namespace {

using row_kernels::combine_lse;
using row_kernels::exp_in_place;
using row_kernels::exp_sum;
using row_kernels::gap;
using row_kernels::kNegInf;
using row_kernels::max_of;
using row_kernels::shifted;

// Per (row or pair, chunk) partials of the forward, [rows, chunks] row-major.
struct ForwardPartials {
  std::vector<double> teacher_max, teacher_sum, student_max, student_sum, pair_gap;
  ForwardPartials(int64_t Rt, int64_t Rs, int64_t P, int64_t chunks)
      : teacher_max(Rt * chunks), teacher_sum(Rt * chunks), student_max(Rs * chunks), student_sum(Rs * chunks),
        pair_gap(P * chunks) {}
};

// One chunk of the forward: the teacher rows' (max, Σ exp) with exp(u - max) kept in the scratch, then per
// student row its (max, Σ exp) and, per pair of it, Σ exp(u - max_t) (max_s - x).
template <typename student_t, typename teacher_t, typename E>
void forward_chunk(const Rows<student_t, teacher_t>& rows, int64_t Rs, const Chunks& chunks, int64_t chunk,
                   Scratch<E>& work, ForwardPartials& out) {
  const int64_t first = chunks.first(chunk), n = chunks.columns(chunk), count = chunks.count;
  double* u = work.logits.data();
  for (int64_t r = 0; r < rows.num_teacher_rows; ++r) {
    rows.prefetch_teacher(r + 1, first, n);
    if (!teacher_row_ok(rows, r)) continue;  // no pair reads it
    E* e = work.teacher + r * chunks.width;
    rows.centered(r, first, n, u);
    const double max = max_of(u, n);
    shifted(u, max, n, e);
    out.teacher_max[r * count + chunk] = max;
    out.teacher_sum[r * count + chunk] = exp_in_place(e, n);
  }
  rows.prefetch_student(0, Rs, first, n);
  for (int64_t r = 0; r < Rs; ++r) {
    rows.prefetch_student(r + 1, Rs, first, n);
    const double max = rows.student_max(r, first, n);
    rows.student_exponents(r, first, n, max, work.row);
    out.student_max[r * count + chunk] = max;
    out.student_sum[r * count + chunk] = exp_sum(work.row, n);
    const SlotRange slots = csr_slots(rows.student_offsets, r, rows.num_pairs);
    for (int64_t slot = slots.first; slot < slots.last; ++slot) {
      if (pair_counts(rows, slot))
        out.pair_gap[slot * count + chunk] = gap(work.teacher + rows.pair_teacher[slot] * chunks.width, work.row, n);
    }
  }
}

// The logsumexps and, per counted pair, w · CE = w Σ_c mass_c (lse_s - max_s,c) + mass-weighted gap_c, with
// mass_c = Σ_t,c exp(max_t,c - lse_t) (every term >= 0: no cancellation at large logits).
template <typename student_t, typename teacher_t>
void combine_forward(const Rows<student_t, teacher_t>& rows, int64_t Rs, const Chunks& chunks,
                     const ForwardPartials& parts, double* pair_loss, double* student_lse, double* teacher_lse) {
  const int64_t count = chunks.count;
  at::parallel_for(0, rows.num_teacher_rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)  // -inf for a row without a center: no pair reads it
      teacher_lse[r] = teacher_row_ok(rows, r)
                           ? combine_lse(&parts.teacher_max[r * count], &parts.teacher_sum[r * count], count)
                           : kNegInf;
  });
  at::parallel_for(0, Rs, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const double* s_max = &parts.student_max[r * count];
      const double lse = combine_lse(s_max, &parts.student_sum[r * count], count);
      student_lse[r] = lse;
      const SlotRange slots = csr_slots(rows.student_offsets, r, rows.num_pairs);
      for (int64_t slot = slots.first; slot < slots.last; ++slot) {
        if (!pair_counts(rows, slot)) continue;  // pair_loss starts at 0
        const int64_t t_row = rows.pair_teacher[slot];
        const double* t_max = &parts.teacher_max[t_row * count];
        const double* t_sum = &parts.teacher_sum[t_row * count];
        const double* gaps = &parts.pair_gap[slot * count];
        double ce = 0;
        for (int64_t c = 0; c < count; ++c)
          ce += std::exp(t_max[c] - teacher_lse[t_row]) * (t_sum[c] * (lse - s_max[c]) + gaps[c]);
        pair_loss[slot] = rows.pair_weight[slot] * ce;
      }
    }
  });
}

template <typename student_t, typename teacher_t>
void forward_rows(const Rows<student_t, teacher_t>& rows, int64_t Rs, double* pair_loss, double* student_lse,
                  double* teacher_lse, const int64_t* center_offsets, const int64_t* center_rows,
                  const double* row_weight, double* center_sum) {
  const int64_t Rt = rows.num_teacher_rows, K = rows.K;
  const Chunks chunks(K, Rt);
  ForwardPartials parts(Rt, Rs, rows.num_pairs, chunks.count);
  at::parallel_for(0, chunks.count, 1, [&](int64_t begin, int64_t end) {
    Scratch<exp_type<student_t, teacher_t>> work(Rt, chunks.width);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      forward_chunk(rows, Rs, chunks, chunk, work, parts);
      center_sums(rows.teacher, center_offsets, center_rows, row_weight, rows.num_centers, Rt, K,
                  chunks.first(chunk), chunks.columns(chunk), center_sum);  // the chunk is still in cache
    }
  });
  combine_forward(rows, Rs, chunks, parts, pair_loss, student_lse, teacher_lse);
}

ForwardTensors forward_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& centers,
                           const at::Tensor& center_id, const at::Tensor& student_offsets,
                           const at::Tensor& pair_teacher, const at::Tensor& pair_weight,
                           const at::Tensor& center_offsets, const at::Tensor& center_rows,
                           const at::Tensor& row_weight, double tau_s, double tau_t) {
  UDI_CHECK_KERNEL_DEVICE(student, at::kCPU);
  check_forward_args(student, teacher, centers, center_id, student_offsets, pair_teacher, pair_weight, center_offsets,
                     center_rows, row_weight, tau_s, tau_t);
  const int64_t Rs = student.size(0), Rt = teacher.size(0), K = student.size(1), n_c = centers.size(0);
  const auto doubles = student.options().dtype(at::kDouble);
  at::Tensor pair_loss = at::zeros({pair_teacher.numel()}, doubles), student_lse = at::empty({Rs}, doubles);
  at::Tensor teacher_lse = at::empty({Rt}, doubles), center_sum = at::empty({n_c, K}, doubles);
  at::Tensor center_count = at::empty({n_c}, doubles);
  const at::Tensor centers64 = as_double(centers), pair_weight64 = as_double(pair_weight);
  const at::Tensor row_weight64 = as_double(row_weight);
  center_counts(center_offsets.data_ptr<int64_t>(), center_rows.data_ptr<int64_t>(), row_weight64.data_ptr<double>(),
                n_c, Rt, center_count.data_ptr<double>());
  with_rows(student, teacher, centers64, center_id, student_offsets, pair_teacher, pair_weight64, tau_s, tau_t,
            [&](const auto& rows) {
              forward_rows(rows, Rs, pair_loss.data_ptr<double>(), student_lse.data_ptr<double>(),
                           teacher_lse.data_ptr<double>(), center_offsets.data_ptr<int64_t>(),
                           center_rows.data_ptr<int64_t>(), row_weight64.data_ptr<double>(),
                           center_sum.data_ptr<double>());
            });
  const at::ScalarType out = compute_dtype(student.scalar_type()), stats = compute_dtype(teacher.scalar_type());
  // the logsumexps stay double: the backward recomputes the exponents in double against them
  return {pair_loss.to(out), center_sum.to(stats), center_count.to(stats), student_lse, teacher_lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(udi_kernels, CPU, m) { m.impl("distill_cross_entropy", &forward_cpu); }

}  // namespace udi::distill_cross_entropy
