// Reductions with a fixed summation order, shared by the CPU core and the CUDA kernels so both give
// bit-identical results: 8 interleaved partial sums (element t goes to lane t % 8), combined pairwise.
#pragma once

#include <cmath>

#include "hostdevice.h"

namespace d2r {

// a * b + c with one rounding, everywhere: the CPU (at every SIMD level, simd.h) and the GPU paths
// then round identically. Code compiled for FMA (the avx2 / avx512 levels, CUDA) gets the
// instruction; elsewhere it is the C library's fma (which uses the instruction where the CPU has
// it, and is exact without it).
D2R_HD double fma_if_fused(double a, double b, double c) { return fma(a, b, c); }

D2R_HD float fmaf_if_fused(float a, float b, float c) { return fmaf(a, b, c); }

D2R_HD double sum_squares(const double* v, int dim) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int t = 0;
  for (; t + 8 <= dim; t += 8)
    for (int l = 0; l < 8; ++l) acc[l] = fma_if_fused(v[t + l], v[t + l], acc[l]);
  for (int l = 0; t < dim; ++t, ++l) acc[l] = fma_if_fused(v[t], v[t], acc[l]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

}  // namespace d2r
