"""udi_kernels.srs_attention: attention of tapped (sampled) queries over all keys of a crop (UDI_SPEC §3)."""
from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .._native import native_loaded
from ..checks import check_bool, check_device, check_float, check_tensor, first_failed, unwrapped
from ..declarations import SRS_ATTENTION
from ..dtypes import FLOATING, INDICES, compute_dtype
from ..reference import srs_attention as reference
from .autocast import autocast_off, cast_inputs
from .registration import Backward, register_kernels

OP = SRS_ATTENTION.name


# ---- registration: Triton custom ops, fake impls, autograd -------------------------------------

def _fake_forward(q, k, v, index, weight, scale):
    B, H, _, D = q.shape
    S = index.shape[1]
    return q.new_empty(B, H, S, D), q.new_empty(B, H, S, dtype=compute_dtype(q.dtype))


def _fake_backward(grad_out, q, k, v, index, weight, out, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@torch.library.custom_op("udi_kernels::srs_attention_triton", mutates_args=())
def _triton_forward(q: Tensor, k: Tensor, v: Tensor, index: Tensor, weight: Tensor, scale: float
                    ) -> tuple[Tensor, Tensor]:
    from ..triton_kernels.srs_attention import srs_attention_forward
    return srs_attention_forward(q, k, v, index, weight, scale)


@torch.library.custom_op("udi_kernels::srs_attention_triton_backward", mutates_args=())
def _triton_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, index: Tensor, weight: Tensor, out: Tensor,
                     lse: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    from ..triton_kernels.srs_attention_backward import srs_attention_backward
    return srs_attention_backward(grad_out, q, k, v, index, weight, out, lse, scale)


def _setup_context(ctx, inputs, output):
    q, k, v, index, weight, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, index, weight, out, lse)
    ctx.scale = scale


def _autograd_through(backward_op) -> Backward:
    """Gradients to q, k, v; none to index, weight or scale."""
    def input_grads(ctx, needs_input_grad, grad_out, _grad_lse):
        q, k, v, index, weight, out, lse = ctx.saved_tensors
        dq, dk, dv = backward_op(grad_out.contiguous(), q, k, v, index, weight, out, lse, ctx.scale)
        return dq, dk, dv, None, None, None
    return Backward(backward_op, _fake_backward, _setup_context, input_grads)


_KERNELS = {"triton": register_kernels(OP, _triton_forward, _fake_forward, _autograd_through(_triton_backward))}
if native_loaded():
    _KERNELS["native"] = register_kernels(OP, f"udi_kernels::{OP}", _fake_forward,
                                          _autograd_through(torch.ops.udi_kernels.srs_attention_backward.default))


def _output_only(kernel):
    """The kernels return (out, lse); the lse is for the backward."""
    return lambda *args: kernel(*args)[0]


_IMPLEMENTATIONS = {**{backend: _output_only(kernel) for backend, kernel in _KERNELS.items()},
                    "reference": reference.srs_attention}


# ---- argument checks ----------------------------------------------------------------------------

INT32_RANGE = (-2**31, 2**31)


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, dtypes=FLOATING)
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape [B, H, N, D], got {list(t.shape)}")
    B, H, _, D = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != D:
        raise ValueError(f"k must have shape [B={B}, H={H}, N, D={D}] (like q), got {list(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {list(k.shape)}, got {list(v.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        check_device(t, name, q.device, "the device of q ({device})")
    if k.shape[2] == 0 or D == 0:  # q may have no rows: every tap then lies outside it
        raise ValueError(f"k and v need at least one token and one channel, got k {list(k.shape)}")


def check_tap_args(index, weight, batch: int, device: torch.device, rows_name: str = "q") -> None:
    """index [batch, S, T >= 1] int32/int64 and weight None or a floating tensor of its shape, both on `device`.
    Shapes, dtypes and devices only (no device sync); rows_name names what the taps index, for the messages."""
    on = "the device of " + rows_name + " ({device})"
    check_tensor(index, "index", dtypes=INDICES)
    if index.dim() != 3 or index.shape[0] != batch or index.shape[2] == 0:
        raise ValueError(f"index must have shape [B={batch}, S, T>=1] (B of {rows_name}), got {list(index.shape)}")
    check_device(index, "index", device, on)
    if check_tensor(weight, "weight", optional=True) is not None:
        if weight.shape != index.shape:
            raise ValueError(f"weight must have the shape of index {list(index.shape)}, got {list(weight.shape)}")
        check_device(weight, "weight", device, on)


def _index_range_message(index, low, high):
    index = unwrapped(index)
    return f"index must lie in [{low}, {high}), got values in [{int(index.min())}, {int(index.max())}]"


def _check_tap_values(index, weight, num_rows, rows):
    """0 <= index < num_rows and finite weights, in one reduction (one device sync on CUDA)."""
    conditions = {"index": ((index >= 0) & (index < num_rows)).all()}
    if weight is not None:
        conditions["weight"] = torch.isfinite(weight).all()
    failed = first_failed(conditions)
    if failed == "index":
        raise ValueError(_index_range_message(index, 0, num_rows) + f" ({rows})")
    if failed == "weight":
        raise ValueError("weight must be finite (no NaN or inf)")


def _assert_tap_values(index, weight, num_rows):
    """The same checks inside torch.compile, without a graph break (asserted asynchronously)."""
    torch._assert_async(((index >= 0) & (index < num_rows)).all(), "index must lie in [0, rows of q)")
    if weight is not None:
        torch._assert_async(torch.isfinite(weight).all(), "weight must be finite (no NaN or inf)")


def check_tap_values(index: Tensor, weight: Optional[Tensor], num_rows: int, rows: str = "the rows of q") -> None:
    """0 <= index < num_rows and finite weights: raises in eager mode, asserts asynchronously when compiled.
    rows says what the taps index, for the message."""
    if torch.compiler.is_compiling():
        _assert_tap_values(index, weight, num_rows)
    else:
        _check_tap_values(index, weight, num_rows, rows)


def index_as_int32(index: Tensor) -> Tensor:
    """index as int32, the kernels' index type. An int64 index must fit in int32 (checked: one device sync on
    CUDA, asserted asynchronously under torch.compile): a value cast would wrap to another row without a word."""
    if index.dtype == torch.int32 or index.device.type == "meta":
        return index.to(torch.int32)
    fits = ((index >= INT32_RANGE[0]) & (index < INT32_RANGE[1])).all()  # True when empty
    if torch.compiler.is_compiling():
        torch._assert_async(fits, "index must fit in int32")
    elif first_failed({"fits": fits}) is not None:
        raise ValueError(_index_range_message(index, *INT32_RANGE) + " (int32, the kernels' index type)")
    return index.to(torch.int32)


# ---- public op ------------------------------------------------------------------------------------

def srs_attention(q: Tensor, k: Tensor, v: Tensor, index: Tensor, weight: Optional[Tensor] = None,
                  scale: Optional[float] = None, *, backend: Optional[str] = None,
                  check_taps: bool = True) -> Tensor:
    """Attention of tapped queries over every key of their crop: out_s = softmax(q_s k^T * scale) v.

    Args:
        q, k, v: [B, H, N, D] float16, bfloat16, float32 (or float64: reference only).
            q may hold a different number of rows Nq than k, v (e.g. queries already tapped and
            projected, with identity taps); the taps index q's rows.
        index: [B, S, T] int32/int64 taps into the Nq rows of q (T = 1: one-hot source samples, T = 4: bilinear
            targets). Several sample sets of one crop can simply be concatenated along S. An int64 index must
            fit in int32 (always checked; one device sync on CUDA, none for int32).
        weight: [B, S, T] tap weights, None for all ones. q_s = sum_t weight[s, t] * q[index[s, t]].
            A sample whose weights are all 0 attends uniformly (never NaN).
        scale: softmax scale, default 1/sqrt(D).
        backend: 'auto', 'native', 'triton' or 'reference' (default: $UDI_KERNELS_BACKEND or 'auto').
        check_taps: check 0 <= index < Nq and finite weights (one device sync on CUDA; asserted
            asynchronously under torch.compile; skipped for meta tensors). Shapes, dtypes and devices are always
            checked.
            With check_taps=False every backend still stays in bounds and deterministic: a tap outside
            [0, Nq) is skipped (as if its weight were 0), and a non-finite weight gives non-finite outputs for
            its sample only.

    Under torch.autocast, q, k and v are first cast to the autocast dtype of their device (float64 ones are not),
    as scaled_dot_product_attention's inputs are, so that mixed dtypes (q bfloat16 from a Linear, k, v float32
    from a LayerNorm) are accepted; every backend then computes in float32 (udi_kernels/ops/autocast.py).
    Outside autocast, k and v must have the dtype of q.

    Returns:
        out [B, H, S, D] in the dtype of q; math in float32 (float64 for float64 inputs). No backend overflows an
        intermediate of a logit q_s . k * scale that is finite in that dtype (q_s enters the dot scaled by a power
        of two, scale as its mantissa), for any finite scale; the tapped query q_s = sum_t w_t q[idx_t] itself
        must be finite in it.

    Raises:
        TypeError / ValueError naming the argument for a wrong type, dtype, shape, device, value (check_taps) or
        scale; the error of backends.resolve for a backend that cannot run the call (udi_kernels/declarations.py),
        e.g. TypeError for float64 with backend='triton', or for bfloat16 with backend='triton' under the Triton
        interpreter (it computes bfloat16 dots wrongly), ValueError for D > 512 with backend='native' on CUDA,
        RuntimeError for backend='native' on CPU tensors (no CPU kernel: the reference is faster there).

    Gradients flow to q (scattered back through the taps), k and v; index, weight and scale get none.
    """
    if isinstance(q, Tensor):
        q, k, v = cast_inputs(q.device, q, k, v)
    _check_qkv(q, k, v)
    check_tap_args(index, weight, q.shape[0], q.device)
    num_rows, D = q.shape[2:]
    scale = reference.default_scale(D) if scale is None else check_float(scale, "scale")
    if check_bool(check_taps, "check_taps") and index.device.type != "meta":
        check_tap_values(index, weight, num_rows)
    dtype = compute_dtype(q.dtype)
    weight = torch.ones(index.shape, dtype=dtype, device=q.device) if weight is None else weight.to(dtype)
    return attend(q, k, v, index_as_int32(index), weight, scale, backend)


def attend(q: Tensor, k: Tensor, v: Tensor, index: Tensor, weight: Tensor, scale: float,
           backend: Optional[str] = None) -> Tensor:
    """srs_attention without the argument checks, for callers that build valid arguments themselves
    (udi_kernels.nn): index int32, weight in compute_dtype(q.dtype), scale a float.
    Launches no kernel besides the attention itself when q, k, v, index and weight are contiguous."""
    q, k, v = cast_inputs(q.device, q, k, v)
    chosen = backends.resolve(SRS_ATTENTION, q.device, q.dtype, backend, head_dim=q.shape[3])
    with autocast_off(q.device):
        return _IMPLEMENTATIONS[chosen](q.contiguous(), k.contiguous(), v.contiguous(), index.contiguous(),
                                        weight.contiguous(), scale)
