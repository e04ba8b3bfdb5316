"""SRS attention (UDI_SPEC §3) in eager PyTorch: the semantics every kernel is tested against.

Shapes: q [B, H, Nq, D] (usually Nq = N), k, v [B, H, N, D]; index [B, S, T] int into the Nq query rows;
weight [B, S, T] -> out [B, H, S, D]. A tap outside [0, Nq) (possible only with check_taps=False) is skipped,
as in every kernel.
"""
import math

import torch
from torch import Tensor

from ..dtypes import compute_dtype



def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def tapped_queries(q: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """q_s = sum_t weight[b, s, t] * q[b, :, index[b, s, t]] over the taps inside [0, Nq):
    [B, H, Nq, D] -> [B, H, S, D]. The other taps read a zero row past the end with weight 0."""
    B, H, Nq, D = q.shape
    S, T = index.shape[1:]
    index = index.long()
    inside = (index >= 0) & (index < Nq)
    rows = torch.where(inside, index, Nq).reshape(B, 1, S * T, 1).expand(B, H, S * T, D)
    padded = torch.cat([q, q.new_zeros(B, H, 1, D)], dim=2)
    taps = padded.gather(2, rows).reshape(B, H, S, T, D)
    return (taps * torch.where(inside, weight, 0)[:, None, :, :, None].to(q.dtype)).sum(3)


def srs_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, weight=None, scale=None) -> Tensor:
    """softmax(q_s k^T * scale) v for the tapped queries q_s; math in float32 (float64 for float64 inputs).

    weight=None means weight 1 for every tap; scale=None means 1/sqrt(D). A sample whose weights are
    all 0 has q_s = 0, so it attends uniformly to every key. Differentiable by autograd in q, k and v; the weights
    are treated as constants (no gradient), as in the kernels.
    """
    dtype = compute_dtype(q.dtype)
    if weight is None:
        weight = torch.ones(index.shape, dtype=dtype, device=q.device)
    if scale is None:
        scale = default_scale(q.shape[-1])
    q_s = tapped_queries(q.to(dtype), index, weight.detach().to(dtype))
    logits = torch.matmul(q_s, k.to(dtype).transpose(-1, -2)) * scale
    out = torch.matmul(torch.softmax(logits, dim=-1), v.to(dtype))
    return out.to(q.dtype)
