"""nn modules of the UDI head path."""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops.srs_attention import check_tap_values, srs_attention


def tap_rows(x: Tensor, index: Tensor, weight: Optional[Tensor]) -> Tensor:
    """sum_t weight[b, s, t] * x[b, index[b, s, t]]: x [B, N, C], index/weight [B, S, T] -> [B, S, C]."""
    B, S, T = index.shape
    rows = x.gather(1, index.long().reshape(B, S * T, 1).expand(B, S * T, x.shape[-1])).reshape(B, S, T, -1)
    if weight is None:
        return rows.sum(2)
    return (rows * weight[..., None].to(x.dtype)).sum(2)


class TappedAttention(nn.Module):
    """Attention of sampled queries over every token of their crop, then proj, tapped skip and LayerNorm.

    forward(h [B, N, C], index [B, S, T], weight [B, S, T] or None) -> [B, S, C], where h is already
    normalised. Only the sampled queries are projected: with t_s = sum_t w_t h[idx_t],
        q_s = t_s W_q + (sum_t w_t) b_q,
    which equals sum_t w_t (h[idx_t] W_q + b_q), i.e. tapping the full q projection, for any weights:
    valid samples (weights summing to 1) get t_s W_q + b_q, padding samples (all weights 0) get q_s = 0
    and attend uniformly, exactly as the reference's dense map times q does.
    Then out_s = norm(proj(softmax(q_s k^T / sqrt(D)) v) + t_s).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 backend: Optional[str] = None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.scale = qk_scale
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def _sampled_queries(self, tapped: Tensor, tap_sum: Tensor) -> Tensor:
        C = tapped.shape[-1]
        q_s = F.linear(tapped, self.qkv.weight[:C])
        if self.qkv.bias is not None:
            q_s = q_s + tap_sum[..., None].to(q_s.dtype) * self.qkv.bias[:C]
        return q_s

    def forward(self, h: Tensor, index: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        if h.dim() != 3 or index.dim() != 3 or index.shape[0] != h.shape[0]:
            raise ValueError(f"h must be [B, N, C] and index [B, S, T], got {list(h.shape)} and {list(index.shape)}")
        check_tap_values(index, weight, h.shape[1])
        B, N, C = h.shape
        S, T = index.shape[1:]
        heads, head_dim = self.num_heads, C // self.num_heads
        tapped = tap_rows(h, index, weight)
        tap_sum = weight.sum(-1) if weight is not None else torch.full((B, S), float(T), device=h.device)
        q_s = self._sampled_queries(tapped, tap_sum).reshape(B, S, heads, head_dim).transpose(1, 2)
        bias = None if self.qkv.bias is None else self.qkv.bias[C:]
        kv = F.linear(h, self.qkv.weight[C:], bias).reshape(B, N, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        q_s = q_s.to(kv.dtype)  # under autocast the bias term promotes q_s to float32
        identity = torch.arange(S, device=h.device, dtype=torch.int32).expand(B, S)[..., None]
        o = srs_attention(q_s, kv[0], kv[1], identity, None, self.scale, backend=self.backend, check_taps=False)
        return self.norm(self.proj(o.transpose(1, 2).reshape(B, S, C)) + tapped)


class SRSAttention(nn.Module):
    """The UDI head path of UDI_SPEC §3: norm1, then TappedAttention (parameters norm1, attn.qkv, attn.proj,
    attn.norm).

    forward(x [B, N, C], index [B, S, T], weight [B, S, T] or None) -> [B, S, C]
      x: patch tokens of the last block before the backbone's final norm;
      index, weight: taps straight from udi_kernels.stratified_sample (one_hot_taps for the source side,
      tgt_index / tgt_weight for the target side); several sample sets of a crop may be concatenated on S.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: Optional[str] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TappedAttention(dim, num_heads, qkv_bias, backend=backend)

    def forward(self, x: Tensor, index: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        return self.attn(self.norm1(x), index, weight)
