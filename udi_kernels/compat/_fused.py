"""What the compat losses share: EMA center updates with the reference codes' choice of mean, and the checks of
their inputs (TypeError / ValueError naming the argument, as the ops' checks)."""
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor, nn

from ..checks import check_choice, check_float, check_tensor
from ..dtypes import FLOATING
from ..losses import update_centers
from ..losses.checks import check_device

CENTER_MEANS = ("global", "per_rank")


def check_mask_tensor(value, name: str, device) -> Tensor:
    """value: a real mask tensor (floating weights or bool) on `device`."""
    check_tensor(value, name, dtypes=FLOATING + (torch.bool,))
    check_device(value, name, device)
    return value


def check_temperature(value, name: str) -> float:
    """A teacher temperature: a finite number > 0 (a Python or numpy number, or a one-element tensor or array, as a
    schedule's entries are)."""
    if isinstance(value, (Tensor, np.ndarray)):
        if value.ndim > 1 or (value.numel() if isinstance(value, Tensor) else value.size) != 1:
            raise ValueError(f"{name} must be one number, got shape {list(value.shape)}")
        value = value.item()
    return check_float(value, name, 0.0, low_open=True)


def check_common_arguments(student_temp, center_momentum, center_mean):
    """The constructor arguments every compat loss takes."""
    check_float(student_temp, "student_temp", 0.0, low_open=True)
    check_float(center_momentum, "center_momentum", 0.0, 1.0)
    check_center_mean(center_mean)


def check_center_mean(center_mean: str):
    check_choice(center_mean, "center_mean", CENTER_MEANS)


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
