// The size limits shared with Python, declared once in udi_kernels/limits.py: setup.py defines UDI_<NAME> from it.
#pragma once
#include <cstdint>

#if !defined(UDI_MAX_GRID) || !defined(UDI_SRS_ATTENTION_CUDA_MAX_HEAD_DIM)
#error "udi_kernels' limits are undefined: build with setup.py, which defines them from udi_kernels/limits.py"
#endif

namespace udi::limits {

constexpr int64_t kMaxGrid = UDI_MAX_GRID;
constexpr int kSrsAttentionCudaMaxHeadDim = UDI_SRS_ATTENTION_CUDA_MAX_HEAD_DIM;

}  // namespace udi::limits
