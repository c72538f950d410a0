// Score accumulation in 64-bit fixed point, shared by the CPU core and the CUDA kernels.
//
// Each per-word contribution sigma(u) is rounded once to a multiple of 2^-32 and the contributions
// are summed as integers, so a score does not depend on the order of the additions: the CPU (posting
// lists scanned in query-word order) and the GPU (posting lists scanned in parallel, integer atomics)
// give bit-identical scores, and two images with the same contributions get exactly the same score
// (ties then break by the lower image id on both paths). |sigma| <= 1, so a sum of up to 2^31
// contributions stays exact.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "hostdevice.h"

namespace d2r {

constexpr double kScoreScale = 4294967296.0;  // 2^32

D2R_HD int64_t score_to_fixed(float c) { return static_cast<int64_t>(llrint(static_cast<double>(c) * kScoreScale)); }

D2R_HD float score_from_fixed(int64_t a) {
  return static_cast<float>(static_cast<double>(a) * (1.0 / kScoreScale));
}

// Order-preserving map of a float score to an unsigned key (larger score, larger key).
D2R_HD uint32_t score_order_key(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

D2R_HD float score_from_order_key(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

}  // namespace d2r
