"""SRS attention (UDI_SPEC §3) in eager PyTorch: the semantics every kernel is tested against.

Shapes: q [B, H, Nq, D] (usually Nq = N), k, v [B, H, N, D]; index [B, S, T] int into the Nq query rows;
weight [B, S, T] -> out [B, H, S, D]. A tap outside [0, Nq) (possible only with check_taps=False) is skipped,
as in every kernel.
"""
import math

import torch
from torch import Tensor

from ..dtypes import compute_dtype


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def tapped_queries(q: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """q_s = sum_t weight[b, s, t] * q[b, :, index[b, s, t]] over the taps inside [0, Nq) of nonzero weight:
    [B, H, Nq, D] -> [B, H, S, D]. The other taps read a zero row past the end with weight 0, so a weight-0 tap
    is left out exactly, whatever its query row holds (NaN, inf), as in every kernel."""
    B, H, Nq, D = q.shape
    S, T = index.shape[1:]
    index = index.long()
    inside = (index >= 0) & (index < Nq) & (weight != 0)
    rows = torch.where(inside, index, Nq).reshape(B, 1, S * T, 1).expand(B, H, S * T, D)
    padded = torch.cat([q, q.new_zeros(B, H, 1, D)], dim=2)
    taps = padded.gather(2, rows).reshape(B, H, S, T, D)
    return (taps * torch.where(inside, weight, 0)[:, None, :, :, None].to(q.dtype)).sum(3)


# (mantissa bits, exponent bias, integer type of the same width) of the compute dtypes
_FLOAT_LAYOUT = {torch.float32: (23, 127, torch.int32), torch.float64: (52, 1023, torch.int64)}


def _power_of_two(exponent: Tensor, dtype: torch.dtype) -> Tensor:
    """2^exponent exactly, built from the bits (exponents inside the normal range of dtype)."""
    mantissa_bits, bias, int_type = _FLOAT_LAYOUT[dtype]
    return ((exponent.to(int_type) + bias) << mantissa_bits).view(dtype)


def _scaled(x: Tensor, mantissa: float, exponent: Tensor) -> Tensor:
    """x * mantissa * 2^exponent (mantissa in [0.5, 1), any int exponents): x times the exact float
    mantissa * 2^e1, then by 2^e2 and 2^e3 (exponents of one sign): overflows or underflows only where the
    product itself does, and is x * (mantissa * 2^exponent) bit for bit wherever that is a normal float."""
    bias = _FLOAT_LAYOUT[x.dtype][1]
    first = exponent.clamp(2 - bias, bias - 1)  # mantissa * 2^first stays a normal float: exact
    second = (exponent - first).clamp(1 - bias, bias - 1)
    third = (exponent - first - second).clamp(1 - bias, bias - 1)
    return x * (mantissa * _power_of_two(first, x.dtype)) * _power_of_two(second, x.dtype) * _power_of_two(
        third, x.dtype)


class _ScaledLogits(torch.autograd.Function):
    """q_s k^T * scale (scaled_logits' forward); the backward is the plain product's, (g * scale) k and
    (g * scale)^T q_s, so that no power of two of the forward enters the gradients."""
    generate_vmap_rule = True  # torch.func.vmap: forward and backward are plain torch ops

    @staticmethod
    def forward(q_s: Tensor, k: Tensor, scale: float) -> Tensor:
        bias = _FLOAT_LAYOUT[q_s.dtype][1]
        # q rows scaled to below 2^top, top <= 0 chosen so that a dot of D terms with k stays below the float max
        top = (bias - q_s.shape[-1].bit_length() - _exponent(_largest_magnitude(k))).clamp(max=0)
        # (in up to three exact steps: 2^-e_q itself may lie outside the normal floats, for q and k both near the max)
        e_q = _exponent(q_s.abs().amax(-1, keepdim=True)) - top
        mantissa, e_scale = math.frexp(scale)
        return _scaled(torch.matmul(_scaled(q_s, 1.0, -e_q), k.transpose(-1, -2)), mantissa, e_q + e_scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q_s, k, ctx.scale = inputs
        ctx.save_for_backward(q_s, k)

    @staticmethod
    def backward(ctx, grad):
        # (grad * scale) k and q_s^T (grad * scale), with the powers of two of scale past float32's range applied
        # after the matmuls (bit for bit the plain product for every scale that is a float32)
        q_s, k = ctx.saved_tensors
        mantissa, exponent = math.frexp(ctx.scale)
        bias = _FLOAT_LAYOUT[grad.dtype][1]
        inside = min(max(exponent, 2 - bias), bias - 1)
        outside = torch.tensor(exponent - inside, device=grad.device)
        grad_dot = _scaled(grad, mantissa, torch.tensor(inside, device=grad.device))
        return (_scaled(torch.matmul(grad_dot, k), 1.0, outside),
                _scaled(torch.matmul(q_s.transpose(-1, -2), grad_dot).transpose(-1, -2), 1.0, outside), None)


class _ScaledLogitsForwardMode(_ScaledLogits):
    """_ScaledLogits with its forward-mode derivative (torch.func.jvp, jacfwd, hessian): the product rule,
    dq_s k^T * scale + q_s dk^T * scale, each term formed as the forward is. Eager only: Dynamo traces no
    autograd.Function with a custom jvp, so compiled code takes _ScaledLogits."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _ScaledLogits.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:2])

    @staticmethod
    def jvp(ctx, q_s_tangent, k_tangent, _):
        q_s, k = ctx.saved_tensors
        tangent = None if q_s_tangent is None else _ScaledLogits.forward(q_s_tangent, k, ctx.scale)
        if k_tangent is not None:
            term = _ScaledLogits.forward(q_s, k_tangent, ctx.scale)
            tangent = term if tangent is None else tangent + term
        return tangent


def _largest_magnitude(k: Tensor) -> Tensor:
    """max |k| of each head, [B, H, 1, 1] (amax and amin of the flat rows: faster on the CPU than abs().amax)."""
    rows = k.flatten(-2)[..., None, :]
    return torch.maximum(rows.amax(-1, keepdim=True), -rows.amin(-1, keepdim=True))


def _exponent(x: Tensor) -> Tensor:
    """e with x in [2^(e-1), 2^e) (0 for 0), elementwise."""
    return torch.frexp(x).exponent


def scaled_logits(q_s: Tensor, k: Tensor, scale: float) -> Tensor:
    """q_s k^T * scale (float32 / float64) without an intermediate that overflows where the logit is finite: each
    row of q_s enters the dot scaled by a power of two (below 1, and small enough that D products with the largest
    |k| of its head stay finite), scale as its mantissa, the powers of two come last. Bit for bit the plain
    product wherever that neither overflows nor underflows (powers of two are exact), gradients included."""
    if torch.compiler.is_compiling():
        return _ScaledLogits.apply(q_s, k, scale)
    return _ScaledLogitsForwardMode.apply(q_s, k, scale)


def srs_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, weight=None, scale=None) -> Tensor:
    """softmax(q_s k^T * scale) v for the tapped queries q_s; math in float32 (float64 for float64 inputs).

    weight=None means weight 1 for every tap; scale=None means 1/sqrt(D). A sample whose weights are
    all 0 has q_s = 0, so it attends uniformly to every key. Differentiable by autograd in q, k and v; the weights
    are treated as constants (no gradient), as in the kernels.
    """
    dtype = compute_dtype(q.dtype)
    if weight is None:
        weight = torch.ones(index.shape, dtype=dtype, device=q.device)
    if scale is None:
        scale = default_scale(q.shape[-1])
    q_s = tapped_queries(q.to(dtype), index, weight.detach().to(dtype))
    logits = scaled_logits(q_s, k.to(dtype), scale)
    out = torch.matmul(torch.softmax(logits, dim=-1), v.to(dtype))
    return out.to(q.dtype)
