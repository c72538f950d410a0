// The baseline entry points of the dispatched kernels (simd.h): the Quantizer and the spatial
// verification functions forward to the active SIMD level's code.
#include <algorithm>
#include <limits>

#include "common.h"
#include "kernels.h"
#include "quantize.h"
#include "ransac.h"

namespace d2r {

// ---- Quantizer (quantize.h; the search itself: quantize.cpp) ------------------------------------

Quantizer::Quantizer(const float* centroids, int64_t n_words, int dim)
    : Quantizer(centroids, n_words, dim, simd::active()) {}

Quantizer::Quantizer(const float* centroids, int64_t n_words, int dim, simd::Level level)
    : n_words_(n_words), dim_(dim), level_(level) {
  D2R_CHECK(n_words > 0, "codebook must have at least one word");
  D2R_CHECK(n_words <= std::numeric_limits<int32_t>::max() - 1, "codebook has too many words");
  D2R_CHECK(dim > 0, "codebook dimension must be positive");
  const simd::Kernels& k = simd::kernels_for(level);
  centroids_.assign(centroids, centroids + n_words * dim);
  impl_ = k.make_quantizer(centroids_.data(), n_words, dim);
}

Quantizer::~Quantizer() = default;

void Quantizer::search(const float* x, int64_t n, int m, int32_t* ids, float* dists) const {
  D2R_CHECK(m >= 1, "multiple assignment m must be >= 1");
  D2R_CHECK(m <= n_words_, "multiple assignment m exceeds the number of visual words");
  if (n <= 0) return;
  impl_->search(x, n, m, ids, dists, counters_, policy_.load());
  counters_.rows += n;
}

Quantizer::Stats Quantizer::stats() const {
  Stats s;
  s.rows = counters_.rows.load();
  s.pairs = counters_.pairs.load();
  s.screened = counters_.screened.load();
  s.screened2 = counters_.screened2.load();
  s.full = counters_.full.load();
  s.fallback_rows = counters_.fallback_rows.load();
  s.plain_blocks = counters_.plain_blocks.load();
  s.pruned_blocks = counters_.pruned_blocks.load();
  s.screen_dims = impl_->screen_dims(0);
  s.screen_dims2 = impl_->screen_dims(1);
  s.dim = dim_;
  return s;
}

void Quantizer::reset_stats() const {
  counters_.rows = 0;
  counters_.pairs = 0;
  counters_.screened = 0;
  counters_.screened2 = 0;
  counters_.full = 0;
  counters_.fallback_rows = 0;
  counters_.plain_blocks = 0;
  counters_.pruned_blocks = 0;
}

// ---- spatial verification (ransac.h; the code: ransac.cpp) --------------------------------------

void nearest_neighbors(const float* q, int64_t nq, const float* db, int64_t ndb, int dim, int32_t* nn,
                       double* sq_dist, bool parallel) {
  simd::kernels().nearest_neighbors(q, nq, db, ndb, dim, nn, sq_dist, parallel);
}

int64_t match_descriptors(const float* q, int64_t nq, const float* db, int64_t ndb, int dim, double max_distance,
                          std::vector<int32_t>* q_idx, std::vector<int32_t>* db_idx, std::vector<float>* dist,
                          bool parallel) {
  return simd::kernels().match_descriptors(q, nq, db, ndb, dim, max_distance, q_idx, db_idx, dist, parallel);
}

int affine_ransac(const float* src_xy, const float* dst_xy, int64_t n, const RansacParams& params, float* best_model,
                  uint8_t* inlier_mask) {
  return simd::kernels().affine_ransac(src_xy, dst_xy, n, params, best_model, inlier_mask);
}

int affine_ransac_inliers(const float* src_xy, const float* dst_xy, int64_t n, float threshold, int max_trials,
                          uint64_t seed, float* best_model, uint8_t* inlier_mask) {
  RansacParams p;
  p.threshold = threshold;
  p.max_trials = max_trials;
  p.seed = seed;
  return affine_ransac(src_xy, dst_xy, n, p, best_model, inlier_mask);
}

void verify_many(const ImageFeatures* queries, int64_t n_queries, const ImageFeatures* images, int64_t n_images,
                 int dim, const int64_t* pairs, int64_t n_pairs, const VerifyParams& params, int32_t* inliers,
                 int32_t* n_matches) {
  simd::kernels().verify_many(queries, n_queries, images, n_images, dim, pairs, n_pairs, params, inliers, n_matches);
}

}  // namespace d2r
