// Row primitives of the CPU kernels (csrc/distill_cross_entropy_*.cpp, csrc/linear_distill_cross_entropy_*.cpp):
// vectorised (at::vec) reductions and exps over a span of one row, and the plain elementwise loops around them.
// E is the element type the exps and lane sums run in (float or double); every reduction returns a double.
//
// The reductions run in lane order and combine the lanes in order: a result depends on the span only, never on
// threads. exp_of takes float exps at <= 20 ulp (at::vec's exp_u20) and double ones at 1 ulp (Sleef).
// Conversions and elementwise arithmetic are plain loops, which the compiler vectorises (no reassociation needed;
// setup.py builds with -ffp-contract=off, so no loop fuses a multiply and an add).
#pragma once
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace udi::row_kernels {

template <typename E>
using VecE = at::vec::Vectorized<E>;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// f(offset, lanes) for each vector of E over a span of n columns; lanes < the vector's size for the last one only.
template <typename E, typename F>
C10_ALWAYS_INLINE void for_each_vector(int64_t n, const F& f) {
  constexpr int64_t size = VecE<E>::size();
  int64_t j = 0;
  for (; j + size <= n; j += size) f(j, size);
  if (j < n) f(j, n - j);
}

// The first `lanes` lanes of v, `fill` in the others.
template <typename E>
VecE<E> first_lanes(const VecE<E>& v, int64_t lanes, E fill) {
  return lanes == VecE<E>::size() ? v : VecE<E>::set(VecE<E>(fill), v, lanes);
}

// Lane reductions in lane order, in double. lane_max keeps a NaN.
template <typename E>
double lane_sum(const VecE<E>& v) {
  alignas(64) E values[VecE<E>::size()];
  v.store(values);
  double sum = 0;
  for (int64_t i = 0; i < VecE<E>::size(); ++i) sum += values[i];
  return sum;
}

template <typename E>
double lane_max(const VecE<E>& v) {
  alignas(64) E values[VecE<E>::size()];
  v.store(values);
  double max = values[0];
  for (int64_t i = 1; i < VecE<E>::size(); ++i) max = (values[i] > max || std::isnan(values[i])) ? values[i] : max;
  return max;
}

inline VecE<double> exp_of(const VecE<double>& a) { return a.exp(); }
// exp_u20 clamps a NaN argument to a finite result: NaN is passed through, as exp does
inline VecE<float> exp_of(const VecE<float>& a) { return VecE<float>::blendv(a.exp_u20(), a, a.isnan()); }

// max_k u[k] for k < n, a NaN kept; four accumulators, as the maximum's latency would bound a single one.
template <typename E>
double max_of(const E* u, int64_t n) {
  constexpr int64_t size = VecE<E>::size();
  const E low = -std::numeric_limits<E>::infinity();
  VecE<E> m0(low), m1(low), m2(low), m3(low);
  int64_t j = 0;
  for (; j + 4 * size <= n; j += 4 * size) {
    m0 = at::vec::maximum(m0, VecE<E>::loadu(u + j));
    m1 = at::vec::maximum(m1, VecE<E>::loadu(u + j + size));
    m2 = at::vec::maximum(m2, VecE<E>::loadu(u + j + 2 * size));
    m3 = at::vec::maximum(m3, VecE<E>::loadu(u + j + 3 * size));
  }
  for_each_vector<E>(n - j, [&](int64_t i, int64_t lanes) {
    m0 = at::vec::maximum(m0, first_lanes(VecE<E>::loadu(u + j + i, lanes), lanes, low));
  });
  return lane_max(at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3)));
}

// The largest of n logits of any dtype, in double, a NaN kept.
template <typename T>
double row_max(const T* row, int64_t n) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return max_of(row, n);
  } else {
    double max = kNegInf;
    for (int64_t k = 0; k < n; ++k) {
      const double v = static_cast<double>(row[k]);
      max = (v > max || std::isnan(v)) ? v : max;
    }
    return max;
  }
}

// Σ_k x[k] for k < n.
template <typename E>
double sum_of(const E* x, int64_t n) {
  VecE<E> sum(0);
  for_each_vector<E>(n, [&](int64_t j, int64_t lanes) { sum = sum + VecE<E>::loadu(x + j, lanes); });
  return lane_sum(sum);
}

// a[k] <- exp(a[k]) for k < n; returns their sum.
template <typename E>
double exp_in_place(E* a, int64_t n) {
  VecE<E> sum(0);
  for_each_vector<E>(n, [&](int64_t j, int64_t lanes) {
    const VecE<E> e = first_lanes(exp_of(VecE<E>::loadu(a + j, lanes)), lanes, E(0));
    e.store(a + j, lanes);
    sum = sum + e;
  });
  return lane_sum(sum);
}

// Σ_k exp(a[k]) for k < n.
template <typename E>
double exp_sum(const E* a, int64_t n) {
  VecE<E> sum(0);
  for_each_vector<E>(n, [&](int64_t j, int64_t lanes) {
    sum = sum + first_lanes(exp_of(VecE<E>::loadu(a + j, lanes)), lanes, E(0));
  });
  return lane_sum(sum);
}

// Σ_k p[k] (max - x[k]) for k < n, from a = x - max: every term >= 0 where p >= 0 and x <= max.
template <typename E>
double gap(const E* p, const E* a, int64_t n) {
  VecE<E> sum(0);
  for_each_vector<E>(n, [&](int64_t j, int64_t lanes) {
    sum = sum - first_lanes(VecE<E>::loadu(p + j, lanes) * VecE<E>::loadu(a + j, lanes), lanes, E(0));
  });
  return lane_sum(sum);
}

// logsumexp over chunks from their (max, Σ exp(u - max)), in chunk order.
inline double combine_lse(const double* maxes, const double* sums, int64_t count) {
  double max = kNegInf;
  for (int64_t c = 0; c < count; ++c) max = std::max(max, maxes[c]);
  double sum = 0;
  for (int64_t c = 0; c < count; ++c) sum += sums[c] * std::exp(maxes[c] - max);
  return max + std::log(sum);
}

// u[k] = (row[k] - center[k]) * scale for k < n, in U (u may be row).
template <typename T, typename C, typename U>
void centered_row(const T* row, const C* center, U scale, int64_t n, U* u) {
  for (int64_t k = 0; k < n; ++k) u[k] = (static_cast<U>(row[k]) - static_cast<U>(center[k])) * scale;
}

// a[k] = row[k] * scale - shift in double, rounded to E: the argument of an exp.
template <typename T, typename E>
void scaled_shifted(const T* row, double scale, double shift, int64_t n, E* a) {
  for (int64_t k = 0; k < n; ++k) a[k] = static_cast<E>(static_cast<double>(row[k]) * scale - shift);
}

// a[k] = u[k] - shift in U, rounded to E: the argument of an exp (a may be u).
template <typename U, typename E>
void shifted(const U* u, U shift, int64_t n, E* a) {
  for (int64_t k = 0; k < n; ++k) a[k] = static_cast<E>(u[k] - shift);
}

// out[k] = x[k] * factor in E, rounded to T (out may be x).
template <typename E, typename T>
void scaled(const E* x, E factor, int64_t n, T* out) {
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<T>(x[k] * factor);
}

// x[k] -= factor * y[k] for k < n.
template <typename E>
void subtract_scaled(E* x, const E* y, E factor, int64_t n) {
  for (int64_t k = 0; k < n; ++k) x[k] -= factor * y[k];
}

// Asks for the n elements at p ahead of their use (for writing: `write`): the rows of a chunk lie K apart, more
// streams than the hardware prefetcher follows.
template <typename T>
void prefetch(const T* p, int64_t n, bool write = false) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) {
    if (write)
      __builtin_prefetch(bytes + b, 1);
    else
      __builtin_prefetch(bytes + b, 0);
  }
}

}  // namespace udi::row_kernels
