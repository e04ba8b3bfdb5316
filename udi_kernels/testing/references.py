"""Float64-capable eager references of the UDI head (UDI_SPEC §3), written the reference code's way: q, k, v for
every token and dense [S, N] sample maps multiplied in (ISL-CV/udi MaskedAttention). Independent of the kernels
and of udi_kernels.reference; run them on float64 copies of a module for exact expectations."""
import torch
import torch.nn.functional as F
from torch import Tensor


def dense_map(index: Tensor, weight, num_rows: int, dtype=torch.float64) -> Tensor:
    """[B, S, num_rows] map of the taps: row s holds weight[s, t] at column index[s, t] (weight None: ones)."""
    one_hot = F.one_hot(index.long(), num_rows).to(dtype)
    return (one_hot if weight is None else one_hot * weight[..., None].to(dtype)).sum(2)


def dense_head_path(attn, h: Tensor, dense: Tensor) -> Tensor:
    """The head of SRSAttention / the reference's MaskedAttention on normalised tokens h [B, N, C] and a dense
    map [B, S, N]: attention of the mapped queries over every token, proj, plus the mapped skip, then attn.norm.
    attn: a udi_kernels.nn TappedAttention (qkv, proj, norm, num_heads). Returns [B, S, C] in h's dtype."""
    B, N, C = h.shape
    heads = attn.num_heads
    q, k, v = attn.qkv(h).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q_s = torch.einsum("bsn,bhnd->bhsd", dense.to(q.dtype), q)
    p = torch.softmax(q_s @ k.transpose(-1, -2) * (C // heads) ** -0.5, dim=-1)
    o = (p @ v).transpose(1, 2).reshape(B, -1, C)
    return attn.norm(attn.proj(o) + dense.to(h.dtype) @ h)


def dense_srs_block(srs, x: Tensor, dense: Tensor) -> Tensor:
    """dense_head_path after the block's first LayerNorm: an SRSAttention module `srs` on tokens x [B, N, C]."""
    return dense_head_path(srs.attn, srs.norm1(x), dense)
