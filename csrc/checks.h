// The argument checks of every op's C++ and CUDA code, after flash-attention's CHECK_DEVICE / CHECK_SHAPE /
// CHECK_CONTIGUOUS: each error names the argument (a RuntimeError through TORCH_CHECK). The public ops check the
// same things in Python first (TypeError / ValueError); these keep a direct torch.ops call memory-safe. The
// UDI_CHECK_* macros name the argument after the variable they are given.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

namespace udi {

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType type) {
  TORCH_CHECK(t.scalar_type() == type, name, " must be ", type, ", got ", t.scalar_type());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be floating, got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have the dtype of ", like_name, " (",
              like.scalar_type(), "), got ", t.scalar_type());
}

// `layout` says the expected shape in words, e.g. "[rows, K]".
inline void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK(t.dim() == dim, name, " must have shape ", layout, ", got ", t.sizes());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef sizes) {
  TORCH_CHECK(t.sizes() == sizes, name, " must have shape ", sizes, ", got ", t.sizes());
}

// On the device of `like` (named like_name) and contiguous: what a kernel reading raw pointers needs.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.device() == like.device(), name, " must be on the device of ", like_name, " (", like.device(),
              "), got ", t.device());
  check_contiguous(t, name);
}

// A contiguous vector [length] of `type` on the device of `like`.
inline void check_vector(const at::Tensor& t, const char* name, at::ScalarType type, int64_t length,
                         const at::Tensor& like, const char* like_name) {
  check_shape(t, name, {length});
  check_dtype(t, name, type);
  check_like(t, name, like, like_name);
}

// A contiguous 2-d tensor of `type` on the device of `like`.
inline void check_matrix(const at::Tensor& t, const char* name, at::ScalarType type, const at::Tensor& like,
                         const char* like_name) {
  check_dim(t, name, 2, "[rows, columns]");
  check_dtype(t, name, type);
  check_like(t, name, like, like_name);
}

// The tensor a kernel of device type `type` was dispatched on is of that type.
inline void check_kernel_device(const at::Tensor& t, const char* name, c10::DeviceType type) {
  const std::string device = c10::DeviceTypeName(type);
  TORCH_CHECK(t.device().type() == type, name, " must be a ", device, " tensor for the ", device, " kernel");
}

// The dtypes of the CUDA kernels: float32, float16 or bfloat16.
inline void check_cuda_dtype(const at::Tensor& t, const char* name) {
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, name,
              " must be float32, float16 or bfloat16 for the CUDA kernel, got ", type);
}

// A size a CUDA kernel's launch geometry bounds (`what` names it, e.g. "centers n_c").
inline void check_cuda_limit(int64_t value, int64_t limit, const char* what) {
  TORCH_CHECK(value <= limit, "the CUDA kernel takes ", what, " <= ", limit, ", got ", value);
}

}  // namespace udi

#define UDI_CHECK_CONTIGUOUS(x) ::udi::check_contiguous(x, #x)
#define UDI_CHECK_DTYPE(x, type) ::udi::check_dtype(x, #x, type)
#define UDI_CHECK_FLOATING(x) ::udi::check_floating(x, #x)
#define UDI_CHECK_SHAPE(x, ...) ::udi::check_shape(x, #x, {__VA_ARGS__})
#define UDI_CHECK_LIKE(x, like) ::udi::check_like(x, #x, like, #like)
#define UDI_CHECK_VECTOR(x, type, length, like) ::udi::check_vector(x, #x, type, length, like, #like)
#define UDI_CHECK_MATRIX(x, type, like) ::udi::check_matrix(x, #x, type, like, #like)
#define UDI_CHECK_KERNEL_DEVICE(x, type) ::udi::check_kernel_device(x, #x, type)
#define UDI_CHECK_CUDA_DTYPE(x) ::udi::check_cuda_dtype(x, #x)
