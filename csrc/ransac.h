// Spatial verification for re-ranking (the DELF / Detect-to-Retrieve re-ranking step):
//
//   1. putative matches: each query descriptor is matched to its nearest database-image descriptor
//      (brute force, squared Euclidean distance, a blocked SIMD product fused with the arg-min, so the
//      n_query x n_db distance matrix is never stored); the match is kept when the distance is
//      < max_distance (0.9 in the official code, where descriptors have unit L2 norm);
//   2. affine RANSAC on the matched locations: 3-point minimal samples, residual threshold 10 px,
//      1000 trials; the score is the inlier count of the best hypothesis.
//
// Everything is deterministic: a fixed pseudo-random generator (xoshiro256** seeded by splitmix64)
// whose stream depends only on `seed` (the same on every platform), and results that do not depend
// on the number of threads. Builds for different instruction sets (FMA contraction, vector width)
// can only differ for points or descriptors within float rounding of a threshold or a tie.
//
// Relation to the official code (tensorflow/models research/delf/.../image_reranking.py, which
// calls scipy's cKDTree and skimage.measure.ransac(AffineTransform, min_samples=3,
// residual_threshold=10, max_trials=1000)):
//   * same nearest-neighbour rule (query -> database image, no ratio test, distance < threshold,
//     several query features may match one database feature); the nearest neighbour is found in
//     float32 (ties -> lower index) and its distance is then recomputed in double for the threshold;
//   * same direction: the model maps database-image points (src) to query points (dst);
//   * same RANSAC loop: a trial = one random 3-subset (distinct indices); inliers are points with
//     residual ||A src + t - dst|| < threshold (strict); a hypothesis replaces the best one when it has
//     more inliers, or as many and a smaller sum of squared residuals over all points; skimage's
//     early stop is reproduced (after a new best at 0-based trial t, stop when
//     t >= ceil(log(max(eps, 1 - p)) / log(max(eps, 1 - (inliers / n)^3))), p = stop_probability,
//     default 1 as in skimage); the inlier count and mask are those of the best hypothesis, and the
//     returned model is refitted by least squares on that hypothesis' inliers (skimage does the same,
//     without re-classifying the points after the refit);
//   * differences: the random stream is not numpy's, so individual results differ from skimage's
//     run-to-run results (which are not reproducible in the official code: it passes no seed);
//     degenerate minimal samples (source or destination triangle collinear or with repeated points)
//     are skipped, while still counting as a trial (skimage fits them anyway and may keep a
//     singular model); residuals are computed in float32 (skimage: float64), so points within about
//     1e-4 px of the threshold may be classified differently; the refit is ordinary least squares in
//     double precision (skimage: a total-least-squares SVD solution; equal on exact data).
#pragma once

#include <cstdint>
#include <vector>

namespace d2r {

// ---- nearest neighbours -------------------------------------------------------------------------

// For each of the nq query rows (q: nq x dim, row-major), the index of its nearest database row
// (db: ndb x dim) in squared Euclidean distance, ties to the lower index, or -1 when ndb == 0;
// sq_dist (may be null) receives that squared distance computed in double precision.
// `parallel`: split the query rows over the OpenMP threads (results do not depend on it).
void nearest_neighbors(const float* q, int64_t nq, const float* db, int64_t ndb, int dim, int32_t* nn,
                       double* sq_dist, bool parallel = true);

// DELF putative matches: pairs (i, nn(i)) whose distance is < max_distance, in increasing query
// index i. Returns the number of matches; fills q_idx, db_idx and dist (each may be null).
int64_t match_descriptors(const float* q, int64_t nq, const float* db, int64_t ndb, int dim, double max_distance,
                          std::vector<int32_t>* q_idx, std::vector<int32_t>* db_idx, std::vector<float>* dist,
                          bool parallel = true);

// ---- affine RANSAC --------------------------------------------------------------------------------

struct RansacParams {
  float threshold = 10.0f;        // residual threshold (pixels), inliers have residual < threshold
  int max_trials = 1000;          // number of random minimal samples drawn (degenerate ones included)
  uint64_t seed = 0;              // the whole result is a function of the inputs and this seed
  double stop_probability = 1.0;  // skimage's early stop rule; negative: never stop early
};

// src_xy, dst_xy: n points each, interleaved (x, y). Returns the inlier count of the best hypothesis
// (0 when n < 3 or no non-degenerate sample was drawn). best_model (may be null) receives the 2 x 3
// matrix [[a, b, c], [d, e, f]], dst ~ (a x + b y + c, d x + e y + f), refitted by least squares on
// the inliers, or NaNs when there is no model; inlier_mask (may be null) receives n flags (0/1).
int affine_ransac(const float* src_xy, const float* dst_xy, int64_t n, const RansacParams& params,
                  float* best_model, uint8_t* inlier_mask);

// Same, with skimage's default early stop (stop_probability = 1).
int affine_ransac_inliers(const float* src_xy, const float* dst_xy, int64_t n, float threshold, int max_trials,
                          uint64_t seed, float* best_model /*2x3, may be null*/, uint8_t* inlier_mask /*may be null*/);

// ---- batched verification -------------------------------------------------------------------------

// Local features of one image: n descriptors (n x dim, row-major) and their locations (n x 2, (x, y)).
struct ImageFeatures {
  const float* descriptors = nullptr;
  const float* xy = nullptr;
  int64_t n = 0;
};

struct VerifyParams {
  double max_distance = 0.9;  // descriptor distance threshold for a putative match (strict)
  int min_matches = 4;        // fewer putative matches -> 0 inliers (official: "<= 3 matches -> 0")
  RansacParams ransac;        // every pair uses ransac.seed, as the official code uses one seed
};

// For each pair p = (pairs[2p], pairs[2p+1]) = (query image, database image): putative matches, then
// affine RANSAC (src = database points, dst = query points). inliers[p] receives the score and
// n_matches[p] (may be null) the number of putative matches. Pairs run in parallel (OpenMP); with
// fewer pairs than twice the threads, the matching of each pair is split over the threads instead.
// Results do not depend on the number of threads.
void verify_many(const ImageFeatures* queries, int64_t n_queries, const ImageFeatures* images, int64_t n_images,
                 int dim, const int64_t* pairs, int64_t n_pairs, const VerifyParams& params, int32_t* inliers,
                 int32_t* n_matches);

}  // namespace d2r
