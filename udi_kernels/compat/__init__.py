"""Drop-in replacements for modules of the reference UDI code (same constructors, names and outputs)."""
from .masked_attention import MaskedAttention

__all__ = ["MaskedAttention"]
