// The SRS tapped query (UDI_SPEC: q_s = sum_t w_t q[idx_t]) and its in-range rule, for code compiled by the host C++
// compiler and by nvcc, as csrc/stratified_sample.h is for the sampler. Every backend follows the rule: a tap outside
// [0, Nq) is skipped, as if its weight were 0 (the public op checks the taps only with check_taps=True).
#pragma once
#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace udi::srs_attention {

// What the kernels read.
template <typename scalar_t>
struct Inputs {
  const scalar_t* q;      // [B, H, Nq, D]
  const scalar_t *k, *v;  // [B, H, N, D]
  const int32_t* index;   // [B, S, T], into the Nq rows of q
  const float* weight;    // [B, S, T]
  int64_t H, Nq, N, S, T, D;
  float scale_mantissa;  // scale = scale_mantissa * 2^scale_exponent (any finite double; the CUDA kernels'
  int scale_exponent;    // scaled_logit applies the powers of two with ldexpf)
};

// Whether tap index `idx` names a row of q.
UDI_HOST_DEVICE bool tap_in_range(int32_t idx, int64_t Nq) { return idx >= 0 && idx < Nq; }

// Element d of q_s = sum_t w_t q[idx_t] of sample `sample` of crop b, head `head` (flat over B and H), in float.
template <typename scalar_t>
UDI_HOST_DEVICE float tapped_query(const Inputs<scalar_t>& a, int64_t b, int64_t head, int64_t sample, int d) {
  const int64_t taps = (b * a.S + sample) * a.T;
  const scalar_t* q_head = a.q + head * a.Nq * a.D;
  float acc = 0.f;
  for (int64_t t = 0; t < a.T; ++t) {
    const int32_t idx = a.index[taps + t];
    const float w = a.weight[taps + t];
    // A weight-0 tap is left out exactly, whatever its row holds (0 * NaN would be NaN).
    if (tap_in_range(idx, a.Nq) && w != 0.f) acc += w * static_cast<float>(q_head[idx * a.D + d]);
  }
  return acc;
}

// e with every |row[d]| * 2^-e below 2^-b, b the bit length of D: a dot of the scaled row with D floats (each
// below 2^128) then stays below the float max. Clamped so that 2^-e is a float (a zero row gives -126).
UDI_HOST_DEVICE int row_exponent(const float* row, int64_t D) {
  float top = 0.f;
  for (int d = 0; d < D; ++d) top = fmaxf(top, fabsf(row[d]));
  int e = 0;
  frexpf(top, &e);
  for (int64_t n = D; n > 0; n >>= 1) ++e;
  return e > -126 ? e : -126;
}

// The logit q_s . k * scale without an intermediate that overflows where the logit is finite: q_s enters the dot
// scaled by 2^-e_q (row_exponent: exact, and no overflow whatever k holds), scale as its mantissa, and the powers of
// two come last (ldexpf, exact).
// Bit for bit (q_s . k) * scale wherever that neither overflows nor underflows.
template <typename scalar_t>
UDI_HOST_DEVICE float scaled_logit(const float* q_s, int e_q, const float* k, const Inputs<scalar_t>& a) {
  const float inv = ldexpf(1.f, -e_q);
  float sum = 0.f;
  for (int d = 0; d < a.D; ++d) sum += (q_s[d] * inv) * k[d];
  return ldexpf(sum * a.scale_mantissa, e_q + a.scale_exponent);
}

}  // namespace udi::srs_attention
