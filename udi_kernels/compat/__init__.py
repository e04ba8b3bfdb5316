"""Drop-in replacements for other code bases' modules, on the fused udi_kernels ops: the reference UDI code's
`MaskedAttention` and `UDILoss` (this package), lightly's `DINOLoss` (`udi_kernels.compat.lightly`). DINO's
`main_dino.DINOLoss` is `udi_kernels.losses.DINOLoss` itself."""
from . import lightly
from .masked_attention import MaskedAttention
from .udi_loss import UDILoss

__all__ = ["MaskedAttention", "UDILoss", "lightly"]
