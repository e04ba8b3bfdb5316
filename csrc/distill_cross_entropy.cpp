// udi_kernels::distill_cross_entropy / distill_cross_entropy_backward: schemas, argument checks and the CPU kernels
// (vectorised, in double, one parallel task per K chunk; plan above `chunk_width`).
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

// The CPU kernels compute in double, vectorised with at::vec (AVX2 where setup.py builds for it), so that their
// float32 results are the float64 ones rounded. K is cut into chunks of a fixed width (chunk_width: it depends on
// the shapes only); one parallel task per chunk reads the chunk of every teacher row once (exp'd into a scratch of
// Rt x chunk doubles) and then the chunk of every student row once. Each task writes its own partials, which are
// combined per row in chunk order: the results do not depend on the number of threads and repeat bit for bit.
using Vec = at::vec::Vectorized<double>;
constexpr int64_t kLanes = Vec::size();
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

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

// f(offset, lanes) for each vector of a span of n columns; lanes < kLanes for the last one only.
template <typename F>
C10_ALWAYS_INLINE void for_each_vector(int64_t n, const F& f) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) f(j, kLanes);
  if (j < n) f(j, n - j);
}

// The first `lanes` lanes of v, `fill` in the others.
Vec first_lanes(const Vec& v, int64_t lanes, double fill) {
  return lanes == kLanes ? v : Vec::set(Vec(fill), v, lanes);
}

// Lane reductions in lane order. lane_max keeps a NaN.
double lane_sum(const Vec& v) {
  alignas(64) double values[kLanes];
  v.store(values);
  double sum = 0;
  for (int64_t i = 0; i < kLanes; ++i) sum += values[i];
  return sum;
}

double lane_max(const Vec& v) {
  alignas(64) double values[kLanes];
  v.store(values);
  double max = values[0];
  for (int64_t i = 1; i < kLanes; ++i) max = (values[i] > max || std::isnan(values[i])) ? values[i] : max;
  return max;
}

// Conversions and elementwise arithmetic are plain loops, which the compiler vectorises (no reassociation needed);
// the reductions and exp use at::vec.

// u[k] = (row[k] - center[k]) * scale for k < n.
template <typename T>
void centered_row(const T* row, const double* center, double scale, int64_t n, double* u) {
  for (int64_t k = 0; k < n; ++k) u[k] = (static_cast<double>(row[k]) - center[k]) * scale;
}

// u[k] = row[k] * scale for k < n.
template <typename T>
void scaled_row(const T* row, double scale, int64_t n, double* u) {
  for (int64_t k = 0; k < n; ++k) u[k] = static_cast<double>(row[k]) * scale;
}

double max_of(const double* u, int64_t n) {
  Vec max(kNegInf);
  for_each_vector(n, [&](int64_t j, int64_t lanes) {
    max = at::vec::maximum(max, first_lanes(Vec::loadu(u + j, lanes), lanes, kNegInf));
  });
  return lane_max(max);
}

// u[k] <- exp(u[k] - shift) for k < n; returns their sum.
double exp_in_place(double* u, int64_t n, double shift) {
  Vec sum(0);
  for_each_vector(n, [&](int64_t j, int64_t lanes) {
    const Vec e = first_lanes((Vec::loadu(u + j, lanes) - Vec(shift)).exp(), lanes, 0);
    e.store(u + j, lanes);
    sum = sum + e;
  });
  return lane_sum(sum);
}

double exp_sum(const double* u, int64_t n, double shift) {
  Vec sum(0);
  for_each_vector(n, [&](int64_t j, int64_t lanes) {
    sum = sum + first_lanes((Vec::loadu(u + j, lanes) - Vec(shift)).exp(), lanes, 0);
  });
  return lane_sum(sum);
}

// Σ_k p[k] (max - x[k]) for k < n: every term >= 0 where p >= 0 and x <= max.
double gap(const double* p, const double* x, double max, int64_t n) {
  Vec sum(0);
  for_each_vector(n, [&](int64_t j, int64_t lanes) {
    sum = sum + first_lanes(Vec::loadu(p + j, lanes) * (Vec(max) - Vec::loadu(x + j, lanes)), lanes, 0);
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

  // u = (t - c) / τt of teacher row `row`, columns [first, first + n).
  void centered(int64_t row, int64_t first, int64_t n, double* u) const {
    centered_row(teacher + row * K + first, centers + center_id[row] * K + first, inv_tau_t, n, u);
  }
  // x = s / τs of student row `row`, columns [first, first + n).
  void scaled_student(int64_t row, int64_t first, int64_t n, double* x) const {
    scaled_row(student + row * K + first, inv_tau_s, n, x);
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

// One chunk of the forward: the teacher rows' (max, Σ exp) with exp(u - max) kept in `scratch` [Rt, width], then
// per student row its (max, Σ exp) and, per pair of it, Σ exp(u - max_t) (max_s - x).
template <typename student_t, typename teacher_t>
void forward_chunk(const Rows<student_t, teacher_t>& rows, int64_t Rs, const Chunks& chunks, int64_t chunk,
                   double* scratch, double* x, ForwardPartials& out) {
  const int64_t first = chunks.first(chunk), n = chunks.columns(chunk), count = chunks.count;
  for (int64_t r = 0; r < rows.num_teacher_rows; ++r) {
    if (!teacher_row_ok(rows, r)) continue;  // no pair reads it
    double* e = scratch + r * chunks.width;
    rows.centered(r, first, n, e);
    const double max = max_of(e, n);
    out.teacher_max[r * count + chunk] = max;
    out.teacher_sum[r * count + chunk] = exp_in_place(e, n, max);
  }
  for (int64_t r = 0; r < Rs; ++r) {
    rows.scaled_student(r, first, n, x);
    const double max = max_of(x, n);
    out.student_max[r * count + chunk] = max;
    out.student_sum[r * count + chunk] = exp_sum(x, n, max);
    const SlotRange slots = csr_slots(rows.student_offsets, r, rows.num_pairs);
    for (int64_t slot = slots.first; slot < slots.last; ++slot) {
      if (pair_counts(rows, slot))
        out.pair_gap[slot * count + chunk] = gap(scratch + rows.pair_teacher[slot] * chunks.width, x, max, n);
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
    std::vector<double> scratch((Rt + 1) * chunks.width);
    double* x = scratch.data() + Rt * chunks.width;
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      forward_chunk(rows, Rs, chunks, chunk, scratch.data(), x, parts);
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

// One chunk of the backward: p_t = exp(u - lse_t) of every teacher row into `scratch` [Rt, width], then per student
// row grad = (Σ_p g_p w_p · softmax(x) - Σ_p g_p w_p · p_t) / τs, written once.
template <typename student_t, typename teacher_t>
void backward_chunk(const Rows<student_t, teacher_t>& rows, int64_t Rs, const Chunks& chunks, int64_t chunk,
                    const double* grad_pair_loss, const double* student_lse, const double* teacher_lse,
                    double* scratch, double* acc, student_t* grad_student) {
  const int64_t first = chunks.first(chunk), n = chunks.columns(chunk), K = rows.K;
  for (int64_t r = 0; r < rows.num_teacher_rows; ++r) {
    if (!teacher_row_ok(rows, r)) continue;
    double* p = scratch + r * chunks.width;
    rows.centered(r, first, n, p);
    exp_in_place(p, n, teacher_lse[r]);
  }
  for (int64_t r = 0; r < Rs; ++r) {
    student_t* out = grad_student + r * K + first;
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
    rows.scaled_student(r, first, n, acc);
    exp_in_place(acc, n, student_lse[r]);
    for (int64_t k = 0; k < n; ++k) acc[k] *= total;
    for (int64_t slot = slots.first; slot < slots.last; ++slot) {
      const double scale = rows.pair_scale(slot, grad_pair_loss);
      if (scale == 0) continue;
      const double* p = scratch + rows.pair_teacher[slot] * chunks.width;
      for (int64_t k = 0; k < n; ++k) acc[k] -= scale * p[k];
    }
    for (int64_t k = 0; k < n; ++k) out[k] = static_cast<student_t>(acc[k] * rows.inv_tau_s);
  }
}

template <typename student_t, typename teacher_t>
void backward_rows(const Rows<student_t, teacher_t>& rows, int64_t Rs, const double* grad_pair_loss,
                   const double* student_lse, const double* teacher_lse, student_t* grad_student) {
  const int64_t Rt = rows.num_teacher_rows;
  const Chunks chunks(rows.K, Rt);
  at::parallel_for(0, chunks.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> scratch((Rt + 1) * chunks.width);
    double* acc = scratch.data() + Rt * chunks.width;
    for (int64_t chunk = begin; chunk < end; ++chunk)
      backward_chunk(rows, Rs, chunks, chunk, grad_pair_loss, student_lse, teacher_lse, scratch.data(), acc,
                     grad_student);
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
