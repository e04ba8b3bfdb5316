"""Drop-in replacements for the reference UDI code's modules: same constructors, names and outputs."""
from .masked_attention import MaskedAttention
from .udi_loss import UDILoss

__all__ = ["MaskedAttention", "UDILoss"]
