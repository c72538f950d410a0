#include "ransac.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>

#include "common.h"
#include "kernels.h"
#include "parallel.h"

// A dispatched source (simd.h): compiled once per SIMD level. It keeps the FMA contraction (its
// products are FMA-bound): the avx2 and avx512 levels contract alike, the scalar level (no FMA) may
// differ from them for points or descriptors within float rounding of a threshold or a tie (ransac.h).
D2R_SIMD_BEGIN
namespace d2r {
namespace D2R_SIMD_NS {
namespace {

// ---- SIMD basics (GCC/Clang vector extensions) ----------------------------------------------------
// At the avx512 level a vector is one zmm register; otherwise 8 lanes (one ymm at the avx2 level, two
// xmm at the scalar level). Vectors are only passed by reference, so no function has a vector-typed ABI.
#if D2R_SIMD_LEVEL == 2
#define D2R_RS_LANES 16
constexpr int kRows = 8;  // query rows per register tile: 8 x 2 accumulators + 2 B vectors + 1 broadcast
#else
#define D2R_RS_LANES 8
constexpr int kRows = 4;  // 4 x 2 accumulators fit the 16 ymm/xmm registers
#endif
constexpr int kLanes = D2R_RS_LANES;
typedef float vf __attribute__((vector_size(D2R_RS_LANES * 4)));
typedef int32_t vi __attribute__((vector_size(D2R_RS_LANES * 4)));
constexpr int kGroup = 2 * kLanes;  // database rows per packed group (two vectors)
constexpr int kBlockRows = 64;      // query rows per cache block (a multiple of kRows)
static_assert(kBlockRows % kRows == 0, "block must hold whole tiles");

// Unaligned, aliasing-safe view of float data as a vector (the pattern of the intrinsics headers).
typedef float vf_u __attribute__((vector_size(D2R_RS_LANES * 4), aligned(4), may_alias));
#define D2R_RS_LOAD(p) (*reinterpret_cast<const vf_u*>(p))
inline void vload(vf& v, const float* p) { v = D2R_RS_LOAD(p); }
inline void vsplat(vf& v, float x) { v = x - vf{}; }  // x - 0 == x, also for -0
inline void vsplat(vi& v, int32_t x) { v = x - vi{}; }

constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- nearest neighbours: packed database, register-tiled product fused with the arg-min ----------

// Database rows packed as groups of kGroup rows, [group][dim][kGroup] (zero padded), with
// 0.5 ||d||^2 per row (+inf for padding): the nearest row minimises 0.5 ||d||^2 - q.d.
struct PackedDb {
  int dim = 0;
  int64_t n = 0, n_groups = 0;
  std::vector<float> packed, half_norm;

  void pack(const float* db, int64_t n_rows, int d) {
    dim = d;
    n = n_rows;
    n_groups = (n + kGroup - 1) / kGroup;
    packed.assign(static_cast<size_t>(n_groups) * dim * kGroup, 0.0f);
    half_norm.assign(static_cast<size_t>(n_groups) * kGroup, kInf);
    for (int64_t j = 0; j < n; ++j) {
      const float* row = db + j * dim;
      float* col = packed.data() + (j / kGroup) * dim * kGroup + (j % kGroup);
      double s = 0.0;
      for (int k = 0; k < dim; ++k) {
        col[static_cast<int64_t>(k) * kGroup] = row[k];
        s += static_cast<double>(row[k]) * row[k];
      }
      half_norm[j] = static_cast<float>(0.5 * s);
    }
  }
};

// Keeps, per lane, the first (lowest index) strict minimum.
inline void keep_min(vf& best, vi& best_idx, const vf& v, const vi& idx) {
  const vi better = v < best;
  best = (vf)(((vi)v & better) | ((vi)best & ~better));
  best_idx = (idx & better) | (best_idx & ~better);
}

// For kRows query rows x (stride dim) and one packed group g: v = 0.5 ||d||^2 - x_i . d for the
// group's kGroup rows d, folded into the per-lane running minima best / best_idx ([kRows][2]).
// Not inlined: its own small register set (16 accumulators, 2 B vectors, 1 broadcast) keeps the
// product loop free of spills.
__attribute__((noinline)) void tile_min(const float* __restrict x, const PackedDb& db, int64_t g,
                                        vf* __restrict best, vi* __restrict best_idx) {
  const int dim = db.dim;
  const float* __restrict group = db.packed.data() + g * dim * kGroup;
  vf acc[kRows][2];
  for (int i = 0; i < kRows; ++i) {
    vsplat(acc[i][0], 0.0f);
    vsplat(acc[i][1], 0.0f);
  }
  for (int k = 0; k < dim; ++k) {
    const vf b0 = D2R_RS_LOAD(group + k * kGroup);
    const vf b1 = D2R_RS_LOAD(group + k * kGroup + kLanes);
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) {
      const float a = x[i * dim + k];
      acc[i][0] += a * b0;
      acc[i][1] += a * b1;
    }
  }
  const vf h0 = D2R_RS_LOAD(db.half_norm.data() + g * kGroup);
  const vf h1 = D2R_RS_LOAD(db.half_norm.data() + g * kGroup + kLanes);
  vi j0;
  vsplat(j0, static_cast<int32_t>(g * kGroup));
  for (int l = 0; l < kLanes; ++l) j0[l] += l;
  const vi j1 = j0 + kLanes;
  for (int i = 0; i < kRows; ++i) {
    keep_min(best[2 * i], best_idx[2 * i], h0 - acc[i][0], j0);
    keep_min(best[2 * i + 1], best_idx[2 * i + 1], h1 - acc[i][1], j1);
  }
}

// Nearest database row of the query rows [r0, r0 + rows), rows <= kBlockRows; xb: scratch of
// kBlockRows * dim floats.
void nn_block(const float* q, int64_t r0, int rows, const PackedDb& db, float* xb, int32_t* nn) {
  const int dim = db.dim;
  const int tiles = (rows + kRows - 1) / kRows;
  const int padded = tiles * kRows;
  std::memset(xb, 0, sizeof(float) * static_cast<size_t>(padded) * dim);
  std::memcpy(xb, q + r0 * dim, sizeof(float) * static_cast<size_t>(rows) * dim);

  vf best[2 * kBlockRows];
  vi best_idx[2 * kBlockRows];
  for (int r = 0; r < 2 * padded; ++r) {
    vsplat(best[r], kInf);
    vsplat(best_idx[r], -1);
  }
  for (int64_t g = 0; g < db.n_groups; ++g)
    for (int t = 0; t < tiles; ++t)
      tile_min(xb + static_cast<size_t>(t) * kRows * dim, db, g, best + 2 * t * kRows, best_idx + 2 * t * kRows);

  for (int r = 0; r < rows; ++r) {
    float bv = kInf;
    int32_t bi = -1;
    for (int h = 0; h < 2; ++h) {
      for (int l = 0; l < kLanes; ++l) {
        const int32_t idx = best_idx[2 * r + h][l];
        const float v = best[2 * r + h][l];
        if (idx >= 0 && (bi < 0 || v < bv || (v == bv && idx < bi))) {
          bv = v;
          bi = idx;
        }
      }
    }
    nn[r0 + r] = bi;
  }
}

void nn_search(const float* q, int64_t nq, const PackedDb& db, int32_t* nn, bool parallel, std::vector<float>& xb) {
  if (nq <= 0) return;
  if (db.n == 0) {
    std::fill(nn, nn + nq, -1);
    return;
  }
  const int64_t n_blocks = (nq + kBlockRows - 1) / kBlockRows;
  const size_t scratch = static_cast<size_t>(kBlockRows) * db.dim;
  // Whether to go parallel is a choice of strategy only: each row's result does not depend on it.
  if (parallel && n_blocks > 1 && num_threads() > 1) {
    ParallelErrors errors;
#pragma omp parallel
    {
      std::vector<float> local;  // per-thread scratch, allocated by the thread's first block
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < n_blocks; ++b) {
        errors.run([&] {
          if (local.empty()) local.resize(scratch);
          const int64_t r0 = b * kBlockRows;
          nn_block(q, r0, static_cast<int>(std::min<int64_t>(kBlockRows, nq - r0)), db, local.data(), nn);
        });
      }
    }
    errors.rethrow();
  } else {
    if (xb.size() < scratch) xb.resize(scratch);
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t r0 = b * kBlockRows;
      nn_block(q, r0, static_cast<int>(std::min<int64_t>(kBlockRows, nq - r0)), db, xb.data(), nn);
    }
  }
}

inline double exact_sq_dist(const float* a, const float* b, int dim) {
  double s = 0.0;
  for (int k = 0; k < dim; ++k) {
    const double d = static_cast<double>(a[k]) - static_cast<double>(b[k]);
    s += d * d;
  }
  return s;
}

void check_match_args(int64_t nq, int64_t ndb, int dim) {
  D2R_CHECK(dim >= 1, "descriptor dimension must be >= 1");
  D2R_CHECK(nq >= 0 && ndb >= 0, "numbers of descriptors must be >= 0");
  D2R_CHECK(nq <= std::numeric_limits<int32_t>::max() && ndb < std::numeric_limits<int32_t>::max() - kGroup,
            "too many descriptors in one image (at most 2^31 - 64)");
}

void check_max_distance(double max_distance) {
  D2R_CHECK(max_distance > 0.0, "max_distance must be > 0 (and not NaN)");
}

// ---- RANSAC -------------------------------------------------------------------------------------

inline uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// xoshiro256** (Blackman & Vigna), seeded by splitmix64: the same stream on every platform.
struct Rng {
  uint64_t s[4];
  explicit Rng(uint64_t seed) {
    uint64_t st = seed;
    for (auto& w : s) w = splitmix64(st);
  }
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t next() {
    const uint64_t result = rotl(s[1] * 5, 7) * 9;
    const uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
  }
  // Uniform integer in [0, range), range >= 1 (Lemire's multiply-shift with rejection: unbiased).
  uint32_t below(uint32_t range) {
    uint64_t m = static_cast<uint64_t>(static_cast<uint32_t>(next() >> 32)) * range;
    uint32_t low = static_cast<uint32_t>(m);
    if (low < range) {
      const uint32_t t = static_cast<uint32_t>(0u - range) % range;
      while (low < t) {
        m = static_cast<uint64_t>(static_cast<uint32_t>(next() >> 32)) * range;
        low = static_cast<uint32_t>(m);
      }
    }
    return static_cast<uint32_t>(m >> 32);
  }
  // Three distinct indices in [0, n), n >= 3, uniformly.
  void sample3(uint32_t n, uint32_t idx[3]) {
    const uint32_t i0 = below(n);
    uint32_t i1 = below(n - 1);
    if (i1 >= i0) ++i1;
    const uint32_t lo = std::min(i0, i1), hi = std::max(i0, i1);
    uint32_t i2 = below(n - 2);
    if (i2 >= lo) ++i2;
    if (i2 >= hi) ++i2;
    idx[0] = i0;
    idx[1] = i1;
    idx[2] = i2;
  }
};

// Points as structure of arrays, zero padded to a whole number of vectors.
struct Points {
  int64_t n = 0, padded = 0;
  std::vector<float> sx, sy, dx, dy;
  void load(const float* src_xy, const float* dst_xy, int64_t count) {
    n = count;
    padded = (n + kLanes - 1) / kLanes * kLanes;
    for (auto* v : {&sx, &sy, &dx, &dy}) v->assign(static_cast<size_t>(padded), 0.0f);
    for (int64_t i = 0; i < n; ++i) {
      sx[i] = src_xy[2 * i];
      sy[i] = src_xy[2 * i + 1];
      dx[i] = dst_xy[2 * i];
      dy[i] = dst_xy[2 * i + 1];
    }
  }
};

// Collinear (or repeated) points: |det(u, v)| tiny relative to the longest side squared.
inline bool degenerate(double ux, double uy, double vx, double vy) {
  const double det = ux * vy - vx * uy;
  const double wx = vx - ux, wy = vy - uy;
  const double longest = std::max({ux * ux + uy * uy, vx * vx + vy * vy, wx * wx + wy * wy});
  return !(std::fabs(det) > 1e-6 * longest);  // also true for NaN and for three equal points
}

// Exact affine map of 3 source points onto 3 destination points; false when either is degenerate.
bool affine_from_3(const Points& P, const uint32_t idx[3], double m[6]) {
  const double x0 = P.sx[idx[0]], y0 = P.sy[idx[0]], X0 = P.dx[idx[0]], Y0 = P.dy[idx[0]];
  const double ux = P.sx[idx[1]] - x0, uy = P.sy[idx[1]] - y0;
  const double vx = P.sx[idx[2]] - x0, vy = P.sy[idx[2]] - y0;
  const double pux = P.dx[idx[1]] - X0, puy = P.dy[idx[1]] - Y0;
  const double pvx = P.dx[idx[2]] - X0, pvy = P.dy[idx[2]] - Y0;
  if (degenerate(ux, uy, vx, vy) || degenerate(pux, puy, pvx, pvy)) return false;
  // A [u v] = [pu pv]  =>  A = [pu pv] [u v]^-1.
  const double inv = 1.0 / (ux * vy - vx * uy);
  m[0] = (pux * vy - pvx * uy) * inv;
  m[1] = (pvx * ux - pux * vx) * inv;
  m[3] = (puy * vy - pvy * uy) * inv;
  m[4] = (pvy * ux - puy * vx) * inv;
  m[2] = X0 - m[0] * x0 - m[1] * y0;
  m[5] = Y0 - m[3] * x0 - m[4] * y0;
  return std::isfinite(m[0]) && std::isfinite(m[1]) && std::isfinite(m[2]) && std::isfinite(m[3]) &&
         std::isfinite(m[4]) && std::isfinite(m[5]);
}

// Squared residuals of points [i, i + kLanes) under model m (float). The single definition used by
// both the hypothesis scoring and the final mask, so the two always classify points identically.
inline void residual2(const float m[6], const Points& P, int64_t i, vf& r2) {
  vf x, y, X, Y;
  vload(x, P.sx.data() + i);
  vload(y, P.sy.data() + i);
  vload(X, P.dx.data() + i);
  vload(Y, P.dy.data() + i);
  const vf ex = (m[0] * x + m[1] * y + m[2]) - X;
  const vf ey = (m[3] * x + m[4] * y + m[5]) - Y;
  r2 = ex * ex + ey * ey;
}

// Number of points with residual^2 < t2, and the sum of the squared residuals (all points; float
// lanes summed in a fixed order).
int score_model(const float m[6], const Points& P, float t2, float* sum) {
  vf thr, s, r2;
  vsplat(thr, t2);
  vsplat(s, 0.0f);
  vi cnt;
  vsplat(cnt, 0);
  const int64_t full = P.n / kLanes * kLanes;
  for (int64_t i = 0; i < full; i += kLanes) {
    residual2(m, P, i, r2);
    cnt -= (r2 < thr);
    s += r2;
  }
  if (full < P.n) {
    vi valid;
    vsplat(valid, 0);
    for (int l = 0; l < kLanes; ++l) valid[l] = (full + l < P.n) ? -1 : 0;
    residual2(m, P, full, r2);
    cnt -= (r2 < thr) & valid;
    s += (vf)((vi)r2 & valid);
  }
  int c = 0;
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) {
    c += cnt[l];
    total += s[l];
  }
  *sum = total;
  return c;
}

int classify(const float m[6], const Points& P, float t2, uint8_t* mask) {
  vf thr, r2;
  vsplat(thr, t2);
  int c = 0;
  for (int64_t i = 0; i < P.n; i += kLanes) {
    residual2(m, P, i, r2);
    const vi in = r2 < thr;
    const int64_t lanes = std::min<int64_t>(kLanes, P.n - i);
    for (int64_t l = 0; l < lanes; ++l) {
      mask[i + l] = in[l] ? 1 : 0;
      c += in[l] ? 1 : 0;
    }
  }
  return c;
}

// Ordinary least squares affine fit on the flagged points (double, centred coordinates); false when
// they are (nearly) collinear.
bool refit(const Points& P, const uint8_t* mask, double m[6]) {
  double cnt = 0, mx = 0, my = 0, mX = 0, mY = 0;
  for (int64_t i = 0; i < P.n; ++i) {
    if (!mask[i]) continue;
    cnt += 1;
    mx += P.sx[i];
    my += P.sy[i];
    mX += P.dx[i];
    mY += P.dy[i];
  }
  if (cnt < 3) return false;
  mx /= cnt;
  my /= cnt;
  mX /= cnt;
  mY /= cnt;
  double sxx = 0, sxy = 0, syy = 0, sxX = 0, syX = 0, sxY = 0, syY = 0;
  for (int64_t i = 0; i < P.n; ++i) {
    if (!mask[i]) continue;
    const double x = P.sx[i] - mx, y = P.sy[i] - my, X = P.dx[i] - mX, Y = P.dy[i] - mY;
    sxx += x * x;
    sxy += x * y;
    syy += y * y;
    sxX += x * X;
    syX += y * X;
    sxY += x * Y;
    syY += y * Y;
  }
  const double det = sxx * syy - sxy * sxy;
  const double tr = sxx + syy;
  if (!(det > 1e-9 * tr * tr)) return false;
  m[0] = (sxX * syy - sxy * syX) / det;
  m[1] = (sxx * syX - sxy * sxX) / det;
  m[3] = (sxY * syy - sxy * syY) / det;
  m[4] = (sxx * syY - sxy * sxY) / det;
  m[2] = mX - m[0] * mx - m[1] * my;
  m[5] = mY - m[3] * mx - m[4] * my;
  return true;
}

// skimage.measure.ransac's _dynamic_max_trials (min_samples = 3), including its IEEE corner cases.
double dynamic_max_trials(int n_inliers, int64_t n, double probability) {
  if (probability == 0.0) return 0.0;
  if (n_inliers == 0) return std::numeric_limits<double>::infinity();
  const double ratio = static_cast<double>(n_inliers) / static_cast<double>(n);
  const double nom = std::max(DBL_EPSILON, 1.0 - probability);
  const double denom = std::max(DBL_EPSILON, 1.0 - ratio * ratio * ratio);
  const double ld = std::log(denom);
  if (ld == 0.0) return -std::numeric_limits<double>::infinity();  // numpy: log(nom) / 0 -> -inf
  return std::ceil(std::log(nom) / ld);
}

void check_ransac_params(const RansacParams& p) {
  D2R_CHECK(std::isfinite(p.threshold) && p.threshold > 0.0f, "RANSAC threshold must be finite and > 0");
  D2R_CHECK(p.max_trials >= 0, "max_trials must be >= 0");
  D2R_CHECK(!std::isnan(p.stop_probability) && p.stop_probability <= 1.0,
            "stop_probability must be <= 1 (negative: no early stop)");
}

int ransac_points(const Points& P, const RansacParams& p, float* best_model, uint8_t* inlier_mask) {
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  if (best_model) std::fill(best_model, best_model + 6, kNaN);
  if (inlier_mask) std::fill(inlier_mask, inlier_mask + P.n, uint8_t{0});
  if (P.n < 3) return 0;
  const float t2 = p.threshold * p.threshold;
  const uint32_t n = static_cast<uint32_t>(P.n);
  Rng rng(p.seed);
  int best = 0;
  float best_sum = kInf;
  float bm[6] = {0, 0, 0, 0, 0, 0};
  for (int trial = 0; trial < p.max_trials; ++trial) {
    uint32_t idx[3];
    rng.sample3(n, idx);
    double m[6];
    if (!affine_from_3(P, idx, m)) continue;
    float fm[6];
    for (int k = 0; k < 6; ++k) fm[k] = static_cast<float>(m[k]);
    float sum = 0.0f;
    const int cnt = score_model(fm, P, t2, &sum);
    if (cnt == 0 || cnt < best || (cnt == best && !(sum < best_sum))) continue;
    best = cnt;
    best_sum = sum;
    std::copy(fm, fm + 6, bm);
    if (p.stop_probability >= 0.0 && trial >= dynamic_max_trials(best, P.n, p.stop_probability)) break;
  }
  if (best == 0 || (!best_model && !inlier_mask)) return best;
  std::vector<uint8_t> own;
  uint8_t* mask = inlier_mask;
  if (!mask) {
    own.assign(static_cast<size_t>(P.n), 0);
    mask = own.data();
  }
  classify(bm, P, t2, mask);
  if (best_model) {
    double m[6];
    if (refit(P, mask, m)) {
      for (int k = 0; k < 6; ++k) best_model[k] = static_cast<float>(m[k]);
    } else {
      std::copy(bm, bm + 6, best_model);
    }
  }
  return best;
}

struct Workspace {
  PackedDb db;
  std::vector<float> xb;
  std::vector<int32_t> nn;
  std::vector<float> src, dst;
  Points points;
};

int verify_one(const ImageFeatures& Q, const ImageFeatures& D, int dim, const VerifyParams& p, Workspace& ws,
               bool parallel, int32_t* n_matches) {
  if (n_matches) *n_matches = 0;
  if (Q.n == 0 || D.n == 0) return 0;
  ws.db.pack(D.descriptors, D.n, dim);
  ws.nn.resize(static_cast<size_t>(Q.n));
  nn_search(Q.descriptors, Q.n, ws.db, ws.nn.data(), parallel, ws.xb);
  const double max_sq = p.max_distance * p.max_distance;
  ws.src.clear();
  ws.dst.clear();
  for (int64_t i = 0; i < Q.n; ++i) {
    const int32_t j = ws.nn[i];
    if (j < 0) continue;
    if (!(exact_sq_dist(Q.descriptors + i * dim, D.descriptors + static_cast<int64_t>(j) * dim, dim) < max_sq))
      continue;
    ws.src.push_back(D.xy[2 * static_cast<int64_t>(j)]);
    ws.src.push_back(D.xy[2 * static_cast<int64_t>(j) + 1]);
    ws.dst.push_back(Q.xy[2 * i]);
    ws.dst.push_back(Q.xy[2 * i + 1]);
  }
  const int64_t m = static_cast<int64_t>(ws.dst.size() / 2);
  if (n_matches) *n_matches = static_cast<int32_t>(m);
  if (m < p.min_matches) return 0;
  ws.points.load(ws.src.data(), ws.dst.data(), m);
  return ransac_points(ws.points, p.ransac, nullptr, nullptr);
}

void check_image(const ImageFeatures& f, const char* what) {
  D2R_CHECK(f.n >= 0, std::string(what) + ": negative number of features");
  D2R_CHECK(f.n <= std::numeric_limits<int32_t>::max() - kGroup, std::string(what) + ": too many features");
  D2R_CHECK(f.n == 0 || (f.descriptors && f.xy), std::string(what) + ": missing descriptors or locations");
}

}  // namespace

// ---- public API ---------------------------------------------------------------------------------

void nearest_neighbors(const float* q, int64_t nq, const float* db, int64_t ndb, int dim, int32_t* nn,
                       double* sq_dist, bool parallel) {
  check_match_args(nq, ndb, dim);
  if (nq == 0) return;
  PackedDb packed;
  packed.pack(db, ndb, dim);
  std::vector<float> xb;
  nn_search(q, nq, packed, nn, parallel, xb);
  if (sq_dist) {
    for (int64_t i = 0; i < nq; ++i) {
      sq_dist[i] = nn[i] < 0 ? std::numeric_limits<double>::infinity()
                             : exact_sq_dist(q + i * dim, db + static_cast<int64_t>(nn[i]) * dim, dim);
    }
  }
}

int64_t match_descriptors(const float* q, int64_t nq, const float* db, int64_t ndb, int dim, double max_distance,
                          std::vector<int32_t>* q_idx, std::vector<int32_t>* db_idx, std::vector<float>* dist,
                          bool parallel) {
  check_match_args(nq, ndb, dim);
  check_max_distance(max_distance);
  if (q_idx) q_idx->clear();
  if (db_idx) db_idx->clear();
  if (dist) dist->clear();
  if (nq == 0 || ndb == 0) return 0;
  std::vector<int32_t> nn(static_cast<size_t>(nq));
  std::vector<double> d2(static_cast<size_t>(nq));
  nearest_neighbors(q, nq, db, ndb, dim, nn.data(), d2.data(), parallel);
  const double max_sq = max_distance * max_distance;
  int64_t m = 0;
  for (int64_t i = 0; i < nq; ++i) {
    if (nn[i] < 0 || !(d2[i] < max_sq)) continue;
    ++m;
    if (q_idx) q_idx->push_back(static_cast<int32_t>(i));
    if (db_idx) db_idx->push_back(nn[i]);
    if (dist) dist->push_back(static_cast<float>(std::sqrt(d2[i])));
  }
  return m;
}

int affine_ransac(const float* src_xy, const float* dst_xy, int64_t n, const RansacParams& params, float* best_model,
                  uint8_t* inlier_mask) {
  D2R_CHECK(n >= 0, "number of points must be >= 0");
  D2R_CHECK(n <= std::numeric_limits<int32_t>::max(), "too many points (at most 2^31 - 1)");
  D2R_CHECK(n == 0 || (src_xy && dst_xy), "missing point arrays");
  check_ransac_params(params);
  Points P;
  P.load(src_xy, dst_xy, n);
  return ransac_points(P, params, best_model, inlier_mask);
}

void verify_many(const ImageFeatures* queries, int64_t n_queries, const ImageFeatures* images, int64_t n_images,
                 int dim, const int64_t* pairs, int64_t n_pairs, const VerifyParams& params, int32_t* inliers,
                 int32_t* n_matches) {
  D2R_CHECK(dim >= 1, "descriptor dimension must be >= 1");
  D2R_CHECK(n_queries >= 0 && n_images >= 0 && n_pairs >= 0, "negative count");
  check_max_distance(params.max_distance);
  D2R_CHECK(params.min_matches >= 0, "min_matches must be >= 0");
  check_ransac_params(params.ransac);
  for (int64_t i = 0; i < n_queries; ++i) check_image(queries[i], "query image");
  for (int64_t i = 0; i < n_images; ++i) check_image(images[i], "database image");
  for (int64_t p = 0; p < n_pairs; ++p) {
    D2R_CHECK(pairs[2 * p] >= 0 && pairs[2 * p] < n_queries, "pair refers to a query image out of range");
    D2R_CHECK(pairs[2 * p + 1] >= 0 && pairs[2 * p + 1] < n_images, "pair refers to a database image out of range");
  }
  if (n_pairs == 0) return;

  // A choice of strategy only (results do not depend on it): pairs in parallel when there are
  // enough of them, else each pair's matching split over the threads.
  const int T = num_threads();
  if (T > 1 && n_pairs >= 2 * T) {
    ParallelErrors errors;
#pragma omp parallel
    {
      Workspace ws;  // per-thread scratch: empty here, grown inside errors.run
#pragma omp for schedule(dynamic, 1)
      for (int64_t p = 0; p < n_pairs; ++p) {
        errors.run([&] {
          inliers[p] = verify_one(queries[pairs[2 * p]], images[pairs[2 * p + 1]], dim, params, ws, false,
                                  n_matches ? n_matches + p : nullptr);
        });
      }
    }
    errors.rethrow();
  } else {
    Workspace ws;
    for (int64_t p = 0; p < n_pairs; ++p) {
      inliers[p] = verify_one(queries[pairs[2 * p]], images[pairs[2 * p + 1]], dim, params, ws, true,
                              n_matches ? n_matches + p : nullptr);
    }
  }
}

}  // namespace D2R_SIMD_NS
}  // namespace d2r
D2R_SIMD_END
