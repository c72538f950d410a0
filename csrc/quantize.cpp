// The exact quantiser's search (a dispatched source: compiled once per SIMD level, simd.h).
#include "quantize.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <utility>

#include "common.h"
#include "kernels.h"
#include "parallel.h"
#include "reduce.h"

#if D2R_SIMD_LEVEL > 0
#include <immintrin.h>
#endif

// Why the result is exact (the argument the code below implements)
// -----------------------------------------------------------------
// Notation: x a descriptor, c a word, d(x, c) = ||x - c||^2. "The" distance that defines the answer is
// the float64 sum of squared differences of the re-check (D64); it differs from the real d(x, c) by
// at most gamma_D(float64) d ~ 1e-14 d, far below every slack used here, so the argument is made on
// real numbers and the slacks carry an ample margin (>= 30 u a^2, u = 2^-24) for it.
//
// 1. Rotation. Large codebooks are searched in a rotated space: x' = fl32(Q x), c' = fl32(Q c), with Q
//    orthogonal (principal axes of the codebook; orthonormalised in double, so ||Q^T Q - I|| ~ 1e-15).
//    Each rounding to float32 moves a vector by at most u ||v||, so with a = ||x|| + max ||c|| (both
//    rounded up, times 1 + 1e-4), | ||x' - c'|| - ||x - c|| | <= 1.01 u a and
//    | ||x' - c'||^2 - ||x - c||^2 | <= 2.1 u a^2; likewise | ||x'||^2 - ||x||^2 | <= 2.1 u a^2.
//    (Small codebooks are not rotated: Q = I and these terms vanish.)
// 2. The float32 value. The kernel ranks words by f = fl(||c'||^2) - 2 fl(x'.c'), the dot product
//    accumulated in float32 in any order: |fl(x'.c') - x'.c'| <= gamma_D sum |x'_i c'_i| <= gamma_D a^2
//    (gamma_D = D u / (1 - D u)), plus one rounding of ||c'||^2 and one of the subtraction, each
//    <= u a^2. With 1. : |f - (d(x, c) - ||x||^2)| <= eps(x) := (2 (D + 4) + 32) u a^2, which the code
//    uses everywhere (it also covers the rounding of the lower bound in 3.).
// 3. The lower bound. With k leading rotated dimensions ("head") and the rest ("tail"),
//    ||x' - c'||^2 = ||x'_h - c'_h||^2 + ||x'_t - c'_t||^2 >= ||x'_h||^2 + ||c'_h||^2 - 2 x'_h.c'_h
//    + (||x'_t|| - ||c'_t||)^2 (the reverse triangle inequality on the tail). The kernel evaluates
//    L = fl(||c'_h||^2) - 2 fl(x'_h.c'_h) + (fl||x'_t|| - fl||c'_t||)^2 with error far below
//    eps - 2.1 u a^2, so d(x, c) >= ||x'_h||^2 + L - eps. Two such bounds are used, k = kScreen1 and
//    k = kScreen2 (the second continues the same accumulators); each is valid on its own.
// 4. The upper bound. U(x) is an upper bound on the m-th smallest d(x, .): m evaluated words with
//    float32 values f_1..f_m give U = max f_j + ||x||^2 + eps (each of them has d <= f_j + ||x||^2 +
//    eps). It comes from the words of the coarse cell nearest to x (phase A), then from the running
//    top list. A word is skipped only when L > theta = U - ||x'_h||^2 + eps (theta rounded up to
//    float), i.e. d(x, c) > U >= d_(m): it is strictly farther than the m-th nearest word, so it
//    cannot be among the m nearest, ties included.
// 5. The certificate. The top list keeps the cap = m + kMargin best evaluated words by (f, id). After
//    the double re-check, T = the m-th smallest D64 among them (>= the true d_(m)). A word evaluated
//    but dropped has f >= f_cap (the worst kept), so d >= f_cap - eps + ||x||^2; when
//    f_cap - eps > T - ||x||^2 it is strictly farther than T, so not among the m nearest. (If the list
//    never filled, no evaluated word was dropped.) Skipped words are excluded by 4. So the m nearest
//    by D64 are among the candidates, and the re-check sorts them by (D64, id).
// 6. When the certificate fails (near-ties within 2 eps, duplicate words), the row is redone by a
//    threshold scan over every word: any word with d <= T has f <= T - ||x||^2 + eps, so collecting
//    all words with f below that bound and sorting them by (D64, id) is exact. Rows with non-finite or
//    huge values (a > 1e15, where float32 could overflow) use a float64 brute force instead.

D2R_SIMD_BEGIN
namespace d2r {
namespace D2R_SIMD_NS {

class Searcher;

namespace {

// One native SIMD register of floats: 16 lanes (zmm) at the avx512 level, otherwise 8 (ymm at the
// avx2 level; GCC / Clang lower it to two SSE registers at the scalar level). A register tile holds
// kRows x 2 vectors of accumulators, sized to the register file (32 zmm / 16 ymm).
#if D2R_SIMD_LEVEL == 2
typedef float vf __attribute__((vector_size(64)));
constexpr int kLanes = 16;
constexpr int kRows = 8;  // descriptors per register tile
#else
typedef float vf __attribute__((vector_size(32)));
constexpr int kLanes = 8;
constexpr int kRows = 6;
#endif
constexpr int kGroup = 2 * kLanes;   // words per packed panel (two vectors)
constexpr int kMaxBlockRows = 96;    // descriptors per cache block, full product (a multiple of kRows)
constexpr int kMaxPrunedRows = 504;  // descriptors per block with pruning (a multiple of kRows)
constexpr int kScreen1 = 12;         // leading rotated dimensions of the first lower bound
constexpr int kScreen2 = 32;         // ... of the second (for the descriptors that pass the first)
constexpr int64_t kWordsPerCell = 64;  // coarse cells: k-means on the codebook
constexpr int kKmeansIters = 6;
constexpr int kSampleForAxes = 16384;  // words used for the principal axes
constexpr int kTileContinue = 5;     // finish the whole tile when this many of its rows survive
constexpr int kMaxPhaseA = 64;       // phase A (the upper bound from the nearest cell) for m <= this
constexpr int64_t kProbeRows = 1000;  // PrunePolicy::kAuto decides after this many pruned rows (one image)
// ... and keeps pruning when the pruned search did at most this fraction of the full product's
// multiply-adds (screening included). Measured on an AMD EPYC (Zen 4) at the avx2 and avx512 levels,
// pruned time / full-product time against this work fraction: 0.39-0.48 at 0.14-0.16 (RootSIFT,
// 65,536 sampled descriptors as words), 0.92-0.93 at 0.20-0.25 (8,192 sampled), 1.04-1.24 at 0.75
// (bench_ivf.py's clustered data, words sampled from descriptors): the break-even lies just above
// 0.25 (the pruned search's screening, branches and one-row products cost more per multiply-add
// than the full product's register tiles).
constexpr double kMaxPrunedWork = 0.25;
constexpr double kU = 1.0 / 16777216.0;  // float32 unit roundoff 2^-24
constexpr double kMaxMagnitude = 1e15;   // beyond: float64 brute force (float32 could overflow)
constexpr int32_t kNoWord = std::numeric_limits<int32_t>::max();

// Unaligned load of kLanes floats, into an out-parameter: a function returning a 64-byte vector by
// value draws GCC's -Wpsabi warning on targets without AVX-512.
inline void load(vf& v, const float* p) { std::memcpy(&v, p, sizeof(vf)); }

// acc[i][0..1] += sum_{d0 <= d < d1} x_i[d] * panel[d][0..kGroup), for kRows descriptors (row-major,
// stride xs) and one packed panel ([dim][kGroup]).
inline void tile_accum(const float* __restrict x, int xs, const float* __restrict panel, int d0, int d1,
                       vf acc[kRows][2]) {
  for (int d = d0; d < d1; ++d) {
    vf b0, b1;
    load(b0, panel + d * kGroup);
    load(b1, panel + d * kGroup + kLanes);
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) {
      const float a = x[i * xs + d];
      acc[i][0] += a * b0;
      acc[i][1] += a * b1;
    }
  }
}

// The same for one descriptor, with two accumulator chains per vector (for latency).
inline void row_accum(const float* __restrict x, const float* __restrict panel, int d0, int d1, vf& a0,
                      vf& a1) {
  vf p0{}, p1{};
  int d = d0;
  for (; d + 1 < d1; d += 2) {
    vf b0, b1, c0, c1;
    load(b0, panel + d * kGroup);
    load(b1, panel + d * kGroup + kLanes);
    load(c0, panel + (d + 1) * kGroup);
    load(c1, panel + (d + 1) * kGroup + kLanes);
    a0 += x[d] * b0;
    a1 += x[d] * b1;
    p0 += x[d + 1] * c0;
    p1 += x[d + 1] * c1;
  }
  if (d < d1) {
    vf b0, b1;
    load(b0, panel + d * kGroup);
    load(b1, panel + d * kGroup + kLanes);
    a0 += x[d] * b0;
    a1 += x[d] * b1;
  }
  a0 += p0;
  a1 += p1;
}

// Whether some lane of a or b is below thr (kStrict) or at most thr.
template <bool kStrict>
inline bool any_lane(const vf& a, const vf& b, float thr) {
#if D2R_SIMD_LEVEL == 2
  constexpr int pred = kStrict ? _CMP_LT_OQ : _CMP_LE_OQ;
  const __m512 t = _mm512_set1_ps(thr);
  return (_mm512_cmp_ps_mask((__m512)a, t, pred) | _mm512_cmp_ps_mask((__m512)b, t, pred)) != 0;
#elif D2R_SIMD_LEVEL == 1
  constexpr int pred = kStrict ? _CMP_LT_OQ : _CMP_LE_OQ;
  const __m256 t = _mm256_set1_ps(thr);
  return _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps((__m256)a, t, pred), _mm256_cmp_ps((__m256)b, t, pred))) != 0;
#else
  bool any = false;
  for (int l = 0; l < kLanes; ++l)
    any |= kStrict ? (a[l] < thr) | (b[l] < thr) : (a[l] <= thr) | (b[l] <= thr);
  return any;
#endif
}

inline bool any_below(const vf& a, const vf& b, float thr) { return any_lane<true>(a, b, thr); }
inline bool any_at_most(const vf& a, const vf& b, float thr) { return any_lane<false>(a, b, thr); }

// v rounded to float; out-of-range values to +-inf (a plain cast would be undefined there).
inline float to_float(double v) {
  const double big = std::numeric_limits<float>::max();
  if (v > big) return std::numeric_limits<float>::infinity();
  if (v < -big) return -std::numeric_limits<float>::infinity();
  return static_cast<float>(v);
}

// The smallest float >= v (NaN stays NaN).
inline float float_up(double v) {
  float f = to_float(v);
  if (static_cast<double>(f) < v) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// A sorted list of the best `cap` (distance, id) pairs in lexicographic order (ties by lower id).
// Empty slots hold (+inf, kNoWord). Each word is pushed at most once.
struct TopList {
  float* d;
  int32_t* id;
  int cap;
  void reset() {
    std::fill(d, d + cap, std::numeric_limits<float>::infinity());
    std::fill(id, id + cap, kNoWord);
  }
  float worst() const { return d[cap - 1]; }
  // true when the list changed
  bool push(float dist, int32_t word) {
    const int last = cap - 1;
    if (!(dist < d[last] || (dist == d[last] && word < id[last]))) return false;
    int pos = last;
    while (pos > 0 && (d[pos - 1] > dist || (d[pos - 1] == dist && id[pos - 1] > word))) {
      d[pos] = d[pos - 1];
      id[pos] = id[pos - 1];
      --pos;
    }
    d[pos] = dist;
    id[pos] = word;
    return true;
  }
};

// Squared L2 distance in double, the re-check's rounding (the same as the GPU re-check).
inline double exact_dist(const float* x, const float* c, int dim) {
  double s = 0.0;
  for (int d = 0; d < dim; ++d) {
    const double diff = static_cast<double>(x[d]) - static_cast<double>(c[d]);
    s = fma_if_fused(diff, diff, s);
  }
  return s;
}

inline double sum_sq(const float* v, int d0, int d1) {
  double s = 0.0;
  for (int d = d0; d < d1; ++d) s += static_cast<double>(v[d]) * v[d];
  return s;
}

// out[0..dim) = fl32(Q v), Q given transposed (qt[j * dim + i] = Q[i][j]); accumulated in double.
void rotate(const double* qt, const float* v, int dim, float* out, double* acc) {
  std::fill(acc, acc + dim, 0.0);
  for (int j = 0; j < dim; ++j) {
    const double vj = v[j];
    const double* q = qt + static_cast<int64_t>(j) * dim;
    for (int i = 0; i < dim; ++i) acc[i] += q[i] * vj;
  }
  for (int i = 0; i < dim; ++i) out[i] = to_float(acc[i]);
}

// Eigenvectors of the symmetric n x n matrix a (destroyed) by cyclic Jacobi rotations: the columns
// of v (row-major), eigenvalues on a's diagonal.
void jacobi_eigen(std::vector<double>& a, int n, std::vector<double>& v) {
  v.assign(static_cast<size_t>(n) * n, 0.0);
  for (int i = 0; i < n; ++i) v[i * n + i] = 1.0;
  double total = 0.0;
  for (double e : a) total += e * e;
  for (int sweep = 0; sweep < 60; ++sweep) {
    double off = 0.0;
    for (int p = 0; p < n; ++p)
      for (int q = p + 1; q < n; ++q) off += a[p * n + q] * a[p * n + q];
    if (!(off > 1e-26 * total)) break;
    for (int p = 0; p < n; ++p) {
      for (int q = p + 1; q < n; ++q) {
        const double apq = a[p * n + q];
        if (std::fabs(apq) < 1e-300) continue;
        const double theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
        const double c = 1.0 / std::sqrt(t * t + 1.0), s = t * c;
        for (int k = 0; k < n; ++k) {  // columns p, q
          const double akp = a[k * n + p], akq = a[k * n + q];
          a[k * n + p] = c * akp - s * akq;
          a[k * n + q] = s * akp + c * akq;
        }
        for (int k = 0; k < n; ++k) {  // rows p, q
          const double apk = a[p * n + k], aqk = a[q * n + k];
          a[p * n + k] = c * apk - s * aqk;
          a[q * n + k] = s * apk + c * aqk;
        }
        for (int k = 0; k < n; ++k) {
          const double vkp = v[k * n + p], vkq = v[k * n + q];
          v[k * n + p] = c * vkp - s * vkq;
          v[k * n + q] = s * vkp + c * vkq;
        }
      }
    }
  }
}

// A codebook (or any set of points) packed in panels of kGroup words: [panel][dim][kGroup].
struct Panels {
  int dim = 0;
  int screen[2] = {0, 0};  // leading dimensions of the two lower bounds (0: none)
  int64_t n = 0, n_panels = 0;
  std::vector<float> data;
  std::vector<float> norms;  // ||c||^2 (+inf for padding)
  std::vector<float> head[2];  // ||c_{0..screen[j]}||^2 (+inf for padding)
  std::vector<float> tail[2];  // ||c_{screen[j]..dim}|| (0 for padding)
  std::vector<int32_t> ids;  // the id of each slot (kNoWord for padding)

  const float* panel(int64_t p) const { return data.data() + p * dim * kGroup; }

  // Rows order[s] (or s), of `rows` (row-major, stride `stride`, first `dim` dims), into slot s.
  void pack(const float* rows, int64_t stride, const int32_t* order, int64_t n_rows, int dim_, int screen1 = 0,
            int screen2 = 0) {
    dim = dim_;
    screen[0] = screen1;
    screen[1] = screen2;
    n = n_rows;
    n_panels = (n_rows + kGroup - 1) / kGroup;
    const size_t slots = static_cast<size_t>(n_panels) * kGroup;
    const float inf = std::numeric_limits<float>::infinity();
    data.assign(slots * dim, 0.0f);
    norms.assign(slots, inf);
    ids.assign(slots, kNoWord);
    for (int j = 0; j < 2; ++j) {
      head[j].assign(screen[j] ? slots : 0, inf);
      tail[j].assign(screen[j] ? slots : 0, 0.0f);
    }
    for (int64_t s = 0; s < n_rows; ++s) {
      const int32_t w = order ? order[s] : static_cast<int32_t>(s);
      const float* c = rows + w * stride;
      const int64_t p = s / kGroup, l = s % kGroup;
      for (int d = 0; d < dim; ++d) data[(p * dim + d) * kGroup + l] = c[d];
      norms[s] = to_float(sum_sq(c, 0, dim));
      ids[s] = w;
      for (int j = 0; j < 2; ++j) {
        if (!screen[j]) continue;
        head[j][s] = to_float(sum_sq(c, 0, screen[j]));
        tail[j][s] = to_float(std::sqrt(sum_sq(c, screen[j], dim)));
      }
    }
  }
};

struct Index {
  int k1 = 0, k2 = 0;          // dimensions of the two lower bounds
  std::vector<double> qt;      // the rotation, transposed (dim x dim)
  Panels words;                // rotated codebook, ordered by cell
  Panels cells;                // cell centres (first k rotated dimensions); ids = cell index
  std::vector<int64_t> begin;  // slots of cell g: [begin[g], begin[g + 1])
};

// out[i] = the id of the nearest point of `cells` (by fl(||c||^2) - 2 fl(x.c), over cells.dim
// leading dimensions) for the rows pts[i] (stride `stride`). Multi-threaded; ties to the lower slot.
void nearest(const float* pts, int64_t n, int64_t stride, const Panels& cells, int32_t* out) {
  const int dim = cells.dim;
  const int64_t tiles = (n + kRows - 1) / kRows;
  parallel_for(tiles, 16, [&](int64_t t) {
    float xb[kRows * 256];
    std::vector<float> big;
    float* buf = xb;
    if (dim > 256) {
      big.assign(static_cast<size_t>(kRows) * dim, 0.0f);
      buf = big.data();
    }
    const int64_t r0 = t * kRows;
    const int rows = static_cast<int>(std::min<int64_t>(kRows, n - r0));
    std::fill(buf, buf + kRows * dim, 0.0f);
    for (int i = 0; i < rows; ++i) std::memcpy(buf + i * dim, pts + (r0 + i) * stride, sizeof(float) * dim);
    float best[kRows];
    int32_t arg[kRows];
    std::fill(best, best + kRows, std::numeric_limits<float>::infinity());
    std::fill(arg, arg + kRows, 0);
    vf acc[kRows][2];
    for (int64_t p = 0; p < cells.n_panels; ++p) {
      for (int i = 0; i < kRows; ++i) acc[i][0] = acc[i][1] = vf{};
      tile_accum(buf, dim, cells.panel(p), 0, dim, acc);
      vf n0, n1;
      load(n0, cells.norms.data() + p * kGroup);
      load(n1, cells.norms.data() + p * kGroup + kLanes);
      for (int i = 0; i < rows; ++i) {
        const vf d0 = n0 - 2.0f * acc[i][0], d1 = n1 - 2.0f * acc[i][1];
        if (!any_below(d0, d1, best[i])) continue;
        for (int l = 0; l < kLanes; ++l)
          if (d0[l] < best[i]) best[i] = d0[l], arg[i] = static_cast<int32_t>(p * kGroup + l);
        for (int l = 0; l < kLanes; ++l)
          if (d1[l] < best[i]) best[i] = d1[l], arg[i] = static_cast<int32_t>(p * kGroup + kLanes + l);
      }
    }
    for (int i = 0; i < rows; ++i) out[r0 + i] = arg[i];
  });
}

// One block of descriptors being searched (rows already gathered, rotated when pruning).
struct BlockView {
  const Panels* P;
  int D, k1, k2, m, rows, tiles;
  const float* xb;  // rows x D (padded with zero rows)
  TopList* tops;
  float* theta[2];     // per row: prune a word when its lower bound j: L_j > theta[j]
  const float* rx[2];  // ||x'_tail_j||
  const double* xh[2]; // ||x'_head_j||^2
  const double *xx, *eps;
  bool prune;
};

// Pushes the lanes d[0..kGroup) of one panel into row i's list; updates its pruning threshold.
__attribute__((noinline)) void push_lanes(const BlockView& b, int i, const float* d, const int32_t* pid) {
  TopList& top = b.tops[i];
  bool changed = false;
  for (int l = 0; l < kGroup; ++l) changed |= top.push(d[l], pid[l]);
  const int m = b.m;
  if (b.prune && changed && top.d[m - 1] < std::numeric_limits<float>::infinity())
    for (int j = 0; j < 2; ++j)
      b.theta[j][i] = std::min(b.theta[j][i], float_up(top.d[m - 1] + b.xx[i] - b.xh[j][i] + 2.0 * b.eps[i]));
}

// Whether some lane may pass: L = head - 2 acc + (rx - tail)^2 <= theta (see the top of the file, 3.).
inline bool lower_bound_passes(const vf& a0, const vf& a1, const vf& h0, const vf& h1, const vf& e0, const vf& e1,
                               float rx, float theta) {
  const vf g0 = rx - e0, g1 = rx - e1;
  const vf l0 = h0 - 2.0f * a0 + g0 * g0, l1 = h1 - 2.0f * a1 + g1 * g1;
  return any_at_most(l0, l1, theta);
}

inline void finish_row(const BlockView& b, int i, const vf& n0, const vf& n1, const vf& a0, const vf& a1,
                       const int32_t* pid) {
  const vf d0 = n0 - 2.0f * a0, d1 = n1 - 2.0f * a1;
  if (!any_below(d0, d1, b.tops[i].worst())) return;
  alignas(64) float buf[kGroup];
  std::memcpy(buf, &d0, sizeof(vf));
  std::memcpy(buf + kLanes, &d1, sizeof(vf));
  push_lanes(b, i, buf, pid);
}

// Phase A for rows [i0, i1) (all nearest to the cell of slots [s0, s1)): best[i * m ..] = the m
// smallest float32 values f among the cell's panels. Returns the pairs computed.
int64_t phase_a(const BlockView& b, int i0, int i1, int64_t s0, int64_t s1, float* best) {
  const Panels& P = *b.P;
  const int m = b.m, D = b.D;
  int64_t pairs = 0;
  for (int64_t p = s0 / kGroup; p <= (s1 - 1) / kGroup; ++p) {
    vf n0, n1;
    load(n0, P.norms.data() + p * kGroup);
    load(n1, P.norms.data() + p * kGroup + kLanes);
    for (int t0 = i0; t0 < i1; t0 += kRows) {
      vf acc[kRows][2];
      for (int i = 0; i < kRows; ++i) acc[i][0] = acc[i][1] = vf{};
      tile_accum(b.xb + static_cast<size_t>(t0) * D, D, P.panel(p), 0, D, acc);
      alignas(64) float buf[kRows][kGroup];
#pragma GCC unroll 8
      for (int i = 0; i < kRows; ++i) {
        const vf d0 = n0 - 2.0f * acc[i][0], d1 = n1 - 2.0f * acc[i][1];
        std::memcpy(buf[i], &d0, sizeof(vf));
        std::memcpy(buf[i] + kLanes, &d1, sizeof(vf));
      }
      for (int i = 0; i < kRows && t0 + i < i1; ++i) {
        float* bi = best + static_cast<size_t>(t0 + i) * m;
        for (int l = 0; l < kGroup; ++l) {
          const float v = buf[i][l];
          if (!(v < bi[m - 1])) continue;
          int pos = m - 1;
          while (pos > 0 && bi[pos - 1] > v) {
            bi[pos] = bi[pos - 1];
            --pos;
          }
          bi[pos] = v;
        }
      }
    }
    pairs += static_cast<int64_t>(i1 - i0) * kGroup;
  }
  const float inf = std::numeric_limits<float>::infinity();
  for (int i = i0; i < i1; ++i) {
    const float fm = best[static_cast<size_t>(i) * m + m - 1];
    if (fm < inf)
      for (int j = 0; j < 2; ++j) b.theta[j][i] = float_up(fm + b.xx[i] + b.eps[i] - b.xh[j][i] + b.eps[i]);
  }
  return pairs;
}

struct MainResult {
  int64_t screened = 0, screened2 = 0, full = 0;
  bool went_plain = false;
};

// The fused product over every panel: the full product (b.prune false, or once pruning stops
// paying), or the screened one: the leading k dimensions, the lower bound, and the rest of the
// product only for the rows where some word may beat theta.
MainResult main_pass(const BlockView& b) {
  const Panels& P = *b.P;
  const int D = b.D, k1 = b.k1, k2 = b.k2, rows = b.rows, tiles = b.tiles;
  bool plain = !b.prune;
  int64_t tested = 0, second = 0, fulls = 0, plain_pairs = 0;
  for (int64_t p = 0; p < P.n_panels; ++p) {
    const float* panel = P.panel(p);
    const int32_t* pid = P.ids.data() + p * kGroup;
    vf n0, n1;
    load(n0, P.norms.data() + p * kGroup);
    load(n1, P.norms.data() + p * kGroup + kLanes);
    if (plain) {
      for (int t = 0; t < tiles; ++t) {
        vf acc[kRows][2];
        for (int i = 0; i < kRows; ++i) acc[i][0] = acc[i][1] = vf{};
        const float* xt = b.xb + static_cast<size_t>(t) * kRows * D;
        tile_accum(xt, D, panel, 0, D, acc);
        const int valid = std::min(kRows, rows - t * kRows);
#pragma GCC unroll 8
        for (int i = 0; i < kRows; ++i)
          if (i < valid) finish_row(b, t * kRows + i, n0, n1, acc[i][0], acc[i][1], pid);
        plain_pairs += valid;
      }
      continue;
    }
    vf h0, h1, e0, e1, H0, H1, E0, E1;
    load(h0, P.head[0].data() + p * kGroup);
    load(h1, P.head[0].data() + p * kGroup + kLanes);
    load(e0, P.tail[0].data() + p * kGroup);
    load(e1, P.tail[0].data() + p * kGroup + kLanes);
    load(H0, P.head[1].data() + p * kGroup);
    load(H1, P.head[1].data() + p * kGroup + kLanes);
    load(E0, P.tail[1].data() + p * kGroup);
    load(E1, P.tail[1].data() + p * kGroup + kLanes);
    for (int t = 0; t < tiles; ++t) {
      vf acc[kRows][2];
      for (int i = 0; i < kRows; ++i) acc[i][0] = acc[i][1] = vf{};
      const float* xt = b.xb + static_cast<size_t>(t) * kRows * D;
      const int row0 = t * kRows;
      const int valid = std::min(kRows, rows - row0);
      tile_accum(xt, D, panel, 0, k1, acc);
      unsigned mask = 0;
#pragma GCC unroll 8
      for (int i = 0; i < kRows; ++i) {
        const int r = std::min(row0 + i, rows - 1);
        if (i < valid && lower_bound_passes(acc[i][0], acc[i][1], h0, h1, e0, e1, b.rx[0][r], b.theta[0][r]))
          mask |= 1u << i;
      }
      tested += valid;
      if (!mask) continue;
      int pc = __builtin_popcount(mask);
      if (pc >= kTileContinue) {
        // the whole tile to k2, the second bound, then the rest
        tile_accum(xt, D, panel, k1, k2, acc);
        unsigned mask2 = 0;
#pragma GCC unroll 8
        for (int i = 0; i < kRows; ++i) {
          const int r = std::min(row0 + i, rows - 1);
          if ((mask >> i & 1u) && lower_bound_passes(acc[i][0], acc[i][1], H0, H1, E0, E1, b.rx[1][r], b.theta[1][r]))
            mask2 |= 1u << i;
        }
        second += valid;
        if (!mask2) continue;
        pc = __builtin_popcount(mask2);
        if (pc >= kTileContinue) {
          tile_accum(xt, D, panel, k2, D, acc);
#pragma GCC unroll 8
          for (int i = 0; i < kRows; ++i)
            if (i < valid) finish_row(b, row0 + i, n0, n1, acc[i][0], acc[i][1], pid);
          fulls += valid;
        } else {
#pragma GCC unroll 8
          for (int i = 0; i < kRows; ++i) {
            if (!(mask2 >> i & 1u)) continue;
            row_accum(xt + static_cast<size_t>(i) * D, panel, k2, D, acc[i][0], acc[i][1]);
            finish_row(b, row0 + i, n0, n1, acc[i][0], acc[i][1], pid);
          }
          fulls += pc;
        }
      } else {
#pragma GCC unroll 8
        for (int i = 0; i < kRows; ++i) {
          if (!(mask >> i & 1u)) continue;
          const int r = row0 + i;
          row_accum(xt + static_cast<size_t>(i) * D, panel, k1, k2, acc[i][0], acc[i][1]);
          ++second;
          if (!lower_bound_passes(acc[i][0], acc[i][1], H0, H1, E0, E1, b.rx[1][r], b.theta[1][r])) continue;
          row_accum(xt + static_cast<size_t>(i) * D, panel, k2, D, acc[i][0], acc[i][1]);
          finish_row(b, r, n0, n1, acc[i][0], acc[i][1], pid);
          ++fulls;
        }
      }
    }
    // Pruning does not pay (a codebook that is not clustered): the full product for the rest.
    if ((p & 15) == 15 && static_cast<double>(fulls) > 0.6 * static_cast<double>(tested)) plain = true;
  }
  MainResult r;
  r.screened = tested * kGroup;
  r.screened2 = second * kGroup;
  r.full = (fulls + plain_pairs) * kGroup;
  r.went_plain = plain && b.prune;
  return r;
}

}  // namespace

// The search structure of one codebook (QuantizerImpl, quantize.h).
class Searcher final : public QuantizerImpl {
 public:
  Searcher(const float* centroids, int64_t n_words, int dim);
  void search(const float* x, int64_t n, int m, int32_t* ids, float* dists, QuantizerCounters& counters,
              PrunePolicy policy) const override;
  bool pruning_enabled() const override { return index_ != nullptr; }
  int prune_decision() const override { return decision_.load(); }
  int screen_dims(int bound) const override { return index_ ? (bound == 0 ? index_->k1 : index_->k2) : 0; }

 private:
  int64_t n_words_;
  int dim_;
  float cmax_;                     // an upper bound on max ||c||
  const float* centroids_;         // row-major, owned by the Quantizer (for the exact re-check)
  std::unique_ptr<Panels> plain_;  // the codebook as given, packed (small codebooks)
  std::unique_ptr<Index> index_;   // the pruning structure (large codebooks)
  // PrunePolicy::kAuto: -1 undecided, 0 full product, 1 prune; the pruned searches measured so far.
  mutable std::atomic<int> decision_{-1};
  mutable std::mutex probe_mu_;
  mutable int64_t probe_rows_ = 0, probe_pairs_ = 0;
  mutable double probe_work_ = 0.0;
};

std::unique_ptr<QuantizerImpl> make_quantizer(const float* centroids, int64_t n_words, int dim) {
  return std::make_unique<Searcher>(centroids, n_words, dim);
}

Searcher::Searcher(const float* centroids, int64_t n_words, int dim)
    : n_words_(n_words), dim_(dim), centroids_(centroids) {
  double cmax = 0.0;
  bool finite = true;
  for (int64_t w = 0; w < n_words; ++w) {
    const double s = sum_sq(centroids + w * dim, 0, dim);
    finite = finite && std::isfinite(s);
    cmax = std::max(cmax, s);
  }
  cmax_ = finite ? float_up(std::sqrt(cmax) * (1.0 + 1e-6)) : std::numeric_limits<float>::infinity();
  const bool prune = n_words >= Quantizer::kMinPruneWords && dim >= kScreen2 + 16 && finite && cmax_ < kMaxMagnitude;
  if (!prune) {
    plain_ = std::make_unique<Panels>();
    plain_->pack(centroids, dim, nullptr, n_words, dim);
    return;
  }
  auto ix = std::make_unique<Index>();
  ix->k1 = kScreen1;
  ix->k2 = kScreen2;
  const int D = dim;
  // Principal axes of (a sample of) the codebook: any orthogonal Q keeps the search exact; the
  // principal axes make the leading dimensions carry most of the distances.
  {
    const int64_t step = std::max<int64_t>(1, n_words / kSampleForAxes);
    std::vector<double> mean(D, 0.0), cov(static_cast<size_t>(D) * D, 0.0), v(D);
    int64_t cnt = 0;
    for (int64_t w = 0; w < n_words; w += step, ++cnt)
      for (int d = 0; d < D; ++d) mean[d] += centroids[w * D + d];
    for (int d = 0; d < D; ++d) mean[d] /= static_cast<double>(cnt);
    for (int64_t w = 0; w < n_words; w += step) {
      for (int d = 0; d < D; ++d) v[d] = centroids[w * D + d] - mean[d];
      for (int i = 0; i < D; ++i) {
        const double vi = v[i];
        double* row = cov.data() + static_cast<size_t>(i) * D;
        for (int j = 0; j < D; ++j) row[j] += vi * v[j];
      }
    }
    std::vector<double> vecs;
    jacobi_eigen(cov, D, vecs);
    std::vector<int> axis(D);
    for (int i = 0; i < D; ++i) axis[i] = i;
    std::stable_sort(axis.begin(), axis.end(), [&](int a, int b) { return cov[a * D + a] > cov[b * D + b]; });
    // q[i] = axis i (rows), orthonormalised twice by modified Gram-Schmidt in double
    std::vector<double> q(static_cast<size_t>(D) * D);
    for (int i = 0; i < D; ++i)
      for (int j = 0; j < D; ++j) q[i * D + j] = vecs[j * D + axis[i]];
    for (int pass = 0; pass < 2; ++pass) {
      for (int i = 0; i < D; ++i) {
        double* qi = q.data() + static_cast<size_t>(i) * D;
        for (int j = 0; j < i; ++j) {
          const double* qj = q.data() + static_cast<size_t>(j) * D;
          double dot = 0.0;
          for (int t = 0; t < D; ++t) dot += qi[t] * qj[t];
          for (int t = 0; t < D; ++t) qi[t] -= dot * qj[t];
        }
        double nrm = 0.0;
        for (int t = 0; t < D; ++t) nrm += qi[t] * qi[t];
        nrm = std::sqrt(nrm);
        D2R_CHECK(nrm > 0.5, "internal error: degenerate rotation");
        for (int t = 0; t < D; ++t) qi[t] /= nrm;
      }
    }
    ix->qt.assign(static_cast<size_t>(D) * D, 0.0);
    for (int i = 0; i < D; ++i)
      for (int j = 0; j < D; ++j) ix->qt[static_cast<size_t>(j) * D + i] = q[static_cast<size_t>(i) * D + j];
  }
  // The rotated codebook.
  std::vector<float> rot(static_cast<size_t>(n_words) * D);
  parallel_for(n_words, 256, [&](int64_t w) {
    std::vector<double> acc(D);
    rotate(ix->qt.data(), centroids + w * D, D, rot.data() + w * D, acc.data());
  });
  // Coarse cells: k-means on the leading k rotated dimensions (they decide the screening), started
  // from evenly spaced words. The cells only order the words and give phase A its first bound: any
  // cells keep the search exact.
  const int k = ix->k2;  // the cells live in the leading k2 rotated dimensions
  int64_t G = std::max<int64_t>(1, n_words / kWordsPerCell);
  std::vector<float> cent(static_cast<size_t>(G) * k);
  for (int64_t g = 0; g < G; ++g)
    std::memcpy(cent.data() + g * k, rot.data() + (g * n_words / G) * D, sizeof(float) * k);
  std::vector<int32_t> assign(n_words);
  for (int it = 0;; ++it) {
    ix->cells.pack(cent.data(), k, nullptr, G, k);
    nearest(rot.data(), n_words, D, ix->cells, assign.data());
    if (it == kKmeansIters) break;
    std::vector<double> sum(static_cast<size_t>(G) * k, 0.0);
    std::vector<int64_t> cnt(G, 0);
    for (int64_t w = 0; w < n_words; ++w) {
      const int32_t g = assign[w];
      ++cnt[g];
      for (int d = 0; d < k; ++d) sum[static_cast<size_t>(g) * k + d] += rot[w * D + d];
    }
    for (int64_t g = 0; g < G; ++g)
      if (cnt[g] > 0)
        for (int d = 0; d < k; ++d) cent[g * k + d] = static_cast<float>(sum[g * k + d] / cnt[g]);
  }
  // Drop the empty cells; order the words by cell (then id).
  std::vector<int64_t> cnt(G, 0);
  for (int64_t w = 0; w < n_words; ++w) ++cnt[assign[w]];
  std::vector<int32_t> remap(G, -1);
  int64_t kept = 0;
  for (int64_t g = 0; g < G; ++g)
    if (cnt[g] > 0) {
      std::memmove(cent.data() + kept * k, cent.data() + g * k, sizeof(float) * k);
      remap[g] = static_cast<int32_t>(kept++);
    }
  G = kept;
  ix->cells.pack(cent.data(), k, nullptr, G, k);
  ix->begin.assign(G + 1, 0);
  for (int64_t w = 0; w < n_words; ++w) ++ix->begin[remap[assign[w]] + 1];
  for (int64_t g = 0; g < G; ++g) ix->begin[g + 1] += ix->begin[g];
  std::vector<int32_t> order(n_words);
  {
    std::vector<int64_t> fill(ix->begin.begin(), ix->begin.end() - 1);
    for (int64_t w = 0; w < n_words; ++w) order[fill[remap[assign[w]]]++] = static_cast<int32_t>(w);
  }
  ix->words.pack(rot.data(), D, order.data(), n_words, D, ix->k1, ix->k2);
  index_ = std::move(ix);
}

void Searcher::search(const float* x, int64_t n, int m, int32_t* ids, float* dists, QuantizerCounters& counters,
                      PrunePolicy policy) const {
  const int D = dim_;
  const int cap = static_cast<int>(std::min<int64_t>(m + Quantizer::kMargin, n_words_));
  const Index* ix = index_.get();
  const Panels& P = ix ? ix->words : *plain_;
  const int k1 = ix ? ix->k1 : D, k2 = ix ? ix->k2 : D;
  const float inf = std::numeric_limits<float>::infinity();
  // With the pruning structure, whether this search prunes (PrunePolicy); if not, it runs the full
  // product over the same (rotated) panels, which the exactness argument covers just the same.
  const bool prune = ix && policy != PrunePolicy::kNever && (policy == PrunePolicy::kAlways || decision_.load() != 0);
  const bool probe = prune && policy == PrunePolicy::kAuto && decision_.load() < 0;

  // With the pruning structure: rotate the descriptors; when pruning, find each one's nearest cell
  // and search them in cell order (descriptors of a tile then tend to share their surviving words).
  const float* xr = x;
  std::vector<float> xrot;
  std::vector<int32_t> cell, order;
  if (ix) {
    xrot.resize(static_cast<size_t>(n) * D);
    const int64_t chunks = (n + 63) / 64;
    parallel_for(chunks, 1, [&](int64_t c) {
      std::vector<double> acc(D);
      for (int64_t r = c * 64; r < std::min<int64_t>(n, (c + 1) * 64); ++r)
        rotate(ix->qt.data(), x + r * D, D, xrot.data() + r * D, acc.data());
    });
    xr = xrot.data();
  }
  if (prune) {
    cell.resize(n);
    nearest(xr, n, D, ix->cells, cell.data());
    const int64_t G = ix->cells.n;
    std::vector<int64_t> start(G + 1, 0);
    for (int64_t r = 0; r < n; ++r) ++start[cell[r] + 1];
    for (int64_t g = 0; g < G; ++g) start[g + 1] += start[g];
    order.resize(n);
    for (int64_t r = 0; r < n; ++r) order[start[cell[r]]++] = static_cast<int32_t>(r);
  }
  // Large codebooks (ix): blocks of kMaxPrunedRows rows whether pruning or not (the rotated codebook
  // is streamed once per block; measured faster for the full product too at 65,536 words).
  const int max_rows = ix ? kMaxPrunedRows : kMaxBlockRows;
  std::atomic<int64_t> call_pairs{0}, call_work{0};  // for the probe: this search's multiply-adds

  ParallelErrors errors;
#pragma omp parallel
  {
    // Blocks of at most max_rows descriptors (each block streams the packed codebook once), as many
    // blocks as a multiple of the team size obtained so the threads finish together. Every thread
    // computes the same split; a row's result does not depend on the block it falls in.
    const int64_t T = team_size();
    int64_t n_blocks = (n + max_rows - 1) / max_rows;
    n_blocks = (n_blocks + T - 1) / T * T;
    int64_t block_rows = (n + n_blocks - 1) / n_blocks;
    block_rows = (block_rows + kRows - 1) / kRows * kRows;
    n_blocks = (n + block_rows - 1) / block_rows;
    const int block = static_cast<int>(block_rows);
    // Per-thread scratch, allocated by the thread's first block (inside errors.run).
    std::vector<float> xb, top_d, best_a, rx[2], theta[2];
    std::vector<int32_t> top_i;
    std::vector<double> xx, xh[2], eps;
    std::vector<char> bad;
    std::vector<std::pair<double, int32_t>> exact;
    std::vector<TopList> tops;
    int64_t c_pairs = 0, c_screened = 0, c_screened2 = 0, c_full = 0, c_fallback = 0, c_plain = 0, c_pruned = 0;

#pragma omp for schedule(dynamic, 1)
    for (int64_t blk = 0; blk < n_blocks; ++blk) {
      errors.run([&] {
        if (xb.empty()) {
          xb.resize(static_cast<size_t>(block + kRows) * D);
          top_d.resize(static_cast<size_t>(block) * cap);
          top_i.resize(static_cast<size_t>(block) * cap);
          xx.resize(block);
          eps.resize(block);
          for (int j = 0; j < 2; ++j) {
            xh[j].resize(block);
            rx[j].resize(block);
            theta[j].resize(block);
          }
          bad.resize(block);
          tops.resize(block);
          exact.resize(cap);
        }
        const int64_t r0 = blk * block;
        const int rows = static_cast<int>(std::min<int64_t>(block, n - r0));
        const int tiles = (rows + kRows - 1) / kRows;
        auto row_of = [&](int i) -> int64_t { return order.empty() ? r0 + i : order[r0 + i]; };
        std::fill(xb.begin(), xb.end(), 0.0f);
        for (int i = 0; i < rows; ++i) {
          std::memcpy(xb.data() + static_cast<size_t>(i) * D, xr + row_of(i) * D, sizeof(float) * D);
          const double s = sum_sq(x + row_of(i) * D, 0, D);
          const double a = (std::sqrt(s) + static_cast<double>(cmax_)) * (1.0 + 1e-4);
          xx[i] = s;
          bad[i] = !(a <= kMaxMagnitude);  // also NaN
          eps[i] = (2.0 * (D + 4) + 32.0) * kU * a * a + 1e-30;
          if (prune) {
            const float* xi = xb.data() + static_cast<size_t>(i) * D;
            xh[0][i] = sum_sq(xi, 0, k1);
            xh[1][i] = sum_sq(xi, 0, k2);
            rx[0][i] = to_float(std::sqrt(sum_sq(xi, k1, D)));
            rx[1][i] = to_float(std::sqrt(sum_sq(xi, k2, D)));
          }
          theta[0][i] = theta[1][i] = inf;
          tops[i] = TopList{top_d.data() + static_cast<size_t>(i) * cap, top_i.data() + static_cast<size_t>(i) * cap, cap};
          tops[i].reset();
        }
        c_pairs += static_cast<int64_t>(rows) * n_words_;
        BlockView bv{&P,
                     D,
                     k1,
                     k2,
                     m,
                     rows,
                     tiles,
                     xb.data(),
                     tops.data(),
                     {theta[0].data(), theta[1].data()},
                     {rx[0].data(), rx[1].data()},
                     {xh[0].data(), xh[1].data()},
                     xx.data(),
                     eps.data(),
                     prune};
        // Phase A: an upper bound on the m-th nearest distance from the words of the nearest cell.
        if (prune && m <= kMaxPhaseA) {
          best_a.assign(static_cast<size_t>(rows) * m, inf);
          for (int i0 = 0; i0 < rows;) {
            const int32_t g = cell[row_of(i0)];
            int i1 = i0;
            while (i1 < rows && cell[row_of(i1)] == g) ++i1;
            c_full += phase_a(bv, i0, i1, ix->begin[g], ix->begin[g + 1], best_a.data());
            i0 = i1;
          }
        }
        // Main pass over the codebook panels.
        const MainResult mr = main_pass(bv);
        c_screened += mr.screened;
        c_screened2 += mr.screened2;
        c_full += mr.full;
        if (prune && !mr.went_plain) ++c_pruned;
        else ++c_plain;

        // Exact re-check in double precision, certified (see the top of this file).
        std::vector<std::pair<double, int32_t>> cand;
        for (int i = 0; i < rows; ++i) {
          const int64_t r = row_of(i);
          const float* xo = x + r * D;
          const TopList& top = tops[i];
          const std::pair<double, int32_t>* res = exact.data();
          bool ok = !bad[i];
          int nc = 0;
          if (ok) {
            for (int c = 0; c < cap; ++c) {
              if (top.id[c] == kNoWord) continue;
              exact[nc++] = {exact_dist(xo, centroids_ + static_cast<int64_t>(top.id[c]) * D, D), top.id[c]};
            }
            std::sort(exact.begin(), exact.begin() + nc);
            ok = nc >= m && (nc < cap || static_cast<double>(top.d[cap - 1]) - eps[i] > exact[m - 1].first - xx[i]);
          }
          if (!ok) {
            ++c_fallback;
            cand.clear();
            if (!bad[i] && nc >= m) {
              // Threshold scan: every word with f <= T - ||x||^2 + eps.
              const float thr = float_up(exact[m - 1].first - xx[i] + eps[i]);
              const float* xrow = xb.data() + static_cast<size_t>(i) * D;
              for (int64_t p = 0; p < P.n_panels; ++p) {
                vf a0{}, a1{}, n0, n1;
                row_accum(xrow, P.panel(p), 0, D, a0, a1);
                load(n0, P.norms.data() + p * kGroup);
                load(n1, P.norms.data() + p * kGroup + kLanes);
                const vf d0 = n0 - 2.0f * a0, d1 = n1 - 2.0f * a1;
                if (!any_at_most(d0, d1, thr)) continue;
                const int32_t* pid = P.ids.data() + p * kGroup;
                for (int l = 0; l < kGroup; ++l) {
                  const float v = l < kLanes ? d0[l] : d1[l - kLanes];
                  if (v <= thr && pid[l] != kNoWord) cand.push_back({0.0, pid[l]});
                }
              }
              for (auto& e : cand) e.first = exact_dist(xo, centroids_ + static_cast<int64_t>(e.second) * D, D);
            } else {
              // Non-finite or huge values: float64 brute force (NaN distances last).
              cand.resize(n_words_);
              for (int64_t w = 0; w < n_words_; ++w) {
                const double d = exact_dist(xo, centroids_ + w * D, D);
                cand[w] = {std::isnan(d) ? std::numeric_limits<double>::infinity() : d, static_cast<int32_t>(w)};
              }
            }
            D2R_CHECK(static_cast<int64_t>(cand.size()) >= m, "internal error: quantizer fallback lost words");
            std::partial_sort(cand.begin(), cand.begin() + m, cand.end());
            res = cand.data();
          }
          for (int j = 0; j < m; ++j) {
            ids[r * m + j] = res[j].second;
            if (dists) dists[r * m + j] = to_float(res[j].first);
          }
        }
      });
    }
    counters.pairs += c_pairs;
    counters.screened += c_screened;
    counters.screened2 += c_screened2;
    counters.full += c_full;
    counters.fallback_rows += c_fallback;
    counters.plain_blocks += c_plain;
    counters.pruned_blocks += c_pruned;
    if (probe) {
      call_pairs += c_pairs;
      call_work += c_screened * k1 + c_screened2 * (k2 - k1) + c_full * (D - k2);
    }
  }
  errors.rethrow();
  if (probe) {
    // kAuto: after kProbeRows pruned rows, keep pruning only where it does little enough of the work.
    std::lock_guard<std::mutex> lock(probe_mu_);
    if (decision_.load() < 0) {
      probe_rows_ += n;
      probe_pairs_ += call_pairs.load();
      probe_work_ += static_cast<double>(call_work.load());
      if (probe_rows_ >= kProbeRows) {
        const double work = probe_work_ / (static_cast<double>(probe_pairs_) * D);
        decision_.store(work <= kMaxPrunedWork ? 1 : 0);
      }
    }
  }
}

}  // namespace D2R_SIMD_NS
}  // namespace d2r
D2R_SIMD_END
