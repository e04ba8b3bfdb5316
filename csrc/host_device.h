// Helpers for code compiled both by the host C++ compiler and by nvcc.
#pragma once

#if defined(__CUDACC__)
#define UDI_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define UDI_HOST_DEVICE inline
#endif

namespace udi {

// Correctly rounded float arithmetic that no compiler may contract into an FMA, so that
// host, device and Triton (which launches with enable_fp_fusion=False) agree bit for bit.
UDI_HOST_DEVICE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
UDI_HOST_DEVICE float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
UDI_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
UDI_HOST_DEVICE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

}  // namespace udi
