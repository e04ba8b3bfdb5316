"""nn modules of the UDI head path."""
import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_backend, check_bool, check_float, check_int, check_tensor
from .ops.srs_attention import attend, check_tap_args, check_tap_values
from .dtypes import compute_dtype
from .reference.srs_attention import default_scale


def tap_rows(x: Tensor, index: Tensor, weight: Optional[Tensor]):
    """(sum_t w[b, s, t] * x[b, index[b, s, t]] [B, S, C], w [B, S, T]) for x [B, N, C], index/weight [B, S, T],
    with w the weights (all 1 for weight=None) of the taps inside [0, N) and 0 for the others: a tap out of range
    is skipped, as in udi_kernels.srs_attention (checked only with check_taps=True)."""
    B, S, T = index.shape
    C = x.shape[-1]
    index = index.long()
    inside = (index >= 0) & (index < x.shape[1])
    rows = x.gather(1, torch.where(inside, index, 0).reshape(B, S * T, 1).expand(B, S * T, C)).reshape(B, S, T, C)
    w = inside.to(x.dtype) if weight is None else torch.where(inside, weight.to(x.dtype), 0)
    return (rows * w[..., None]).sum(2), w


def check_input_dtype(module: nn.Module, x: Tensor, name: str) -> None:
    """x floating, in the dtype of the module's parameters unless autocast is on; TypeError naming `name`."""
    parameters = next(module.parameters())
    if not x.dtype.is_floating_point or (x.dtype != parameters.dtype and autocast_dtype(x.device) is None):
        raise TypeError(f"{name} must have the dtype of the module's parameters ({parameters.dtype}; or run under "
                        f"autocast), got {x.dtype}")


def check_module_inputs(module: nn.Module, x: Tensor, index: Tensor, weight: Optional[Tensor], dim: int,
                        name: str) -> None:
    """x [B, N >= 1, dim] floating, in the dtype of the module's parameters unless autocast is on; index
    [B, S, T >= 1] int32/int64 and weight None or floating [B, S, T] on the device of x. Raises TypeError /
    ValueError naming the argument. B = 0 and S = 0 are allowed."""
    check_tensor(x, name)
    if x.dim() != 3 or x.shape[2] != dim or x.shape[1] == 0:
        raise ValueError(f"{name} must have shape [B, N >= 1, C={dim}], got {list(x.shape)}")
    check_input_dtype(module, x, name)
    check_tap_args(index, weight, x.shape[0], x.device, name)


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
    (constructor) checks 0 <= index < N and finite weights on every call, at the cost of one device sync; with
    check_taps=False a tap outside [0, N) is skipped (weight 0), as in udi_kernels.srs_attention. Shapes, dtypes
    and devices are always checked (TypeError / ValueError naming h, index or weight); B = 0 and S = 0 work.
    Under autocast, h and the qkv parameters are cast once and t_s is tapped from the cast h (as the
    reference's map @ h runs under autocast).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 backend: Optional[str] = None, check_taps: bool = False):
        super().__init__()
        check_int(dim, "dim", 1)
        check_int(num_heads, "num_heads", 1)
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if qk_scale is not None:
            check_float(qk_scale, "qk_scale", 0.0, low_open=True)
        check_backend(backend)
        check_bool(qkv_bias, "qkv_bias")
        check_bool(check_taps, "check_taps")
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
    def _sampled_queries(tapped: Tensor, tap_sum: Tensor, w_q: Tensor, b_q: Optional[Tensor]) -> Tensor:
        """q_s = t_s W_q + (sum_t w_t) b_q: [B, S, C]; tap_sum [B, S, 1] the samples' sum_t w_t."""
        if b_q is None:
            return F.linear(tapped, w_q)
        return torch.addcmul(F.linear(tapped, w_q), tap_sum, b_q)

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
        self.check_inputs(h, index, weight, "h")
        return self.attend_taps(h, index, weight)

    def check_inputs(self, h: Tensor, index: Tensor, weight: Optional[Tensor], name: str) -> None:
        """The checks of forward (check_module_inputs, and the tap values with check_taps), naming h `name`."""
        check_module_inputs(self, h, index, weight, self.qkv.in_features, name)
        if self.check_taps:
            check_tap_values(index, weight, h.shape[1], "the tokens")

    def attend_taps(self, h: Tensor, index: Tensor, weight: Optional[Tensor]) -> Tensor:
        """forward without its checks, for a caller that has made them once (SRSAttention: check_inputs)."""
        h = cast_for_autocast(h)
        tapped, weight = tap_rows(h, index, weight)
        return self.attend_tapped(h, tapped, weight.sum(-1, keepdim=True), skip=tapped)

    def attend_tapped(self, h: Tensor, tapped: Tensor, tap_sum: Tensor, skip: Optional[Tensor]) -> Tensor:
        """norm(proj(softmax(q_s k^T * scale) v) + skip) for q_s = tapped W_q + tap_sum b_q: [B, S, C].

        h [B, N, C] already in the autocast dtype (cast_for_autocast); tapped [B, S, C] the samples' tapped rows
        sum_t w_t h[idx_t]; tap_sum [B, S, 1] their sum_t w_t; skip [B, S, C] added before the norm
        (None: no skip). The forward passes tapped itself as the skip; udi_kernels.compat.MaskedAttention forms
        tapped with a dense map and masks the queries of its padding rows.
        """
        B, S, C = tapped.shape
        heads, head_dim = self.num_heads, C // self.num_heads
        (w_q, w_kv), (b_q, b_kv) = self._qkv_parameters(autocast_dtype(h.device))
        q_s = self._sampled_queries(tapped, tap_sum, w_q, b_q).view(B, S, heads, head_dim)
        scale = default_scale(head_dim) if self.scale is None else float(self.scale)
        attend_over = self._attend_over_h if S <= head_dim else self._attend_over_tokens
        o = self.proj(attend_over(h, q_s, w_kv, b_kv, scale))
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
        check_int(dim, "dim", 1)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)  # the reference's UDIWrapper norm_layer
        self.attn = TappedAttention(dim, num_heads, qkv_bias, backend=backend, check_taps=check_taps)

    def forward(self, x: Tensor, index: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        self.attn.check_inputs(x, index, weight, "x")  # once per call: norm1 keeps the shape, dtype and device
        return self.attn.attend_taps(self.norm1(x), index, weight)
