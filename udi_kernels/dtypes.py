"""The dtype rule of every op (C++: csrc/dtypes.h): float64 inputs compute, and return, float64; every other floating
dtype computes in float32 (tap weights, logsumexps, losses and center statistics)."""
import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


HALF_AND_FLOAT = (torch.float16, torch.bfloat16, torch.float32)  # what the GPU kernels take
FLOATING = HALF_AND_FLOAT + (torch.float64,)  # the real floating dtypes every op takes on some backend
INDICES = (torch.int32, torch.int64)  # index tensors
STATISTICS = (torch.float32, torch.float64)  # centers and weights: a compute dtype (compute_dtype)
