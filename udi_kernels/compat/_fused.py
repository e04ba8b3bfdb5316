"""What the compat losses share: cached pair tables for the fused distillation op, and EMA center updates."""
import functools
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from ..losses import PairTable, _cat_pairs, _crop_pairs, _table, update_centers

CENTER_MEANS = ("global", "per_rank")


@functools.lru_cache(maxsize=64)
@torch.inference_mode(False)  # later training calls save these tensors for the backward
def crop_mean_pairs(pattern: tuple, batch: int, student_crops: int, teacher_crops: int,
                    device: torch.device) -> PairTable:
    """Row b of student crop s against row b of teacher crop t for every (s, t) in pattern, each pair weighing
    1 / (len(pattern) · batch): the mean cross-entropy over those pairs. Rows are crop-major (row c·batch + b);
    built once per arguments (no sort or small launches per step)."""
    weight = 1.0 / max(len(pattern) * batch, 1)
    groups = [_crop_pairs(s, t, batch, weight, device) for s, t in pattern] or [_crop_pairs(0, 0, 0, weight, device)]
    return _table(_cat_pairs(groups), student_crops * batch, teacher_crops * batch)


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
