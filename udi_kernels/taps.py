"""Conversions between sparse taps (index, weight) and the reference code's dense [S, N] maps."""
import torch
from torch import Tensor


def taps_to_dense(index: Tensor, weight: Tensor, num_tokens: int) -> Tensor:
    """index/weight [..., S, T] -> dense [..., S, num_tokens] with map[s, index[s, t]] += weight[s, t]."""
    if index.shape != weight.shape:
        raise ValueError(f"index {list(index.shape)} and weight {list(weight.shape)} must have the same shape")
    dense = weight.new_zeros(*index.shape[:-1], num_tokens)
    return dense.scatter_add_(-1, index.long(), weight)


def one_hot_taps(src_index: Tensor, count: Tensor):
    """Source taps (T = 1) of SRS samples: weight 1 for the first `count` samples, 0 for padding."""
    positions = torch.arange(src_index.shape[-1], device=src_index.device)
    weight = (positions < count[..., None]).to(torch.float32)
    return src_index[..., None], weight[..., None]


def dense_to_taps(dense: Tensor, max_taps: int = 4):
    """dense [..., S, N] -> (index [..., S, max_taps] int32, weight [..., S, max_taps]).

    Raises when a row has more than max_taps nonzeros: such a map is no SRS map.
    """
    nonzeros = (dense != 0).sum(-1)
    if bool((nonzeros > max_taps).any()):
        raise ValueError(f"map has a row with {int(nonzeros.max())} nonzeros; at most {max_taps} are supported")
    weight, index = dense.abs().topk(min(max_taps, dense.shape[-1]), dim=-1, sorted=False)
    return index.to(torch.int32), dense.gather(-1, index)
