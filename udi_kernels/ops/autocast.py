"""The autocast rule of every op: what torch.autocast does to its inputs, the same for every backend.

Autocast casts inside ops it knows (matmuls, linear layers) but not inside our registered kernels, so that without
a rule the reference backend (eager matmuls) would compute in the autocast dtype while the kernels compute in
float32. Each public op therefore applies its rule itself, then runs its backend with autocast off:

- srs_attention, linear_distill_cross_entropy (a linear layer fused into the loss): like
  torch.nn.functional.scaled_dot_product_attention and linear, "lower precision": their floating inputs
  (q, k, v; student, weight, teacher, teacher_weight) are cast to the autocast dtype of their device (float64
  ones stay as they are), so that the mixed dtypes autocast produces (q from a Linear in bfloat16, k, v from a
  LayerNorm in float32) are accepted. The math is then the op's dtype rule (udi_kernels.dtypes): float32.
- distill_cross_entropy, stratified_sample: no cast; their inputs keep their dtypes (the kernels accumulate in
  float32 whatever the logits' dtype; boxes are float32).
The centers, pair and row weights and tap weights are never cast. Outside autocast nothing is cast, and the dtype
checks of each op hold as documented there.
"""
import contextlib
from typing import Optional

import torch
from torch import Tensor


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast runs linear layers in on `device`, None when autocast is off there."""
    if not torch.amp.is_autocast_available(device.type) or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def cast_inputs(device: torch.device, *tensors):
    """The tensors (None passes) in the autocast dtype of `device`, for a lower-precision op; float64 tensors, and
    every tensor when autocast is off there, as they are."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def autocast_off(device: torch.device):
    """A context that turns autocast off on `device` while a backend runs (a no-op context when it is off)."""
    if autocast_dtype(device) is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)
