"""nn modules of the UDI head path."""
import functools
from typing import Optional, Union

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


def _build_identity_taps(batch: int, samples: int, device: torch.device):
    # normal tensors even inside inference_mode, so that a later call with autograd can save them
    with torch.inference_mode(False):
        index = torch.arange(samples, device=device, dtype=torch.int32).expand(batch, samples)[..., None]
        return index.contiguous(), torch.ones(batch, samples, 1, device=device)


_cached_identity_taps = functools.lru_cache(maxsize=16)(_build_identity_taps)


def identity_taps(batch: int, samples: int, device: torch.device):
    """index [batch, samples, 1] int32 with index[b, s, 0] = s, weight ones (float32): constants, built once
    per shape in eager mode; torch.compile traces the construction into its graph instead."""
    if torch.compiler.is_compiling():
        return _build_identity_taps(batch, samples, device)
    return _cached_identity_taps(batch, samples, device)


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast runs linear layers in on `device`, None when autocast is off."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def cast_for_autocast(h: Tensor) -> Tensor:
    """h in the dtype autocast runs linear layers in (h itself when autocast is off)."""
    dtype = autocast_dtype(h.device)
    return h if dtype is None else h.to(dtype)


class TappedAttention(nn.Module):
    """Attention of sampled queries over every token of their crop, then proj, tapped skip and LayerNorm.

    forward(h [B, N, C], index [B, S, T], weight [B, S, T] or None) -> [B, S, C], where h is already
    normalised. Only the sampled queries are projected: with t_s = sum_t w_t h[idx_t],
        q_s = t_s W_q + (sum_t w_t) b_q,
    which equals sum_t w_t (h[idx_t] W_q + b_q), i.e. tapping the full q projection, for any weights:
    valid samples (weights summing to 1) get t_s W_q + b_q, padding samples (all weights 0) get q_s = 0
    and attend uniformly, exactly as the reference's dense map times q does.
    Then out_s = norm(proj(softmax(q_s k^T / sqrt(D)) v) + t_s), computed in one of two exact ways, whichever
    needs fewer FLOPs:
    - over tokens (S > head_dim): k, v projected for all N tokens, attention per head (width head_dim);
    - over h (S <= head_dim): the k bias adds q_s . b_k to every logit of a row, which the softmax ignores, and
      the attention weights sum to 1, so with q~ = W_k,h^T q_s,h the logits are q~ . h_n and
      o_s,h = (sum_n a_n h_n) W_v,h^T + b_v,h: the heads' queries (width C) attend over h itself, and no k, v
      exist for the N tokens. It costs 4 S H N C FLOPs against 4 N C^2 for the k, v projection.

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
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # the reference's norm_layer

    def _qkv_parameters(self, dtype: Optional[torch.dtype]):
        """(W_q, W_kv), (b_q, b_kv) or (None, None): one cast of each parameter, split without copies."""
        C = self.qkv.in_features
        weight, bias = self.qkv.weight, self.qkv.bias
        if dtype is not None:
            weight, bias = weight.to(dtype), (None if bias is None else bias.to(dtype))
        return weight.split([C, 2 * C]), ((None, None) if bias is None else bias.split([C, 2 * C]))

    @staticmethod
    def _sampled_queries(tapped: Tensor, tap_sum: Union[Tensor, int], w_q: Tensor, b_q: Optional[Tensor]) -> Tensor:
        """q_s = t_s W_q + (sum_t w_t) b_q: [B, S, C]; tap_sum [B, S, 1], or a number for every sample."""
        if b_q is None:
            return F.linear(tapped, w_q)
        if isinstance(tap_sum, Tensor):
            return torch.addcmul(F.linear(tapped, w_q), tap_sum, b_q)
        return F.linear(tapped, w_q, b_q * tap_sum)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """srs_attention of every row of q [B, H, S, D] (identity taps) over k, v [B, H, N, D]."""
        B, _, S, _ = q.shape
        identity, ones = identity_taps(B, S, q.device)
        return attend(q.to(k.dtype), k, v, identity, ones.to(compute_dtype(k.dtype)), scale, self.backend)

    def _attend_over_tokens(self, h: Tensor, q_s: Tensor, w_kv: Tensor, b_kv: Optional[Tensor],
                            scale: float) -> Tensor:
        """q_s [B, S, H, D] -> o [B, S, C], with k, v projected for every token."""
        B, S, heads, head_dim = q_s.shape
        # unbind, not indexing: the backward then stacks dk, dv straight into the kv gradient, one kernel
        k, v = (t.transpose(1, 2) for t in F.linear(h, w_kv, b_kv).unflatten(-1, (2, heads, head_dim)).unbind(2))
        return self._attend(q_s.transpose(1, 2), k, v, scale).transpose(1, 2).reshape(B, S, heads * head_dim)

    def _attend_over_h(self, h: Tensor, q_s: Tensor, w_kv: Tensor, b_kv: Optional[Tensor], scale: float) -> Tensor:
        """q_s [B, S, H, D] -> o [B, S, C], attending over h with q~ = W_k,h^T q_s,h (see the class docstring)."""
        B, S, heads, head_dim = q_s.shape
        C = h.shape[-1]
        w_k, w_v = w_kv.view(2, heads, head_dim, C).unbind(0)  # [H, D, C] each
        queries = torch.einsum("bshd,hdc->bshc", q_s, w_k).reshape(B, 1, S * heads, C)
        tokens = h[:, None]
        context = self._attend(queries, tokens, tokens, scale).view(B, S, heads, C)
        o = torch.einsum("bshc,hdc->bshd", context, w_v)
        if b_kv is not None:
            o = o + b_kv.view(2, heads, head_dim)[1]
        return o.reshape(B, S, C)

    def forward(self, h: Tensor, index: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        if h.dim() != 3 or index.dim() != 3 or index.shape[0] != h.shape[0]:
            raise ValueError(f"h must be [B, N, C] and index [B, S, T], got {list(h.shape)} and {list(index.shape)}")
        if self.check_taps:
            check_tap_values(index, weight, h.shape[1])
        h = cast_for_autocast(h)
        weight = None if weight is None else weight.to(h.dtype)
        tapped = tap_rows(h, index, weight)
        tap_sum = index.shape[2] if weight is None else weight.sum(-1, keepdim=True)
        return self.attend_tapped(h, tapped, tap_sum, skip=tapped)

    def attend_tapped(self, h: Tensor, tapped: Tensor, tap_sum: Union[Tensor, int], skip: Optional[Tensor]) -> Tensor:
        """norm(proj(softmax(q_s k^T * scale) v) + skip) for q_s = tapped W_q + tap_sum b_q: [B, S, C].

        h [B, N, C] already in the autocast dtype (cast_for_autocast); tapped [B, S, C] the samples' tapped rows
        sum_t w_t h[idx_t]; tap_sum [B, S, 1] (or a number) their sum_t w_t; skip [B, S, C] added before the norm
        (None: no skip). The forward passes tapped itself as the skip; udi_kernels.compat.MaskedAttention forms
        tapped with a dense map and masks the queries of its padding rows.
        """
        B, S, C = tapped.shape
        heads, head_dim = self.num_heads, C // self.num_heads
        (w_q, w_kv), (b_q, b_kv) = self._qkv_parameters(autocast_dtype(h.device))
        q_s = self._sampled_queries(tapped, tap_sum, w_q, b_q).view(B, S, heads, head_dim)
        scale = default_scale(head_dim) if self.scale is None else float(self.scale)
        if S == 0:  # no sample: nothing to attend (the kernels need at least one query)
            o = tapped
        else:
            attend_over = self._attend_over_h if S <= head_dim else self._attend_over_tokens
            o = attend_over(h, q_s, w_kv, b_kv, scale)
        o = self.proj(o)
        return self.norm(o if skip is None else o + skip)


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
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)  # the reference's UDIWrapper norm_layer
        self.attn = TappedAttention(dim, num_heads, qkv_bias, backend=backend, check_taps=check_taps)

    def forward(self, x: Tensor, index: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        return self.attn(self.norm1(x), index, weight)
