// Inverted-file scoring kernels and the aggregation's squared norm (a dispatched source: compiled
// once per SIMD level with -ffp-contract=off, simd.h). InvertedFile::score_slots (ivf.cpp) decodes
// the posting blocks (scan.h) and InvertedFile::score_block calls score_block_* once per (block, query
// entry) for the codes the scan's kernels do not take (binary codes of other widths than 16 bytes,
// float codes). No other copy of these loops exists.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "binarize.h"
#include "common.h"
#include "fixed_point.h"
#include "kernels.h"
#include "reduce.h"
#include "selectivity.h"

D2R_SIMD_BEGIN
namespace d2r {
namespace D2R_SIMD_NS {

namespace {

inline float dot(const float* a, const uint8_t* braw, int dim) {
  // Codes sit unaligned in the compressed blocks: loaded through memcpy.
  float s = 0.0f;
  for (int t = 0; t < dim; ++t) {
    float b;
    std::memcpy(&b, braw + sizeof(float) * t, sizeof(float));
    s = fmaf_if_fused(a[t], b, s);  // as the GPU scoring rounds
  }
  return s;
}

}  // namespace

double sum_squares(const double* v, int dim) { return d2r::sum_squares(v, dim); }

void score_block_binary(const ScoreBlock& b, const int64_t* table) {
  // Any code width (16 bytes, the default, goes to the scan's kernels: scan.h).
  const uint8_t* qc = b.query;
  int64_t* acc = b.acc;
  const int cb = b.code_bytes;
  for (int i = b.begin; i < b.end; ++i)
    acc[static_cast<uint32_t>(b.slots[i] - b.base)] += table[hamming(qc, b.codes + static_cast<size_t>(i) * cb, cb)];
}

void score_block_float(const ScoreBlock& b, float alpha, float tau, float limit) {
  float qv[1024];
  const float* qf = reinterpret_cast<const float*>(b.query);
  if (b.dim <= 1024) {
    std::memcpy(qv, b.query, sizeof(float) * b.dim);
    qf = qv;
  }
  int64_t* acc = b.acc;
  for (int i = b.begin; i < b.end; ++i) {
    const float cc = selectivity(dot(qf, b.codes + static_cast<size_t>(i) * b.code_bytes, b.dim), alpha, tau);
    if (!(std::fabs(cc) <= limit))
      throw InvalidArgument("score contribution out of the fixed-point range (codes far from unit length)");
    acc[static_cast<uint32_t>(b.slots[i] - b.base)] += score_to_fixed(cc);
  }
}

}  // namespace D2R_SIMD_NS
}  // namespace d2r
D2R_SIMD_END
