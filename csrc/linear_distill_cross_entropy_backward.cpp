// udi_kernels::linear_distill_cross_entropy_backward: the CPU kernel (plan: csrc/linear_distill_cross_entropy_cpu.h).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "checks.h"
#include "linear_distill_cross_entropy_cpu.h"
#include "row_kernels.h"

namespace udi::linear_distill_cross_entropy {

namespace {

// g_p = w_p · grad_p of the pairs that count (0 for the others), their sum per student row, and whether a row has
// one ([Rs, 1] bool: a row without one is left out, so that a NaN row stays out of grad W).
template <typename T>
struct PairScales {
  std::vector<T> scale, total;
  at::Tensor active;

  PairScales(const Problem<T>& p, const T* grad)
      : scale(p.pairs.num_pairs, T(0)), total(p.Rs, T(0)),
        active(at::zeros({p.Rs, 1}, p.student.options().dtype(at::kBool))) {
    bool* is_active = active.data_ptr<bool>();
    for (int64_t r = 0; r < p.Rs; ++r) {
      const SlotRange slots = csr_slots(p.pairs.student_offsets, r, p.pairs.num_pairs);
      for (int64_t slot = slots.first; slot < slots.last; ++slot) {
        if (!pair_counts(p.pairs, slot)) continue;
        scale[slot] = p.pairs.pair_weight[slot] * grad[slot];
        total[r] += scale[slot];
        is_active[r] = true;
      }
    }
  }
};

// Chunk row `row` of student row r, s / τs, becomes ∂L/∂x = (total · exp(s / τs − lse) − Σ_p g_p · p_t) / τs.
template <typename T>
void row_gradient(const Problem<T>& p, const PairScales<T>& scales, int64_t r, T lse, const T* probs, int64_t n,
                  T* row) {
  if (!scales.active.template data_ptr<bool>()[r]) {
    std::fill(row, row + n, T(0));
    return;
  }
  row_kernels::shifted(row, lse, n, row);
  row_kernels::exp_in_place(row, n);
  row_kernels::scaled(row, scales.total[r], n, row);
  const SlotRange slots = csr_slots(p.pairs.student_offsets, r, p.pairs.num_pairs);
  for (int64_t slot = slots.first; slot < slots.last; ++slot)
    if (scales.scale[slot] != 0)
      row_kernels::subtract_scaled(row, probs + p.pairs.pair_teacher[slot] * n, scales.scale[slot], n);
  row_kernels::scaled(row, p.pairs.inv_tau_s, n, row);
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> backward_typed(Problem<T>& p, const at::Tensor& grad_pair_loss,
                                                  const at::Tensor& student_lse, const at::Tensor& teacher_lse) {
  const int64_t D = p.student.size(1);
  const at::Tensor lse_t_tensor = teacher_lse.to(Problem<T>::type).contiguous();
  const T* lse_t = lse_t_tensor.template data_ptr<T>();
  const T* lse_s = student_lse.template data_ptr<T>();
  const PairScales<T> scales(p, grad_pair_loss.template data_ptr<T>());
  const at::Tensor rows = at::where(scales.active, p.student, at::zeros({}, p.student.options()));
  at::Tensor grad_student = at::zeros({p.Rs, D}, p.student.options());
  at::Tensor grad_weight = at::empty(p.weight.sizes(), p.weight.options());
  // grad_weight's chunk is formed in place when the weight is in T, else in a [kChunk, D] buffer in T
  const bool in_place = p.weight.scalar_type() == Problem<T>::type;
  at::Tensor weight_buffer = at::empty({in_place ? 0 : std::min(kChunk, p.K) * D}, p.student.options());
  for (int64_t k0 = 0; k0 < p.K; k0 += kChunk) {
    const int64_t n = p.chunk_size(k0);
    const T* probs = p.centered_teacher(k0, n, lse_t).template data_ptr<T>();
    const at::Tensor weight = weight_chunk(p.weight, k0, n, Problem<T>::type);
    at::Tensor chunk_grad = in_place ? grad_weight.narrow(0, k0, n) : Problem<T>::view(weight_buffer, n, D);
    for (int64_t r0 = 0; r0 < p.Rs; r0 += kRowBlock) {
      const int64_t m = std::min(kRowBlock, p.Rs - r0);
      at::Tensor g = p.scaled_student(rows, r0, m, weight);  // becomes ∂L/∂x of the block's chunk, in place
      T* data = g.template data_ptr<T>();
      at::parallel_for(r0, r0 + m, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) row_gradient(p, scales, r, lse_s[r], probs, n, data + (r - r0) * n);
      });
      grad_student.narrow(0, r0, m).addmm_(g, weight);
      if (r0 == 0)
        at::mm_out(chunk_grad, g.t(), rows.narrow(0, 0, m));
      else  // the row blocks in order: deterministic
        chunk_grad.addmm_(g.t(), rows.narrow(0, r0, m));
    }
    if (p.Rs == 0) chunk_grad.zero_();
    if (!in_place) grad_weight.narrow(0, k0, n).copy_(chunk_grad);
  }
  return {grad_student, grad_weight};
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_pair_loss, const at::Tensor& student,
                                                const at::Tensor& weight, const at::Tensor& teacher,
                                                const std::optional<at::Tensor>& teacher_weight,
                                                const at::Tensor& centers, const at::Tensor& center_id,
                                                const at::Tensor& student_offsets, const at::Tensor& pair_teacher,
                                                const at::Tensor& pair_weight, const at::Tensor& student_lse,
                                                const at::Tensor& teacher_lse, double tau_s, double tau_t) {
  UDI_CHECK_KERNEL_DEVICE(student, at::kCPU);
  check_backward_args(grad_pair_loss, student, weight, teacher, teacher_weight, centers, center_id, student_offsets,
                      pair_teacher, pair_weight, student_lse, teacher_lse, tau_s, tau_t);
  std::tuple<at::Tensor, at::Tensor> grads;
  with_problem(student, weight, teacher, teacher_weight, centers, center_id, student_offsets, pair_teacher,
               pair_weight, tau_s, tau_t,
               [&](auto& problem) { grads = backward_typed(problem, grad_pair_loss, student_lse, teacher_lse); });
  return {std::get<0>(grads).to(student.scalar_type()), std::get<1>(grads)};
}

}  // namespace

TORCH_LIBRARY_IMPL(udi_kernels, CPU, m) { m.impl("linear_distill_cross_entropy_backward", &backward_cpu); }

}  // namespace udi::linear_distill_cross_entropy
