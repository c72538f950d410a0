// GPU quantisation (mirror of csrc/quantize.cpp): nearest m visual words by squared L2.
//
// 1. approx_topk_kernel: blocks of 64 descriptors x a range of words ("split"); the products X C^T are
//    computed tile by tile (64 x 128 words) on tensor cores in TF32 (WMMA), the approximate distances
//    ||c||^2 - 2 x.c go straight from shared memory into per-thread sorted top-T lists in registers,
//    so the distance matrix never reaches global memory. Each block writes its T best words and the
//    T-th value (its threshold) per row.
// 2. recheck_kernel: one warp per row re-computes the candidates' distances in float64 exactly as the
//    CPU re-check does, keeps the m best (ties by the lower id), and certifies them: every word that
//    is not a candidate has an approximate distance >= its split's threshold A, so its exact distance
//    is >= A - E, where E bounds the TF32/float32 error (see error_bound). If the m-th exact distance
//    is < min A - E the answer is proven equal to an exhaustive float64 search; otherwise the row is
//    queued for
// 3. exact_rows_kernel: an exhaustive float64 scan of the whole codebook for that row.
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <climits>
#include <cmath>
#include <vector>

#include "cuda_utils.cuh"

namespace d2r {
namespace gpu {
namespace {

using namespace nvcuda;

constexpr int kBM = 64;        // descriptors per block
constexpr int kBN = 128;       // words per tile
constexpr int kBK = 32;        // dimensions per centroid chunk in shared memory
constexpr int kThreads = 256;  // 8 warps
constexpr int kRecheckWarps = 8;
constexpr int kMaxCand = 512;  // candidates per row in the re-check (splits x T)

__device__ __forceinline__ bool before(double da, int ia, double db, int ib) {
  return da < db || (da == db && ia < ib);
}

// Warp-wide minimum of (d, id) in the order of `before`; `tag` (a position or a thread) travels
// with the winner. Every lane ends with the winner.
__device__ __forceinline__ void warp_argmin(double& d, int& id, int& tag) {
  for (int o = 16; o; o >>= 1) {
    const double od = __shfl_xor_sync(0xffffffffu, d, o);
    const int oi = __shfl_xor_sync(0xffffffffu, id, o);
    const int ot = __shfl_xor_sync(0xffffffffu, tag, o);
    if (before(od, oi, d, id)) {
      d = od;
      id = oi;
      tag = ot;
    }
  }
}

// Exact squared distance in float64, the same arithmetic as the CPU re-check.
__device__ __forceinline__ double exact_dist(const float* __restrict__ x, const float* __restrict__ c, int dim) {
  double s = 0.0;
  for (int d = 0; d < dim; ++d) {
    const double diff = static_cast<double>(x[d]) - static_cast<double>(c[d]);
    s = fma(diff, diff, s);
  }
  return s;
}

__global__ void prepare_codebook_kernel(const float* __restrict__ c, int64_t k, int dim, int dp,
                                        float* __restrict__ cpad, float* __restrict__ norms,
                                        float* __restrict__ norm_max_bits) {
  const int64_t w = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (w >= k) return;
  double s = 0.0;
  for (int d = 0; d < dp; ++d) {
    const float v = d < dim ? c[w * dim + d] : 0.0f;
    cpad[w * dp + d] = wmma::__float_to_tf32(v);
    s += static_cast<double>(v) * v;
  }
  norms[w] = static_cast<float>(s);
  // max of non-negative floats through their bit patterns
  atomicMax(reinterpret_cast<unsigned int*>(norm_max_bits), __float_as_uint(static_cast<float>(sqrt(s))));
}

template <int T>
__global__ void __launch_bounds__(kThreads, T == 16 ? 2 : 1) approx_topk_kernel(
    const float* __restrict__ x, int64_t n, int dim, int dp, const float* __restrict__ cpad,
    const float* __restrict__ norms, int64_t k, int64_t words_per_split, int splits, float* __restrict__ part_d,
    int32_t* __restrict__ part_i, float* __restrict__ part_thr) {
  extern __shared__ __align__(128) float smem[];
  const int ldx = dp + 8;
  const int ldc = kBK + 8;
  const int lds = kBN + 8;
  float* xs = smem;                    // kBM x ldx
  float* cs0 = xs + kBM * ldx;         // two kBN x ldc centroid chunks (double buffer)
  float* ss = cs0 + 2 * kBN * ldc;     // kBM x lds (scores); reused for the list merge
  float* tn = ss + (kBM * lds > kBM * 4 * T * 2 ? kBM * lds : kBM * 4 * T * 2);  // the tile's norms (kBN)
  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int split = blockIdx.y;
  const int64_t w_begin = split * words_per_split;
  const int64_t w_end = min(k, w_begin + words_per_split);

  for (int i = tid; i < kBM * dp; i += kThreads) {
    const int r = i / dp, c = i % dp;
    const int64_t gr = row0 + r;
    const float v = (gr < n && c < dim) ? x[gr * dim + c] : 0.0f;
    xs[r * ldx + c] = wmma::__float_to_tf32(v);
  }

  float td[T];
  int32_t ti[T];
#pragma unroll
  for (int i = 0; i < T; ++i) {
    td[i] = FLT_MAX;
    ti[i] = -1;
  }
  const int my_row = tid >> 2, sub = tid & 3;
  const int wr = warp >> 1;        // row fragment 0..3
  const int wc = (warp & 1) * 4;   // first of 4 column fragments

  // The centroid chunks (tile t, dimensions k0..k0+kBK) are streamed in order; chunk c+1 is fetched
  // into registers (float4) while the tensor cores work on chunk c, then stored into the other buffer.
  // (No 64-bit divisions in the loop: they are long software sequences on the GPU.)
  const int kchunks = (dp + kBK - 1) / kBK;
  const int n_tiles = static_cast<int>((w_end - w_begin + kBN - 1) / kBN);
  const int n_chunks = n_tiles * kchunks;
  constexpr int kVec = kBN * kBK / 4 / kThreads;  // float4 per thread per chunk (4)
  float4 pre[kVec];
  auto fetch = [&](int t, int kc) {
    const int64_t w0 = w_begin + static_cast<int64_t>(t) * kBN;
    const int k0 = kc * kBK;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int i = tid + j * kThreads;
      const int r = i / (kBK / 4), c4 = i % (kBK / 4);
      const int64_t w = w0 + r;
      pre[j] = (w < w_end && k0 + 4 * c4 < dp)
                   ? __ldg(reinterpret_cast<const float4*>(cpad + w * dp + k0) + c4)
                   : make_float4(0.f, 0.f, 0.f, 0.f);
    }
  };
  auto stash = [&](float* cs) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int i = tid + j * kThreads;
      const int r = i / (kBK / 4), c4 = i % (kBK / 4);
      *reinterpret_cast<float4*>(cs + r * ldc + 4 * c4) = pre[j];
    }
  };
  if (n_chunks > 0) {
    fetch(0, 0);
    stash(cs0);
  }
  __syncthreads();
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[4];
  int tile = 0, kc = 0;  // chunk c = tile * kchunks + kc
  for (int c = 0; c < n_chunks; ++c) {
    const int k0 = kc * kBK;
    if (kc == 0) {
#pragma unroll
      for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[j], 0.0f);
    }
    const int next_tile = kc + 1 == kchunks ? tile + 1 : tile;
    const int next_kc = kc + 1 == kchunks ? 0 : kc + 1;
    if (c + 1 < n_chunks) fetch(next_tile, next_kc);
    const float* cs = cs0 + (c & 1) * kBN * ldc;
    const int kw = min(kBK, dp - k0);
    for (int kk = 0; kk < kw; kk += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a;
      wmma::load_matrix_sync(a, xs + wr * 16 * ldx + k0 + kk, ldx);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> b;
        wmma::load_matrix_sync(b, cs + (wc + j) * 16 * ldc + kk, ldc);
        wmma::mma_sync(acc[j], a, b, acc[j]);
      }
    }
    if (kc == kchunks - 1) {
      // tile complete: scores to shared memory, then into the per-thread top-T lists
#pragma unroll
      for (int j = 0; j < 4; ++j)
        wmma::store_matrix_sync(ss + wr * 16 * lds + (wc + j) * 16, acc[j], lds, wmma::mem_row_major);
      const int64_t w0 = w_begin + static_cast<int64_t>(tile) * kBN;
      if (tid < kBN) tn[tid] = w0 + tid < w_end ? norms[w0 + tid] : INFINITY;  // padding never selected
      __syncthreads();
      // Each thread scans 4 consecutive words at a time (float4 reads of scores and norms) and only
      // enters the insertion when one of the 4 beats its current T-th distance.
      const float* srow = ss + my_row * lds;
      const int32_t wbase = static_cast<int32_t>(w0);
      for (int q = sub; q < kBN / 4; q += 4) {
        const float4 s4 = *reinterpret_cast<const float4*>(srow + 4 * q);
        const float4 n4 = *reinterpret_cast<const float4*>(tn + 4 * q);
        const float dd[4] = {n4.x - 2.0f * s4.x, n4.y - 2.0f * s4.y, n4.z - 2.0f * s4.z, n4.w - 2.0f * s4.w};
        if (fminf(fminf(dd[0], dd[1]), fminf(dd[2], dd[3])) >= td[T - 1]) continue;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float d = dd[e];
          if (!(d < td[T - 1])) continue;
          int32_t id = wbase + 4 * q + e;
#pragma unroll
          for (int i = 0; i < T; ++i) {
            if (d < td[i]) {
              const float t = td[i];
              td[i] = d;
              d = t;
              const int32_t u = ti[i];
              ti[i] = id;
              id = u;
            }
          }
        }
      }
    }
    if (c + 1 < n_chunks) stash(cs0 + ((c + 1) & 1) * kBN * ldc);
    __syncthreads();
    tile = next_tile;
    kc = next_kc;
  }
  // Merge the 4 lists of each row (sorted by distance, then id) into the block's top T.
  __syncthreads();
  float* md = ss;
  int32_t* mi = reinterpret_cast<int32_t*>(ss + kBM * 4 * T);
#pragma unroll
  for (int i = 0; i < T; ++i) {
    md[(my_row * 4 + sub) * T + i] = td[i];
    mi[(my_row * 4 + sub) * T + i] = ti[i];
  }
  __syncthreads();
  if (sub == 0 && row0 + my_row < n) {
    int pos[4] = {0, 0, 0, 0};
    const int64_t out = ((row0 + my_row) * splits + split) * T;
    float last = FLT_MAX;
    for (int i = 0; i < T; ++i) {
      int best = -1;
      float bd = FLT_MAX;
      int32_t bi = INT_MAX;
      for (int l = 0; l < 4; ++l) {
        if (pos[l] >= T) continue;
        const float d = md[(my_row * 4 + l) * T + pos[l]];
        const int32_t id = mi[(my_row * 4 + l) * T + pos[l]];
        if (id < 0) continue;
        if (d < bd || (d == bd && id < bi)) {
          bd = d;
          bi = id;
          best = l;
        }
      }
      if (best < 0) {
        part_d[out + i] = FLT_MAX;
        part_i[out + i] = -1;
        last = FLT_MAX;  // fewer than T words in this split: every word is a candidate
      } else {
        part_d[out + i] = bd;
        part_i[out + i] = bi;
        ++pos[best];
        last = bd;
      }
    }
    part_thr[(row0 + my_row) * splits + split] = last;
  }
}

// Bound on |approximate - exact| distance (both without ||x||^2): TF32 rounding of both operands
// (relative 2^-11 each), float32 accumulation over the padded dimension, the float32 norm and the
// final subtraction; doubled for safety.
__device__ __forceinline__ double error_bound(double xnorm, double cmax, int dp) {
  const double u_tf32 = 1.0 / 2048.0, u32 = 1.0 / 16777216.0;
  const double dot_err = (2.0 * u_tf32 + u_tf32 * u_tf32 + 4.0 * dp * u32) * xnorm * cmax;
  const double rest = 4.0 * u32 * (cmax * cmax + 2.0 * xnorm * cmax);
  return 2.0 * (2.0 * dot_err + rest) + 1e-12 * (xnorm * xnorm + cmax * cmax);
}

__global__ void recheck_kernel(const float* __restrict__ x, int64_t n, int dim, int dp,
                               const float* __restrict__ c, const float* __restrict__ cmax_p,
                               const float* __restrict__ part_d, const int32_t* __restrict__ part_i,
                               const float* __restrict__ part_thr, int splits, int T, int m,
                               int32_t* __restrict__ ids, float* __restrict__ dists, int32_t* __restrict__ fb_rows,
                               int32_t* __restrict__ fb_count) {
  extern __shared__ __align__(16) unsigned char rsm[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  double* cd = reinterpret_cast<double*>(rsm) + warp * kMaxCand;
  int32_t* ci = reinterpret_cast<int32_t*>(reinterpret_cast<double*>(rsm) + kRecheckWarps * kMaxCand) + warp * kMaxCand;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRecheckWarps + warp;
  if (row >= n) return;
  const float* xr = x + row * dim;
  const int cnt = splits * T;
  double xn2 = 0.0;
  for (int d = lane; d < dim; d += 32) xn2 += static_cast<double>(xr[d]) * xr[d];
  for (int o = 16; o; o >>= 1) xn2 += __shfl_xor_sync(0xffffffffu, xn2, o);
  float thr = FLT_MAX;
  for (int s = 0; s < splits; ++s) thr = fminf(thr, part_thr[row * splits + s]);
  for (int i = lane; i < cnt; i += 32) {
    const int32_t id = part_i[row * cnt + i];
    ci[i] = id < 0 ? INT_MAX : id;
    cd[i] = id < 0 ? DBL_MAX : exact_dist(xr, c + static_cast<int64_t>(id) * dim, dim);
  }
  __syncwarp();
  double dm = 0.0;
  for (int r = 0; r < m; ++r) {
    double bd = DBL_MAX;
    int bi = INT_MAX, bp = -1;
    for (int i = lane; i < cnt; i += 32)
      if (before(cd[i], ci[i], bd, bi)) {
        bd = cd[i];
        bi = ci[i];
        bp = i;
      }
    warp_argmin(bd, bi, bp);
    if (lane == 0) {
      ids[row * m + r] = bi;
      if (dists) dists[row * m + r] = static_cast<float>(bd);
    }
    if (bp >= 0 && (bp & 31) == lane) {
      cd[bp] = DBL_MAX;
      ci[bp] = INT_MAX;
    }
    __syncwarp();
    dm = bd;
  }
  if (lane == 0 && thr < FLT_MAX) {
    const double e = error_bound(sqrt(xn2), static_cast<double>(*cmax_p), dp);
    if (!(dm - xn2 < static_cast<double>(thr) - e)) fb_rows[atomicAdd(fb_count, 1)] = static_cast<int32_t>(row);
  }
}

// Exhaustive float64 search of one row per block (rows the bound could not certify).
__global__ void exact_rows_kernel(const float* __restrict__ x, int dim, const float* __restrict__ c, int64_t k,
                                  int m, const int32_t* __restrict__ rows, int32_t* __restrict__ ids,
                                  float* __restrict__ dists) {
  constexpr int kT = 256;
  __shared__ double sd[kT / 32];
  __shared__ int si[kT / 32], st[kT / 32];
  __shared__ int winner;
  const int64_t row = rows[blockIdx.x];
  const float* xr = x + row * dim;
  double ld[Quantizer::kMaxM];
  int li[Quantizer::kMaxM];
  for (int i = 0; i < m; ++i) {
    ld[i] = DBL_MAX;
    li[i] = INT_MAX;
  }
  for (int64_t w = threadIdx.x; w < k; w += kT) {
    double d = exact_dist(xr, c + w * dim, dim);
    int id = static_cast<int>(w);
    if (!before(d, id, ld[m - 1], li[m - 1])) continue;
    for (int i = 0; i < m; ++i) {
      if (before(d, id, ld[i], li[i])) {
        const double t = ld[i];
        ld[i] = d;
        d = t;
        const int u = li[i];
        li[i] = id;
        id = u;
      }
    }
  }
  int head = 0;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int r = 0; r < m; ++r) {
    double bd = head < m ? ld[head] : DBL_MAX;
    int bi = head < m ? li[head] : INT_MAX;
    int bt = threadIdx.x;
    warp_argmin(bd, bi, bt);
    if (lane == 0) {
      sd[warp] = bd;
      si[warp] = bi;
      st[warp] = bt;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int b = 0;
      for (int wq = 1; wq < kT / 32; ++wq)
        if (before(sd[wq], si[wq], sd[b], si[b])) b = wq;
      ids[row * m + r] = si[b];
      if (dists) dists[row * m + r] = static_cast<float>(sd[b]);
      winner = st[b];
    }
    __syncthreads();
    if (threadIdx.x == winner) ++head;
    __syncthreads();
  }
}

template <int T>
size_t approx_smem_bytes(int dp) {
  const size_t ss = std::max<size_t>(static_cast<size_t>(kBM) * (kBN + 8), static_cast<size_t>(kBM) * 4 * T * 2);
  return sizeof(float) * (static_cast<size_t>(kBM) * (dp + 8) + 2 * static_cast<size_t>(kBN) * (kBK + 8) + ss + kBN);
}

}  // namespace

struct Quantizer::Impl {
  int64_t k = 0;
  int dim = 0, dp = 0;
  Buffer c, cpad, norms, cmax;
  mutable std::atomic<int64_t> fallback{0};
};

Quantizer::Quantizer(const float* centroids, bool on_device, int64_t n_words, int dim) : impl_(new Impl) {
  require_device();
  if (n_words < 1) throw std::invalid_argument("the codebook is empty");
  if (dim < 1 || dim > kMaxDim)
    throw std::invalid_argument("the GPU quantizer supports dimensions 1.." + std::to_string(kMaxDim) + ", got " +
                                std::to_string(dim));
  if (n_words > INT32_MAX) throw std::invalid_argument("too many visual words for the GPU quantizer");
  Impl& q = *impl_;
  q.k = n_words;
  q.dim = dim;
  q.dp = (dim + 7) / 8 * 8;
  const size_t cb = sizeof(float) * n_words * dim;
  q.c = Buffer(cb, "codebook");
  if (on_device)
    copy_d2d(q.c.data(), centroids, cb);
  else
    q.c.upload(centroids, cb);
  q.cpad = Buffer(sizeof(float) * n_words * q.dp, "padded TF32 codebook");
  q.norms = Buffer(sizeof(float) * n_words, "codebook norms");
  q.cmax = Buffer(sizeof(float), "codebook max norm");
  D2R_CUDA_CHECK(cudaMemset(q.cmax.data(), 0, sizeof(float)), "cudaMemset");
  prepare_codebook_kernel<<<grid_for(n_words, 256), 256>>>(q.c.as<float>(), n_words, dim, q.dp, q.cpad.as<float>(),
                                                            q.norms.as<float>(), q.cmax.as<float>());
  D2R_CUDA_LAUNCH("prepare_codebook_kernel");
  sync("preparing the codebook");
}

Quantizer::~Quantizer() = default;
int64_t Quantizer::n_words() const { return impl_->k; }
int Quantizer::dim() const { return impl_->dim; }
const float* Quantizer::centroids() const { return impl_->c.as<float>(); }
int64_t Quantizer::last_fallback_rows() const { return impl_->fallback; }

namespace {
template <int T>
void launch_approx(const float* x, int64_t n, int dim, int dp, const float* cpad, const float* norms, int64_t k,
                   int64_t wps, int splits, float* pd, int32_t* pi, float* pt) {
  const size_t sm = approx_smem_bytes<T>(dp);
  int dev = 0, optin = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (sm > static_cast<size_t>(optin))
    throw std::invalid_argument("descriptor dimension " + std::to_string(dim) + " with this m needs " +
                                std::to_string(sm) + " bytes of shared memory per block; this GPU has " +
                                std::to_string(optin) + " (use a smaller dimension or m)");
  D2R_CUDA_CHECK(cudaFuncSetAttribute(approx_topk_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(sm)),
                 "cudaFuncSetAttribute (quantizer shared memory)");
  dim3 grid(static_cast<unsigned>((n + kBM - 1) / kBM), static_cast<unsigned>(splits));
  approx_topk_kernel<T><<<grid, kThreads, sm>>>(x, n, dim, dp, cpad, norms, k, wps, splits, pd, pi, pt);
  D2R_CUDA_LAUNCH("approx_topk_kernel");
}
}  // namespace

void Quantizer::search(const float* x, int64_t n, int m, int32_t* ids, float* dists) const {
  const Impl& q = *impl_;
  if (m < 1 || m > kMaxM)
    throw std::invalid_argument("GPU multiple assignment m must be in 1.." + std::to_string(kMaxM));
  if (m > q.k) throw std::invalid_argument("multiple assignment m exceeds the number of visual words");
  q.fallback = 0;
  if (n <= 0) return;
  const int T = m <= 8 ? 16 : 32;  // T >= m + 8 keeps the certified fraction high
  // Rows in chunks so the candidate buffers stay small.
  const int64_t chunk = int64_t{1} << 18;
  const int64_t row_blocks_full = (std::min(n, chunk) + kBM - 1) / kBM;
  const int64_t target = 4 * static_cast<int64_t>(sm_count());
  int64_t splits = (target + row_blocks_full - 1) / row_blocks_full;
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, kMaxCand / T, (q.k + 2047) / 2048}));
  int64_t wps = (q.k + splits - 1) / splits;
  wps = (wps + kBN - 1) / kBN * kBN;
  splits = (q.k + wps - 1) / wps;
  const int64_t rows = std::min(n, chunk);
  Buffer pd(sizeof(float) * rows * splits * T, "quantizer candidates");
  Buffer pi(sizeof(int32_t) * rows * splits * T, "quantizer candidates");
  Buffer pt(sizeof(float) * rows * splits, "quantizer thresholds");
  Buffer fb(sizeof(int32_t) * rows, "quantizer fallback rows");
  Buffer fbn(sizeof(int32_t), "quantizer fallback count");
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t nr = std::min(chunk, n - r0);
    const float* xc = x + r0 * q.dim;
    if (T == 16)
      launch_approx<16>(xc, nr, q.dim, q.dp, q.cpad.as<float>(), q.norms.as<float>(), q.k, wps,
                        static_cast<int>(splits), pd.as<float>(), pi.as<int32_t>(), pt.as<float>());
    else
      launch_approx<32>(xc, nr, q.dim, q.dp, q.cpad.as<float>(), q.norms.as<float>(), q.k, wps,
                        static_cast<int>(splits), pd.as<float>(), pi.as<int32_t>(), pt.as<float>());
    D2R_CUDA_CHECK(cudaMemset(fbn.data(), 0, sizeof(int32_t)), "cudaMemset");
    const size_t rsm = static_cast<size_t>(kRecheckWarps) * kMaxCand * (sizeof(double) + sizeof(int32_t));
    D2R_CUDA_CHECK(cudaFuncSetAttribute(recheck_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(rsm)),
                   "cudaFuncSetAttribute (re-check shared memory)");
    recheck_kernel<<<grid_for(nr, kRecheckWarps), kRecheckWarps * 32, rsm>>>(
        xc, nr, q.dim, q.dp, q.c.as<float>(), q.cmax.as<float>(), pd.as<float>(), pi.as<int32_t>(), pt.as<float>(),
        static_cast<int>(splits), T, m, ids + r0 * m, dists ? dists + r0 * m : nullptr, fb.as<int32_t>(),
        fbn.as<int32_t>());
    D2R_CUDA_LAUNCH("recheck_kernel");
    int32_t n_fb = 0;
    fbn.download(&n_fb, sizeof(n_fb));
    if (n_fb > 0) {
      exact_rows_kernel<<<n_fb, 256>>>(xc, q.dim, q.c.as<float>(), q.k, m, fb.as<int32_t>(), ids + r0 * m,
                                       dists ? dists + r0 * m : nullptr);
      D2R_CUDA_LAUNCH("exact_rows_kernel");
    }
    q.fallback += n_fb;
  }
  sync("GPU quantisation");
}

}  // namespace gpu
}  // namespace d2r
