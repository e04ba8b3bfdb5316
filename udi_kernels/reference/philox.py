"""Philox4x32-10 on int64 tensors, bit-identical to csrc/philox.h and Triton's tl.philox."""
import torch

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mul_wide(constant: int, x: torch.Tensor):
    """(high, low) 32-bit halves of constant * x for x in [0, 2**32), without int64 overflow."""
    low_product = constant * (x & 0xFFFF)
    partial = constant * (x >> 16) + (low_product >> 16)
    return partial >> 16, ((partial & 0xFFFF) << 16) | (low_product & 0xFFFF)


def philox4x32(seed: int, c0, c1, c2, c3):
    """Four uint32 words (as int64 tensors) per counter; the counters broadcast together."""
    device = next((c.device for c in (c0, c1, c2, c3) if isinstance(c, torch.Tensor)), None)
    counters = (torch.as_tensor(c, dtype=torch.int64, device=device) for c in (c0, c1, c2, c3))
    c0, c1, c2, c3 = torch.broadcast_tensors(*counters)
    c0, c1, c2, c3 = (c & _MASK32 for c in (c0, c1, c2, c3))
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul_wide(_ROUND_B, c2)
        hi_a, lo_a = _mul_wide(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3
