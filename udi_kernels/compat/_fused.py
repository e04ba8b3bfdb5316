"""What the compat losses share: the checks of their inputs (TypeError / ValueError naming the argument, as the ops'
checks). Their centers are udi_kernels.losses.EMACenter's, with the reference codes' choice of mean."""
import numpy as np
import torch
from torch import Tensor

from ..checks import check_choice, check_float, check_tensor
from ..dtypes import FLOATING
from ..losses.centering import CENTER_MEANS
from ..losses.checks import check_device


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
