"""The dtype rule of every op (C++: csrc/dtypes.h): float64 inputs compute, and return, float64; every other floating
dtype computes in float32 (tap weights, logsumexps, losses and center statistics)."""
import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
