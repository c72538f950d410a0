// The dispatched kernels (simd.h): their shared argument types, and, inside a dispatched source
// (D2R_SIMD_LEVEL defined), their declarations in the level's namespace.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "simd.h"

namespace d2r {

// One decoded posting block against one query entry (InvertedFile::score_block): for the postings
// i in [begin, end), acc[uint32(slots[i] - base)] += the fixed-point contribution of (query,
// codes + i code_bytes). 16-byte binary codes take the scan's kernels instead (scan.h, ScanKernels::bin16).
struct ScoreBlock {
  const uint8_t* query;   // the query entry's code: code_bytes bytes (binary), or dim floats
  const uint8_t* codes;   // the block's codes, code_bytes each, unaligned
  const uint32_t* slots;  // the block's decoded (local) slots
  int begin, end;
  uint32_t base;          // the local slot of acc[0] (modulo 2^32)
  int code_bytes, dim;
  int64_t* acc;
};

}  // namespace d2r

#ifdef D2R_SIMD_LEVEL
#include "simd_level.h"

namespace d2r {
namespace D2R_SIMD_NS {

// quantize.cpp
std::unique_ptr<QuantizerImpl> make_quantizer(const float* centroids, int64_t n_words, int dim);

// ivf_kernels.cpp
double sum_squares(const double* v, int dim);
void score_block_binary(const ScoreBlock& b, const int64_t* table);
void score_block_float(const ScoreBlock& b, float alpha, float tau, float limit);

// ransac.cpp
void nearest_neighbors(const float* q, int64_t nq, const float* db, int64_t ndb, int dim, int32_t* nn,
                       double* sq_dist, bool parallel);
int64_t match_descriptors(const float* q, int64_t nq, const float* db, int64_t ndb, int dim, double max_distance,
                          std::vector<int32_t>* q_idx, std::vector<int32_t>* db_idx, std::vector<float>* dist,
                          bool parallel);
int affine_ransac(const float* src_xy, const float* dst_xy, int64_t n, const RansacParams& params,
                  float* best_model, uint8_t* inlier_mask);
void verify_many(const ImageFeatures* queries, int64_t n_queries, const ImageFeatures* images, int64_t n_images,
                 int dim, const int64_t* pairs, int64_t n_pairs, const VerifyParams& params, int32_t* inliers,
                 int32_t* n_matches);

}  // namespace D2R_SIMD_NS

namespace simd {
extern const Kernels D2R_SIMD_TABLE;  // simd_table.cpp
}  // namespace simd
}  // namespace d2r
#endif
