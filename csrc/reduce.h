// Reductions with a fixed summation order, shared by the CPU core and the CUDA kernels so both give
// bit-identical results: 8 interleaved partial sums (element t goes to lane t % 8), combined pairwise.
#pragma once

#include "hostdevice.h"

namespace d2r {

D2R_HD double sum_squares(const double* v, int dim) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int t = 0;
  for (; t + 8 <= dim; t += 8)
    for (int l = 0; l < 8; ++l) acc[l] += v[t + l] * v[t + l];
  for (int l = 0; t < dim; ++t, ++l) acc[l] += v[t] * v[t];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

}  // namespace d2r
