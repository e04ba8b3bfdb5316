"""SRS attention forward (UDI_SPEC §3) in Triton: one program per (sample block, head, crop).

The tapped queries q_s = sum_t w_t q[idx_t] are summed on chip, then an online softmax runs over
blocks of keys; the logsumexp of every row is saved for the backward pass. No intermediate overflows where the
logit is finite, in any dtype (scaled_logits): every query row and (float32 / bfloat16) key tile enters the dot
scaled by a power of two so that its largest element lies in [2^13, 2^14) (exact, and never past float16's
65504), the scale enters as its mantissa, and the powers of two are applied to the fp32 logits last.

Shapes (contiguous): q [B, H, NQ, D], k, v [B, H, N, D] fp32/fp16/bf16; index [B, S, T] int32 into
the NQ rows of q; weight [B, S, T] fp32 -> out [B, H, S, D] (dtype of q), lse [B, H, S] fp32 (natural
log of the scaled logits). Taps outside [0, NQ) and taps of weight 0 are skipped, as in every backend: the public op
checks them only with check_taps=True.
"""
import math

import torch
import triton
import triton.language as tl


@triton.jit
def tapped_queries(q_head, index_row, weight_row, sample, sample_ok, dims, dim_ok, NQ, T, D):
    """[BLOCK_S, BLOCK_D] fp32 block of q_s = sum_t w[s, t] * q[idx[s, t]] for one head."""
    acc = tl.zeros((sample.shape[0], dims.shape[0]), dtype=tl.float32)
    for t in range(T):
        idx = tl.load(index_row + sample * T + t, mask=sample_ok, other=0)
        tap_ok = sample_ok & (idx >= 0) & (idx < NQ)
        w = tl.load(weight_row + sample * T + t, mask=tap_ok, other=0.0)  # a skipped tap's weight is not read
        tap_ok = tap_ok & (w != 0)  # a weight-0 tap is left out exactly, whatever its row holds
        rows = tl.load(q_head + idx[:, None].to(tl.int64) * D + dims[None, :],
                       mask=tap_ok[:, None] & dim_ok[None, :], other=0.0)
        acc += w[:, None] * rows.to(tl.float32)
    return acc


@triton.jit
def sample_block(H, S, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's crop b, flat head index, sample rows and channels (grid: sample blocks, H, B)."""
    b = tl.program_id(2)
    sample = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    return b, b.to(tl.int64) * H + tl.program_id(1), sample, sample < S, dims, dims < D


@triton.jit
def _power_of_two(exponent):
    """2^exponent, exactly, for int32 exponents in [-126, 127] (built from the float32 bits)."""
    return ((exponent + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def times_power_of_two(x, exponent):
    """x * 2^exponent for any int32 exponent, in two exact steps of the same sign (2^exponent alone may not be a
    float32): overflows or underflows only where the product itself does."""
    e = tl.minimum(tl.maximum(exponent, -252), 252)
    half = e // 2
    return x * _power_of_two(half) * _power_of_two(e - half)


@triton.jit
def _exponent_for(top):
    """e (int32, like top) with top * 2^-e in [2^13, 2^14), clamped so that 2^-e is a normal float32."""
    exponent = ((top.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2(top)); -127 for 0
    return tl.minimum(tl.maximum(exponent - 13, -126), 126)


@triton.jit
def normalized_rows(x, dtype):
    """(x_op in `dtype`, e [rows] int32) with x = x_op * 2^e and each row's largest |x_op| in [2^13, 2^14):
    exact in every dtype (no overflow past float16's 65504; subnormal rows stay as they are)."""
    e = _exponent_for(tl.max(tl.abs(x), 1))
    return (x * _power_of_two(-e)[:, None]).to(dtype), e


@triton.jit
def normalized_tile(x, dtype):
    """(x_op in `dtype`, e) with x = x_op * 2^e, e one int32 for the tile, the largest |x_op| in [2^13, 2^14): a
    float32 tile as a dot operand in any dtype, without overflow or flush to 0 (exact but for elements 2^-139
    below the largest)."""
    e = _exponent_for(tl.max(tl.max(tl.abs(x), 1), 0))
    return (x * _power_of_two(-e)).to(dtype), e


@triton.jit
def normalized_keys(k_block):
    """(k_op, e) with k_block = k_op * 2^e, e one int32 for the tile: float32 and bfloat16 tiles scaled so that their
    largest |k_op| lies in [2^13, 2^14) (exact but for elements 2^-139 below it), float16 tiles as they are (their
    range cannot overflow the dot). One exponent per tile, not per row: the raw tile need not stay in registers
    (dq sums dot(ds, k_op) * 2^e)."""
    if k_block.dtype == tl.float16:
        return k_block, tl.zeros((), tl.int32)
    return normalized_tile(k_block, k_block.dtype)


@triton.jit
def scaled_logits(q_op, q_exp, k_op, k_exp, scale_mantissa, scale_exponent, PRECISION: tl.constexpr):
    """[BLOCK_S, BLOCK_N] fp32 logits q_s . k_n * scale from normalized queries (normalized_rows), keys
    (normalized_keys) and scale = scale_mantissa * 2^scale_exponent: the dot of elements below 2^14 (float16 keys:
    65504) times a mantissa below 1, then the powers of two."""
    dot = tl.dot(q_op, tl.trans(k_op), input_precision=PRECISION) * scale_mantissa
    return times_power_of_two(dot, q_exp[:, None] + k_exp + scale_exponent)


@triton.jit
def scaled_queries(q, index, weight, b, head, sample, sample_ok, dims, dim_ok, NQ, S, T, D, dtype):
    """(q_op [BLOCK_S, BLOCK_D] in `dtype`, q_exp [BLOCK_S] int32): the tapped queries, normalized_rows."""
    taps = b.to(tl.int64) * S * T
    q_s = tapped_queries(q + head * NQ * D, index + taps, weight + taps, sample, sample_ok, dims, dim_ok, NQ, T, D)
    return normalized_rows(q_s, dtype)


@triton.jit
def kv_block(k, v, head, keys, dims, N, D):
    """k and v rows `keys` of one head ([BLOCK_N, BLOCK_D], zero outside), their offsets and mask."""
    offsets = head * N * D + keys[:, None] * D + dims[None, :]
    mask = (keys < N)[:, None] & (dims < D)[None, :]
    return tl.load(k + offsets, mask=mask, other=0.0), tl.load(v + offsets, mask=mask, other=0.0), offsets, mask


@triton.jit
def key_tile(q_s, q_exp, k, v, head, start, dims, N, D, scale_mantissa, scale_exponent, PRECISION: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """The tile of BLOCK_N keys from `start` that the forward and the dq kernel sweep: (keys, v block, k operand
    and its exponent, the logits of q_s over it)."""
    keys = start + tl.arange(0, BLOCK_N)
    k_block, v_block, _, _ = kv_block(k, v, head, keys, dims, N, D)
    k_op, k_exp = normalized_keys(k_block)
    return keys, v_block, k_op, k_exp, scaled_logits(q_s, q_exp, k_op, k_exp, scale_mantissa, scale_exponent,
                                                     PRECISION)


@triton.jit
def _forward_kernel(q, k, v, index, weight, out, lse, H, NQ, N, S, T, D, scale_mantissa, scale_exponent,
                    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr):
    b, head, sample, sample_ok, dims, dim_ok = sample_block(H, S, D, BLOCK_S, BLOCK_D)
    q_s, q_exp = scaled_queries(q, index, weight, b, head, sample, sample_ok, dims, dim_ok, NQ, S, T, D,
                                k.dtype.element_ty)

    row_max = tl.full((BLOCK_S,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_S,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        keys, v_block, _, _, logits = key_tile(q_s, q_exp, k, v, head, start, dims, N, D, scale_mantissa,
                                               scale_exponent, PRECISION, BLOCK_N)
        logits = tl.where((keys < N)[None, :], logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        p = tl.exp(logits - new_max[:, None])
        rescale = tl.exp(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v_block.dtype), v_block, input_precision=PRECISION)
        row_max = new_max

    rows = head * S + sample
    tl.store(out + rows[:, None] * D + dims[None, :], (acc / row_sum[:, None]).to(out.dtype.element_ty),
             mask=sample_ok[:, None] & dim_ok[None, :])
    tl.store(lse + rows, row_max + tl.log(row_sum), mask=sample_ok)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact fp32 products so that the interpreter and the GPU match the reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def block_sizes(S: int, N: int, D: int):
    """(BLOCK_S, BLOCK_N, BLOCK_D); tl.dot needs every dimension >= 16. Rows wider than 128 (SRSAttention
    attending over whole tokens, D = C) get 16-row blocks: at BLOCK_D = 512 that is the largest tile whose kernels
    compile for sm_90 without register spills (ptxas -v; 32-row blocks spill 0.2-0.7 KB per thread)."""
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if BLOCK_D > 128:
        return 16, 16, BLOCK_D
    return max(16, min(64, triton.next_power_of_2(S))), max(16, min(64, triton.next_power_of_2(N))), BLOCK_D


def launch_options(BLOCK_D: int) -> dict:
    """num_warps / num_stages: wide rows get more warps and two pipeline stages, so that the staged [rows, 512]
    dot operands stay well inside shared memory."""
    return dict(num_warps=8, num_stages=2) if BLOCK_D > 128 else dict(num_warps=4)


def srs_attention_forward(q, k, v, index, weight, scale):
    """Same contract as udi_kernels::srs_attention (arguments checked, contiguous): returns (out, lse)."""
    B, H, NQ, D = q.shape
    N = k.shape[2]
    S, T = index.shape[1:]
    out = torch.empty(B, H, S, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    BLOCK_S, BLOCK_N, BLOCK_D = block_sizes(S, N, D)
    grid = (triton.cdiv(S, BLOCK_S), H, B)
    _forward_kernel[grid](q, k, v, index, weight, out, lse, H, NQ, N, S, T, D, *math.frexp(scale), BLOCK_S=BLOCK_S,
                          BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PRECISION=dot_precision(q.dtype),
                          **launch_options(BLOCK_D))
    return out, lse
