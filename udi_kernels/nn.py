"""nn modules of the UDI head path."""
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops.srs_attention import attend, check_tap_values
from .reference.srs_attention import compute_dtype, default_scale


def tap_rows(x: Tensor, index: Tensor, weight: Optional[Tensor]) -> Tensor:
    """sum_t weight[b, s, t] * x[b, index[b, s, t]]: x [B, N, C], index/weight [B, S, T] -> [B, S, C]."""
    B, S, T = index.shape
    rows = x.gather(1, index.long().reshape(B, S * T, 1).expand(B, S * T, x.shape[-1])).reshape(B, S, T, -1)
    if weight is None:
        return rows.sum(2)
    return (rows * weight[..., None].to(x.dtype)).sum(2)


@functools.lru_cache(maxsize=16)
def identity_taps(batch: int, samples: int, device: torch.device):
    """index [batch, samples, 1] int32 with index[b, s, 0] = s, weight ones (float32): constants, built once
    (as normal tensors even inside inference_mode, so that a later call with autograd can save them)."""
    with torch.inference_mode(False):
        index = torch.arange(samples, device=device, dtype=torch.int32).expand(batch, samples)[..., None]
        return index.contiguous(), torch.ones(batch, samples, 1, device=device)


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast runs linear layers in on `device`, None when autocast is off."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


class TappedAttention(nn.Module):
    """Attention of sampled queries over every token of their crop, then proj, tapped skip and LayerNorm.

    forward(h [B, N, C], index [B, S, T], weight [B, S, T] or None) -> [B, S, C], where h is already
    normalised. Only the sampled queries are projected: with t_s = sum_t w_t h[idx_t],
        q_s = t_s W_q + (sum_t w_t) b_q,
    which equals sum_t w_t (h[idx_t] W_q + b_q), i.e. tapping the full q projection, for any weights:
    valid samples (weights summing to 1) get t_s W_q + b_q, padding samples (all weights 0) get q_s = 0
    and attend uniformly, exactly as the reference's dense map times q does.
    Then out_s = norm(proj(softmax(q_s k^T / sqrt(D)) v) + t_s).

    The hot path has no host sync: taps from stratified_sample are valid by construction. check_taps=True
    (constructor) checks 0 <= index < N and finite weights on every call, at the cost of one device sync.
    Under autocast, h and the qkv parameters are cast once and t_s is tapped from the cast h (as the
    reference's map @ h runs under autocast).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 backend: Optional[str] = None, check_taps: bool = False):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.scale = qk_scale
        self.backend = backend
        self.check_taps = check_taps
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def _qkv_parameters(self, dtype: Optional[torch.dtype]):
        """(W_q, W_kv), (b_q, b_kv) or (None, None): one cast of each parameter, split without copies."""
        C = self.qkv.in_features
        weight, bias = self.qkv.weight, self.qkv.bias
        if dtype is not None:
            weight, bias = weight.to(dtype), (None if bias is None else bias.to(dtype))
        return weight.split([C, 2 * C]), ((None, None) if bias is None else bias.split([C, 2 * C]))

    @staticmethod
    def _sampled_queries(tapped: Tensor, weight: Optional[Tensor], taps: int, w_q: Tensor,
                         b_q: Optional[Tensor]) -> Tensor:
        """q_s = t_s W_q + (sum_t w_t) b_q: [B, S, C]."""
        if b_q is None:
            return F.linear(tapped, w_q)
        if weight is None:  # every tap weighs 1
            return F.linear(tapped, w_q, b_q * taps)
        return torch.addcmul(F.linear(tapped, w_q), weight.sum(-1, keepdim=True), b_q)

    def forward(self, h: Tensor, index: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        if h.dim() != 3 or index.dim() != 3 or index.shape[0] != h.shape[0]:
            raise ValueError(f"h must be [B, N, C] and index [B, S, T], got {list(h.shape)} and {list(index.shape)}")
        if self.check_taps:
            check_tap_values(index, weight, h.shape[1])
        B, N, C = h.shape
        S, T = index.shape[1:]
        heads, head_dim = self.num_heads, C // self.num_heads
        dtype = autocast_dtype(h.device)
        (w_q, w_kv), (b_q, b_kv) = self._qkv_parameters(dtype)
        h = h if dtype is None else h.to(dtype)
        weight = None if weight is None else weight.to(h.dtype)
        tapped = tap_rows(h, index, weight)
        q_s = self._sampled_queries(tapped, weight, T, w_q, b_q).view(B, S, heads, head_dim).transpose(1, 2)
        # unbind, not indexing: the backward then stacks dk, dv straight into the kv gradient, one kernel
        k, v = (t.transpose(1, 2) for t in F.linear(h, w_kv, b_kv).unflatten(-1, (2, heads, head_dim)).unbind(2))
        scale = default_scale(head_dim) if self.scale is None else float(self.scale)
        identity, ones = identity_taps(B, S, h.device)
        o = attend(q_s.to(k.dtype), k, v, identity, ones.to(compute_dtype(q_s.dtype)), scale, self.backend)
        return self.norm(self.proj(o.transpose(1, 2).reshape(B, S, C)) + tapped)


class SRSAttention(nn.Module):
    """The UDI head path of UDI_SPEC §3: norm1, then TappedAttention (parameters norm1, attn.qkv, attn.proj,
    attn.norm).

    forward(x [B, N, C], index [B, S, T], weight [B, S, T] or None) -> [B, S, C]
      x: patch tokens of the last block before the backbone's final norm;
      index, weight: taps straight from udi_kernels.stratified_sample (one_hot_taps for the source side,
      tgt_index / tgt_weight for the target side); several sample sets of a crop may be concatenated on S.
    check_taps=True checks the tap values on every call (one device sync; off by default, see TappedAttention).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, backend: Optional[str] = None,
                 check_taps: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TappedAttention(dim, num_heads, qkv_bias, backend=backend, check_taps=check_taps)

    def forward(self, x: Tensor, index: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        return self.attn(self.norm1(x), index, weight)
