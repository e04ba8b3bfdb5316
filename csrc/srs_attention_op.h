// Host-side argument checks of udi_kernels::srs_attention(_backward), shared by the CPU and CUDA kernels.
#pragma once
#include <ATen/core/Tensor.h>

#include <tuple>

#include "dtypes.h"

namespace udi::srs_attention {

struct Shape {
  int64_t B, H, Nq, N, S, T, D;  // Nq: rows of q (what the taps index), N: keys
};

// Checks q [B, H, Nq, D], k, v [B, H, N, D] (same dtype and device, contiguous), index [B, S, T] int32 and
// weight [B, S, T] in the compute dtype (csrc/dtypes.h).
Shape check_forward_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& index,
                         const at::Tensor& weight);

// The forward checks plus grad_out, out [B, H, S, D] (dtype of q) and lse [B, H, S] (compute dtype).
Shape check_backward_args(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& index, const at::Tensor& weight, const at::Tensor& out,
                          const at::Tensor& lse);

}  // namespace udi::srs_attention
