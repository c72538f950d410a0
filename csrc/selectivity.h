// The thresholded polynomial selectivity function and the similarity mappings (METHOD.md section 4).
// Shared by the CPU core and the CUDA kernels: the arithmetic must be identical on both.
#pragma once

#include <cmath>
#include <cstdint>

#include "hostdevice.h"

namespace d2r {

// sigma(u) = sign(u) * |u|^alpha if u > tau else 0
D2R_HD float selectivity(float u, float alpha, float tau) {
  if (!(u > tau)) return 0.0f;
  float a = fabsf(u);
  // alpha = 3 (the default) exactly by products; otherwise pow in double, rounded once to float, so
  // the CPU's and CUDA's pow (both well under a float ulp in double) give the same float.
  float p = (alpha == 3.0f) ? a * a * a : static_cast<float>(pow(static_cast<double>(a), static_cast<double>(alpha)));
  return u < 0.0f ? -p : p;
}

// Binary similarity from a Hamming distance: u = 1 - 2 h / denom, where the official denominator is
// min(D, 8) * n_bytes (== D whenever D is a multiple of 8).
D2R_HD int hamming_denominator(int dim, int n_bytes) { return (dim < 8 ? dim : 8) * n_bytes; }

D2R_HD float hamming_similarity(int h, int denom) {
  return 1.0f - 2.0f * static_cast<float>(h) / static_cast<float>(denom);
}

// gamma(X) * gamma(Y) = 1 / sqrt(|W_X| * |W_Y|)  (the official implementation's word-count form)
D2R_HD float gamma_pair(int64_t n_words_x, int64_t n_words_y) {
  return static_cast<float>(1.0 / sqrt(static_cast<double>(n_words_x) * static_cast<double>(n_words_y)));
}

}  // namespace d2r
