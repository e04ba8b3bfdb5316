// udi_kernels::linear_distill_cross_entropy / _backward: schemas, argument checks and the CPU kernels.
//
// K-chunk by K-chunk (kChunk columns): BLAS GEMMs (at::mm_out into reused chunk buffers) form the chunk's logits,
// then vectorised row loops (at::vec) reduce them while they are in cache, one at::parallel_for task per row.
// Forward: pass 1 the teacher's logsumexps; pass 2 the teacher's probabilities of the chunk and the student's
// online logsumexp (running max m, sum l) with, per pair, Σ_k p_tk · (m − s_k) (non-negative terms, shifted when m
// grows), so that CE = that + (lse − m) · Σ_k p_tk is exact at large logits. Backward: the chunk's logits again,
// G = (Σ_p g_p · softmax(s) − Σ_p g_p · p_t) / τs per row, grad_student += G · W_chunk,
// grad_weight_chunk = Gᵀ · student. The student side runs in blocks of kRowBlock rows.
// Computes in the student's compute dtype (float for float/half/bfloat16, double for double).
// Repeatability: every row is reduced by one task in chunk order (independent of the thread count); the GEMMs are
// BLAS's, bitwise repeatable run to run at a fixed thread count (not claimed across thread counts).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "linear_distill_cross_entropy_op.h"

namespace udi::linear_distill_cross_entropy {

using distill_cross_entropy::check_pair_args;
using distill_cross_entropy::check_temperatures;
using distill_cross_entropy::check_vector;

namespace {

void check_matrix(const at::Tensor& t, const char* name, at::ScalarType type, const at::Device& device) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-d, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == type, name, " must be ", type, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, name, " must be on ", device, " like student, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// student [Rs, D], weight [K, D], teacher [Rt, Dt] with teacher_weight [K, Dt] or logits [Rt, K], centers [n_c, K].
void check_linear_args(const at::Tensor& student, const at::Tensor& weight, const at::Tensor& teacher,
                       const std::optional<at::Tensor>& teacher_weight, const at::Tensor& centers) {
  const at::Device device = student.device();
  TORCH_CHECK(at::isFloatingType(student.scalar_type()), "student must be floating, got ", student.scalar_type());
  TORCH_CHECK(at::isFloatingType(teacher.scalar_type()), "teacher must be floating, got ", teacher.scalar_type());
  check_matrix(student, "student", student.scalar_type(), device);
  check_matrix(weight, "weight", student.scalar_type(), device);
  check_matrix(teacher, "teacher", teacher.scalar_type(), device);
  check_matrix(centers, "centers", compute_dtype(teacher.scalar_type()), device);
  const int64_t K = weight.size(0);
  TORCH_CHECK(weight.size(1) == student.size(1), "weight must have student's D = ", student.size(1), ", got ",
              weight.sizes());
  if (teacher_weight) {
    check_matrix(*teacher_weight, "teacher_weight", teacher.scalar_type(), device);
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
  const at::Device device = student.device();
  check_vector(center_offsets, "center_offsets", at::kLong, centers.size(0) + 1, device);
  check_vector(center_rows, "center_rows", at::kLong, teacher.size(0), device);
  check_vector(row_weight, "row_weight", compute_dtype(teacher.scalar_type()), teacher.size(0), device);
  check_temperatures(tau_s, tau_t);
}

void check_backward_args(const at::Tensor& grad_pair_loss, const at::Tensor& student, const at::Tensor& weight,
                         const at::Tensor& teacher, const std::optional<at::Tensor>& teacher_weight,
                         const at::Tensor& centers, const at::Tensor& center_id, const at::Tensor& student_offsets,
                         const at::Tensor& pair_teacher, const at::Tensor& pair_weight, const at::Tensor& student_lse,
                         const at::Tensor& teacher_lse, double tau_s, double tau_t) {
  check_linear_args(student, weight, teacher, teacher_weight, centers);
  check_pair_args(student, teacher, center_id, student_offsets, pair_teacher, pair_weight);
  const at::Device device = student.device();
  const at::ScalarType out = compute_dtype(student.scalar_type());
  check_vector(grad_pair_loss, "grad_pair_loss", out, pair_teacher.numel(), device);
  check_vector(student_lse, "student_lse", out, student.size(0), device);
  check_vector(teacher_lse, "teacher_lse", compute_dtype(teacher.scalar_type()), teacher.size(0), device);
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

namespace {

constexpr int64_t kChunk = 8192;  // K-columns per chunk: MKL runs the [R, D] x [D, 2048] chunk GEMMs 3-10x
                                  // slower per FLOP than one [R, D] x [D, K] GEMM on this CPU, [R, D] x [D, 8192]
                                  // at 0.6-1x (benchmarks/NOTES.md)
constexpr int64_t kRowBlock = 128;  // student rows per GEMM and row loop: the student buffer is [128, kChunk]
                                   // (MKL: ~20-50 GFLOP/s at 64 rows, 40-50 at 128, 50-60 at 224, loaded CPU)

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
struct VecOps {
  static T max(const T* x, int64_t n) {
    return at::vec::reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, x, n);
  }
  static T sum(const T* x, int64_t n) {
    return at::vec::reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, x, n);
  }
  static T sum_exp(const T* x, T shift, int64_t n) {  // Σ exp(x − shift)
    return at::vec::map_reduce_all<T>([shift](Vec<T> v) { return (v - Vec<T>(shift)).exp(); },
                                      [](Vec<T> a, Vec<T> b) { return a + b; }, x, n);
  }
  static T shifted_dot(const T* p, const T* s, T shift, int64_t n) {  // Σ p · (shift − s)
    return at::vec::map2_reduce_all<T>([shift](Vec<T> a, Vec<T> b) { return a * (Vec<T>(shift) - b); },
                                       [](Vec<T> a, Vec<T> b) { return a + b; }, p, s, n);
  }
  static void scale(T* x, T factor, int64_t n) {
    at::vec::map([factor](Vec<T> v) { return v * Vec<T>(factor); }, x, x, n);
  }
  static void center_and_scale(T* x, const T* center, T factor, int64_t n) {  // x = (x − c) · factor
    at::vec::map2([factor](Vec<T> v, Vec<T> c) { return (v - c) * Vec<T>(factor); }, x, x, center, n);
  }
  static void exp_shifted(T* out, const T* x, T shift, T factor, int64_t n) {  // out = factor · exp(x − shift)
    at::vec::map([shift, factor](Vec<T> v) { return (v - Vec<T>(shift)).exp() * Vec<T>(factor); }, out, x, n);
  }
  static void subtract_scaled(T* x, const T* y, T factor, int64_t n) {  // x −= factor · y
    at::vec::map2([factor](Vec<T> a, Vec<T> b) { return a - Vec<T>(factor) * b; }, x, x, y, n);
  }
};

using distill_cross_entropy::csr_slots;
using distill_cross_entropy::PairArgs;
using distill_cross_entropy::pair_counts;
using distill_cross_entropy::SlotRange;
using distill_cross_entropy::teacher_row_ok;

// The operands of one call in the compute type T, and the chunk loop's buffers.
template <typename T>
struct Problem {
  at::Tensor centers, pair_weight;      // in T; `pairs` points into them
  at::Tensor student, weight, teacher;  // student in T; weight as given; teacher rows in T, or logits as given
  std::optional<at::Tensor> teacher_weight;
  PairArgs<T> pairs;
  int64_t Rs, Rt, K;
  at::Tensor student_chunk, teacher_chunk;  // buffers of kRowBlock · kChunk and Rt · kChunk elements

  static constexpr at::ScalarType type = c10::CppTypeToScalarType<T>::value;

  int64_t chunk_size(int64_t k0) const { return std::min(kChunk, K - k0); }

  static at::Tensor view(at::Tensor& buffer, int64_t rows, int64_t n) {
    return buffer.narrow(0, 0, rows * n).view({rows, n});
  }

  // rows[r0 : r0 + m] @ weight_chunk.T / τs, [m, n] in the student buffer.
  at::Tensor scaled_student(const at::Tensor& rows, int64_t r0, int64_t m, const at::Tensor& weight_chunk) {
    const int64_t n = weight_chunk.size(0);
    at::Tensor out = view(student_chunk, m, n);
    at::mm_out(out, rows.narrow(0, r0, m), weight_chunk.t());
    T* data = out.data_ptr<T>();
    at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) VecOps<T>::scale(data + r * n, pairs.inv_tau_s, n);
    });
    return out;
  }

  // (x_t − c) / τt of the chunk, [Rt, n] in the teacher buffer; with lse, the teacher's probabilities
  // exp((x_t − c) / τt − lse). Rows without a center are not computed (no pair reads them).
  at::Tensor centered_teacher(int64_t k0, int64_t n, const T* lse = nullptr) {
    at::Tensor out = view(teacher_chunk, Rt, n);
    teacher_logits(teacher, teacher_weight, k0, out);
    T* data = out.data_ptr<T>();
    at::parallel_for(0, Rt, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (!teacher_row_ok(pairs, r)) continue;
        T* row = data + r * n;
        VecOps<T>::center_and_scale(row, pairs.centers + pairs.center_id[r] * K + k0, pairs.inv_tau_t, n);
        if (lse != nullptr) VecOps<T>::exp_shifted(row, row, lse[r], T(1), n);
      }
    });
    return out;
  }
};

template <typename T>
Problem<T> make_problem(const at::Tensor& student, const at::Tensor& weight, const at::Tensor& teacher,
                        const std::optional<at::Tensor>& teacher_weight, const at::Tensor& centers,
                        const at::Tensor& center_id, const at::Tensor& student_offsets, const at::Tensor& pair_teacher,
                        const at::Tensor& pair_weight, double tau_s, double tau_t) {
  constexpr at::ScalarType type = Problem<T>::type;
  const int64_t Rs = student.size(0), Rt = teacher.size(0), K = weight.size(0);
  const auto options = student.options().dtype(type);
  Problem<T> p{centers.to(type).contiguous(), pair_weight.to(type).contiguous(), student.to(type), weight,
               teacher_weight ? teacher.to(type) : teacher,  // logits are converted chunk by chunk
               teacher_weight, {}, Rs, Rt, K,
               at::empty({std::min(Rs, kRowBlock) * std::min(kChunk, K)}, options),
               at::empty({Rt * std::min(kChunk, K)}, options)};
  p.pairs = PairArgs<T>{p.centers.template data_ptr<T>(), center_id.data_ptr<int64_t>(),
                        student_offsets.data_ptr<int64_t>(), pair_teacher.data_ptr<int64_t>(),
                        p.pair_weight.template data_ptr<T>(), K, T(1.0 / tau_s), T(1.0 / tau_t), Rt, centers.size(0),
                        pair_teacher.numel()};
  return p;
}

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Online logsumexp: folds one chunk row into (max, sum of exp(x − max)).
template <typename T>
void fold_row(const T* row, int64_t n, T& max, T& sum) {
  const T chunk_max = VecOps<T>::max(row, n);
  if (chunk_max > max) {
    sum = max == T(kNegInf) ? T(0) : sum * std::exp(max - chunk_max);
    max = chunk_max;
  }
  sum += VecOps<T>::sum_exp(row, max, n);
}

// logsumexp((x_t − c) / τt) per teacher row; -inf for a row without a center.
template <typename T>
at::Tensor teacher_lse_of(Problem<T>& p) {
  std::vector<T> max(p.Rt, T(kNegInf)), sum(p.Rt, T(0));
  for (int64_t k0 = 0; k0 < p.K; k0 += kChunk) {
    const int64_t n = p.chunk_size(k0);
    const T* u = p.centered_teacher(k0, n).template data_ptr<T>();
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

template <typename T>
ForwardTensors forward_typed(Problem<T>& p) {
  const at::Tensor teacher_lse = teacher_lse_of(p);
  const T* lse_t = teacher_lse.template data_ptr<T>();
  const int64_t P = p.pairs.num_pairs;
  // per student row: running max and Σ exp; per pair: Σ_k p_tk · (max − s_k) and Σ_k p_tk
  std::vector<T> max(p.Rs, T(kNegInf)), sum(p.Rs, T(0)), shifted(P, T(0)), mass(P, T(0));
  for (int64_t k0 = 0; k0 < p.K; k0 += kChunk) {
    const int64_t n = p.chunk_size(k0);
    const T* probs = p.centered_teacher(k0, n, lse_t).template data_ptr<T>();
    const at::Tensor weight = weight_chunk(p.weight, k0, n, Problem<T>::type);
    for (int64_t r0 = 0; r0 < p.Rs; r0 += kRowBlock) {
      const int64_t m = std::min(kRowBlock, p.Rs - r0);
      const T* s = p.scaled_student(p.student, r0, m, weight).template data_ptr<T>();
      at::parallel_for(r0, r0 + m, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const T* row = s + (r - r0) * n;
          const SlotRange slots = csr_slots(p.pairs.student_offsets, r, P);
          const T chunk_max = VecOps<T>::max(row, n);
          if (chunk_max > max[r]) {
            if (max[r] != T(kNegInf)) {
              sum[r] *= std::exp(max[r] - chunk_max);
              for (int64_t slot = slots.first; slot < slots.last; ++slot)
                shifted[slot] += (chunk_max - max[r]) * mass[slot];
            }
            max[r] = chunk_max;
          }
          sum[r] += VecOps<T>::sum_exp(row, max[r], n);
          for (int64_t slot = slots.first; slot < slots.last; ++slot) {
            if (!pair_counts(p.pairs, slot)) continue;
            const T* target = probs + p.pairs.pair_teacher[slot] * n;
            shifted[slot] += VecOps<T>::shifted_dot(target, row, max[r], n);
            mass[slot] += VecOps<T>::sum(target, n);
          }
        }
      });
    }
  }
  at::Tensor pair_loss = at::zeros({P}, p.student.options()), student_lse = at::empty({p.Rs}, p.student.options());
  T* loss = pair_loss.data_ptr<T>();
  T* lse_s = student_lse.data_ptr<T>();
  for (int64_t r = 0; r < p.Rs; ++r) {
    const T log_sum = std::log(sum[r]);  // lse − max
    lse_s[r] = max[r] + log_sum;
    const SlotRange slots = csr_slots(p.pairs.student_offsets, r, P);
    for (int64_t slot = slots.first; slot < slots.last; ++slot)
      if (pair_counts(p.pairs, slot)) loss[slot] = p.pairs.pair_weight[slot] * (shifted[slot] + log_sum * mass[slot]);
  }
  return {pair_loss, at::Tensor(), at::Tensor(), student_lse, teacher_lse};
}

#define UDI_DISPATCH_COMPUTE(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(compute_dtype(TYPE), NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__))

ForwardTensors forward_cpu(const at::Tensor& student, const at::Tensor& weight, const at::Tensor& teacher,
                           const std::optional<at::Tensor>& teacher_weight, const at::Tensor& centers,
                           const at::Tensor& center_id, const at::Tensor& student_offsets,
                           const at::Tensor& pair_teacher, const at::Tensor& pair_weight,
                           const at::Tensor& center_offsets, const at::Tensor& center_rows,
                           const at::Tensor& row_weight, double tau_s, double tau_t) {
  TORCH_CHECK(student.device().is_cpu(), "student must be a CPU tensor for the CPU kernel");
  check_forward_args(student, weight, teacher, teacher_weight, centers, center_id, student_offsets, pair_teacher,
                     pair_weight, center_offsets, center_rows, row_weight, tau_s, tau_t);
  ForwardTensors out;
  UDI_DISPATCH_COMPUTE(student.scalar_type(), "linear_distill_cross_entropy_cpu", [&] {
    auto problem = make_problem<scalar_t>(student, weight, teacher, teacher_weight, centers, center_id,
                                          student_offsets, pair_teacher, pair_weight, tau_s, tau_t);
    out = forward_typed(problem);
  });
  auto [center_sum, center_count] = center_statistics(teacher, teacher_weight, center_offsets, center_rows, row_weight);
  const at::ScalarType stats = compute_dtype(teacher.scalar_type());
  return {std::get<0>(out), center_sum, center_count, std::get<3>(out), std::get<4>(out).to(stats)};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> backward_typed(Problem<T>& p, const at::Tensor& grad_pair_loss,
                                                  const at::Tensor& student_lse, const at::Tensor& teacher_lse) {
  const int64_t P = p.pairs.num_pairs, D = p.student.size(1);
  const at::Tensor lse_t_tensor = teacher_lse.to(Problem<T>::type).contiguous();
  const T* lse_t = lse_t_tensor.template data_ptr<T>();
  const T* lse_s = student_lse.template data_ptr<T>();
  const T* grad = grad_pair_loss.template data_ptr<T>();
  // g_p = w_p · grad_p for the pairs that count; a row without one is left out (zeroed: NaN rows stay out of grad W)
  std::vector<T> scale(P, T(0)), total(p.Rs, T(0));
  at::Tensor active = at::zeros({p.Rs, 1}, p.student.options().dtype(at::kBool));
  bool* is_active = active.data_ptr<bool>();
  for (int64_t r = 0; r < p.Rs; ++r) {
    const SlotRange slots = csr_slots(p.pairs.student_offsets, r, P);
    for (int64_t slot = slots.first; slot < slots.last; ++slot) {
      if (!pair_counts(p.pairs, slot)) continue;
      scale[slot] = p.pairs.pair_weight[slot] * grad[slot];
      total[r] += scale[slot];
      is_active[r] = true;
    }
  }
  const at::Tensor rows = at::where(active, p.student, at::zeros({}, p.student.options()));
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
        for (int64_t r = begin; r < end; ++r) {
          T* row = data + (r - r0) * n;
          if (!is_active[r]) {
            std::fill(row, row + n, T(0));
            continue;
          }
          VecOps<T>::exp_shifted(row, row, lse_s[r], total[r], n);
          const SlotRange slots = csr_slots(p.pairs.student_offsets, r, P);
          for (int64_t slot = slots.first; slot < slots.last; ++slot)
            if (scale[slot] != 0)
              VecOps<T>::subtract_scaled(row, probs + p.pairs.pair_teacher[slot] * n, scale[slot], n);
          VecOps<T>::scale(row, p.pairs.inv_tau_s, n);
        }
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
  TORCH_CHECK(student.device().is_cpu(), "student must be a CPU tensor for the CPU kernel");
  check_backward_args(grad_pair_loss, student, weight, teacher, teacher_weight, centers, center_id, student_offsets,
                      pair_teacher, pair_weight, student_lse, teacher_lse, tau_s, tau_t);
  std::tuple<at::Tensor, at::Tensor> grads;
  UDI_DISPATCH_COMPUTE(student.scalar_type(), "linear_distill_cross_entropy_backward_cpu", [&] {
    auto problem = make_problem<scalar_t>(student, weight, teacher, teacher_weight, centers, center_id,
                                          student_offsets, pair_teacher, pair_weight, tau_s, tau_t);
    grads = backward_typed(problem, grad_pair_loss, student_lse, teacher_lse);
  });
  return {std::get<0>(grads).to(student.scalar_type()), std::get<1>(grads)};
}

}  // namespace

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

TORCH_LIBRARY_IMPL(udi_kernels, CPU, m) {
  m.impl("linear_distill_cross_entropy", &forward_cpu);
  m.impl("linear_distill_cross_entropy_backward", &backward_cpu);
}

}  // namespace udi::linear_distill_cross_entropy
