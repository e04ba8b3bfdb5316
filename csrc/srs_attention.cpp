// udi_kernels::srs_attention(_backward): schemas and argument checks. The kernel is CUDA's (csrc/cuda/srs_attention.cu);
// there is no CPU kernel: the eager reference (BLAS and SDPA) is faster on the CPU (benchmarks/NOTES.md, srs_attention).
#include <torch/library.h>

#include <utility>

#include "checks.h"
#include "srs_attention_op.h"

namespace udi::srs_attention {

Shape check_forward_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& index,
                         const at::Tensor& weight) {
  check_dim(q, "q", 4, "[B, H, N, D]");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble,
              "q must be float16, bfloat16, float32 or float64, got ", dtype);
  UDI_CHECK_CONTIGUOUS(q);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "k must have shape [B=", q.size(0), ", H=", q.size(1), ", N, D=", q.size(3), "], got ", k.sizes());
  TORCH_CHECK(k.size(2) >= 1 && q.size(3) >= 1, "k needs at least one row and one channel, got ", k.sizes());
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    check_shape(*t, name, k.sizes());
    check_same_dtype(*t, name, q, "q");
    check_like(*t, name, q, "q");
  }
  TORCH_CHECK(index.dim() == 3 && index.size(0) == q.size(0) && index.size(2) >= 1,
              "index must have shape [B=", q.size(0), ", S, T>=1], got ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kInt, "index must be int32, got ", index.scalar_type());
  UDI_CHECK_LIKE(index, q);
  check_shape(weight, "weight", index.sizes());
  TORCH_CHECK(weight.scalar_type() == compute_dtype(dtype), "weight must be ", compute_dtype(dtype),
              " for ", dtype, " inputs, got ", weight.scalar_type());
  UDI_CHECK_LIKE(weight, q);
  return Shape{q.size(0), q.size(1), q.size(2), k.size(2), index.size(1), index.size(2), q.size(3)};
}

Shape check_backward_args(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& index, const at::Tensor& weight, const at::Tensor& out,
                          const at::Tensor& lse) {
  const Shape s = check_forward_args(q, k, v, index, weight);
  for (const auto& [t, name] : {std::pair{&grad_out, "grad_out"}, std::pair{&out, "out"}}) {
    check_shape(*t, name, {s.B, s.H, s.S, s.D});
    check_same_dtype(*t, name, q, "q");
    check_like(*t, name, q, "q");
  }
  UDI_CHECK_SHAPE(lse, s.B, s.H, s.S);
  UDI_CHECK_DTYPE(lse, compute_dtype(q.scalar_type()));
  UDI_CHECK_LIKE(lse, q);
  return s;
}

TORCH_LIBRARY_FRAGMENT(udi_kernels, m) {
  m.def("srs_attention(Tensor q, Tensor k, Tensor v, Tensor index, Tensor weight, float scale) -> (Tensor, Tensor)");
  m.def(
      "srs_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor index, Tensor weight, "
      "Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)");
}

}  // namespace udi::srs_attention
