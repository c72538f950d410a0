// Exact nearest visual words (squared L2) with multiple assignment.
//
// A blocked product X C^T computed by a register-tiled SIMD micro-kernel over a pre-packed codebook,
// fused with a running top-(m + margin) selection, so the descriptors x words distance matrix is
// never materialised. The float32 candidates are then re-ranked with distances computed in double
// precision, ties broken by the lower word id: the result equals a float64 brute force whenever the
// true m nearest words are among the float32 top m + margin.
#pragma once

#include <cstdint>
#include <vector>

namespace d2r {

class Quantizer {
 public:
  // centroids: n_words x dim, row-major float32.
  Quantizer(const float* centroids, int64_t n_words, int dim);

  int64_t n_words() const { return n_words_; }
  int dim() const { return dim_; }
  const float* centroids() const { return centroids_.data(); }

  // x: n x dim float32. Writes the m nearest words (ascending distance, ties by lower id) to
  // ids (n x m) and their squared distances to dists (n x m; may be null). Multi-threaded.
  void search(const float* x, int64_t n, int m, int32_t* ids, float* dists) const;

  // Candidates kept by the float32 pass beyond m before the double-precision re-check.
  static constexpr int kMargin = 3;

 private:
  int64_t n_words_;
  int dim_;
  int64_t n_groups_;             // word groups of kGroup words
  std::vector<float> centroids_; // row-major copy (for the exact re-check)
  std::vector<float> packed_;    // [group][dim][kGroup]
  std::vector<float> norms_;     // ||c||^2 per padded word (+inf for padding)
};

}  // namespace d2r
