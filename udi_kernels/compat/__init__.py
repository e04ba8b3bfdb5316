"""Drop-in replacements for the reference UDI code's modules (one-import swaps)."""
from .udi_loss import UDILoss

__all__ = ["UDILoss"]
