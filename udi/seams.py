"""The two seams to the package's fused ops: SRS attention (issue 3) and the distillation cross-entropy (issue 4).

STAND-IN: until `udi_kernels.nn.SRSAttention` and `udi_kernels.losses` are on main, this file provides the
smallest eager versions of both so that the loop runs. They are not optimised and must not grow; wiring the real
ops in replaces this file's fallbacks and nothing else.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    from udi_kernels.nn import SRSAttention
except ImportError:
    SRSAttention = None


def tap_rows(x: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """x [B, N, C], index/weight [B, S, T] -> sum_t weight * x[index] : [B, S, C]."""
    B, S, T = index.shape
    rows = x.gather(1, index.long().reshape(B, S * T, 1).expand(-1, -1, x.shape[-1])).reshape(B, S, T, -1)
    return (rows * weight.to(x.dtype)[..., None]).sum(2)


class _EagerAttentionCore(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)


class _EagerSRSAttention(nn.Module):
    """STAND-IN for udi_kernels.nn.SRSAttention (UDI_SPEC §3): same parameters, same forward signature."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _EagerAttentionCore(dim, num_heads, qkv_bias)

    def forward(self, x: Tensor, index: Tensor, weight: Tensor = None) -> Tensor:
        if weight is None:
            weight = torch.ones(index.shape, dtype=torch.float32, device=index.device)
        B, N, C = x.shape
        H = self.attn.num_heads
        h = self.norm1(x)
        skip = tap_rows(h, index, weight)
        w_q, w_kv = self.attn.qkv.weight.split([C, 2 * C])
        b_q, b_kv = self.attn.qkv.bias.split([C, 2 * C])
        q = skip @ w_q.t() + weight.sum(-1, keepdim=True).to(h.dtype) * b_q
        k, v = F.linear(h, w_kv, b_kv).reshape(B, N, 2, H, C // H).permute(2, 0, 3, 1, 4)
        q = q.reshape(B, -1, H, C // H).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(C // H))
        return self.attn.norm(self.attn.proj(out.transpose(1, 2).reshape(B, -1, C)) + skip)


if SRSAttention is None:
    SRSAttention = _EagerSRSAttention


def distill_cross_entropy(student: Tensor, teacher: Tensor, center: Tensor, student_temp: float,
                          teacher_temp: float) -> Tensor:
    """STAND-IN for the fused op: per-row CE(softmax((t - c)/tau_t), log_softmax(s/tau_s)) in fp32 -> [...]."""
    target = F.softmax((teacher.float() - center) / teacher_temp, dim=-1)
    return -(target * F.log_softmax(student.float() / student_temp, dim=-1)).sum(-1)
