// The dtype rule of every op (Python: udi_kernels/dtypes.py): float64 inputs compute, and return, float64; every
// other floating dtype computes in float32 (the tap weights, logsumexps and statistics the kernels exchange).
#pragma once
#include <c10/core/ScalarType.h>

namespace udi {

inline at::ScalarType compute_dtype(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace udi
