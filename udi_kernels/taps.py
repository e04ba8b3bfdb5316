"""Conversions between sparse taps (index, weight) and the reference code's dense [S, N] maps."""
import torch
from torch import Tensor

from .checks import check_int, check_tensor


def taps_to_dense(index: Tensor, weight: Tensor, num_tokens: int) -> Tensor:
    """index/weight [..., S, T] -> dense [..., S, num_tokens] with map[s, index[s, t]] += weight[s, t].

    Raises TypeError / ValueError naming the argument; an index outside [0, num_tokens) is refused (one device sync
    on CUDA)."""
    check_tensor(index, "index", integer=True)
    check_tensor(weight, "weight", integer=False, device=index.device)
    num_tokens = check_int(num_tokens, "num_tokens", 1)
    if index.shape != weight.shape or index.dim() < 1:
        raise ValueError(f"index {list(index.shape)} and weight {list(weight.shape)} must have the same shape "
                         "[..., S, T]")
    if index.numel() and not bool(((index >= 0) & (index < num_tokens)).all()):
        raise ValueError(f"index must lie in [0, {num_tokens}) (num_tokens), got values in "
                         f"[{int(index.min())}, {int(index.max())}]")
    dense = weight.new_zeros(*index.shape[:-1], num_tokens)
    return dense.scatter_add_(-1, index.long(), weight)


def one_hot_taps(src_index: Tensor, count: Tensor):
    """Source taps (T = 1) of SRS samples: weight 1 for the first `count` samples, 0 for padding.
    src_index [..., S] int, count [...] int -> (index [..., S, 1], weight [..., S, 1] float32)."""
    check_tensor(src_index, "src_index", integer=True)
    check_tensor(count, "count", integer=True, device=src_index.device)
    if src_index.dim() < 1 or count.shape != src_index.shape[:-1]:
        raise ValueError(f"count must have shape {list(src_index.shape[:-1])} (src_index without its last "
                         f"dimension), got {list(count.shape)}")
    positions = torch.arange(src_index.shape[-1], device=src_index.device)
    weight = (positions < count[..., None]).to(torch.float32)
    return src_index[..., None], weight[..., None]


def dense_to_taps(dense: Tensor, max_taps: int = 4):
    """dense [..., S, N] -> (index [..., S, max_taps] int32, weight [..., S, max_taps]).

    Raises when a row has more than max_taps nonzeros: such a map is no SRS map.
    """
    check_tensor(dense, "dense", integer=False)
    max_taps = check_int(max_taps, "max_taps", 1)
    if dense.dim() < 1:
        raise ValueError(f"dense must have shape [..., S, N], got {list(dense.shape)}")
    nonzeros = (dense != 0).sum(-1)
    if bool((nonzeros > max_taps).any()):
        raise ValueError(f"map has a row with {int(nonzeros.max())} nonzeros; at most {max_taps} are supported")
    weight, index = dense.abs().topk(min(max_taps, dense.shape[-1]), dim=-1, sorted=False)
    return index.to(torch.int32), dense.gather(-1, index)
