// Philox4x32-10 (Salmon et al., SC'11), the counter-based generator that Triton's
// tl.philox / tl.randint4x implement: key = (seed low 32 bits, seed high 32 bits),
// counter = (c0, c1, c2, c3). tl.randint4x(seed, offset) is philox4x32(seed, {offset, 0, 0, 0}).
#pragma once
#include <cstdint>

#include "host_device.h"

namespace udi {

struct Philox4 {
  uint32_t x[4];
};

UDI_HOST_DEVICE uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

UDI_HOST_DEVICE Philox4 philox4x32(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t old0 = c0, old2 = c2;
    c0 = mulhi32(kRoundB, old2) ^ c1 ^ k0;
    c2 = mulhi32(kRoundA, old0) ^ c3 ^ k1;
    c1 = kRoundB * old2;
    c3 = kRoundA * old0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return Philox4{{c0, c1, c2, c3}};
}

}  // namespace udi
