// Sign binarisation and bit packing exactly like numpy.packbits(code > 0): most significant bit first,
// ceil(D/8) bytes per code, unused low bits of a partial last byte set to 0.
// Shared by the CPU core and the CUDA kernels.
#pragma once

#include <cstdint>

#include "hostdevice.h"

namespace d2r {

D2R_HD void pack_signs(const float* code, int dim, uint8_t* out) {
  const int n_bytes = (dim + 7) / 8;
  const int full = dim / 8;
  for (int b = 0; b < full; ++b) {  // branch-free for whole bytes
    unsigned byte = 0;
    for (int j = 0; j < 8; ++j) byte |= static_cast<unsigned>(code[8 * b + j] > 0.0f) << (7 - j);
    out[b] = static_cast<uint8_t>(byte);
  }
  for (int b = full; b < n_bytes; ++b) {
    uint8_t byte = 0;
    for (int j = 0; j < 8; ++j) {
      const int d = 8 * b + j;
      if (d < dim && code[d] > 0.0f) byte |= static_cast<uint8_t>(0x80u >> j);
    }
    out[b] = byte;
  }
}

D2R_HD int popcount64(uint64_t x) {
#if defined(__CUDA_ARCH__)
  return __popcll(x);
#else
  return __builtin_popcountll(x);
#endif
}

// Hamming distance between two packed codes of n_bytes bytes.
D2R_HD int hamming(const uint8_t* a, const uint8_t* b, int n_bytes) {
  int h = 0;
  int i = 0;
  for (; i + 8 <= n_bytes; i += 8) {
    uint64_t x = 0, y = 0;
    for (int j = 0; j < 8; ++j) {
      x |= static_cast<uint64_t>(a[i + j]) << (8 * j);
      y |= static_cast<uint64_t>(b[i + j]) << (8 * j);
    }
    h += popcount64(x ^ y);
  }
  for (; i < n_bytes; ++i) h += popcount64(static_cast<uint64_t>(a[i] ^ b[i]));
  return h;
}

}  // namespace d2r
