"""What the compat losses share: the checks of their inputs (TypeError / ValueError naming the argument, as the ops'
checks). Their centers are udi_kernels.losses.EMACenter's, with the reference codes' choice of mean."""
import numpy as np
import torch
from torch import Tensor

from ..checks import check_choice, check_float, check_temperature, check_tensor
from ..dtypes import FLOATING
from ..losses.centering import CENTER_MEANS
from ..losses.checks import check_device


def check_mask_tensor(value, name: str, device) -> Tensor:
    """value: a real mask tensor (floating weights or bool) on `device`."""
    check_tensor(value, name, dtypes=FLOATING + (torch.bool,))
    check_device(value, name, device)
    return value


def as_temperature(value, name: str) -> float:
    """A teacher temperature as the reference codes take it, a Python or numpy number or a one-element tensor or
    array (a schedule's entry), as a float checked by checks.check_temperature. A tensor that requires grad is
    refused (TypeError): the losses take temperatures as constants, no gradient would reach it."""
    if isinstance(value, Tensor) and value.requires_grad:
        raise TypeError(f"{name} must not require grad: the losses take temperatures as constants (pass "
                        f"{name}.detach() or a float)")
    if isinstance(value, (Tensor, np.ndarray)):
        if value.ndim > 1 or (value.numel() if isinstance(value, Tensor) else value.size) != 1:
            raise ValueError(f"{name} must be one number, got shape {list(value.shape)}")
        value = value.item()
    return check_temperature(value, name)


def check_common_arguments(student_temp, center_momentum, center_mean):
    """The constructor arguments every compat loss takes."""
    check_temperature(student_temp, "student_temp")
    check_float(center_momentum, "center_momentum", 0.0, 1.0)
    check_center_mean(center_mean)


def check_center_mean(center_mean: str):
    check_choice(center_mean, "center_mean", CENTER_MEANS)
