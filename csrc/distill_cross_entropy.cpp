// udi_kernels::distill_cross_entropy / distill_cross_entropy_backward: schemas, argument checks and the CPU kernels
// (vectorised, exponents formed in double, one parallel task per K chunk; plan above `chunk_width`).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "distill_cross_entropy_op.h"

namespace udi::distill_cross_entropy {

void check_vector(const at::Tensor& t, const char* name, at::ScalarType type, int64_t length, const at::Device& device) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == length, name, " must have shape [", length, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == type, name, " must be ", type, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, name, " must be on ", device, " like student, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

namespace {

void check_logits(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.dim() == 2, name, " must have shape [rows, K], got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be floating, got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, name, " must be on ", device, " like student, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

namespace {

// student, teacher, centers: 2-d with one positive K, on the student's device, contiguous; centers in the
// teacher's compute dtype with at least one row.
void check_logit_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& centers) {
  const at::Device device = student.device();
  check_logits(student, "student", device);
  check_logits(teacher, "teacher", device);
  check_logits(centers, "centers", device);
  const int64_t K = student.size(1);
  TORCH_CHECK(K > 0 && teacher.size(1) == K && centers.size(1) == K,
              "student, teacher and centers must share a positive K, got ", student.sizes(), ", ", teacher.sizes(),
              " and ", centers.sizes());
  TORCH_CHECK(centers.size(0) > 0, "centers must have at least one row");
  TORCH_CHECK(centers.scalar_type() == compute_dtype(teacher.scalar_type()), "centers must be ",
              compute_dtype(teacher.scalar_type()), ", got ", centers.scalar_type());
}

}  // namespace

void check_pair_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& center_id,
                     const at::Tensor& student_offsets, const at::Tensor& pair_teacher, const at::Tensor& pair_weight) {
  const at::Device device = student.device();
  const int64_t P = pair_teacher.numel();
  check_vector(center_id, "center_id", at::kLong, teacher.size(0), device);
  check_vector(student_offsets, "student_offsets", at::kLong, student.size(0) + 1, device);
  check_vector(pair_teacher, "pair_teacher", at::kLong, P, device);
  check_vector(pair_weight, "pair_weight", compute_dtype(student.scalar_type()), P, device);
}

void check_temperatures(double tau_s, double tau_t) {
  TORCH_CHECK(tau_s > 0 && tau_t > 0, "tau_s and tau_t must be positive, got ", tau_s, " and ", tau_t);
}

void check_forward_args(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& centers,
                        const at::Tensor& center_id, const at::Tensor& student_offsets, const at::Tensor& pair_teacher,
                        const at::Tensor& pair_weight, const at::Tensor& center_offsets, const at::Tensor& center_rows,
                        const at::Tensor& row_weight, double tau_s, double tau_t) {
  const at::Device device = student.device();
  check_logit_args(student, teacher, centers);
  check_pair_args(student, teacher, center_id, student_offsets, pair_teacher, pair_weight);
  const int64_t Rt = teacher.size(0);
  check_vector(center_offsets, "center_offsets", at::kLong, centers.size(0) + 1, device);
  check_vector(center_rows, "center_rows", at::kLong, Rt, device);
  check_vector(row_weight, "row_weight", compute_dtype(teacher.scalar_type()), Rt, device);
  check_temperatures(tau_s, tau_t);
}

void check_backward_args(const at::Tensor& grad_pair_loss, const at::Tensor& student, const at::Tensor& teacher,
                         const at::Tensor& centers, const at::Tensor& center_id, const at::Tensor& student_offsets,
                         const at::Tensor& pair_teacher, const at::Tensor& pair_weight,
                         const at::Tensor& student_lse, const at::Tensor& teacher_lse, at::ScalarType lse_type) {
  const at::Device device = student.device();
  check_logit_args(student, teacher, centers);
  check_pair_args(student, teacher, center_id, student_offsets, pair_teacher, pair_weight);
  check_vector(grad_pair_loss, "grad_pair_loss", compute_dtype(student.scalar_type()), pair_teacher.numel(), device);
  check_vector(student_lse, "student_lse", lse_type, student.size(0), device);
  check_vector(teacher_lse, "teacher_lse", lse_type, teacher.size(0), device);
}

namespace {

// The CPU kernels form every exponent's argument in double from the inputs (x − max, u − lse: exact at any logit
// magnitude), then take the exp in the exponent type E of the inputs: float for float32 / float16 / bfloat16 logits
// (16 lanes with AVX-512, at::vec's exp_u20: <= 20 ulp), double for float64 ones (Sleef, 1 ulp). Rounding the
// non-positive argument to float costs at most e^-1 * 6e-8 of the largest term, whatever the logits' magnitude.
// Per-chunk sums accumulate in E lanes and are combined in double. K is cut into chunks of a fixed width
// (chunk_width: it depends on the shapes only); one parallel task per chunk reads the chunk of every teacher row
// once (exp'd into a scratch of Rt x chunk) and then the chunk of every student row once. Each task writes its own
// partials, which are combined per row in chunk order: the results do not depend on the number of threads and
// repeat bit for bit.
using Vec = at::vec::Vectorized<double>;
template <typename E>
using VecE = at::vec::Vectorized<E>;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

template <typename student_t, typename teacher_t>
using exp_type = std::conditional_t<std::is_same_v<student_t, double> || std::is_same_v<teacher_t, double>, double,
                                    float>;

// 512 columns, halved (down to 128) while the teacher scratch of a task exceeds 4 MiB.
int64_t chunk_width(int64_t teacher_rows) {
  int64_t width = 512;
  while (width > 128 && teacher_rows * width * int64_t{sizeof(double)} > (int64_t{4} << 20)) width /= 2;
  return width;
}

struct Chunks {
  int64_t K, width, count;
  Chunks(int64_t K, int64_t teacher_rows) : K(K), width(chunk_width(teacher_rows)), count((K + width - 1) / width) {}
  int64_t first(int64_t chunk) const { return chunk * width; }
  int64_t columns(int64_t chunk) const { return std::min(width, K - first(chunk)); }
};

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

VecE<double> exp_of(const VecE<double>& a) { return a.exp(); }
// exp_u20 clamps a NaN argument to a finite result: NaN is passed through, as exp does
VecE<float> exp_of(const VecE<float>& a) { return VecE<float>::blendv(a.exp_u20(), a, a.isnan()); }

// Conversions and elementwise arithmetic are plain loops, which the compiler vectorises (no reassociation needed);
// the reductions and exp use at::vec.

// u[k] = (row[k] - center[k]) * scale for k < n.
template <typename T>
void centered_row(const T* row, const double* center, double scale, int64_t n, double* u) {
  for (int64_t k = 0; k < n; ++k) u[k] = (static_cast<double>(row[k]) - center[k]) * scale;
}

// a[k] = row[k] * scale - shift in double, rounded to E: the argument of an exp.
template <typename T, typename E>
void scaled_shifted(const T* row, double scale, double shift, int64_t n, E* a) {
  for (int64_t k = 0; k < n; ++k) a[k] = static_cast<E>(static_cast<double>(row[k]) * scale - shift);
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

// a[k] = u[k] - shift, the difference in double, rounded to E: the argument of an exp.
template <typename E>
void shifted(const double* u, double shift, int64_t n, E* a) {
  for (int64_t k = 0; k < n; ++k) a[k] = static_cast<E>(u[k] - shift);
}

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
double combine_lse(const double* maxes, const double* sums, int64_t count) {
  double max = kNegInf;
  for (int64_t c = 0; c < count; ++c) max = std::max(max, maxes[c]);
  double sum = 0;
  for (int64_t c = 0; c < count; ++c) sum += sums[c] * std::exp(maxes[c] - max);
  return max + std::log(sum);
}

// Everything a CPU kernel reads, as raw pointers; the logits keep their dtypes.
template <typename student_t, typename teacher_t>
struct Rows : PairArgs<double> {
  const student_t* student;
  const teacher_t* teacher;

  // Teacher row `row` of a chunk, then the student rows in turn: each prefetches the next while it is worked on.
  void prefetch_teacher(int64_t row, int64_t first, int64_t n) const {
    if (row < num_teacher_rows) prefetch(teacher + row * K + first, n);
  }
  void prefetch_student(int64_t row, int64_t Rs, int64_t first, int64_t n) const {
    if (row < Rs) prefetch(student + row * K + first, n);
  }
  // u = (t - c) / τt of teacher row `row`, columns [first, first + n).
  void centered(int64_t row, int64_t first, int64_t n, double* u) const {
    centered_row(teacher + row * K + first, centers + center_id[row] * K + first, inv_tau_t, n, u);
  }
  // max_k s / τs of student row `row` over columns [first, first + n): the scaling is monotone, so the max of the
  // scaled row is the scaled max of the row.
  double student_max(int64_t row, int64_t first, int64_t n) const {
    return row_max(student + row * K + first, n) * inv_tau_s;
  }
  // a = s / τs - shift of student row `row`, columns [first, first + n), rounded to E.
  template <typename E>
  void student_exponents(int64_t row, int64_t first, int64_t n, double shift, E* a) const {
    scaled_shifted(student + row * K + first, inv_tau_s, shift, n, a);
  }
  double pair_scale(int64_t slot, const double* grad_pair_loss) const {
    return pair_counts(*this, slot) ? pair_weight[slot] * grad_pair_loss[slot] : 0.0;
  }
};

// Per (row or pair, chunk) partials of the forward, [rows, chunks] row-major.
struct ForwardPartials {
  std::vector<double> teacher_max, teacher_sum, student_max, student_sum, pair_gap;
  ForwardPartials(int64_t Rt, int64_t Rs, int64_t P, int64_t chunks)
      : teacher_max(Rt * chunks), teacher_sum(Rt * chunks), student_max(Rs * chunks), student_sum(Rs * chunks),
        pair_gap(P * chunks) {}
};

// Rows of center_rows outside [0, Rt) are skipped, like the rows of a center_id out of range (build_csr leaves
// those out of every segment). Columns [first, first + n) of every center, rows added in CSR order.
template <typename teacher_t>
void center_sums(const teacher_t* teacher, const int64_t* center_offsets, const int64_t* center_rows,
                 const double* row_weight, int64_t n_c, int64_t Rt, int64_t K, int64_t first, int64_t n,
                 double* center_sum) {
  for (int64_t c = 0; c < n_c; ++c) {
    double* out = center_sum + c * K + first;
    std::fill(out, out + n, 0.0);
    const SlotRange slots = csr_slots(center_offsets, c, Rt);
    for (int64_t slot = slots.first; slot < slots.last; ++slot) {
      const int64_t row = row_or_none(center_rows, slot, Rt);
      if (row < 0 || row_weight[row] == 0) continue;
      const teacher_t* t = teacher + row * K + first;
      const double weight = row_weight[row];
      for (int64_t k = 0; k < n; ++k) out[k] += weight * static_cast<double>(t[k]);
    }
  }
}

void center_counts(const int64_t* center_offsets, const int64_t* center_rows, const double* row_weight, int64_t n_c,
                   int64_t Rt, double* center_count) {
  for (int64_t c = 0; c < n_c; ++c) {
    double count = 0;
    const SlotRange slots = csr_slots(center_offsets, c, Rt);
    for (int64_t slot = slots.first; slot < slots.last; ++slot) {
      const int64_t row = row_or_none(center_rows, slot, Rt);
      if (row >= 0) count += row_weight[row];
    }
    center_count[c] = count;
  }
}

// What a task works in: `teacher` [Rt, width] exps of the teacher rows, `row` [width] the exponents of one student
// row, `logits` [width] one row's scaled logits in double.
template <typename E>
struct Scratch {
  std::vector<E> exps;
  std::vector<double> logits;
  E* teacher;
  E* row;
  Scratch(int64_t Rt, int64_t width) : exps((Rt + 1) * width), logits(width) {
    teacher = exps.data();
    row = exps.data() + Rt * width;
  }
};

// One chunk of the forward: the teacher rows' (max, Σ exp) with exp(u - max) kept in the scratch, then per
// student row its (max, Σ exp) and, per pair of it, Σ exp(u - max_t) (max_s - x).
template <typename student_t, typename teacher_t, typename E>
void forward_chunk(const Rows<student_t, teacher_t>& rows, int64_t Rs, const Chunks& chunks, int64_t chunk,
                   Scratch<E>& work, ForwardPartials& out) {
  const int64_t first = chunks.first(chunk), n = chunks.columns(chunk), count = chunks.count;
  double* u = work.logits.data();
  for (int64_t r = 0; r < rows.num_teacher_rows; ++r) {
    rows.prefetch_teacher(r + 1, first, n);
    if (!teacher_row_ok(rows, r)) continue;  // no pair reads it
    E* e = work.teacher + r * chunks.width;
    rows.centered(r, first, n, u);
    const double max = max_of(u, n);
    shifted(u, max, n, e);
    out.teacher_max[r * count + chunk] = max;
    out.teacher_sum[r * count + chunk] = exp_in_place(e, n);
  }
  rows.prefetch_student(0, Rs, first, n);
  for (int64_t r = 0; r < Rs; ++r) {
    rows.prefetch_student(r + 1, Rs, first, n);
    const double max = rows.student_max(r, first, n);
    rows.student_exponents(r, first, n, max, work.row);
    out.student_max[r * count + chunk] = max;
    out.student_sum[r * count + chunk] = exp_sum(work.row, n);
    const SlotRange slots = csr_slots(rows.student_offsets, r, rows.num_pairs);
    for (int64_t slot = slots.first; slot < slots.last; ++slot) {
      if (pair_counts(rows, slot))
        out.pair_gap[slot * count + chunk] = gap(work.teacher + rows.pair_teacher[slot] * chunks.width, work.row, n);
    }
  }
}

// The logsumexps and, per counted pair, w · CE = w Σ_c mass_c (lse_s - max_s,c) + mass-weighted gap_c, with
// mass_c = Σ_t,c exp(max_t,c - lse_t) (every term >= 0: no cancellation at large logits).
template <typename student_t, typename teacher_t>
void combine_forward(const Rows<student_t, teacher_t>& rows, int64_t Rs, const Chunks& chunks,
                     const ForwardPartials& parts, double* pair_loss, double* student_lse, double* teacher_lse) {
  const int64_t count = chunks.count;
  at::parallel_for(0, rows.num_teacher_rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)  // -inf for a row without a center: no pair reads it
      teacher_lse[r] = teacher_row_ok(rows, r)
                           ? combine_lse(&parts.teacher_max[r * count], &parts.teacher_sum[r * count], count)
                           : kNegInf;
  });
  at::parallel_for(0, Rs, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const double* s_max = &parts.student_max[r * count];
      const double lse = combine_lse(s_max, &parts.student_sum[r * count], count);
      student_lse[r] = lse;
      const SlotRange slots = csr_slots(rows.student_offsets, r, rows.num_pairs);
      for (int64_t slot = slots.first; slot < slots.last; ++slot) {
        if (!pair_counts(rows, slot)) continue;  // pair_loss starts at 0
        const int64_t t_row = rows.pair_teacher[slot];
        const double* t_max = &parts.teacher_max[t_row * count];
        const double* t_sum = &parts.teacher_sum[t_row * count];
        const double* gaps = &parts.pair_gap[slot * count];
        double ce = 0;
        for (int64_t c = 0; c < count; ++c)
          ce += std::exp(t_max[c] - teacher_lse[t_row]) * (t_sum[c] * (lse - s_max[c]) + gaps[c]);
        pair_loss[slot] = rows.pair_weight[slot] * ce;
      }
    }
  });
}

at::Tensor as_double(const at::Tensor& t) { return t.to(at::kDouble).contiguous(); }

}  // namespace

#define UDI_DISPATCH_LOGITS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

std::tuple<at::Tensor, at::Tensor> center_statistics_cpu(const at::Tensor& teacher, const at::Tensor& center_offsets,
                                                         const at::Tensor& center_rows, const at::Tensor& row_weight) {
  const int64_t n_c = center_offsets.size(0) - 1, Rt = teacher.size(0), K = teacher.size(1);
  const auto doubles = teacher.options().dtype(at::kDouble);
  at::Tensor center_sum = at::empty({n_c, K}, doubles), center_count = at::empty({n_c}, doubles);
  const at::Tensor row_weight64 = as_double(row_weight);
  center_counts(center_offsets.data_ptr<int64_t>(), center_rows.data_ptr<int64_t>(), row_weight64.data_ptr<double>(),
                n_c, Rt, center_count.data_ptr<double>());
  UDI_DISPATCH_LOGITS(teacher.scalar_type(), "center_statistics_cpu", [&] {
    center_sums(teacher.data_ptr<scalar_t>(), center_offsets.data_ptr<int64_t>(), center_rows.data_ptr<int64_t>(),
                row_weight64.data_ptr<double>(), n_c, Rt, K, 0, K, center_sum.data_ptr<double>());
  });
  return {center_sum, center_count};
}

namespace {

template <typename student_t, typename teacher_t>
void forward_rows(const Rows<student_t, teacher_t>& rows, int64_t Rs, double* pair_loss, double* student_lse,
                  double* teacher_lse, const int64_t* center_offsets, const int64_t* center_rows,
                  const double* row_weight, double* center_sum) {
  const int64_t Rt = rows.num_teacher_rows, K = rows.K;
  const Chunks chunks(K, Rt);
  ForwardPartials parts(Rt, Rs, rows.num_pairs, chunks.count);
  at::parallel_for(0, chunks.count, 1, [&](int64_t begin, int64_t end) {
    Scratch<exp_type<student_t, teacher_t>> work(Rt, chunks.width);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      forward_chunk(rows, Rs, chunks, chunk, work, parts);
      center_sums(rows.teacher, center_offsets, center_rows, row_weight, rows.num_centers, Rt, K,
                  chunks.first(chunk), chunks.columns(chunk), center_sum);  // the chunk is still in cache
    }
  });
  combine_forward(rows, Rs, chunks, parts, pair_loss, student_lse, teacher_lse);
}

template <typename student_t, typename teacher_t>
Rows<student_t, teacher_t> make_rows(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& centers,
                                     const at::Tensor& center_id, const at::Tensor& student_offsets,
                                     const at::Tensor& pair_teacher, const at::Tensor& pair_weight, double tau_s,
                                     double tau_t) {
  const PairArgs<double> pairs{centers.data_ptr<double>(),       center_id.data_ptr<int64_t>(),
                               student_offsets.data_ptr<int64_t>(), pair_teacher.data_ptr<int64_t>(),
                               pair_weight.data_ptr<double>(),  student.size(1),
                               1.0 / tau_s,                     1.0 / tau_t,
                               teacher.size(0),                 centers.size(0),
                               pair_teacher.numel()};
  return Rows<student_t, teacher_t>{pairs, student.data_ptr<student_t>(), teacher.data_ptr<teacher_t>()};
}

// Calls body(rows) with the Rows of the student's and the teacher's dtypes.
template <typename Body>
void with_rows(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& centers64,
               const at::Tensor& center_id, const at::Tensor& student_offsets, const at::Tensor& pair_teacher,
               const at::Tensor& pair_weight64, double tau_s, double tau_t, const Body& body) {
  UDI_DISPATCH_LOGITS(student.scalar_type(), "distill_cross_entropy_cpu", [&] {
    using student_t = scalar_t;
    UDI_DISPATCH_LOGITS(teacher.scalar_type(), "distill_cross_entropy_cpu", [&] {
      body(make_rows<student_t, scalar_t>(student, teacher, centers64, center_id, student_offsets, pair_teacher,
                                          pair_weight64, tau_s, tau_t));
    });
  });
}

ForwardTensors forward_cpu(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& centers,
                           const at::Tensor& center_id, const at::Tensor& student_offsets,
                           const at::Tensor& pair_teacher, const at::Tensor& pair_weight,
                           const at::Tensor& center_offsets, const at::Tensor& center_rows,
                           const at::Tensor& row_weight, double tau_s, double tau_t) {
  TORCH_CHECK(student.device().is_cpu(), "student must be a CPU tensor for the CPU kernel");
  check_forward_args(student, teacher, centers, center_id, student_offsets, pair_teacher, pair_weight, center_offsets,
                     center_rows, row_weight, tau_s, tau_t);
  const int64_t Rs = student.size(0), Rt = teacher.size(0), K = student.size(1), n_c = centers.size(0);
  const auto doubles = student.options().dtype(at::kDouble);
  at::Tensor pair_loss = at::zeros({pair_teacher.numel()}, doubles), student_lse = at::empty({Rs}, doubles);
  at::Tensor teacher_lse = at::empty({Rt}, doubles), center_sum = at::empty({n_c, K}, doubles);
  at::Tensor center_count = at::empty({n_c}, doubles);
  const at::Tensor centers64 = as_double(centers), pair_weight64 = as_double(pair_weight);
  const at::Tensor row_weight64 = as_double(row_weight);
  center_counts(center_offsets.data_ptr<int64_t>(), center_rows.data_ptr<int64_t>(), row_weight64.data_ptr<double>(),
                n_c, Rt, center_count.data_ptr<double>());
  with_rows(student, teacher, centers64, center_id, student_offsets, pair_teacher, pair_weight64, tau_s, tau_t,
            [&](const auto& rows) {
              forward_rows(rows, Rs, pair_loss.data_ptr<double>(), student_lse.data_ptr<double>(),
                           teacher_lse.data_ptr<double>(), center_offsets.data_ptr<int64_t>(),
                           center_rows.data_ptr<int64_t>(), row_weight64.data_ptr<double>(),
                           center_sum.data_ptr<double>());
            });
  const at::ScalarType out = compute_dtype(student.scalar_type()), stats = compute_dtype(teacher.scalar_type());
  // the logsumexps stay double: the backward recomputes the exponents in double against them
  return {pair_loss.to(out), center_sum.to(stats), center_count.to(stats), student_lse, teacher_lse};
}

// One chunk of the backward: p_t = exp(u - lse_t) of every teacher row into the scratch, then per student row
// grad = (Σ_p g_p w_p · softmax(x) - Σ_p g_p w_p · p_t) / τs, written once.
template <typename student_t, typename teacher_t, typename E>
void backward_chunk(const Rows<student_t, teacher_t>& rows, int64_t Rs, const Chunks& chunks, int64_t chunk,
                    const double* grad_pair_loss, const double* student_lse, const double* teacher_lse,
                    Scratch<E>& work, student_t* grad_student) {
  const int64_t first = chunks.first(chunk), n = chunks.columns(chunk), K = rows.K;
  double* u = work.logits.data();
  E* acc = work.row;
  for (int64_t r = 0; r < rows.num_teacher_rows; ++r) {
    rows.prefetch_teacher(r + 1, first, n);
    if (!teacher_row_ok(rows, r)) continue;
    E* p = work.teacher + r * chunks.width;
    rows.centered(r, first, n, u);
    shifted(u, teacher_lse[r], n, p);
    exp_in_place(p, n);
  }
  rows.prefetch_student(0, Rs, first, n);
  for (int64_t r = 0; r < Rs; ++r) {
    rows.prefetch_student(r + 1, Rs, first, n);
    student_t* out = grad_student + r * K + first;
    prefetch(out, n, /*write=*/true);
    const SlotRange slots = csr_slots(rows.student_offsets, r, rows.num_pairs);
    double total = 0;
    bool any = false;
    for (int64_t slot = slots.first; slot < slots.last; ++slot) {
      const double scale = rows.pair_scale(slot, grad_pair_loss);
      total += scale;
      any = any || scale != 0;
    }
    if (!any) {  // no pair of this row counts: its gradient is exactly 0
      std::fill(out, out + n, static_cast<student_t>(0));
      continue;
    }
    rows.student_exponents(r, first, n, student_lse[r], acc);
    exp_in_place(acc, n);
    const E row_total = static_cast<E>(total);
    for (int64_t k = 0; k < n; ++k) acc[k] *= row_total;
    for (int64_t slot = slots.first; slot < slots.last; ++slot) {
      const E scale = static_cast<E>(rows.pair_scale(slot, grad_pair_loss));
      if (scale == 0) continue;
      const E* p = work.teacher + rows.pair_teacher[slot] * chunks.width;
      for (int64_t k = 0; k < n; ++k) acc[k] -= scale * p[k];
    }
    const E inv_tau_s = static_cast<E>(rows.inv_tau_s);
    for (int64_t k = 0; k < n; ++k) out[k] = static_cast<student_t>(acc[k] * inv_tau_s);
  }
}

template <typename student_t, typename teacher_t>
void backward_rows(const Rows<student_t, teacher_t>& rows, int64_t Rs, const double* grad_pair_loss,
                   const double* student_lse, const double* teacher_lse, student_t* grad_student) {
  const int64_t Rt = rows.num_teacher_rows;
  const Chunks chunks(rows.K, Rt);
  at::parallel_for(0, chunks.count, 1, [&](int64_t begin, int64_t end) {
    Scratch<exp_type<student_t, teacher_t>> work(Rt, chunks.width);
    for (int64_t chunk = begin; chunk < end; ++chunk)
      backward_chunk(rows, Rs, chunks, chunk, grad_pair_loss, student_lse, teacher_lse, work, grad_student);
  });
}

at::Tensor backward_cpu(const at::Tensor& grad_pair_loss, const at::Tensor& student, const at::Tensor& teacher,
                        const at::Tensor& centers, const at::Tensor& center_id, const at::Tensor& student_offsets,
                        const at::Tensor& pair_teacher, const at::Tensor& pair_weight, const at::Tensor& student_lse,
                        const at::Tensor& teacher_lse, double tau_s, double tau_t) {
  TORCH_CHECK(student.device().is_cpu(), "student must be a CPU tensor for the CPU kernel");
  check_backward_args(grad_pair_loss, student, teacher, centers, center_id, student_offsets, pair_teacher, pair_weight,
                      student_lse, teacher_lse, at::kDouble);
  at::Tensor grad_student = at::empty_like(student);
  const at::Tensor centers64 = as_double(centers), pair_weight64 = as_double(pair_weight);
  const at::Tensor grad64 = as_double(grad_pair_loss);
  with_rows(student, teacher, centers64, center_id, student_offsets, pair_teacher, pair_weight64, tau_s, tau_t,
            [&](const auto& rows) {
              using student_t = std::remove_cv_t<std::remove_pointer_t<decltype(rows.student)>>;
              backward_rows(rows, student.size(0), grad64.data_ptr<double>(), student_lse.data_ptr<double>(),
                            teacher_lse.data_ptr<double>(), grad_student.data_ptr<student_t>());
            });
  return grad_student;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(udi_kernels, m) {
  m.def(
      "distill_cross_entropy(Tensor student, Tensor teacher, Tensor centers, Tensor center_id, Tensor student_offsets, "
      "Tensor pair_teacher, Tensor pair_weight, Tensor center_offsets, Tensor center_rows, Tensor row_weight, "
      "float tau_s, float tau_t) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "distill_cross_entropy_backward(Tensor grad_pair_loss, Tensor student, Tensor teacher, Tensor centers, "
      "Tensor center_id, Tensor student_offsets, Tensor pair_teacher, Tensor pair_weight, Tensor student_lse, "
      "Tensor teacher_lse, float tau_s, float tau_t) -> Tensor");
}

TORCH_LIBRARY_IMPL(udi_kernels, CPU, m) {
  m.impl("distill_cross_entropy", &forward_cpu);
  m.impl("distill_cross_entropy_backward", &backward_cpu);
}

}  // namespace udi::distill_cross_entropy
