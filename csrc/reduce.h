// Reductions with a fixed summation order, shared by the CPU core and the CUDA kernels so both give
// bit-identical results: 8 interleaved partial sums (element t goes to lane t % 8), combined pairwise.
#pragma once

#include <cmath>

#include "hostdevice.h"

namespace d2r {

// a * b + c, fused wherever the hardware fuses (CUDA, x86 with FMA): the CPU and GPU paths then round
// identically. Without hardware FMA (a portable build) it is a multiply then an add.
D2R_HD double fma_if_fused(double a, double b, double c) {
#if defined(__CUDA_ARCH__) || defined(__FMA__) || defined(__aarch64__)
  return fma(a, b, c);
#else
  return a * b + c;
#endif
}

D2R_HD float fmaf_if_fused(float a, float b, float c) {
#if defined(__CUDA_ARCH__) || defined(__FMA__) || defined(__aarch64__)
  return fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

D2R_HD double sum_squares(const double* v, int dim) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int t = 0;
  for (; t + 8 <= dim; t += 8)
    for (int l = 0; l < 8; ++l) acc[l] = fma_if_fused(v[t + l], v[t + l], acc[l]);
  for (int l = 0; t < dim; ++t, ++l) acc[l] = fma_if_fused(v[t], v[t], acc[l]);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

}  // namespace d2r
