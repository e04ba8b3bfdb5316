"""MaskedAttention: the reference UDI code's SRS attention over dense maps (UDI_SPEC §3, §9), on the fused op."""
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from ..checks import check_bool, check_tensor
from ..nn import TappedAttention, autocast_dtype, cast_for_autocast, check_input_dtype


class MaskedAttention(TappedAttention):
    """The reference's `vision_transformer.MaskedAttention` (github ISL-CV/udi, commit 133c2cb), one-line swap.

    MaskedAttention(dim, num_heads, qkv_bias=False, skip_connection=True,
                    norm_layer=partial(nn.LayerNorm, eps=1e-6), *, backend=None, compute_attention=None)

    Modules `qkv` (dim -> 3·dim, bias iff qkv_bias), `attn_drop`, `proj` (dim -> dim), `proj_drop`, `norm`
    (norm_layer(dim)); `scale = (dim // num_heads) ** -0.5`. Init as the reference: every Linear weight truncated
    normal (std 0.02, cut at ±2), every Linear bias 0, LayerNorm weight 1 and bias 0, drawing the same random
    numbers in the same order, so under one seed both classes start from identical parameters. Dropouts exist
    for the module tree only: the reference never applies them here either.

    forward(x [B, N, C], map [M, B, S, N]) -> (out [M, B, S, C], attn [M, B, H, S, N] or None)
      x:   the normalised patch tokens (the reference's UDIWrapper applies norm1 first);
      map: M dense sample maps per crop, any real rows (one-hot, bilinear or anything else). A row attends iff
           its sum is > 0 (the reference's row mask); other rows ("padding") attend uniformly.
      out: norm(proj(softmax(q_s k^T · scale) v) + map @ x) with q_s = map @ (x W_q + b_q), the skip only with
           skip_connection; every row, padding rows included, has the reference's value.
      attn: the attention probabilities times the row mask (padding rows all 0), as the reference returns them.

    How it runs: map @ x is one batched matmul for all M maps (exact for any map, no host sync); the queries
    of the M·S rows then attend over their crop in one call of the fused udi_kernels.srs_attention op
    (TappedAttention.attend_tapped), which never materialises the probabilities. The probabilities are only
    formed eagerly when asked for, so the reference's training loop (which discards them) pays nothing:
      compute_attention=None (default): formed iff the module is in eval mode or autograd is off, i.e. in the
          reference's visualisation path (`UDIWrapper.forward(x, map, return_attention=True)` under
          torch.no_grad() or after .eval()); in training, attn is None;
      compute_attention=True / False: always / never (settable on the instance at any time).
    Gradients flow to x, the parameters, and map (as in the reference); attn is differentiable too.

    Errors (checked before anything runs, naming the argument): TypeError when x or map is not a real floating
    tensor (integer, bool and complex maps are refused; x in the parameters' dtype unless under autocast);
    ValueError when x is not [B, N, dim] or not on the parameters' device, map not [M, B, S, N] for that x or not
    on the device of x. The constructor: TypeError / ValueError naming dim, num_heads (must divide dim), qkv_bias,
    skip_connection and compute_attention (bools) or backend.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, skip_connection: bool = True,
                 norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6), *,
                 backend: Optional[str] = None, compute_attention: Optional[bool] = None):
        super().__init__(dim, num_heads, qkv_bias, backend=backend)
        check_bool(skip_connection, "skip_connection")
        if compute_attention is not None:
            check_bool(compute_attention, "compute_attention")
        self.scale = (dim // num_heads) ** -0.5
        self.skip_connection = skip_connection
        self.compute_attention = compute_attention
        self.norm = norm_layer(dim)
        self.attn_drop = nn.Dropout(0.0)
        self.proj_drop = nn.Dropout(0.0)
        self.apply(_init_weights)

    def forward(self, x: Tensor, map: Tensor):
        M, B, S, N = self._check(x, map)
        C = x.shape[-1]
        h = cast_for_autocast(x)
        rows = map.to(h.dtype).transpose(0, 1).reshape(B, M * S, N)  # crop b's M·S rows together
        tapped = torch.bmm(rows, h)                                    # map @ x, [B, M·S, C]
        tap_sum = rows.sum(-1, keepdim=True)
        attends = tap_sum > 0
        queries, query_sum = torch.where(attends, tapped, 0), tap_sum * attends
        out = self.attend_tapped(h, queries, query_sum, tapped if self.skip_connection else None)
        out = out.view(B, M, S, C).transpose(0, 1).contiguous()
        attn = self._probabilities(h, queries, query_sum, attends, M, S) if self._wants_attention() else None
        return out, attn

    def _wants_attention(self) -> bool:
        if self.compute_attention is None:
            return not (self.training and torch.is_grad_enabled())
        return bool(self.compute_attention)

    def _probabilities(self, h: Tensor, queries: Tensor, query_sum: Tensor, attends: Tensor, M: int, S: int) -> Tensor:
        """softmax(q_s k^T · scale) times the row mask, eagerly: [M, B, H, S, N]."""
        B, N, C = h.shape
        heads = self.num_heads
        (w_q, w_kv), (b_q, b_kv) = self._qkv_parameters(autocast_dtype(h.device))
        q = self._sampled_queries(queries, query_sum, w_q, b_q).view(B, M * S, heads, C // heads).transpose(1, 2)
        k = F.linear(h, w_kv[:C], None if b_kv is None else b_kv[:C]).view(B, N, heads, C // heads).transpose(1, 2)
        attn = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1) * attends.view(B, 1, M * S, 1)
        return attn.view(B, heads, M, S, N).permute(2, 0, 1, 3, 4).contiguous()

    def _check(self, x: Tensor, map: Tensor):
        C = self.qkv.in_features
        check_tensor(x, "x")
        if x.dim() != 3 or x.shape[2] != C:
            raise ValueError(f"x must have shape [B, N, {C}], got {list(x.shape)}")
        check_input_dtype(self, x, "x")
        if x.device != self.qkv.weight.device:
            raise ValueError(f"x must be on the device of the module's parameters ({self.qkv.weight.device}), got "
                             f"{x.device}")
        check_tensor(map, "map", device=x.device)
        B, N = x.shape[:2]
        if map.dim() != 4 or map.shape[1] != B or map.shape[3] != N:
            raise ValueError(f"map must have shape [M, B={B}, S, N={N}], got {list(map.shape)}")
        return map.shape


def _init_weights(module: nn.Module):
    """The reference's init (also its ViT's and DINO's): Linear weights trunc normal 0.02, biases 0, LN 1 and 0.

    timm's trunc_normal_ samples by the inverse CDF as the reference does (one uniform draw per element);
    torch.nn.init.trunc_normal_ now rejection-samples, which draws other random numbers."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
