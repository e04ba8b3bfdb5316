"""Checks of arguments (ints, floats, bools, tensors) shared by the ops, modules and losses: each raises TypeError or
ValueError naming the argument, and returns the value (a Python int / float for numbers)."""
import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from .backends import BACKENDS


def check_int(value, name: str, minimum: Optional[int] = None) -> int:
    """An integer (not a bool, not a tensor: one-element tensors are refused rather than synced), >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = " (pass int(t) for a one-element tensor)" if isinstance(value, Tensor) else ""
        raise TypeError(f"{name} must be an int, got {type(value).__name__}{hint}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_float(value, name: str, low: float = -math.inf, high: float = math.inf, low_open: bool = False) -> float:
    """A finite real number (not a bool, not a tensor) in [low, high] ((low, high] with low_open)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value}")
    if not (low < value if low_open else low <= value) or not value <= high:
        interval = f"{'(' if low_open else '['}{low}, {high}{']' if high < math.inf else ')'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return float(value)


SMALLEST_TEMPERATURE = 2.0**-126  # the kernels multiply by 1/tau in float32: it must be finite there


def check_temperature(value, name: str) -> float:
    """A loss temperature: a real number (not a tensor) >= 2**-126, finite: the kernels scale the logits by its
    reciprocal in float32, which must be finite."""
    check_float(value, name, 0.0, low_open=True)
    if value < SMALLEST_TEMPERATURE:
        raise ValueError(f"{name} must be >= 2**-126 (its reciprocal must be a finite float32), got {value}")
    return float(value)


def check_tensor(value, name: str, integer: bool = False, device=None, *, dtypes=None, dims: Optional[int] = None,
                 on: Optional[str] = None, optional: bool = False) -> Optional[Tensor]:
    """The one tensor check of every op, module, loss and tap helper (after xformers' `Inputs.validate`): value a
    torch.Tensor (or None, with optional=True) with `dims` dimensions if given, of a dtype in `dtypes` if given,
    else of an integer dtype (integer=True) or of a real floating dtype, on `device` if given (`on` names that
    device in the message, "{device}" standing for it: "the device of q ({device})"). TypeError naming the argument for the type or dtype,
    ValueError for the dimensions or the device; returns value."""
    if value is None and optional:
        return None
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {type(value).__name__}")
    if dims is not None and value.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), got shape {list(value.shape)}")
    if dtypes is not None:
        if value.dtype not in dtypes:
            raise TypeError(f"{name} must be {dtype_names(dtypes)}, got {value.dtype}")
    elif integer and (value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    elif not integer and not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    check_device(value, name, device, on)
    return value


def check_device(value: Tensor, name: str, device=None, on: Optional[str] = None) -> None:
    """value on `device` (None: anywhere); ValueError naming the argument and `on` (default: the device; formatted
    only for the message, "{device}" standing for it)."""
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on {(on or '{device}').format(device=device)}, got {value.device}")


def dtype_names(dtypes) -> str:
    """"float16, bfloat16 or float32": dtypes in their order, as an error message names them."""
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def check_choice(value, name: str, choices):
    """value one of `choices` (ValueError naming the argument and the choices)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_backend(backend: Optional[str]) -> Optional[str]:
    """None (not given) or a backend name of udi_kernels.backends."""
    return backend if backend is None else check_choice(backend, "backend", BACKENDS)


def check_bool(value, name: str) -> bool:
    """A bool (a flag such as check_taps: a string like "no" would be true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def first_failed(conditions: dict) -> Optional[str]:
    """The name of the first False among named boolean 0-dim tensors (None when all hold), read in one device
    sync: the value checks of every op cost one sync on CUDA, however many conditions they test."""
    if not conditions:
        return None
    held = torch.stack([unwrapped(c).all() for c in conditions.values()]).tolist()
    return next((name for name, ok in zip(conditions, held) if not ok), None)


def unwrapped(t: Tensor) -> Tensor:
    """t without its torch.func wrappers (vmap's batched, grad's tracking tensors): the values of every slice, so
    that a value check under torch.func checks all of them at once."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def require(conditions: dict) -> None:
    """Value checks: {message: 0-dim bool tensor}. Raises ValueError(message) for the first that fails (one device
    sync); under torch.compile each is asserted asynchronously instead (no graph break, no sync)."""
    if torch.compiler.is_compiling():
        for message, held in conditions.items():
            torch._assert_async(held, message)
        return
    failed = first_failed(conditions)
    if failed is not None:
        raise ValueError(failed)
