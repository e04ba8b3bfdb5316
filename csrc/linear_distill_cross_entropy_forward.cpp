// udi_kernels::linear_distill_cross_entropy: the CPU kernel (plan: csrc/linear_distill_cross_entropy_cpu.h).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "distill_cross_entropy_op.h"
#include "linear_distill_cross_entropy_cpu.h"
#include "row_kernels.h"

namespace udi::linear_distill_cross_entropy {

namespace {

using row_kernels::kNegInf;

// Online logsumexp: folds one chunk row x into (max, Σ exp(x − max)) and leaves x − max in the row. Returns how
// much the max grew (0 while nothing was folded: max was -inf).
template <typename T>
T fold_row(T* row, int64_t n, T& max, T& sum) {
  const T chunk_max = static_cast<T>(row_kernels::max_of(row, n));
  T growth = 0;
  if (chunk_max > max) {
    if (max == T(kNegInf)) {
      sum = 0;
    } else {
      growth = chunk_max - max;
      sum *= std::exp(-growth);
    }
    max = chunk_max;
  }
  row_kernels::shifted(row, max, n, row);
  sum += static_cast<T>(row_kernels::exp_sum(row, n));
  return growth;
}

// logsumexp((x_t − c) / τt) per teacher row; -inf for a row without a center.
template <typename T>
at::Tensor teacher_lse_of(Problem<T>& p) {
  std::vector<T> max(p.Rt, T(kNegInf)), sum(p.Rt, T(0));
  for (int64_t k0 = 0; k0 < p.K; k0 += kChunk) {
    const int64_t n = p.chunk_size(k0);
    T* u = p.centered_teacher(k0, n).template data_ptr<T>();
    at::parallel_for(0, p.Rt, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        if (teacher_row_ok(p.pairs, r)) fold_row(u + r * n, n, max[r], sum[r]);
    });
  }
  at::Tensor lse = at::empty({p.Rt}, p.student.options());
  T* out = lse.data_ptr<T>();
  for (int64_t r = 0; r < p.Rt; ++r) out[r] = teacher_row_ok(p.pairs, r) ? max[r] + std::log(sum[r]) : T(kNegInf);
  return lse;
}

// center_sum = (Σ row_weight · teacher) @ teacher_weight.T (or Σ row_weight · logits), center_count.
std::tuple<at::Tensor, at::Tensor> center_statistics(const at::Tensor& teacher,
                                                     const std::optional<at::Tensor>& teacher_weight,
                                                     const at::Tensor& center_offsets, const at::Tensor& center_rows,
                                                     const at::Tensor& row_weight) {
  const at::ScalarType stats = compute_dtype(teacher.scalar_type());
  auto [sums, counts] = distill_cross_entropy::center_statistics_cpu(teacher, center_offsets, center_rows, row_weight);
  if (!teacher_weight) return {sums.to(stats), counts.to(stats)};
  const at::Tensor rows = sums.to(stats);
  const int64_t K = teacher_weight->size(0);
  at::Tensor center_sum = at::empty({rows.size(0), K}, rows.options());
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t n = std::min(kChunk, K - k0);
    center_sum.narrow(1, k0, n).copy_(at::mm(rows, weight_chunk(*teacher_weight, k0, n, stats).t()));
  }
  return {center_sum, counts.to(stats)};
}

// The student's running logsumexp (max, sum) and, per pair, Σ_k p_tk · (max − s_k) (`shifted`) and Σ_k p_tk (`mass`).
template <typename T>
struct StudentFold {
  std::vector<T> max, sum, shifted, mass;
  StudentFold(int64_t Rs, int64_t P) : max(Rs, T(kNegInf)), sum(Rs, T(0)), shifted(P, T(0)), mass(P, T(0)) {}

  // Folds chunk row `row` (s / τs, n columns; left as s / τs − max) of student row r against the chunk's teacher
  // probabilities [Rt, n].
  void fold(const PairArgs<T>& pairs, int64_t r, T* row, int64_t n, const T* probs) {
    const SlotRange slots = csr_slots(pairs.student_offsets, r, pairs.num_pairs);
    const T growth = fold_row(row, n, max[r], sum[r]);
    if (growth > 0)
      for (int64_t slot = slots.first; slot < slots.last; ++slot) shifted[slot] += growth * mass[slot];
    for (int64_t slot = slots.first; slot < slots.last; ++slot) {
      if (!pair_counts(pairs, slot)) continue;
      const T* target = probs + pairs.pair_teacher[slot] * n;
      shifted[slot] += static_cast<T>(row_kernels::gap(target, row, n));
      mass[slot] += static_cast<T>(row_kernels::sum_of(target, n));
    }
  }
};

template <typename T>
ForwardTensors forward_typed(Problem<T>& p) {
  const at::Tensor teacher_lse = teacher_lse_of(p);
  const T* lse_t = teacher_lse.template data_ptr<T>();
  const int64_t P = p.pairs.num_pairs;
  StudentFold<T> fold(p.Rs, P);
  for (int64_t k0 = 0; k0 < p.K; k0 += kChunk) {
    const int64_t n = p.chunk_size(k0);
    const T* probs = p.centered_teacher(k0, n, lse_t).template data_ptr<T>();
    const at::Tensor weight = weight_chunk(p.weight, k0, n, Problem<T>::type);
    for (int64_t r0 = 0; r0 < p.Rs; r0 += kRowBlock) {
      const int64_t m = std::min(kRowBlock, p.Rs - r0);
      T* s = p.scaled_student(p.student, r0, m, weight).template data_ptr<T>();
      at::parallel_for(r0, r0 + m, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) fold.fold(p.pairs, r, s + (r - r0) * n, n, probs);
      });
    }
  }
  at::Tensor pair_loss = at::zeros({P}, p.student.options()), student_lse = at::empty({p.Rs}, p.student.options());
  T* loss = pair_loss.data_ptr<T>();
  T* lse_s = student_lse.data_ptr<T>();
  for (int64_t r = 0; r < p.Rs; ++r) {
    const T log_sum = std::log(fold.sum[r]);  // lse − max
    lse_s[r] = fold.max[r] + log_sum;
    const SlotRange slots = csr_slots(p.pairs.student_offsets, r, P);
    for (int64_t slot = slots.first; slot < slots.last; ++slot)
      if (pair_counts(p.pairs, slot))
        loss[slot] = p.pairs.pair_weight[slot] * (fold.shifted[slot] + log_sum * fold.mass[slot]);
  }
  return {pair_loss, at::Tensor(), at::Tensor(), student_lse, teacher_lse};
}

ForwardTensors forward_cpu(const at::Tensor& student, const at::Tensor& weight, const at::Tensor& teacher,
                           const std::optional<at::Tensor>& teacher_weight, const at::Tensor& centers,
                           const at::Tensor& center_id, const at::Tensor& student_offsets,
                           const at::Tensor& pair_teacher, const at::Tensor& pair_weight,
                           const at::Tensor& center_offsets, const at::Tensor& center_rows,
                           const at::Tensor& row_weight, double tau_s, double tau_t) {
  UDI_CHECK_KERNEL_DEVICE(student, at::kCPU);
  check_forward_args(student, weight, teacher, teacher_weight, centers, center_id, student_offsets, pair_teacher,
                     pair_weight, center_offsets, center_rows, row_weight, tau_s, tau_t);
  ForwardTensors out;
  with_problem(student, weight, teacher, teacher_weight, centers, center_id, student_offsets, pair_teacher,
               pair_weight, tau_s, tau_t, [&](auto& problem) { out = forward_typed(problem); });
  auto [center_sum, center_count] = center_statistics(teacher, teacher_weight, center_offsets, center_rows, row_weight);
  const at::ScalarType stats = compute_dtype(teacher.scalar_type());
  return {std::get<0>(out), center_sum, center_count, std::get<3>(out), std::get<4>(out).to(stats)};
}

}  // namespace

TORCH_LIBRARY_IMPL(udi_kernels, CPU, m) { m.impl("linear_distill_cross_entropy", &forward_cpu); }

}  // namespace udi::linear_distill_cross_entropy
