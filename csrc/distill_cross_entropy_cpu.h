// What the CPU kernels of udi_kernels::distill_cross_entropy (csrc/distill_cross_entropy_forward.cpp) and its
// backward (csrc/distill_cross_entropy_backward.cpp) share: the chunk plan, the rows as raw pointers, the scratch of
// a task and the center statistics.
//
// The CPU kernels form every exponent's argument in double from the inputs (x − max, u − lse: exact at any logit
// magnitude), then take the exp in the exponent type E of the inputs: float for float32 / float16 / bfloat16 logits
// (16 lanes with AVX-512, at::vec's exp_u20: <= 20 ulp), double for float64 ones (Sleef, 1 ulp). Rounding the
// non-positive argument to float costs at most e^-1 * 6e-8 of the largest term, whatever the logits' magnitude.
// Per-chunk sums accumulate in E lanes and are combined in double. K is cut into chunks of a fixed width
// (chunk_width: it depends on the shapes only); one parallel task per chunk reads the chunk of every teacher row
// once (exp'd into a scratch of Rt x chunk) and then the chunk of every student row once. Each task writes its own
// partials, which are combined per row in chunk order: the results do not depend on the number of threads and
// repeat bit for bit.
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "distill_cross_entropy_op.h"
#include "row_kernels.h"

namespace udi::distill_cross_entropy {

template <typename student_t, typename teacher_t>
using exp_type = std::conditional_t<std::is_same_v<student_t, double> || std::is_same_v<teacher_t, double>, double,
                                    float>;

// 512 columns, halved (down to 128) while the teacher scratch of a task exceeds 4 MiB.
inline int64_t chunk_width(int64_t teacher_rows) {
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

// Everything a CPU kernel reads, as raw pointers; the logits keep their dtypes.
template <typename student_t, typename teacher_t>
struct Rows : PairArgs<double> {
  const student_t* student;
  const teacher_t* teacher;

  // Teacher row `row` of a chunk, then the student rows in turn: each prefetches the next while it is worked on.
  void prefetch_teacher(int64_t row, int64_t first, int64_t n) const {
    if (row < num_teacher_rows) row_kernels::prefetch(teacher + row * K + first, n);
  }
  void prefetch_student(int64_t row, int64_t Rs, int64_t first, int64_t n) const {
    if (row < Rs) row_kernels::prefetch(student + row * K + first, n);
  }
  // u = (t - c) / τt of teacher row `row`, columns [first, first + n).
  void centered(int64_t row, int64_t first, int64_t n, double* u) const {
    row_kernels::centered_row(teacher + row * K + first, centers + center_id[row] * K + first, inv_tau_t, n, u);
  }
  // max_k s / τs of student row `row` over columns [first, first + n): the scaling is monotone, so the max of the
  // scaled row is the scaled max of the row.
  double student_max(int64_t row, int64_t first, int64_t n) const {
    return row_kernels::row_max(student + row * K + first, n) * inv_tau_s;
  }
  // a = s / τs - shift of student row `row`, columns [first, first + n), rounded to E.
  template <typename E>
  void student_exponents(int64_t row, int64_t first, int64_t n, double shift, E* a) const {
    row_kernels::scaled_shifted(student + row * K + first, inv_tau_s, shift, n, a);
  }
  double pair_scale(int64_t slot, const double* grad_pair_loss) const {
    return pair_counts(*this, slot) ? pair_weight[slot] * grad_pair_loss[slot] : 0.0;
  }
};

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

inline void center_counts(const int64_t* center_offsets, const int64_t* center_rows, const double* row_weight,
                          int64_t n_c, int64_t Rt, double* center_count) {
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

inline at::Tensor as_double(const at::Tensor& t) { return t.to(at::kDouble).contiguous(); }

#define UDI_DISPATCH_LOGITS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

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

}  // namespace udi::distill_cross_entropy
