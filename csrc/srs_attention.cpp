// udi_kernels::srs_attention(_backward): schemas, argument checks and the CPU kernels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "srs_attention_op.h"

namespace udi::srs_attention {

namespace {

void check_same(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.device() == like.device(), name, " must be on the device of ", like_name, " (", like.device(),
              "), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_sizes(const at::Tensor& t, const char* name, at::IntArrayRef sizes) {
  TORCH_CHECK(t.sizes() == sizes, name, " must have shape ", sizes, ", got ", t.sizes());
}

}  // namespace

Shape check_forward_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& index,
                         const at::Tensor& weight) {
  TORCH_CHECK(q.dim() == 4, "q must have shape [B, H, N, D], got ", q.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
              "q must be float16, bfloat16, float32 or float64, got ", dtype);
  check_same(q, "q", q, "q");
  TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "k must have shape [B=", q.size(0), ", H=", q.size(1), ", N, D=", q.size(3), "], got ", k.sizes());
  TORCH_CHECK(k.size(2) >= 1 && q.size(3) >= 1, "k needs at least one row and one channel, got ", k.sizes());
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    check_sizes(*t, name, k.sizes());
    TORCH_CHECK(t->scalar_type() == dtype, name, " must have the dtype of q (", dtype, "), got ", t->scalar_type());
    check_same(*t, name, q, "q");
  }
  TORCH_CHECK(index.dim() == 3 && index.size(0) == q.size(0) && index.size(2) >= 1,
              "index must have shape [B=", q.size(0), ", S, T>=1], got ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kInt, "index must be int32, got ", index.scalar_type());
  check_same(index, "index", q, "q");
  check_sizes(weight, "weight", index.sizes());
  TORCH_CHECK(weight.scalar_type() == compute_dtype(dtype), "weight must be ", compute_dtype(dtype),
              " for ", dtype, " inputs, got ", weight.scalar_type());
  check_same(weight, "weight", q, "q");
  return Shape{q.size(0), q.size(1), q.size(2), k.size(2), index.size(1), index.size(2), q.size(3)};
}

Shape check_backward_args(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& index, const at::Tensor& weight, const at::Tensor& out,
                          const at::Tensor& lse) {
  const Shape s = check_forward_args(q, k, v, index, weight);
  for (const auto& [t, name] : {std::pair{&grad_out, "grad_out"}, std::pair{&out, "out"}}) {
    check_sizes(*t, name, {s.B, s.H, s.S, s.D});
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), name, " must have the dtype of q, got ", t->scalar_type());
    check_same(*t, name, q, "q");
  }
  check_sizes(lse, "lse", {s.B, s.H, s.S});
  TORCH_CHECK(lse.scalar_type() == compute_dtype(q.scalar_type()), "lse must be ",
              compute_dtype(q.scalar_type()), ", got ", lse.scalar_type());
  check_same(lse, "lse", q, "q");
  return s;
}

namespace {

template <typename acc_t, typename scalar_t>
acc_t dot(const acc_t* a, const scalar_t* b, int64_t D) {
  acc_t sum = 0;
  for (int64_t d = 0; d < D; ++d) sum += a[d] * static_cast<acc_t>(b[d]);
  return sum;
}

// Whether a tap lands on a row of q; the others are skipped (weight 0) by every kernel, since the public op
// checks the taps only with check_taps=True (udi_kernels/ops/srs_attention.py).
inline bool tap_ok(int32_t idx, const Shape& s) { return idx >= 0 && idx < s.Nq; }

// q_s = sum_t w_t q[idx_t] for sample s of crop b, head h (q_head points at q[b, h]).
template <typename scalar_t, typename acc_t>
void tapped_query(const scalar_t* q_head, const int32_t* idx, const acc_t* w, const Shape& s, acc_t* q_s) {
  std::fill(q_s, q_s + s.D, acc_t(0));
  for (int64_t t = 0; t < s.T; ++t) {
    if (!tap_ok(idx[t], s)) continue;
    const scalar_t* row = q_head + idx[t] * s.D;
    for (int64_t d = 0; d < s.D; ++d) q_s[d] += w[t] * static_cast<acc_t>(row[d]);
  }
}

// Probabilities of one row over all keys; returns the logsumexp of the scaled logits.
template <typename scalar_t, typename acc_t>
acc_t softmax_row(const acc_t* q_s, const scalar_t* k_head, const Shape& s, acc_t scale, acc_t* p) {
  acc_t max_logit = -std::numeric_limits<acc_t>::infinity();
  for (int64_t n = 0; n < s.N; ++n) {
    p[n] = dot(q_s, k_head + n * s.D, s.D) * scale;
    max_logit = std::max(max_logit, p[n]);
  }
  acc_t total = 0;
  for (int64_t n = 0; n < s.N; ++n) total += (p[n] = std::exp(p[n] - max_logit));
  for (int64_t n = 0; n < s.N; ++n) p[n] /= total;
  return max_logit + std::log(total);
}

template <typename scalar_t, typename acc_t>
void forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& index,
                 const at::Tensor& weight, acc_t scale, const Shape& s, at::Tensor& out, at::Tensor& lse) {
  const scalar_t *q_ptr = q.data_ptr<scalar_t>(), *k_ptr = k.data_ptr<scalar_t>(), *v_ptr = v.data_ptr<scalar_t>();
  const int32_t* idx_ptr = index.data_ptr<int32_t>();
  const acc_t* w_ptr = weight.data_ptr<acc_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  acc_t* lse_ptr = lse.data_ptr<acc_t>();
  at::parallel_for(0, s.B * s.H * s.S, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_s(s.D), p(s.N), o(s.D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t head = row / s.S, b = head / s.H, sample = row % s.S;
      const int64_t taps = (b * s.S + sample) * s.T, kv_offset = head * s.N * s.D;
      tapped_query(q_ptr + head * s.Nq * s.D, idx_ptr + taps, w_ptr + taps, s, q_s.data());
      lse_ptr[row] = softmax_row(q_s.data(), k_ptr + kv_offset, s, scale, p.data());
      std::fill(o.begin(), o.end(), acc_t(0));
      for (int64_t n = 0; n < s.N; ++n)
        for (int64_t d = 0; d < s.D; ++d) o[d] += p[n] * static_cast<acc_t>(v_ptr[kv_offset + n * s.D + d]);
      for (int64_t d = 0; d < s.D; ++d) out_ptr[row * s.D + d] = static_cast<scalar_t>(o[d]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> srs_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& index, const at::Tensor& weight,
                                                     double scale) {
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor for the CPU kernel");
  const Shape s = check_forward_args(q, k, v, index, weight);
  at::Tensor out = at::empty({s.B, s.H, s.S, s.D}, q.options());
  at::Tensor lse = at::empty({s.B, s.H, s.S}, q.options().dtype(compute_dtype(q.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "srs_attention_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_cpu<scalar_t, acc_t>(q, k, v, index, weight, static_cast<acc_t>(scale), s, out, lse);
  });
  return {out, lse};
}

// All samples of one (crop, head), in order, so the scatter of dq through the taps is deterministic.
template <typename scalar_t, typename acc_t>
void backward_one_head(const scalar_t* grad_out, const scalar_t* q_head, const scalar_t* k_head,
                       const scalar_t* v_head, const int32_t* idx, const acc_t* w, const scalar_t* out,
                       const acc_t* lse, acc_t scale, const Shape& s, acc_t* dq, acc_t* dk, acc_t* dv) {
  std::vector<acc_t> q_s(s.D), d_out(s.D), dq_s(s.D);
  for (int64_t sample = 0; sample < s.S; ++sample) {
    const int64_t taps = sample * s.T;
    tapped_query(q_head, idx + taps, w + taps, s, q_s.data());
    for (int64_t d = 0; d < s.D; ++d) d_out[d] = static_cast<acc_t>(grad_out[sample * s.D + d]);
    const acc_t delta = dot(d_out.data(), out + sample * s.D, s.D);
    std::fill(dq_s.begin(), dq_s.end(), acc_t(0));
    for (int64_t n = 0; n < s.N; ++n) {
      const acc_t prob = std::exp(dot(q_s.data(), k_head + n * s.D, s.D) * scale - lse[sample]);
      const acc_t ds = prob * (dot(d_out.data(), v_head + n * s.D, s.D) - delta) * scale;
      for (int64_t d = 0; d < s.D; ++d) {
        dv[n * s.D + d] += prob * d_out[d];
        dk[n * s.D + d] += ds * q_s[d];
        dq_s[d] += ds * static_cast<acc_t>(k_head[n * s.D + d]);
      }
    }
    for (int64_t t = 0; t < s.T; ++t) {
      if (!tap_ok(idx[taps + t], s)) continue;
      for (int64_t d = 0; d < s.D; ++d) dq[idx[taps + t] * s.D + d] += w[taps + t] * dq_s[d];
    }
  }
}

template <typename scalar_t, typename acc_t>
void backward_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& index, const at::Tensor& weight, const at::Tensor& out, const at::Tensor& lse,
                  acc_t scale, const Shape& s, std::array<at::Tensor, 3>& grads) {
  const int64_t q_size = s.Nq * s.D, kv_size = s.N * s.D;
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(q_size + 2 * kv_size);
    for (int64_t head = begin; head < end; ++head) {
      const int64_t b = head / s.H, rows = head * s.S;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      backward_one_head(grad_out.data_ptr<scalar_t>() + rows * s.D, q.data_ptr<scalar_t>() + head * q_size,
                        k.data_ptr<scalar_t>() + head * kv_size, v.data_ptr<scalar_t>() + head * kv_size,
                        index.data_ptr<int32_t>() + b * s.S * s.T, weight.data_ptr<acc_t>() + b * s.S * s.T,
                        out.data_ptr<scalar_t>() + rows * s.D, lse.data_ptr<acc_t>() + rows, scale, s, acc.data(),
                        acc.data() + q_size, acc.data() + q_size + kv_size);
      const acc_t* src = acc.data();
      for (int g = 0; g < 3; ++g) {
        const int64_t size = g == 0 ? q_size : kv_size;
        scalar_t* dst = grads[g].data_ptr<scalar_t>() + head * size;
        for (int64_t i = 0; i < size; ++i) dst[i] = static_cast<scalar_t>(src[i]);
        src += size;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> srs_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& index, const at::Tensor& weight, const at::Tensor& out, const at::Tensor& lse, double scale) {
  TORCH_CHECK(q.device().is_cpu(), "q must be a CPU tensor for the CPU kernel");
  const Shape s = check_backward_args(grad_out, q, k, v, index, weight, out, lse);
  std::array<at::Tensor, 3> grads{at::empty_like(q), at::empty_like(k), at::empty_like(v)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "srs_attention_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    backward_cpu<scalar_t, acc_t>(grad_out, q, k, v, index, weight, out, lse, static_cast<acc_t>(scale), s, grads);
  });
  return {grads[0], grads[1], grads[2]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(udi_kernels, m) {
  m.def("srs_attention(Tensor q, Tensor k, Tensor v, Tensor index, Tensor weight, float scale) -> (Tensor, Tensor)");
  m.def(
      "srs_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor index, Tensor weight, "
      "Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(udi_kernels, CPU, m) {
  m.impl("srs_attention", &srs_attention_cpu);
  m.impl("srs_attention_backward", &srs_attention_backward_cpu);
}

}  // namespace udi::srs_attention
