"""What the compat losses share: EMA center updates with the reference codes' choice of mean."""
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from ..losses import update_centers

CENTER_MEANS = ("global", "per_rank")


def check_center_mean(center_mean: str):
    if center_mean not in CENTER_MEANS:
        raise ValueError(f"center_mean must be one of {CENTER_MEANS}, got {center_mean!r}")


@torch.no_grad()
def update_center_buffer(owner: nn.Module, momentum: float, sums: Tensor, counts: Tensor, center_mean: str):
    """owner.center [n, K] (or [1, 1, K]) ← m·c + (1 − m)·mean, from this rank's sums [n, K] and counts [n, 1].

    center_mean 'global': the exact mean over all ranks' rows (sums and counts all-reduced);
    'per_rank': each rank's mean, averaged over the ranks that have rows (the reference UDI code's and lightly's
    way; DINO's main_dino.py divides the global sum by world size times the local count, the same when every
    rank has as many rows). A center without rows anywhere keeps its value.
    """
    if center_mean == "per_rank":
        has_rows = counts > 0
        sums = torch.where(has_rows, sums / counts.clamp_min(torch.finfo(torch.float32).tiny), 0)
        counts = has_rows.to(sums.dtype)
    ema = SimpleNamespace(momentum=momentum, center=owner.center)
    update_centers([ema], [sums], [counts])
    owner.center = ema.center
