#include "quantize.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "common.h"
#include "parallel.h"
#include "reduce.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace d2r {
namespace {

// 16 float lanes; GCC/Clang lower this to one zmm register with AVX-512, two ymm with AVX2.
typedef float vf __attribute__((vector_size(64)));
constexpr int kLanes = 16;
constexpr int kGroup = 2 * kLanes;  // words per packed group (two vectors)
constexpr int kRows = 8;            // descriptors per register tile
constexpr int kMaxBlockRows = 96;   // descriptors per cache block at most (a multiple of kRows)

// Unaligned load of kLanes floats, into an out-parameter: a function returning a 64-byte vector by
// value draws GCC's -Wpsabi warning on targets without AVX-512.
inline void load(vf& v, const float* p) { std::memcpy(&v, p, sizeof(vf)); }

// acc[i][0..1] = x_i . c_{group words}, for kRows descriptors (row-major, stride dim) and one
// packed group ([dim][kGroup]).
inline void dot_tile(const float* __restrict x, const float* __restrict group, int dim,
                     vf acc[kRows][2]) {
  for (int i = 0; i < kRows; ++i) acc[i][0] = acc[i][1] = vf{};
  for (int d = 0; d < dim; ++d) {
    vf b0, b1;
    load(b0, group + d * kGroup);
    load(b1, group + d * kGroup + kLanes);
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) {
      const float a = x[i * dim + d];
      acc[i][0] += a * b0;
      acc[i][1] += a * b1;
    }
  }
}

inline bool any_below(const vf& a, const vf& b, float thr) {
#if defined(__AVX512F__)
  const __m512 t = _mm512_set1_ps(thr);
  return (_mm512_cmp_ps_mask((__m512)a, t, _CMP_LT_OQ) | _mm512_cmp_ps_mask((__m512)b, t, _CMP_LT_OQ)) != 0;
#else
  bool any = false;
  for (int l = 0; l < kLanes; ++l) any |= (a[l] < thr) | (b[l] < thr);
  return any;
#endif
}

// A sorted list of the best `cap` (distance, id) pairs; ids arrive in increasing order, so a strict
// comparison keeps the lower id on exact ties.
struct TopList {
  float* d;
  int32_t* id;
  int cap;
  void reset() {
    std::fill(d, d + cap, std::numeric_limits<float>::infinity());
    std::fill(id, id + cap, -1);
  }
  float worst() const { return d[cap - 1]; }
  void push(float dist, int32_t word) {
    if (!(dist < d[cap - 1])) return;
    int pos = cap - 1;
    while (pos > 0 && d[pos - 1] > dist) {
      d[pos] = d[pos - 1];
      id[pos] = id[pos - 1];
      --pos;
    }
    d[pos] = dist;
    id[pos] = word;
  }
};

}  // namespace

Quantizer::Quantizer(const float* centroids, int64_t n_words, int dim)
    : n_words_(n_words), dim_(dim) {
  D2R_CHECK(n_words > 0, "codebook must have at least one word");
  D2R_CHECK(n_words <= std::numeric_limits<int32_t>::max(), "codebook has too many words");
  D2R_CHECK(dim > 0, "codebook dimension must be positive");
  n_groups_ = (n_words + kGroup - 1) / kGroup;
  centroids_.assign(centroids, centroids + n_words * dim);
  packed_.assign(static_cast<size_t>(n_groups_) * dim * kGroup, 0.0f);
  norms_.assign(static_cast<size_t>(n_groups_) * kGroup, std::numeric_limits<float>::infinity());
  for (int64_t w = 0; w < n_words; ++w) {
    const float* c = centroids + w * dim;
    const int64_t g = w / kGroup, l = w % kGroup;
    double s = 0.0;
    for (int d = 0; d < dim; ++d) {
      packed_[(g * dim + d) * kGroup + l] = c[d];
      s += static_cast<double>(c[d]) * c[d];
    }
    norms_[w] = static_cast<float>(s);
  }
}

void Quantizer::search(const float* x, int64_t n, int m, int32_t* ids, float* dists) const {
  D2R_CHECK(m >= 1, "multiple assignment m must be >= 1");
  D2R_CHECK(m <= n_words_, "multiple assignment m exceeds the number of visual words");
  if (n <= 0) return;
  const int dim = dim_;
  const int cap = static_cast<int>(std::min<int64_t>(m + kMargin, n_words_));
  ParallelErrors errors;
#pragma omp parallel
  {
    // Blocks of at most kMaxBlockRows descriptors (each block streams the whole packed codebook
    // once), as many blocks as a multiple of the team size obtained so the threads finish together.
    // Every thread computes the same split (T is the same across the team); a row's result does not
    // depend on the block it falls in.
    const int64_t T = team_size();
    int64_t n_blocks = (n + kMaxBlockRows - 1) / kMaxBlockRows;
    n_blocks = (n_blocks + T - 1) / T * T;
    int64_t block_rows = (n + n_blocks - 1) / n_blocks;
    block_rows = (block_rows + kRows - 1) / kRows * kRows;
    n_blocks = (n + block_rows - 1) / block_rows;
    const int block = static_cast<int>(block_rows);
    // Per-thread scratch, allocated by the thread's first block (inside errors.run).
    std::vector<float> xb;  // this block's descriptors, zero-padded
    std::vector<float> top_d;
    std::vector<int32_t> top_i;
    std::vector<std::pair<double, int32_t>> exact;

#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      errors.run([&] {
        if (xb.empty()) {
          xb.resize(static_cast<size_t>(block) * dim);
          top_d.resize(static_cast<size_t>(block) * cap);
          top_i.resize(static_cast<size_t>(block) * cap);
          exact.resize(cap);
        }
        const int64_t r0 = blk * block;
        const int rows = static_cast<int>(std::min<int64_t>(block, n - r0));
        const int tiles = (rows + kRows - 1) / kRows;
        std::fill(xb.begin(), xb.end(), 0.0f);
        std::memcpy(xb.data(), x + r0 * dim, sizeof(float) * rows * dim);
        std::vector<TopList> tops(tiles * kRows);
        for (int r = 0; r < tiles * kRows; ++r) {
          tops[r] = TopList{top_d.data() + r * cap, top_i.data() + r * cap, cap};
          tops[r].reset();
        }
        vf acc[kRows][2];
        for (int64_t g = 0; g < n_groups_; ++g) {
          const float* group = packed_.data() + g * dim * kGroup;
          vf n0, n1;
          load(n0, norms_.data() + g * kGroup);
          load(n1, norms_.data() + g * kGroup + kLanes);
          const int32_t base = static_cast<int32_t>(g * kGroup);
          for (int t = 0; t < tiles; ++t) {
            dot_tile(xb.data() + t * kRows * dim, group, dim, acc);
            for (int i = 0; i < kRows; ++i) {
              TopList& top = tops[t * kRows + i];
              const vf d0 = n0 - 2.0f * acc[i][0];
              const vf d1 = n1 - 2.0f * acc[i][1];
              if (!any_below(d0, d1, top.worst())) continue;
              for (int l = 0; l < kLanes; ++l) top.push(d0[l], base + l);
              for (int l = 0; l < kLanes; ++l) top.push(d1[l], base + kLanes + l);
            }
          }
        }
        // Exact re-check of the candidates in double precision; ties by the lower word id.
        for (int r = 0; r < rows; ++r) {
          const float* xr = x + (r0 + r) * dim;
          const TopList& top = tops[r];
          int nc = 0;
          for (int c = 0; c < cap; ++c) {
            if (top.id[c] < 0) continue;
            const float* cw = centroids_.data() + static_cast<int64_t>(top.id[c]) * dim;
            double s = 0.0;
            for (int d = 0; d < dim; ++d) {
              const double diff = static_cast<double>(xr[d]) - static_cast<double>(cw[d]);
              s = fma_if_fused(diff, diff, s);  // the same rounding as the GPU re-check
            }
            exact[nc++] = {s, top.id[c]};
          }
          std::sort(exact.begin(), exact.begin() + nc);
          for (int j = 0; j < m; ++j) {
            ids[(r0 + r) * m + j] = exact[j].second;
            if (dists) dists[(r0 + r) * m + j] = static_cast<float>(exact[j].first);
          }
        }
      });
    }
  }
  errors.rethrow();
}

}  // namespace d2r
