"""Argument and input checks shared by the losses: TypeError / ValueError naming the argument."""
import torch
from torch import Tensor, nn

from .. import checks
from ..checks import check_backend, check_choice, check_tensor  # noqa: F401 (the losses import them here)


LIKE_THE_OTHERS = "{device} (like the other inputs)"


def check_rows(tensor: Tensor, name: str, rows: int, out_dim: int, device=None):
    check_tensor(tensor, name)
    if tensor.dim() != 2 or tensor.shape != (rows, out_dim):
        raise ValueError(f"{name} must have shape [{rows}, {out_dim}], got {list(tensor.shape)}")
    check_logits(tensor, name, device)


def check_logits(tensor: Tensor, name: str, device=None):
    check_tensor(tensor, name, device=device, on=LIKE_THE_OTHERS)


def check_device(tensor: Tensor, name: str, device=None):
    checks.check_device(tensor, name, device, LIKE_THE_OTHERS)


def check_mask(mask, name: str, shape, device):
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != shape:
        got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor of shape {list(shape)}, got {got}")
    check_device(mask, name, device)


def check_state_device(loss: nn.Module, device: torch.device):
    """The loss's centers (its buffers) must be where its inputs are."""
    for name, buffer in loss.named_buffers():
        if buffer.device != device:
            raise ValueError(f"{type(loss).__name__}.{name} is on {buffer.device} but the inputs are on {device}; "
                             f"move the loss there with .to({str(device)!r})")


def check_last_layer(weight, name: str, out_dim: int, device=None) -> int:
    """weight: None or the head's effective last-layer weight [out_dim, D] (floating, on `device`); returns the width
    of the rows it takes: D, or out_dim for None (the rows are logits)."""
    if weight is None:
        return out_dim
    check_tensor(weight, name, optional=True)
    if weight.dim() != 2 or weight.shape[0] != out_dim or weight.shape[1] == 0:
        raise ValueError(f"{name} must have shape [{out_dim}, D] (the last layer's weight, D > 0), got "
                         f"{list(weight.shape)}")
    check_logits(weight, name, device)
    return weight.shape[1]


def detached(teacher):
    """The teacher side without its graph: a tensor, a NamedTuple of tensors (UDITeacher, UDITargets; other fields
    kept) or None. Every loss treats the teacher as a constant, as DINO's `.detach()` does, also when a teacher with
    trainable parameters hands over tensors that require grad."""
    if teacher is None or isinstance(teacher, Tensor):
        return None if teacher is None else teacher.detach()
    return teacher._replace(**{name: value.detach() for name, value in teacher._asdict().items()
                               if isinstance(value, Tensor)})
