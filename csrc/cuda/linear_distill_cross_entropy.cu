// udi_kernels::linear_distill_cross_entropy / _backward on CUDA. Contract:
// udi_kernels/ops/linear_distill_cross_entropy.py; the plan is the CPU kernel's (csrc/linear_distill_cross_entropy.cpp):
// K-chunk by K-chunk (kChunk columns), cuBLAS GEMMs (at::mm_out, fp32 output and accumulation for fp16/bf16 inputs)
// form the chunk's logits in a reused fp32 buffer, then small row kernels (one block per row) reduce them: the
// teacher's online logsumexp, the student's online logsumexp with each pair's Σ p_t · (max − x) and Σ p_t, and in
// the backward G = ∂L/∂x of the chunk, after which grad_student += G · W_chunk and grad_weight_chunk = Gᵀ · student
// (cuBLAS, in the input dtype). Every reduction has a fixed order: results are deterministic.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "blocks.cuh"
#include "checks.h"
#include "linear_distill_cross_entropy_op.h"

namespace udi::linear_distill_cross_entropy {

namespace {

using distill_cross_entropy::csr_slots;
using distill_cross_entropy::PairArgs;
using distill_cross_entropy::pair_counts;
using distill_cross_entropy::row_or_none;
using distill_cross_entropy::SlotRange;
using distill_cross_entropy::teacher_row_ok;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = 4096;  // the buffers are [rows, kChunk] fp32

using cuda::block_max;
using cuda::block_sum;
using cuda::row_grid;

// ---- row kernels on one chunk [rows, n] of fp32 logits ------------------------------------------------------------

// u = (x − c) / τt in place; with lse, p_t = exp(u − lse). Rows without a center are skipped (no pair reads them).
__global__ void centered_teacher_kernel(float* x, int64_t n, int64_t k0, PairArgs<float> p, const float* lse) {
  const int64_t r = blockIdx.x;
  if (!teacher_row_ok(p, r)) return;
  float* row = x + r * n;
  const float* c = p.centers + p.center_id[r] * p.K + k0;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) {
    const float u = (row[k] - c[k]) * p.inv_tau_t;
    row[k] = lse != nullptr ? __expf(u - lse[r]) : u;
  }
}

// Folds the chunk's u of each teacher row into its running (max, Σ exp(u − max)).
__global__ void teacher_fold_kernel(const float* u, int64_t n, PairArgs<float> p, float* max, float* sum) {
  __shared__ float scratch[kWarps];
  const int64_t r = blockIdx.x;
  if (!teacher_row_ok(p, r)) return;
  const float* row = u + r * n;
  float local = -INFINITY;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) local = fmaxf(local, row[k]);
  const float old = max[r], top = fmaxf(old, block_max<kWarps>(local, scratch));
  float s = 0.f;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) s += __expf(row[k] - top);
  s = block_sum<kWarps>(s, scratch);
  if (threadIdx.x == 0) {
    sum[r] = (old == -INFINITY ? 0.f : sum[r] * __expf(old - top)) + s;
    max[r] = top;
  }
}

__global__ void teacher_lse_kernel(PairArgs<float> p, const float* max, const float* sum, float* lse) {
  const int64_t r = blockIdx.x * int64_t{kThreads} + threadIdx.x;
  if (r < p.num_teacher_rows) lse[r] = teacher_row_ok(p, r) ? max[r] + logf(sum[r]) : -INFINITY;
}

// The student's chunk x (unscaled logits): its online logsumexp of x / τs, and per counting pair
// shifted += Σ p_t · (max − x / τs) (shifted by the growth of max first) and mass += Σ p_t.
__global__ void student_forward_kernel(const float* x, const float* probs, int64_t n, PairArgs<float> p,
                                       const int64_t* student_offsets, float* max, float* sum, float* shifted,
                                       float* mass) {
  __shared__ float scratch[kWarps];
  const int64_t r = blockIdx.x;
  const float* row = x + r * n;
  const float inv_tau = p.inv_tau_s;
  float local = -INFINITY;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) local = fmaxf(local, row[k] * inv_tau);
  const float old = max[r], top = fmaxf(old, block_max<kWarps>(local, scratch));
  const bool grew = top > old && old != -INFINITY;
  float s = 0.f;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) s += __expf(row[k] * inv_tau - top);
  s = block_sum<kWarps>(s, scratch);
  const SlotRange slots = csr_slots(student_offsets, r, p.num_pairs);
  for (int64_t slot = slots.first; slot < slots.last; ++slot) {
    if (!pair_counts(p, slot)) continue;
    const float* target = probs + p.pair_teacher[slot] * n;
    float gap = 0.f, weight = 0.f;
    for (int64_t k = threadIdx.x; k < n; k += kThreads) {
      gap += target[k] * (top - row[k] * inv_tau);
      weight += target[k];
    }
    gap = block_sum<kWarps>(gap, scratch);
    weight = block_sum<kWarps>(weight, scratch);
    if (threadIdx.x == 0) {
      shifted[slot] += (grew ? (top - old) * mass[slot] : 0.f) + gap;
      mass[slot] += weight;
    }
  }
  if (threadIdx.x == 0) {
    sum[r] = (old == -INFINITY ? 0.f : (grew ? sum[r] * __expf(old - top) : sum[r])) + s;
    max[r] = top;
  }
}

// One thread per student row: lse = max + log(sum), pair_loss = w · (shifted + (lse − max) · mass).
__global__ void student_finish_kernel(PairArgs<float> p, const int64_t* student_offsets, int64_t Rs, const float* max,
                                      const float* sum, const float* shifted, const float* mass, float* lse,
                                      float* pair_loss) {
  const int64_t r = blockIdx.x * int64_t{kThreads} + threadIdx.x;
  if (r >= Rs) return;
  const float log_sum = logf(sum[r]);
  lse[r] = max[r] + log_sum;
  const SlotRange slots = csr_slots(student_offsets, r, p.num_pairs);
  for (int64_t slot = slots.first; slot < slots.last; ++slot)
    pair_loss[slot] = pair_counts(p, slot) ? p.pair_weight[slot] * (shifted[slot] + log_sum * mass[slot]) : 0.f;
}

// One thread per student row: g_p = w_p · grad_p of its counting pairs (0 otherwise), their sum, whether it has one.
__global__ void row_scales_kernel(PairArgs<float> p, const int64_t* student_offsets, int64_t Rs, const float* grad,
                                  float* scale, float* total, bool* active) {
  const int64_t r = blockIdx.x * int64_t{kThreads} + threadIdx.x;
  if (r >= Rs) return;
  const SlotRange slots = csr_slots(student_offsets, r, p.num_pairs);
  float t = 0.f;
  bool any = false;
  for (int64_t slot = slots.first; slot < slots.last; ++slot) {
    const bool counts = pair_counts(p, slot);
    scale[slot] = counts ? p.pair_weight[slot] * grad[slot] : 0.f;
    t += scale[slot];
    any = any || counts;
  }
  total[r] = t;
  active[r] = any;
}

// The student's chunk x in place → G = (total · exp(x / τs − lse) − Σ_p g_p · p_t) / τs; 0 for inactive rows.
__global__ void grad_logits_kernel(float* x, const float* probs, int64_t n, PairArgs<float> p,
                                   const int64_t* student_offsets, const float* lse, const float* scale,
                                   const float* total, const bool* active) {
  const int64_t r = blockIdx.x;
  float* row = x + r * n;
  if (!active[r]) {
    for (int64_t k = threadIdx.x; k < n; k += kThreads) row[k] = 0.f;
    return;
  }
  const SlotRange slots = csr_slots(student_offsets, r, p.num_pairs);
  for (int64_t k = threadIdx.x; k < n; k += kThreads) {
    float g = total[r] * __expf(row[k] * p.inv_tau_s - lse[r]);
    for (int64_t slot = slots.first; slot < slots.last; ++slot)
      if (scale[slot] != 0.f) g -= scale[slot] * probs[p.pair_teacher[slot] * n + k];
    row[k] = g * p.inv_tau_s;
  }
}

// center_sum [n_c, X] of the teacher's rows [Rt, X] (one thread per column, rows in slot order), center_count [n_c];
// rows of weight 0 or outside [0, Rt) are left out exactly.
template <typename T>
__global__ void center_sum_kernel(const T* teacher, const int64_t* center_offsets, const int64_t* center_rows,
                                  const float* row_weight, int64_t Rt, int64_t X, float* center_sum,
                                  float* center_count) {
  const int64_t c = blockIdx.y, column = blockIdx.x * int64_t{kThreads} + threadIdx.x;
  const SlotRange slots = csr_slots(center_offsets, c, Rt);
  float acc = 0.f, count = 0.f;
  for (int64_t slot = slots.first; slot < slots.last; ++slot) {
    const int64_t row = row_or_none(center_rows, slot, Rt);
    if (row < 0) continue;
    const float w = row_weight[row];
    count += w;
    if (w != 0.f && column < X) acc += w * static_cast<float>(teacher[row * X + column]);
  }
  if (column < X) center_sum[c * X + column] = acc;
  if (blockIdx.x == 0 && threadIdx.x == 0) center_count[c] = count;
}

// ---- host -----------------------------------------------------------------------------------------------------------

unsigned thread_blocks(int64_t rows) { return cuda::blocks_for(rows, kThreads); }

void check_cuda_types(const at::Tensor& student, const at::Tensor& teacher) {
  UDI_CHECK_KERNEL_DEVICE(student, at::kCUDA);
  UDI_CHECK_CUDA_DTYPE(student);
  UDI_CHECK_CUDA_DTYPE(teacher);
}

// The chunk loop's state: pair arguments in fp32, the [rows, kChunk] buffers.
struct Chunks {
  at::Tensor centers, pair_weight;
  PairArgs<float> pairs;
  at::Tensor student_buffer, teacher_buffer;
  int64_t Rs, Rt, K;

  Chunks(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& weight, const at::Tensor& centers_in,
         const at::Tensor& center_id, const at::Tensor& pair_teacher, const at::Tensor& pair_weight_in, double tau_s,
         double tau_t)
      : centers(centers_in.to(at::kFloat).contiguous()),
        pair_weight(pair_weight_in.to(at::kFloat).contiguous()),
        Rs(student.size(0)),
        Rt(teacher.size(0)),
        K(weight.size(0)) {
    pairs = PairArgs<float>{centers.data_ptr<float>(),
                            center_id.data_ptr<int64_t>(),
                            nullptr,
                            pair_teacher.data_ptr<int64_t>(),
                            pair_weight.data_ptr<float>(),
                            K,
                            static_cast<float>(1.0 / tau_s),
                            static_cast<float>(1.0 / tau_t),
                            Rt,
                            centers.size(0),
                            pair_teacher.numel()};
    const auto floats = student.options().dtype(at::kFloat);
    student_buffer = at::empty({Rs * std::min(kChunk, K)}, floats);
    teacher_buffer = at::empty({Rt * std::min(kChunk, K)}, floats);
  }

  int64_t width(int64_t k0) const { return std::min(kChunk, K - k0); }

  static at::Tensor view(at::Tensor& buffer, int64_t rows, int64_t n) {
    return buffer.narrow(0, 0, rows * n).view({rows, n});
  }

  // rows @ weight[k0 : k0 + n].T in fp32.
  at::Tensor student_logits(const at::Tensor& rows, const at::Tensor& weight, int64_t k0, int64_t n) {
    at::Tensor out = view(student_buffer, Rs, n);
    const at::Tensor w = weight.narrow(0, k0, n).t();
    if (rows.scalar_type() == at::kFloat)
      at::mm_out(out, rows, w);
    else
      at::mm_out(out, rows, w, at::kFloat);
    return out;
  }

  // (x_t − c) / τt of the chunk, or with lse the teacher's probabilities, [Rt, n] fp32.
  at::Tensor teacher_chunk(const at::Tensor& teacher, const std::optional<at::Tensor>& teacher_weight, int64_t k0,
                           int64_t n, const float* lse, cudaStream_t stream) {
    at::Tensor out = view(teacher_buffer, Rt, n);
    if (Rt == 0) return out;
    teacher_logits(teacher, teacher_weight, k0, out);
    centered_teacher_kernel<<<row_grid(Rt), kThreads, 0, stream>>>(out.data_ptr<float>(), n, k0, pairs, lse);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> center_statistics(const at::Tensor& teacher,
                                                     const std::optional<at::Tensor>& teacher_weight,
                                                     const at::Tensor& center_offsets, const at::Tensor& center_rows,
                                                     const at::Tensor& row_weight, int64_t n_c, int64_t K,
                                                     cudaStream_t stream) {
  check_cuda_limit(n_c, cuda::kMaxGridY, "centers n_c");
  const int64_t Rt = teacher.size(0), X = teacher.size(1);
  const auto floats = teacher.options().dtype(at::kFloat);
  at::Tensor sums = at::empty({n_c, X}, floats), count = at::empty({n_c}, floats);
  const at::Tensor weights = row_weight.to(at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, teacher.scalar_type(), "center_sum_cuda", [&] {
    const dim3 grid(thread_blocks(X), static_cast<unsigned>(n_c));
    center_sum_kernel<<<grid, kThreads, 0, stream>>>(teacher.data_ptr<scalar_t>(), center_offsets.data_ptr<int64_t>(),
                                                     center_rows.data_ptr<int64_t>(), weights.data_ptr<float>(), Rt,
                                                     X, sums.data_ptr<float>(), count.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!teacher_weight) return {sums, count};
  at::Tensor center_sum = at::empty({n_c, K}, floats);  // (Σ w · teacher) @ teacher_weight.T, fp32, chunk by chunk
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t n = std::min(kChunk, K - k0);
    center_sum.narrow(1, k0, n).copy_(at::mm(sums, teacher_weight->narrow(0, k0, n).to(at::kFloat).t()));
  }
  return {center_sum, count};
}

ForwardTensors forward_cuda(const at::Tensor& student, const at::Tensor& weight, const at::Tensor& teacher,
                            const std::optional<at::Tensor>& teacher_weight, const at::Tensor& centers,
                            const at::Tensor& center_id, const at::Tensor& student_offsets,
                            const at::Tensor& pair_teacher, const at::Tensor& pair_weight,
                            const at::Tensor& center_offsets, const at::Tensor& center_rows,
                            const at::Tensor& row_weight, double tau_s, double tau_t) {
  check_cuda_types(student, teacher);
  check_forward_args(student, weight, teacher, teacher_weight, centers, center_id, student_offsets, pair_teacher,
                     pair_weight, center_offsets, center_rows, row_weight, tau_s, tau_t);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  Chunks chunks(student, teacher, weight, centers, center_id, pair_teacher, pair_weight, tau_s, tau_t);
  const int64_t Rs = chunks.Rs, Rt = chunks.Rt, K = chunks.K, P = pair_teacher.numel();
  const auto floats = student.options().dtype(at::kFloat);
  at::Tensor t_max = at::full({Rt}, -INFINITY, floats), t_sum = at::zeros({Rt}, floats);
  at::Tensor teacher_lse = at::empty({Rt}, floats);
  for (int64_t k0 = 0; k0 < K && Rt > 0; k0 += kChunk) {
    const int64_t n = chunks.width(k0);
    const at::Tensor u = chunks.teacher_chunk(teacher, teacher_weight, k0, n, nullptr, stream);
    teacher_fold_kernel<<<row_grid(Rt), kThreads, 0, stream>>>(u.data_ptr<float>(), n, chunks.pairs,
                                                                t_max.data_ptr<float>(), t_sum.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (Rt > 0) {
    teacher_lse_kernel<<<thread_blocks(Rt), kThreads, 0, stream>>>(chunks.pairs, t_max.data_ptr<float>(),
                                                                    t_sum.data_ptr<float>(),
                                                                    teacher_lse.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  at::Tensor s_max = at::full({Rs}, -INFINITY, floats), s_sum = at::zeros({Rs}, floats);
  at::Tensor shifted = at::zeros({P}, floats), mass = at::zeros({P}, floats);
  at::Tensor pair_loss = at::zeros({P}, floats), student_lse = at::empty({Rs}, floats);
  for (int64_t k0 = 0; k0 < K && Rs > 0; k0 += kChunk) {
    const int64_t n = chunks.width(k0);
    const at::Tensor probs = chunks.teacher_chunk(teacher, teacher_weight, k0, n, teacher_lse.data_ptr<float>(),
                                                  stream);
    const at::Tensor x = chunks.student_logits(student, weight, k0, n);
    student_forward_kernel<<<row_grid(Rs), kThreads, 0, stream>>>(
        x.data_ptr<float>(), probs.data_ptr<float>(), n, chunks.pairs, student_offsets.data_ptr<int64_t>(),
        s_max.data_ptr<float>(), s_sum.data_ptr<float>(), shifted.data_ptr<float>(), mass.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (Rs > 0) {
    student_finish_kernel<<<thread_blocks(Rs), kThreads, 0, stream>>>(
        chunks.pairs, student_offsets.data_ptr<int64_t>(), Rs, s_max.data_ptr<float>(), s_sum.data_ptr<float>(),
        shifted.data_ptr<float>(), mass.data_ptr<float>(), student_lse.data_ptr<float>(), pair_loss.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto [center_sum, center_count] = center_statistics(teacher, teacher_weight, center_offsets, center_rows,
                                                      row_weight, centers.size(0), K, stream);
  return {pair_loss, center_sum, center_count, student_lse, teacher_lse};
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_pair_loss, const at::Tensor& student,
                                                 const at::Tensor& weight, const at::Tensor& teacher,
                                                 const std::optional<at::Tensor>& teacher_weight,
                                                 const at::Tensor& centers, const at::Tensor& center_id,
                                                 const at::Tensor& student_offsets, const at::Tensor& pair_teacher,
                                                 const at::Tensor& pair_weight, const at::Tensor& student_lse,
                                                 const at::Tensor& teacher_lse, double tau_s, double tau_t) {
  check_cuda_types(student, teacher);
  check_backward_args(grad_pair_loss, student, weight, teacher, teacher_weight, centers, center_id, student_offsets,
                      pair_teacher, pair_weight, student_lse, teacher_lse, tau_s, tau_t);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  Chunks chunks(student, teacher, weight, centers, center_id, pair_teacher, pair_weight, tau_s, tau_t);
  const int64_t Rs = chunks.Rs, K = chunks.K, P = pair_teacher.numel();
  const auto floats = student.options().dtype(at::kFloat);
  at::Tensor scale = at::zeros({P}, floats), total = at::zeros({Rs}, floats);
  at::Tensor active = at::zeros({Rs, 1}, student.options().dtype(at::kBool));
  at::Tensor grad_student = at::zeros({Rs, student.size(1)}, floats), grad_weight = at::empty_like(weight);
  if (Rs == 0) return {grad_student.to(student.scalar_type()), grad_weight.zero_()};
  row_scales_kernel<<<thread_blocks(Rs), kThreads, 0, stream>>>(
      chunks.pairs, student_offsets.data_ptr<int64_t>(), Rs, grad_pair_loss.data_ptr<float>(),
      scale.data_ptr<float>(), total.data_ptr<float>(), active.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor rows = at::where(active, student, at::zeros({}, student.options()));  // NaN rows stay out
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t n = chunks.width(k0);
    const at::Tensor probs = chunks.teacher_chunk(teacher, teacher_weight, k0, n, teacher_lse.data_ptr<float>(),
                                                  stream);
    at::Tensor g = chunks.student_logits(rows, weight, k0, n);
    grad_logits_kernel<<<row_grid(Rs), kThreads, 0, stream>>>(
        g.data_ptr<float>(), probs.data_ptr<float>(), n, chunks.pairs, student_offsets.data_ptr<int64_t>(),
        student_lse.data_ptr<float>(), scale.data_ptr<float>(), total.data_ptr<float>(), active.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor g_in = g.to(weight.scalar_type());  // tensor-core GEMMs in the input dtype, fp32 accumulation
    const at::Tensor w = weight.narrow(0, k0, n);
    if (weight.scalar_type() == at::kFloat)
      grad_student.addmm_(g_in, w);
    else
      grad_student.add_(at::mm(g_in, w, at::kFloat));
    at::Tensor chunk_grad = grad_weight.narrow(0, k0, n);
    at::mm_out(chunk_grad, g_in.t(), rows);
  }
  return {grad_student.to(student.scalar_type()), grad_weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(udi_kernels, CUDA, m) {
  m.impl("linear_distill_cross_entropy", &forward_cuda);
  m.impl("linear_distill_cross_entropy_backward", &backward_cuda);
}

}  // namespace udi::linear_distill_cross_entropy
