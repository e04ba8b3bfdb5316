"""SRS attention backward (UDI_SPEC §3) in Triton, deterministic and without atomics.

Pass 1, one program per (sample block, head, crop): delta_s = <dout_s, out_s> and the gradient of
  the tapped query, dq_s = scale * sum_n P_sn (dP_sn - delta_s) k_n  (fp32, [B, H, S, D]); it also saves the
  dot operand of the tapped queries (q_op [B, H, S, D] in the dtype of k, row_exp [B, H, S] int32: q_s =
  q_op * 2^row_exp, scaled_queries).
Pass 2, one program per (key block, head, crop): dv_n = sum_s P_sn dout_s, dk_n = scale * sum_s dS_sn q_s, with
  q_s read back as q_op * 2^row_exp. Both passes recompute the logits as the forward does (scaled_logits).
Pass 3, one program per (block of q rows, head, crop): dq_r = sum_{s,t: idx_st = r} w_st dq_s, i.e. dq_s
  scattered back through the transposed tap map, built on chip.

Shapes (contiguous): grad_out, out [B, H, S, D]; q [B, H, NQ, D]; k, v [B, H, N, D]; index [B, S, T] int32;
weight [B, S, T] fp32; lse [B, H, S] fp32 -> dq [B, H, NQ, D], dk, dv [B, H, N, D].
"""
import math

import torch
import triton
import triton.language as tl

from .srs_attention import (block_sizes, dot_precision, key_tile, kv_block, launch_options, normalized_keys,
                           normalized_tile, sample_block, scaled_logits, scaled_queries, times_power_of_two)


@triton.jit
def _query_grad_kernel(q, k, v, index, weight, grad_out, out, lse, dq_s, delta, q_op, row_exp, H, NQ, N, S, T, D,
                       scale_mantissa, scale_exponent, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       PRECISION: tl.constexpr):
    b, head, sample, sample_ok, dims, dim_ok = sample_block(H, S, D, BLOCK_S, BLOCK_D)
    q_s, q_exp = scaled_queries(q, index, weight, b, head, sample, sample_ok, dims, dim_ok, NQ, S, T, D,
                                k.dtype.element_ty)
    rows = head * S + sample
    row_offsets = rows[:, None] * D + dims[None, :]
    row_mask = sample_ok[:, None] & dim_ok[None, :]
    tl.store(q_op + row_offsets, q_s, mask=row_mask)
    tl.store(row_exp + rows, q_exp, mask=sample_ok)
    d_out = tl.load(grad_out + row_offsets, mask=row_mask, other=0.0)
    row_delta = tl.sum(d_out.to(tl.float32) * tl.load(out + row_offsets, mask=row_mask, other=0.0).to(tl.float32), 1)
    row_lse = tl.load(lse + rows, mask=sample_ok, other=0.0)

    acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        keys, v_block, k_op, k_exp, logits = key_tile(q_s, q_exp, k, v, head, start, dims, N, D, scale_mantissa,
                                                      scale_exponent, PRECISION, BLOCK_N)
        p = tl.where((keys < N)[None, :], tl.exp(logits - row_lse[:, None]), 0.0)
        dp = tl.dot(d_out.to(v_block.dtype), tl.trans(v_block), input_precision=PRECISION)
        ds = p * (dp - row_delta[:, None])
        ds_op, ds_exp = normalized_tile(ds, k_op.dtype)  # ds may lie far below float16's range
        acc += times_power_of_two(tl.dot(ds_op, k_op, input_precision=PRECISION), k_exp + ds_exp)
    tl.store(dq_s + row_offsets, times_power_of_two(acc * scale_mantissa, scale_exponent), mask=row_mask)
    tl.store(delta + rows, row_delta, mask=sample_ok)


@triton.jit
def _key_grad_kernel(q_op, row_exp, k, v, grad_out, lse, delta, dk, dv, H, N, S, D, scale_mantissa, scale_exponent,
                     BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr):
    b = tl.program_id(2)
    head = b.to(tl.int64) * H + tl.program_id(1)
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = keys < N
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    k_block, v_block, kv_offsets, kv_mask = kv_block(k, v, head, keys, dims, N, D)
    k_op, k_exp = normalized_keys(k_block)
    acc_dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    acc_dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start in range(0, S, BLOCK_S):
        sample = start + tl.arange(0, BLOCK_S)
        sample_ok = sample < S
        rows = head * S + sample
        row_offsets = rows[:, None] * D + dims[None, :]
        row_mask = sample_ok[:, None] & dim_ok[None, :]
        q_s = tl.load(q_op + row_offsets, mask=row_mask, other=0.0)
        q_exp = tl.load(row_exp + rows, mask=sample_ok, other=0)
        # q (hence out and grad_out) may be wider than k, v
        d_out = tl.load(grad_out + row_offsets, mask=row_mask, other=0.0).to(v_block.dtype)
        row_lse = tl.load(lse + rows, mask=sample_ok, other=0.0)
        row_delta = tl.load(delta + rows, mask=sample_ok, other=0.0)
        logits = scaled_logits(q_s, q_exp, k_op, k_exp, scale_mantissa, scale_exponent, PRECISION)
        p = tl.where(sample_ok[:, None] & key_ok[None, :], tl.exp(logits - row_lse[:, None]), 0.0)
        acc_dv += tl.dot(tl.trans(p.to(d_out.dtype)), d_out, input_precision=PRECISION)
        ds = p * (tl.dot(d_out, tl.trans(v_block), input_precision=PRECISION) - row_delta[:, None])
        # dk_n = scale * sum_s ds_sn q_s = sum_s (ds_sn * scale * 2^q_exp_s) q_op_s
        # in two steps, so that neither scale * 2^q_exp nor its product with ds overflows or flushes to 0 alone
        ds_op, ds_exp = normalized_tile(times_power_of_two(ds * scale_mantissa, q_exp[:, None]), q_s.dtype)
        acc_dk += times_power_of_two(tl.dot(tl.trans(ds_op), q_s, input_precision=PRECISION),
                                     ds_exp + scale_exponent)
    tl.store(dk + kv_offsets, acc_dk.to(dk.dtype.element_ty), mask=kv_mask)
    tl.store(dv + kv_offsets, acc_dv.to(dv.dtype.element_ty), mask=kv_mask)


@triton.jit
def _token_grad_kernel(index, weight, dq_s, dq, H, NQ, S, T, D, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    b = tl.program_id(2)
    head = b.to(tl.int64) * H + tl.program_id(1)
    q_rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    taps = b.to(tl.int64) * S * T
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for start in range(0, S, BLOCK_S):
        sample = start + tl.arange(0, BLOCK_S)
        sample_ok = sample < S
        tap_map = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)  # (r, s): weight of sample s's taps on row r
        for t in range(T):
            idx = tl.load(index + taps + sample * T + t, mask=sample_ok, other=-1)
            w = tl.load(weight + taps + sample * T + t, mask=sample_ok, other=0.0)
            tap_map += tl.where(idx[None, :] == q_rows[:, None], w[None, :], 0.0)
        grads = tl.load(dq_s + (head * S + sample)[:, None] * D + dims[None, :],
                        mask=sample_ok[:, None] & dim_ok[None, :], other=0.0)
        acc += tl.dot(tap_map, grads, input_precision="ieee")
    tl.store(dq + (head * NQ + q_rows)[:, None] * D + dims[None, :], acc.to(dq.dtype.element_ty),
             mask=(q_rows < NQ)[:, None] & dim_ok[None, :])


def srs_attention_backward(grad_out, q, k, v, index, weight, out, lse, scale):
    """Same contract as udi_kernels::srs_attention_backward (contiguous inputs): returns (dq, dk, dv)."""
    B, H, NQ, D = q.shape
    N = k.shape[2]
    S, T = index.shape[1:]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B * H == 0:
        return dq, dk, dv
    dq_s = torch.empty(B, H, S, D, dtype=torch.float32, device=q.device)
    delta = torch.empty(B, H, S, dtype=torch.float32, device=q.device)
    q_op = torch.empty(B, H, S, D, dtype=k.dtype, device=q.device)
    row_exp = torch.empty(B, H, S, dtype=torch.int32, device=q.device)
    scale_mantissa, scale_exponent = math.frexp(scale)
    BLOCK_S, BLOCK_N, BLOCK_D = block_sizes(S, N, D)
    meta = dict(BLOCK_S=BLOCK_S, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PRECISION=dot_precision(q.dtype),
                **launch_options(BLOCK_D))
    if S > 0:
        _query_grad_kernel[(triton.cdiv(S, BLOCK_S), H, B)](q, k, v, index, weight, grad_out, out, lse, dq_s, delta,
                                                            q_op, row_exp, H, NQ, N, S, T, D, scale_mantissa,
                                                            scale_exponent, **meta)
    _key_grad_kernel[(triton.cdiv(N, BLOCK_N), H, B)](q_op, row_exp, k, v, grad_out, lse, delta, dk, dv, H, N, S, D,
                                                      scale_mantissa, scale_exponent, **meta)
    BLOCK_R = block_sizes(S, NQ, D)[1]
    if NQ > 0:
        _token_grad_kernel[(triton.cdiv(NQ, BLOCK_R), H, B)](index, weight, dq_s, dq, H, NQ, S, T, D,
                                                             BLOCK_S=BLOCK_S, BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D,
                                                             **launch_options(BLOCK_D))
    return dq, dk, dv
