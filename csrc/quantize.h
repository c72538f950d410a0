// Exact nearest visual words (squared L2) with multiple assignment.
//
// A blocked product X C^T computed by a register-tiled SIMD micro-kernel over a pre-packed codebook,
// fused with a running top-(m + margin) selection, so the descriptors x words distance matrix is
// never materialised. The float32 candidates are then re-ranked with distances computed in double
// precision, ties broken by the lower word id, and the result is certified: a rigorous bound on the
// float32 error proves that no word outside the candidates can be among the m nearest; a row that
// the bound cannot certify (near-ties, duplicate words) is redone by a threshold scan that is exact
// by construction. The result therefore always equals a float64 brute force (ties to the lower id).
//
// Large codebooks (>= kMinPruneWords words) are searched with exact pruning (see quantize.cpp):
// the codebook is rotated onto its principal axes and ordered by a coarse k-means; every
// (descriptor tile, word panel) product first accumulates the leading rotated dimensions, which give
// a lower bound on each distance (two levels: 12, then 32 dimensions); the remaining dimensions are
// computed only for the descriptors where some word of the panel can still beat an upper bound on the
// m-th nearest distance. A codebook where this does not pay (not clustered) falls back to the full
// product.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "simd.h"

namespace d2r {

// Work counters of a Quantizer (Quantizer::Stats documents them).
struct QuantizerCounters {
  std::atomic<int64_t> rows{0}, pairs{0}, screened{0}, screened2{0}, full{0}, fallback_rows{0}, plain_blocks{0},
      pruned_blocks{0};
};

// Whether a search uses the pruning structure (large codebooks; quantize.cpp): kAuto (the default)
// prunes until the first searches (at least 1,000 descriptors) have shown whether the pruning pays:
// when it did more than 25 % of the full product's multiply-adds (a codebook with little cluster
// structure, e.g. words sampled from clustered descriptors) every later search runs the exact
// fused product instead. kAlways / kNever force it.
// The results are the same either way (exact); only the speed differs.
enum class PrunePolicy : int { kAuto = 0, kAlways = 1, kNever = 2 };

// The search structure of one SIMD level (quantize.cpp, compiled once per level; simd.h).
class QuantizerImpl {
 public:
  virtual ~QuantizerImpl() = default;
  virtual void search(const float* x, int64_t n, int m, int32_t* ids, float* dists, QuantizerCounters& c,
                      PrunePolicy policy) const = 0;
  virtual bool pruning_enabled() const = 0;
  // kAuto's verdict: -1 not decided yet (or no pruning structure), 0 the full product, 1 pruning.
  virtual int prune_decision() const = 0;
  virtual int screen_dims(int bound) const = 0;  // bound 0 or 1; 0 without pruning
};

class Quantizer {
 public:
  // centroids: n_words x dim, row-major float32. The search runs at the active SIMD level
  // (simd::active()), or at `level` (tests compare the levels in one process).
  Quantizer(const float* centroids, int64_t n_words, int dim);
  Quantizer(const float* centroids, int64_t n_words, int dim, simd::Level level);
  ~Quantizer();
  Quantizer(const Quantizer&) = delete;
  Quantizer& operator=(const Quantizer&) = delete;

  int64_t n_words() const { return n_words_; }
  int dim() const { return dim_; }
  const float* centroids() const { return centroids_.data(); }
  simd::Level level() const { return level_; }

  // x: n x dim float32. Writes the m nearest words (ascending distance, ties by lower id) to
  // ids (n x m) and their squared distances to dists (n x m; may be null). Multi-threaded.
  void search(const float* x, int64_t n, int m, int32_t* ids, float* dists) const;

  // Candidates kept by the float32 pass beyond m before the double-precision re-check.
  static constexpr int kMargin = 3;
  // Codebooks with at least this many words (and dim >= 48) get the pruning structure.
  static constexpr int64_t kMinPruneWords = 4096;

  // Work counters, accumulated over all searches since construction / reset_stats() (for
  // benchmarks). pairs: descriptor x word pairs asked; screened / screened2: pairs whose first
  // screen_dims / screen_dims2 dimensions were computed for the lower bounds; full: pairs whose
  // whole product was computed; fallback_rows:
  // rows redone by the certified threshold scan; plain_blocks / pruned_blocks: blocks searched
  // without / with pruning.
  struct Stats {
    int64_t rows = 0, pairs = 0, screened = 0, screened2 = 0, full = 0, fallback_rows = 0, plain_blocks = 0,
            pruned_blocks = 0;
    int screen_dims = 0, screen_dims2 = 0, dim = 0;
  };
  Stats stats() const;
  void reset_stats() const;
  bool pruning_enabled() const { return impl_->pruning_enabled(); }
  PrunePolicy prune_policy() const { return policy_.load(); }
  void set_prune_policy(PrunePolicy p) { policy_.store(p); }
  int prune_decision() const { return impl_->prune_decision(); }

 private:
  int64_t n_words_;
  int dim_;
  simd::Level level_;
  std::vector<float> centroids_;  // row-major copy
  std::unique_ptr<QuantizerImpl> impl_;
  std::atomic<PrunePolicy> policy_{PrunePolicy::kAuto};
  mutable QuantizerCounters counters_;
};

}  // namespace d2r
