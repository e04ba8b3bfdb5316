"""MaskedAttention: the reference UDI code's attention over dense sample maps, on the fused op."""
from typing import Optional

import torch
from torch import Tensor

from ..nn import TappedAttention
from ..reference.srs_attention import default_scale
from ..taps import dense_to_taps


class MaskedAttention(TappedAttention):
    """The reference's MaskedAttention (UDI_SPEC §3), parameters qkv, proj, norm, so its state dicts load.

    forward(x [B, N, C], map [M, B, S, N], return_attention=False) -> (out [M, B, S, C], attn)
      x:   the normalised patch tokens h (the wrapper applies norm1 before this module);
      map: M dense sample maps per crop (one-hot source rows or bilinear target rows, zero rows for
           padding); each row may hold at most 4 nonzeros (ValueError otherwise). The M maps share
           the crop's k, v and run as one op call.
      out: norm(proj(softmax(q_s k^T / sqrt(D)) v) + map @ x) with q_s = map @ q.
      attn: None by default, because the fused op never materialises the probabilities; with
           return_attention=True, the probabilities [M, B, H, S, N] recomputed eagerly (no gradient
           flows through them). map gets no gradient either.
    """

    def __init__(self, dim: int, num_heads: int = 6, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 backend: Optional[str] = None):
        super().__init__(dim, num_heads, qkv_bias, qk_scale, backend)

    def forward(self, x: Tensor, map: Tensor, return_attention: bool = False):
        if x.dim() != 3 or map.dim() != 4 or map.shape[1] != x.shape[0] or map.shape[3] != x.shape[1]:
            raise ValueError(f"map must have shape [M, B={x.shape[0]}, S, N={x.shape[1]}], got {list(map.shape)}")
        M, B, S, _ = map.shape
        index, weight = dense_to_taps(map.detach())
        merged = lambda t: t.permute(1, 0, 2, 3).reshape(B, M * S, -1)  # noqa: E731  [M, B, S, T] -> [B, M*S, T]
        out = super().forward(x, merged(index), merged(weight))
        out = out.reshape(B, M, S, -1).transpose(0, 1)
        return out, (self.attention_probabilities(x, map) if return_attention else None)

    @torch.no_grad()
    def attention_probabilities(self, x: Tensor, map: Tensor) -> Tensor:
        """softmax((map @ q) k^T * scale): [M, B, H, S, N], computed eagerly in the dtype of x."""
        B, N, C = x.shape
        heads = self.num_heads
        qkv = self.qkv(x).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        q_s = torch.einsum("mbsn,bhnd->mbhsd", map.to(x.dtype), qkv[0])
        scale = self.scale if self.scale is not None else default_scale(C // heads)
        return torch.softmax(q_s @ qkv[1].transpose(-1, -2) * scale, dim=-1)
