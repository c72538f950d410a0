// Inverted file in GPU memory, scoring and top-k (mirror of csrc/ivf.cpp and csrc/topk.cpp).
//
// Storage: a list of CSR parts, each {offsets per word, slots, codes} over a contiguous range of slots,
// built in bulk on the GPU by a stable radix sort of the entries by word (slots stay ascending within a
// word). An add builds one part (several batches are concatenated first); the newest parts are merged
// while the newest is at least half the size of the one before (amortised O(log n) merges per entry),
// and the tail is merged beyond kMaxParts. A part's sort keys and permutation are uint32, so a part
// holds at most 2^32 - 1 entries (kMaxPartEntries): a larger add is refused, merges stop at the limit.
// Removal filters the parts from the first changed slot on (no sort: the renumbering keeps the order).
//
// Exception safety: the parts are immutable once built and shared (shared_ptr) between the current
// content and the one an operation builds beside it; per-slot host tables get their capacity reserved
// before the commit; the commit is swaps and moves that cannot throw (see InvertedFile in gpu.h).
//
// Fixed point (csrc/fixed_point.h): a slot's score is the sum, over the query's words, of one
// contribution sigma(u) each (an image holds a word at most once), accumulated in int64 units of
// 2^-32. It cannot overflow while |sigma| * n_query_words < 2^31. Binary codes: |sigma| is read off the
// Hamming table. Float codes (ASMK, Naive-R-ASMK: not unit vectors): |u| <= |q| |c| (1 + dim 2^-23)
// for the float dot product, so every part records the largest L2 norm of its codes (computed on the
// device when it is built), each scoring call measures its queries' largest norm (unit vectors for
// ASMK / ASMK* queries), and the call is refused (InvalidArgument, "score contribution out of the
// fixed-point range") when the bound on |sigma| times its largest query word count reaches 2^31. The
// CPU index refuses the same cases per contribution.
//
// Scoring (why it is organised so): a query touches ~|W_q| posting lists of ~n * |W| / C entries each;
// reading them is the unavoidable cost (the "bandwidth bound"), and the accumulator must not spill to
// global memory. Each block therefore owns one query and one range of kSlotsPerBlock database slots,
// keeps that range's accumulators in shared memory (64-bit fixed point, csrc/fixed_point.h: integer
// atomics, so the sum is exact and does not depend on the order, and equals the CPU's), binary-searches
// each query word's posting list for its slot range (lists are sorted by slot) and scans it, a warp per
// list. It then applies gamma, turns each slot's score into a unique 64-bit key (order-preserving score
// bits, then the inverted rank of the image id, so ties break by the lower id as on the CPU) and keeps
// the range's k best with a block-wide radix select. A second kernel selects each query's k best of its
// ranges' candidates and sorts them. No dense queries x images matrix is formed; memory per batch is
// n_queries x n_ranges x k keys. score_all (dense scores, for full rankings and k > kMaxK) writes the
// scores of a chunk of queries instead.
#include <cub/cub.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <unordered_map>
#include <utility>
#include <vector>

#include "binarize.h"
#include "common.h"
#include "cuda_utils.cuh"
#include "fixed_point.h"
#include "reduce.h"
#include "selectivity.h"
#include "topk.h"

namespace d2r {
namespace gpu {
namespace {

constexpr int kMaxParts = 16;
constexpr int kSlotsPerBlock = 8192;
constexpr int kScoreThreads = 512;
constexpr int kFinalThreads = 1024;
constexpr int64_t kMaxId = int64_t{1} << 62;  // as the CPU index: ids stay far from int64 overflow (next_id = max + 1)

struct PartView {
  const int64_t* off;
  const uint32_t* slot;
  const uint8_t* code;
};
struct Parts {
  PartView p[kMaxParts];
  int n;
};

// One CSR part. Immutable once built: the current content and an operation's new content share it.
struct Part {
  Buffer off, slot, code;
  int64_t n = 0;                         // entries
  int64_t slot_begin = 0, slot_end = 0;  // the slots it covers
  double max_norm = 0.0;                 // largest L2 norm of its float codes (0 for binary codes)
  size_t bytes() const { return off.bytes() + slot.bytes() + code.bytes(); }
};
using PartPtr = std::shared_ptr<const Part>;

// Entry i of a batch of images -> (word, slot).
__global__ void entry_slots_kernel(int64_t n_entries, const int64_t* __restrict__ img_off, int64_t n_img,
                                   const int32_t* __restrict__ words, uint32_t slot_base, uint32_t* __restrict__ keys,
                                   uint32_t* __restrict__ slots) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= n_entries) return;
  int64_t lo = 0, hi = n_img;  // last image with img_off[i] <= e
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (img_off[mid] <= e) lo = mid; else hi = mid;
  }
  keys[e] = static_cast<uint32_t>(words[e]);
  slots[e] = slot_base + static_cast<uint32_t>(lo);
}

// Entry i of a part -> its word (from the part's offsets).
__global__ void entry_words_kernel(int64_t n_entries, const int64_t* __restrict__ off, int64_t n_words,
                                   uint32_t* __restrict__ words) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= n_entries) return;
  int64_t lo = 0, hi = n_words;  // last word with off[w] <= e
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (off[mid] <= e) lo = mid; else hi = mid;
  }
  words[e] = static_cast<uint32_t>(lo);
}

// vec16: codes_in is 16-byte aligned and cb a multiple of 16 (codes may be a caller's device array).
__global__ void gather_kernel(int64_t n, int cb, bool vec16, const uint32_t* __restrict__ perm,
                              const uint32_t* __restrict__ slots_in,
                              const uint8_t* __restrict__ codes_in, uint32_t* __restrict__ slots_out,
                              uint8_t* __restrict__ codes_out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const int64_t s = perm[i];
  slots_out[i] = slots_in[s];
  if (vec16) {
    const uint4* src = reinterpret_cast<const uint4*>(codes_in + s * cb);
    uint4* dst = reinterpret_cast<uint4*>(codes_out + i * cb);
    for (int j = 0; j < cb / 16; ++j) dst[j] = src[j];
  } else {
    for (int j = 0; j < cb; ++j) codes_out[i * cb + j] = codes_in[s * cb + j];
  }
}

__global__ void offsets_kernel(int64_t n_words, int64_t n, const uint32_t* __restrict__ sorted_words,
                               int64_t* __restrict__ off) {
  const int64_t w = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (w > n_words) return;
  int64_t lo = 0, hi = n;  // first entry with word >= w
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (static_cast<int64_t>(sorted_words[mid]) < w) lo = mid + 1; else hi = mid;
  }
  off[w] = lo;
}

__device__ __forceinline__ int64_t lower_slot(const uint32_t* slots, int64_t b, int64_t e, uint32_t v) {
  while (b < e) {
    const int64_t mid = (b + e) / 2;
    if (slots[mid] < v) b = mid + 1; else e = mid;
  }
  return b;
}

// Block-wide selection of the kk largest keys among get(i), i < n (0 = absent; present keys are unique
// and nonzero; at least kk are present). Writes them, unordered, to out. Every thread must call.
template <class Get>
__device__ void block_select(const Get& get, int64_t n, int kk, uint64_t* out, uint32_t* hist, uint32_t* sh) {
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31;
  uint64_t prefix = 0, mask = 0;
  uint32_t need = static_cast<uint32_t>(kk);
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += nt) hist[i] = 0;
    __syncthreads();
    for (int64_t base = 0; base < n; base += nt) {
      const int64_t i = base + tid;
      uint32_t digit = 256;
      if (i < n) {
        const uint64_t key = get(i);
        if (key != 0 && (key & mask) == prefix) digit = static_cast<uint32_t>((key >> shift) & 255u);
      }
      const unsigned peers = __match_any_sync(0xffffffffu, digit);
      if (digit < 256 && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], static_cast<uint32_t>(__popc(peers)));
    }
    __syncthreads();
    if (tid == 0) {
      uint32_t cum = 0, sel = 0, nd = need;
      for (int d = 255; d >= 0; --d) {
        if (cum + hist[d] >= need) {
          sel = d;
          nd = need - cum;
          break;
        }
        cum += hist[d];
      }
      sh[0] = sel;
      sh[1] = nd;
      sh[2] = hist[sel];
    }
    __syncthreads();
    const uint32_t sel = sh[0];
    need = sh[1];
    const uint32_t in_bucket = sh[2];
    prefix |= static_cast<uint64_t>(sel) << shift;
    mask |= uint64_t{255} << shift;
    __syncthreads();
    if (in_bucket == need) break;
  }
  if (tid == 0) sh[3] = 0;
  __syncthreads();
  for (int64_t i = tid; i < n; i += nt) {
    const uint64_t key = get(i);
    if (key != 0 && (key & mask) >= prefix) out[atomicAdd(&sh[3], 1u)] = key;
  }
  __syncthreads();
}

struct ScoreArgs {
  Parts parts;
  int64_t n_slots;
  int cb, dim;
  bool binary, normalize;
  float alpha, tau;
  const int64_t* q_off;  // device, absolute offsets of the whole query batch
  const int32_t* q_words;
  const uint8_t* q_codes;
  int64_t q_first;       // first query of this chunk
  const int64_t* table;  // device fixed-point table (binary)
  int table_len;
  const int32_t* slot_nwords;
  const uint32_t* id_rank;
  int qbatch;
  int kk;                // top-k mode: candidates per range; 0: dense mode
  int n_ranges;
  uint64_t* cand;        // [q][range][kk]
  uint32_t* cand_n;      // [q][range]
  float* dense;          // [q][slot]
};

__global__ void __launch_bounds__(kScoreThreads) score_kernel(ScoreArgs a) {
  extern __shared__ __align__(16) unsigned char ssm[];
  int64_t* acc = reinterpret_cast<int64_t*>(ssm);
  int64_t* table = acc + kSlotsPerBlock;
  uint8_t* qc = reinterpret_cast<uint8_t*>(table + a.table_len);
  const int np = a.parts.n;
  const size_t qc_bytes = (static_cast<size_t>(a.qbatch) * a.cb + 15) / 16 * 16;
  int64_t* rb = reinterpret_cast<int64_t*>(qc + qc_bytes);
  uint32_t* rl = reinterpret_cast<uint32_t*>(rb + a.qbatch * np);
  uint32_t* hist = rl + a.qbatch * np;
  uint32_t* sh = hist + 256;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, nwarps = blockDim.x >> 5;
  const int64_t q = a.q_first + blockIdx.y;
  const int range = blockIdx.x;
  const int64_t lo = static_cast<int64_t>(range) * kSlotsPerBlock;
  const int64_t hi = min(a.n_slots, lo + kSlotsPerBlock);
  const int ns = static_cast<int>(hi - lo);
  for (int i = tid; i < kSlotsPerBlock; i += blockDim.x) acc[i] = 0;
  for (int i = tid; i < a.table_len; i += blockDim.x) table[i] = a.table[i];
  const int64_t qb = a.q_off[q], qe = a.q_off[q + 1];
  const int64_t nq = qe - qb;
  for (int64_t eb = qb; eb < qe; eb += a.qbatch) {
    const int nb = static_cast<int>(min(static_cast<int64_t>(a.qbatch), qe - eb));
    __syncthreads();
    for (int i = tid; i < nb * a.cb; i += blockDim.x) qc[i] = a.q_codes[eb * a.cb + i];
    for (int i = tid; i < nb * np; i += blockDim.x) {
      const int e = i / np, p = i % np;
      const int32_t w = a.q_words[eb + e];
      const PartView& pv = a.parts.p[p];
      const int64_t b0 = pv.off[w], e0 = pv.off[w + 1];
      const int64_t b1 = lower_slot(pv.slot, b0, e0, static_cast<uint32_t>(lo));
      const int64_t e1 = lower_slot(pv.slot, b1, e0, static_cast<uint32_t>(hi));
      rb[i] = b1;
      rl[i] = static_cast<uint32_t>(e1 - b1);
    }
    __syncthreads();
    for (int i = warp; i < nb * np; i += nwarps) {
      const int e = i / np, p = i % np;
      const PartView& pv = a.parts.p[p];
      const int64_t b = rb[i];
      const uint32_t len = rl[i];
      const uint8_t* qe_code = qc + static_cast<size_t>(e) * a.cb;
      for (uint32_t j = lane; j < len; j += 32) {
        const int64_t idx = b + j;
        const uint32_t s = pv.slot[idx];
        int64_t v;
        if (a.binary) {
          int h;
          if (a.cb == 16) {
            const uint4 c = __ldg(reinterpret_cast<const uint4*>(pv.code + idx * 16));
            const uint64_t c0 = (static_cast<uint64_t>(c.y) << 32) | c.x, c1 = (static_cast<uint64_t>(c.w) << 32) | c.z;
            const uint64_t* qq = reinterpret_cast<const uint64_t*>(qe_code);
            h = __popcll(c0 ^ qq[0]) + __popcll(c1 ^ qq[1]);
          } else {
            h = hamming(qe_code, pv.code + idx * a.cb, a.cb);
          }
          v = table[h];
        } else {
          const float* qf = reinterpret_cast<const float*>(qe_code);
          const float* cf = reinterpret_cast<const float*>(pv.code + idx * a.cb);
          float d = 0.0f;
          for (int t = 0; t < a.dim; ++t) d = fmaf_if_fused(qf[t], __ldg(cf + t), d);
          v = score_to_fixed(selectivity(d, a.alpha, a.tau));
        }
        atomicAdd(reinterpret_cast<unsigned long long*>(acc + (s - lo)), static_cast<unsigned long long>(v));
      }
    }
  }
  __syncthreads();
  uint64_t* keys = reinterpret_cast<uint64_t*>(acc);
  for (int i = tid; i < ns; i += blockDim.x) {
    const int64_t s = lo + i;
    const int32_t nw = a.slot_nwords[s];
    float f;
    if (nq == 0 || nw == 0) {
      f = -1.0f;
    } else {
      f = score_from_fixed(acc[i]);
      if (a.normalize) f *= gamma_pair(nq, nw);
    }
    if (a.kk == 0) {
      a.dense[blockIdx.y * a.n_slots + s] = f;
    } else {
      keys[i] = (static_cast<uint64_t>(score_order_key(f)) << 32) | (0xffffffffu - a.id_rank[s]);
    }
  }
  if (a.kk == 0) return;
  __syncthreads();
  const int kr = min(a.kk, ns);
  uint64_t* out = a.cand + (static_cast<int64_t>(blockIdx.y) * a.n_ranges + range) * a.kk;
  block_select([&](int64_t i) { return keys[i]; }, ns, kr, out, hist, sh);
  if (tid == 0) a.cand_n[blockIdx.y * a.n_ranges + range] = static_cast<uint32_t>(kr);
}

__global__ void __launch_bounds__(kFinalThreads) final_topk_kernel(const uint64_t* __restrict__ cand,
                                                                   const uint32_t* __restrict__ cand_n, int n_ranges,
                                                                   int kk, int k, const int64_t* __restrict__ rank_to_id,
                                                                   int64_t q_first, float* __restrict__ out_scores,
                                                                   int64_t* __restrict__ out_ids) {
  __shared__ uint64_t sel[InvertedFile::kMaxK];
  __shared__ uint32_t hist[256];
  __shared__ uint32_t sh[4];
  const int64_t ql = blockIdx.x;
  const uint64_t* c = cand + ql * n_ranges * kk;
  const uint32_t* cn = cand_n + ql * n_ranges;
  int N = 1;
  while (N < k) N <<= 1;
  for (int i = threadIdx.x; i < N; i += blockDim.x) sel[i] = 0;
  __syncthreads();
  block_select([&](int64_t i) {
                 const int64_t r = i / kk, j = i % kk;
                 return j < cn[r] ? c[i] : uint64_t{0};
               },
               static_cast<int64_t>(n_ranges) * kk, k, sel, hist, sh);
  // bitonic sort, descending
  for (int size = 2; size <= N; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      __syncthreads();
      for (int i = threadIdx.x; i < N; i += blockDim.x) {
        const int j = i ^ stride;
        if (j > i) {
          const uint64_t x = sel[i], y = sel[j];
          const bool desc = (i & size) == 0;
          if (desc ? (x < y) : (x > y)) {
            sel[i] = y;
            sel[j] = x;
          }
        }
      }
    }
  }
  __syncthreads();
  const int64_t q = q_first + ql;
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    const uint64_t key = sel[i];
    out_scores[q * k + i] = score_from_order_key(static_cast<uint32_t>(key >> 32));
    out_ids[q * k + i] = rank_to_id[0xffffffffu - static_cast<uint32_t>(key & 0xffffffffu)];
  }
}

void sort_pairs32(Buffer& keys, Buffer& vals, int64_t n, int end_bit) {
  const char* what = "inverted-file sort buffers";
  Buffer k2(sizeof(uint32_t) * n, what), v2(sizeof(uint32_t) * n, what);
  size_t tmp = 0;
  D2R_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, tmp, keys.as<uint32_t>(), k2.as<uint32_t>(),
                                                 vals.as<uint32_t>(), v2.as<uint32_t>(), n, 0, end_bit),
                 "cub::DeviceRadixSort");
  Buffer t(tmp, what);
  D2R_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(t.data(), tmp, keys.as<uint32_t>(), k2.as<uint32_t>(),
                                                 vals.as<uint32_t>(), v2.as<uint32_t>(), n, 0, end_bit),
                 "cub::DeviceRadixSort");
  keys = std::move(k2);
  vals = std::move(v2);
}

__global__ void iota_kernel(int64_t n, uint32_t* v) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) v[i] = static_cast<uint32_t>(i);
}

// The rules of d2r::check_codes on device words: bit 1 of *bad when a word id lies outside
// [0, n_words), bit 2 when the words of an image are not strictly ascending.
__global__ void check_words_kernel(int64_t n_entries, const int64_t* __restrict__ img_off, int64_t n_img,
                                   const int32_t* __restrict__ words, int64_t n_words, int* __restrict__ bad) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= n_entries) return;
  const int32_t w = words[e];
  if (w < 0 || w >= n_words) atomicOr(bad, 1);
  if (e == 0) return;
  int64_t lo = 0, hi = n_img;  // the image of entry e: the last one with img_off[i] <= e
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (img_off[mid] <= e) lo = mid; else hi = mid;
  }
  if (img_off[lo] < e && !(words[e - 1] < w)) atomicOr(bad, 2);
}

// The largest L2 norm (float64) of n float codes of dim components (any alignment), as the bits of
// a non-negative double, which order as unsigned integers (NaN above infinity).
__global__ void max_norm_kernel(int64_t n, int dim, const uint8_t* __restrict__ codes,
                                unsigned long long* __restrict__ out) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= n) return;
  const uint8_t* c = codes + e * static_cast<int64_t>(dim) * 4;
  double s = 0.0;
  for (int t = 0; t < dim; ++t) {
    float f;
    memcpy(&f, c + 4 * t, sizeof(f));
    s += static_cast<double>(f) * f;
  }
  atomicMax(out, static_cast<unsigned long long>(__double_as_longlong(fabs(sqrt(s)))));
}

// Removal: flags[i] = entry i is kept (flags[n] = 0, so the exclusive sum ends with the kept count).
__global__ void keep_flags_kernel(int64_t n, const uint32_t* __restrict__ slots, const uint32_t* __restrict__ remap,
                                  uint32_t* __restrict__ flags) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) flags[i] = remap[slots[i]] != 0xffffffffu ? 1u : 0u;
  else if (i == n) flags[n] = 0u;
}

__global__ void remap_offsets_kernel(int64_t n_words, const int64_t* __restrict__ off, const uint32_t* __restrict__ pos,
                                     int64_t* __restrict__ out) {
  const int64_t w = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (w <= n_words) out[w] = pos[off[w]];
}

__global__ void compact_kernel(int64_t n, int cb, const uint32_t* __restrict__ slots, const uint8_t* __restrict__ codes,
                               const uint32_t* __restrict__ remap, const uint32_t* __restrict__ pos,
                               uint32_t* __restrict__ out_slots, uint8_t* __restrict__ out_codes) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  const uint32_t r = remap[slots[i]];
  if (r == 0xffffffffu) return;
  const int64_t j = pos[i];
  out_slots[j] = r;
  for (int t = 0; t < cb; ++t) out_codes[j * cb + t] = codes[i * cb + t];
}

// Host side of max_norm_kernel: the largest L2 norm of n float codes in device memory (0 when n = 0).
double max_code_norm(const uint8_t* codes, int64_t n, int dim) {
  if (n <= 0) return 0.0;
  unsigned long long bits = 0;
  Buffer d = upload_array(&bits, 1, "code norms");
  max_norm_kernel<<<grid_for(n, 256), 256>>>(n, dim, codes, d.as<unsigned long long>());
  D2R_CUDA_LAUNCH("max_norm_kernel");
  d.download(&bits, sizeof(bits));
  double r;
  std::memcpy(&r, &bits, sizeof(r));
  return r;
}

// A CSR part from entries (word, slot, code) in slot-ascending order per word. known_norm >= 0: the
// largest code norm is known (a merge); otherwise it is measured, and non-finite float codes refused.
Part build_part(int64_t n_words, int cb, int dim, bool binary, int64_t n, Buffer& words, const Buffer& slots,
                const uint8_t* codes, double known_norm = -1.0) {
  D2R_CHECK(n <= InvertedFile::kMaxPartEntries,
            "one GPU inverted-file part holds at most 2^32 - 1 entries (its sort permutation is uint32), " +
                std::to_string(n) + " given: add fewer images at a time");
  Part p;
  p.n = n;
  p.off = Buffer(sizeof(int64_t) * (n_words + 1), "inverted-file offsets");
  if (n == 0) {
    D2R_CUDA_CHECK(cudaMemset(p.off.data(), 0, p.off.bytes()), "cudaMemset");
    return p;
  }
  Buffer perm(sizeof(uint32_t) * n, "inverted-file sort buffers");
  iota_kernel<<<grid_for(n, 256), 256>>>(n, perm.as<uint32_t>());
  D2R_CUDA_LAUNCH("iota_kernel");
  sort_pairs32(words, perm, n, bits_for(static_cast<uint64_t>(n_words)));
  p.slot = Buffer(sizeof(uint32_t) * n, "inverted-file slots");
  p.code = Buffer(static_cast<size_t>(cb) * n, "inverted-file codes");
  const bool vec16 = cb % 16 == 0 && reinterpret_cast<uintptr_t>(codes) % 16 == 0;
  gather_kernel<<<grid_for(n, 256), 256>>>(n, cb, vec16, perm.as<uint32_t>(), slots.as<uint32_t>(), codes,
                                           p.slot.as<uint32_t>(), p.code.as<uint8_t>());
  D2R_CUDA_LAUNCH("gather_kernel");
  offsets_kernel<<<grid_for(n_words + 1, 256), 256>>>(n_words, n, words.as<uint32_t>(), p.off.as<int64_t>());
  D2R_CUDA_LAUNCH("offsets_kernel");
  if (!binary) {
    p.max_norm = known_norm >= 0.0 ? known_norm : max_code_norm(p.code.as<uint8_t>(), n, dim);
    D2R_CHECK(std::isfinite(p.max_norm), "codes contain NaN or Inf");
  }
  return p;
}

// ---- input batches ------------------------------------------------------------------------------

void check_offsets(const Batch& b, const char* what) {
  D2R_CHECK(b.n >= 0 && b.offsets != nullptr, std::string(what) + " word_offsets missing");
  D2R_CHECK(b.offsets[0] == 0, std::string(what) + " word offsets must start at 0");
  for (int64_t i = 0; i < b.n; ++i)
    D2R_CHECK(b.offsets[i + 1] >= b.offsets[i], std::string(what) + " word offsets must be non-decreasing");
  D2R_CHECK(b.offsets[b.n] == b.n_entries,
            std::string(what) + " word offsets must end at the number of words (" + std::to_string(b.n_entries) + ")");
  D2R_CHECK(b.n_entries == 0 || (b.words != nullptr && b.codes != nullptr), std::string(what) + " words or codes missing");
}

// Device memory of the current device (or managed memory); refuses host pointers declared as device ones.
void check_on_device(const void* p, const char* what) {
  cudaPointerAttributes attr{};
  cudaError_t err = cudaPointerGetAttributes(&attr, p);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw InvalidArgument(std::string(what) + ": not a CUDA device pointer");
  }
  int dev = 0;
  D2R_CUDA_CHECK(cudaGetDevice(&dev), "cudaGetDevice");
  D2R_CHECK(attr.type == cudaMemoryTypeManaged || (attr.type == cudaMemoryTypeDevice && attr.device == dev),
            std::string(what) + ": not device memory of the current CUDA device");
}

void copy_in(void* dst, const void* src, size_t bytes, bool on_device) {
  if (on_device) copy_d2d(dst, src, bytes); else copy_h2d(dst, src, bytes);
}

// One batch, or several concatenated, on the device: host offsets and device offsets, words, codes.
// Host words are checked on the host with the CPU index's check_codes, device words on the device.
struct Staged {
  std::vector<int64_t> off;  // host, n + 1
  Buffer d_off, words_buf, codes_buf;
  const int32_t* w = nullptr;
  const uint8_t* c = nullptr;
  int64_t n = 0, E = 0;
  int64_t max_words = 0;  // the largest word count of an image
};

// The host checks of batches: everything that can be checked without the device.
void check_batches(const std::vector<Batch>& bs, int64_t n_words, const char* what) {
  for (const Batch& b : bs) {
    check_offsets(b, what);
    if (b.n_entries > 0 && !b.words_on_device) check_codes(CodesView{b.n, b.offsets, b.words, nullptr}, n_words);
    if (b.n_entries > 0 && b.words_on_device) check_on_device(b.words, "words");
    if (b.n_entries > 0 && b.codes_on_device) check_on_device(b.codes, "codes");
  }
}

void stage(Staged& s, const std::vector<Batch>& bs, int cb, int64_t n_words, const char* what) {
  s.n = 0;
  s.E = 0;
  bool device_words = false;
  for (const Batch& b : bs) {
    s.n += b.n;
    s.E += b.n_entries;
    device_words = device_words || (b.words_on_device && b.n_entries > 0);
  }
  s.off.assign(s.n + 1, 0);
  int64_t i0 = 0, e0 = 0;
  for (const Batch& b : bs) {
    for (int64_t i = 0; i < b.n; ++i) {
      s.off[i0 + i + 1] = e0 + b.offsets[i + 1];
      s.max_words = std::max(s.max_words, b.offsets[i + 1] - b.offsets[i]);
    }
    i0 += b.n;
    e0 += b.n_entries;
  }
  s.d_off = upload_array(s.off.data(), s.off.size(), what);
  if (s.E == 0) return;
  if (bs.size() == 1) {  // read device inputs in place
    const Batch& b = bs[0];
    if (b.words_on_device) {
      s.w = b.words;
    } else {
      s.words_buf = upload_array(b.words, s.E, what);
      s.w = s.words_buf.as<int32_t>();
    }
    if (b.codes_on_device) {
      s.c = b.codes;
    } else {
      s.codes_buf = upload_array(b.codes, static_cast<size_t>(s.E) * cb, what);
      s.c = s.codes_buf.as<uint8_t>();
    }
  } else {
    s.words_buf = Buffer(sizeof(int32_t) * s.E, what);
    s.codes_buf = Buffer(static_cast<size_t>(s.E) * cb, what);
    int64_t e = 0;
    for (const Batch& b : bs) {
      if (b.n_entries == 0) continue;
      copy_in(s.words_buf.as<int32_t>() + e, b.words, sizeof(int32_t) * b.n_entries, b.words_on_device);
      copy_in(s.codes_buf.as<uint8_t>() + e * cb, b.codes, static_cast<size_t>(cb) * b.n_entries, b.codes_on_device);
      e += b.n_entries;
    }
    s.w = s.words_buf.as<int32_t>();
    s.c = s.codes_buf.as<uint8_t>();
  }
  if (device_words) {
    int flag = 0;
    Buffer bad = upload_array(&flag, 1, "word check");
    check_words_kernel<<<grid_for(s.E, 256), 256>>>(s.E, s.d_off.as<int64_t>(), s.n, s.w, n_words, bad.as<int>());
    D2R_CUDA_LAUNCH("check_words_kernel");
    bad.download(&flag, sizeof(flag));
    D2R_CHECK(!(flag & 1), "visual word id out of range [0, n_words)");
    D2R_CHECK(!(flag & 2), "the words of an image must be strictly ascending (sorted, no duplicates)");
  }
}

// What one scoring call (search or score_all) sets up: the queries on the device, the fixed-point
// Hamming table, the kernel arguments and the kernel's shared-memory size.
struct Scoring {
  Staged u;
  Buffer table;
  ScoreArgs a{};
  size_t smem = 0;

  // Scores queries [q0, q0 + qc) (the arguments' kk and outputs must be set).
  void launch(int64_t q0, int64_t qc) {
    a.q_first = q0;
    score_kernel<<<dim3(a.n_ranges, static_cast<unsigned>(qc)), kScoreThreads, smem>>>(a);
    D2R_CUDA_LAUNCH("score_kernel");
  }
};

size_t score_smem(const ScoreArgs& a) {
  return sizeof(int64_t) * (kSlotsPerBlock + a.table_len) + (static_cast<size_t>(a.qbatch) * a.cb + 15) / 16 * 16 +
         static_cast<size_t>(a.qbatch) * a.parts.n * (sizeof(int64_t) + sizeof(uint32_t)) + sizeof(uint32_t) * (256 + 4);
}

// Arms the allocation-failure test hook for one operation (in the calling thread) and disarms it after.
class FaultScope {
 public:
  explicit FaultScope(int64_t& pending) : armed_(pending > 0) {
    if (armed_) fail_allocation_after(pending);
    pending = 0;
  }
  ~FaultScope() {
    if (armed_) fail_allocation_after(0);
  }
  FaultScope(const FaultScope&) = delete;
  FaultScope& operator=(const FaultScope&) = delete;

 private:
  bool armed_;
};

// Capacity for `need` elements, grown geometrically (so appends stay amortised O(1)).
template <class V>
void reserve_for(V& v, size_t need) {
  if (v.capacity() < need) v.reserve(std::max(need, 2 * v.capacity()));
}

}  // namespace

struct InvertedFile::Impl {
  int64_t n_words = 0;
  int dim = 0, cb = 0;
  bool binary = true;
  mutable std::mutex mu;  // one operation at a time; no Python (no GIL) is ever taken while held

  // The content, changed only by the commit steps of an operation (swaps and moves that cannot throw).
  std::vector<PartPtr> parts;  // ascending, disjoint slot ranges; at most kMaxParts
  std::vector<int64_t> slot_ids;
  std::vector<int32_t> slot_nwords;
  std::unordered_map<int64_t, uint32_t> slot_of_id;
  Buffer d_nwords;  // slot_nwords on the device (its capacity may exceed the slots)
  int64_t n_entries = 0;
  int64_t next_id = 0;

  // Derived from the content, rebuilt lazily (under the lock; a failed rebuild leaves them dirty).
  mutable bool ranks_dirty = true;
  mutable Buffer d_rank, d_rank_to_id;
  mutable int64_t fail_after = 0;  // test hook, for the next operation

  void ensure_ranks() const {
    if (!ranks_dirty) return;
    const size_t n = slot_ids.size();
    std::vector<uint32_t> order(n);
    std::iota(order.begin(), order.end(), 0u);
    if (!std::is_sorted(slot_ids.begin(), slot_ids.end()))
      std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return slot_ids[a] < slot_ids[b]; });
    std::vector<uint32_t> rank(n);
    std::vector<int64_t> r2id(n);
    for (size_t r = 0; r < n; ++r) {
      rank[order[r]] = static_cast<uint32_t>(r);
      r2id[r] = slot_ids[order[r]];
    }
    Buffer dr = upload_array(rank.data(), n, "inverted-file id ranks");
    Buffer dr2 = upload_array(r2id.data(), n, "inverted-file id ranks");
    d_rank = std::move(dr);
    d_rank_to_id = std::move(dr2);
    ranks_dirty = false;
  }

  // A new part merging ps[first, last) (the old parts are untouched).
  PartPtr merge_parts(const std::vector<PartPtr>& ps, size_t first, size_t last) const {
    int64_t n = 0;
    double norm = 0.0;
    for (size_t i = first; i < last; ++i) {
      n += ps[i]->n;
      norm = std::max(norm, ps[i]->max_norm);
    }
    D2R_CHECK(n <= kMaxPartEntries, "GPU inverted-file merge beyond the part limit");
    const char* what = "inverted-file merge buffers";
    const size_t m = static_cast<size_t>(std::max<int64_t>(n, 1));
    Buffer words(sizeof(uint32_t) * m, what), slots(sizeof(uint32_t) * m, what), codes(static_cast<size_t>(cb) * m, what);
    int64_t o = 0;
    for (size_t i = first; i < last; ++i) {
      const Part& p = *ps[i];
      if (p.n == 0) continue;
      entry_words_kernel<<<grid_for(p.n, 256), 256>>>(p.n, p.off.as<int64_t>(), n_words, words.as<uint32_t>() + o);
      D2R_CUDA_LAUNCH("entry_words_kernel");
      copy_d2d(slots.as<uint32_t>() + o, p.slot.data(), sizeof(uint32_t) * p.n);
      copy_d2d(codes.as<uint8_t>() + o * cb, p.code.data(), static_cast<size_t>(cb) * p.n);
      o += p.n;
    }
    auto merged = std::make_shared<Part>(build_part(n_words, cb, dim, binary, n, words, slots, codes.as<uint8_t>(), norm));
    merged->slot_begin = ps[first]->slot_begin;
    merged->slot_end = ps[last - 1]->slot_end;
    return merged;
  }

  void replace_range(std::vector<PartPtr>& ps, size_t first, size_t last) const {
    PartPtr m = merge_parts(ps, first, last);
    ps.erase(ps.begin() + static_cast<std::ptrdiff_t>(first), ps.begin() + static_cast<std::ptrdiff_t>(last));
    ps.insert(ps.begin() + static_cast<std::ptrdiff_t>(first), std::move(m));
  }

  // Merges the newest parts of ps while the newest is at least half the one before, then the tail
  // beyond kMaxParts; never beyond kMaxPartEntries entries in one part.
  void compact(std::vector<PartPtr>& ps) const {
    while (ps.size() >= 2) {
      const size_t m = ps.size() - 2;
      if (ps[m + 1]->n * 2 < ps[m]->n || ps[m]->n + ps[m + 1]->n > kMaxPartEntries) break;
      replace_range(ps, m, ps.size());
    }
    while (ps.size() > static_cast<size_t>(kMaxParts)) {
      size_t first = ps.size();
      int64_t total = 0;
      while (first > 0 && total + ps[first - 1]->n <= kMaxPartEntries) total += ps[--first]->n;
      D2R_CHECK(ps.size() - first >= 2, "too many entries for one GPU inverted file (at most " +
                                            std::to_string(kMaxParts) + " parts of 2^32 - 1 entries)");
      replace_range(ps, first, ps.size());
    }
  }

  // Part p with the slots renumbered by remap (0xffffffff: removed); kept_before[s]: slots kept before s.
  PartPtr filter_part(const Part& p, const Buffer& d_remap, const std::vector<int64_t>& kept_before) const {
    auto q = std::make_shared<Part>();
    q->slot_begin = kept_before[p.slot_begin];
    q->slot_end = kept_before[p.slot_end];
    if (p.n == 0) return q;
    const char* what = "inverted-file removal buffers";
    const int64_t n = p.n;
    Buffer flags(sizeof(uint32_t) * (n + 1), what), pos(sizeof(uint32_t) * (n + 1), what);
    keep_flags_kernel<<<grid_for(n + 1, 256), 256>>>(n, p.slot.as<uint32_t>(), d_remap.as<uint32_t>(), flags.as<uint32_t>());
    D2R_CUDA_LAUNCH("keep_flags_kernel");
    size_t tmp = 0;
    D2R_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, tmp, flags.as<uint32_t>(), pos.as<uint32_t>(), n + 1),
                   "cub::DeviceScan");
    Buffer t(tmp, what);
    D2R_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(t.data(), tmp, flags.as<uint32_t>(), pos.as<uint32_t>(), n + 1),
                   "cub::DeviceScan");
    uint32_t kept = 0;
    pos.download(&kept, sizeof(kept), sizeof(uint32_t) * n);
    q->n = kept;
    if (kept == 0) return q;
    q->off = Buffer(sizeof(int64_t) * (n_words + 1), "inverted-file offsets");
    remap_offsets_kernel<<<grid_for(n_words + 1, 256), 256>>>(n_words, p.off.as<int64_t>(), pos.as<uint32_t>(),
                                                              q->off.as<int64_t>());
    D2R_CUDA_LAUNCH("remap_offsets_kernel");
    q->slot = Buffer(sizeof(uint32_t) * kept, "inverted-file slots");
    q->code = Buffer(static_cast<size_t>(cb) * kept, "inverted-file codes");
    compact_kernel<<<grid_for(n, 256), 256>>>(n, cb, p.slot.as<uint32_t>(), p.code.as<uint8_t>(), d_remap.as<uint32_t>(),
                                              pos.as<uint32_t>(), q->slot.as<uint32_t>(), q->code.as<uint8_t>());
    D2R_CUDA_LAUNCH("compact_kernel");
    if (!binary) q->max_norm = max_code_norm(q->code.as<uint8_t>(), q->n, dim);
    return q;
  }

  // Refuses a scoring call whose accumulators could overflow (see the file comment).
  void check_fixed_point_range(const Staged& q, const ScoreParams& p) const {
    double s;  // bound on |sigma| of one contribution
    if (binary) {
      s = 0.0;
      const int denom = hamming_denominator(dim, cb);
      for (int h = 0; h <= 8 * cb; ++h) {
        const double v = std::fabs(static_cast<double>(selectivity(hamming_similarity(h, denom), p.alpha, p.tau)));
        s = std::isnan(v) ? v : std::max(s, v);
        if (std::isnan(s)) break;
      }
    } else {
      double db = 0.0;
      for (const PartPtr& pp : parts) db = std::max(db, pp->max_norm);
      const double qn = max_code_norm(q.c, q.E, dim);
      D2R_CHECK(std::isfinite(qn), "query codes contain NaN or Inf");
      const double u = db * qn * (1.0 + dim * 0x1p-23);  // |q . c| as the kernel computes it (float fma)
      if (p.alpha >= 0.0f) s = std::pow(u, static_cast<double>(p.alpha));
      else s = p.tau > 0.0f ? std::pow(static_cast<double>(p.tau), static_cast<double>(p.alpha))
                            : std::numeric_limits<double>::infinity();  // |u|^alpha unbounded as u -> 0
      s *= 1.0 + 0x1p-20;  // sigma rounded to float
    }
    const double nq = static_cast<double>(std::max<int64_t>(1, q.max_words));
    D2R_CHECK(s * nq < 2147483648.0,
              "score contribution out of the fixed-point range: contributions up to " + std::to_string(s) + " for " +
                  std::to_string(static_cast<int64_t>(nq)) + " query words could overflow the 64-bit accumulators "
                  "(|sigma| * query words must stay below 2^31; are the codes normalised?)");
  }

  // Validates and uploads the queries, and refuses an out-of-range fixed-point call.
  void stage_queries(Scoring& sc, const Batch& q, const ScoreParams& p) const {
    check_batches({q}, n_words, "query");
    stage(sc.u, {q}, cb, n_words, "query buffers");
    check_fixed_point_range(sc.u, p);
  }

  // Sets up the scoring of staged queries (the index has slots).
  void begin_scoring(Scoring& sc, const ScoreParams& p) const {
    std::vector<int64_t> tab = binary ? fixed_hamming_table(dim, cb, p.alpha, p.tau) : std::vector<int64_t>{0};
    sc.table = upload_array(tab.data(), tab.size(), "score table");
    ScoreArgs& a = sc.a;
    a.parts = views();
    a.n_slots = static_cast<int64_t>(slot_ids.size());
    a.cb = cb;
    a.dim = dim;
    a.binary = binary;
    a.normalize = p.normalize;
    a.alpha = p.alpha;
    a.tau = p.tau;
    a.q_off = sc.u.d_off.as<int64_t>();
    a.q_words = sc.u.w;
    a.q_codes = sc.u.c;
    a.table = binary ? sc.table.as<int64_t>() : nullptr;
    a.table_len = binary ? 8 * cb + 1 : 0;
    a.slot_nwords = d_nwords.as<int32_t>();
    a.qbatch = std::max(1, std::min(128, 16384 / cb));
    a.n_ranges = static_cast<int>((a.n_slots + kSlotsPerBlock - 1) / kSlotsPerBlock);
    sc.smem = score_smem(a);
    D2R_CUDA_CHECK(cudaFuncSetAttribute(score_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(sc.smem)),
                   "cudaFuncSetAttribute (scoring shared memory)");
  }

  // Dense scores of the staged queries in chunks: sink(q0, qc, host scores qc x n_slots).
  template <class Sink>
  void dense(Scoring& sc, float* chunk_out_or_null, const Sink& sink) const {
    const int64_t nq = sc.u.n, n = static_cast<int64_t>(slot_ids.size());
    sc.a.kk = 0;
    const int64_t qchunk =
        std::max<int64_t>(1, std::min<int64_t>({nq, 65535, static_cast<int64_t>((size_t{512} << 20) / (sizeof(float) * n))}));
    Buffer d(sizeof(float) * n * qchunk, "dense scores");
    sc.a.dense = d.as<float>();
    std::vector<float> host;
    if (!chunk_out_or_null) host.resize(static_cast<size_t>(n) * qchunk);
    for (int64_t q0 = 0; q0 < nq; q0 += qchunk) {
      const int64_t qc = std::min(qchunk, nq - q0);
      sc.launch(q0, qc);
      float* dst = chunk_out_or_null ? chunk_out_or_null + q0 * n : host.data();
      d.download(dst, sizeof(float) * n * qc);
      sink(q0, qc, dst);
    }
  }

  Parts views() const {
    if (parts.size() > static_cast<size_t>(kMaxParts)) throw DeviceError("GPU inverted file: too many parts");
    Parts v{};
    v.n = static_cast<int>(parts.size());
    for (size_t i = 0; i < parts.size(); ++i)
      v.p[i] = PartView{parts[i]->off.as<int64_t>(), parts[i]->slot.as<uint32_t>(), parts[i]->code.as<uint8_t>()};
    return v;
  }
};

InvertedFile::InvertedFile(int64_t n_words, int dim, bool binary) : impl_(new Impl) {
  require_device();
  D2R_CHECK(n_words >= 1 && n_words <= INT32_MAX, "n_words out of range");
  D2R_CHECK(dim >= 1 && dim <= 1 << 20, "dim out of range");
  impl_->n_words = n_words;
  impl_->dim = dim;
  impl_->binary = binary;
  impl_->cb = binary ? (dim + 7) / 8 : static_cast<int>(sizeof(float)) * dim;
}

InvertedFile::~InvertedFile() = default;
int64_t InvertedFile::n_words() const { return impl_->n_words; }
int InvertedFile::dim() const { return impl_->dim; }
bool InvertedFile::binary() const { return impl_->binary; }
int InvertedFile::code_bytes() const { return impl_->cb; }

int64_t InvertedFile::n_images() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return static_cast<int64_t>(impl_->slot_ids.size());
}
int64_t InvertedFile::n_entries() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->n_entries;
}
int64_t InvertedFile::next_id() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->next_id;
}
int InvertedFile::n_parts() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return static_cast<int>(impl_->parts.size());
}
bool InvertedFile::contains(int64_t id) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->slot_of_id.count(id) > 0;
}
std::vector<int64_t> InvertedFile::image_ids() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->slot_ids;
}
std::vector<int32_t> InvertedFile::word_counts() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->slot_nwords;
}
size_t InvertedFile::memory_bytes() const {
  const Impl& f = *impl_;
  std::lock_guard<std::mutex> lock(f.mu);
  size_t b = 0;
  for (const PartPtr& p : f.parts) b += p->bytes();
  return b + f.d_nwords.bytes() + f.d_rank.bytes() + f.d_rank_to_id.bytes();
}

void InvertedFile::fail_after_allocations(int64_t n) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  impl_->fail_after = n > 0 ? n : 0;
}

std::vector<int64_t> InvertedFile::add(const std::vector<Batch>& batches, const int64_t* ids) {
  Impl& f = *impl_;
  check_batches(batches, f.n_words, "image");  // the input alone: no lock needed
  int64_t n_new = 0, E = 0;
  for (const Batch& b : batches) {
    n_new += b.n;
    E += b.n_entries;
  }
  std::lock_guard<std::mutex> lock(f.mu);
  FaultScope faults(f.fail_after);
  const int64_t n_old = static_cast<int64_t>(f.slot_ids.size());
  D2R_CHECK(n_new < int64_t{0xffffffff} - n_old, "too many images for one GPU inverted file");

  // 1. The ids (default ones allocated here, under the lock) and their slots.
  std::vector<int64_t> new_ids(n_new);
  if (ids) {
    std::copy(ids, ids + n_new, new_ids.begin());
  } else {
    D2R_CHECK(f.next_id <= kMaxId - n_new, "image ids exhausted (ids stay below 2^62)");
    std::iota(new_ids.begin(), new_ids.end(), f.next_id);
  }
  std::unordered_map<int64_t, uint32_t> fresh;
  fresh.reserve(static_cast<size_t>(n_new));
  int64_t max_id = -1;
  for (int64_t i = 0; i < n_new; ++i) {
    const int64_t id = new_ids[i];
    D2R_CHECK(id >= 0 && id < kMaxId, "image ids must be in [0, 2^62), got " + std::to_string(id));
    D2R_CHECK(f.slot_of_id.count(id) == 0, "image id " + std::to_string(id) + " is already in the index");
    D2R_CHECK(fresh.emplace(id, static_cast<uint32_t>(n_old + i)).second,
              "duplicate image id " + std::to_string(id) + " in one add");
    max_id = std::max(max_id, id);
  }
  if (n_new == 0) return new_ids;

  // 2. The new parts, beside the current ones (which stay untouched).
  std::vector<PartPtr> new_parts = f.parts;
  if (E > 0) {
    Staged s;
    stage(s, batches, f.cb, f.n_words, "inverted-file add buffers");
    const char* what = "inverted-file add buffers";
    Buffer keys(sizeof(uint32_t) * E, what), slots(sizeof(uint32_t) * E, what);
    entry_slots_kernel<<<grid_for(E, 256), 256>>>(E, s.d_off.as<int64_t>(), n_new, s.w, static_cast<uint32_t>(n_old),
                                                  keys.as<uint32_t>(), slots.as<uint32_t>());
    D2R_CUDA_LAUNCH("entry_slots_kernel");
    auto part = std::make_shared<Part>(build_part(f.n_words, f.cb, f.dim, f.binary, E, keys, slots, s.c));
    part->slot_begin = n_old;
    part->slot_end = n_old + n_new;
    new_parts.push_back(std::move(part));
    f.compact(new_parts);
  }

  // 3. Per-slot word counts on the device: in the spare capacity of the current buffer (which the
  // current content never reads) or in a new, larger one.
  std::vector<int32_t> counts;
  counts.reserve(static_cast<size_t>(n_new));
  for (const Batch& b : batches)
    for (int64_t i = 0; i < b.n; ++i) counts.push_back(static_cast<int32_t>(b.offsets[i + 1] - b.offsets[i]));
  const size_t need = sizeof(int32_t) * static_cast<size_t>(n_old + n_new);
  Buffer grown;
  if (f.d_nwords.bytes() >= need) {
    copy_h2d(f.d_nwords.as<int32_t>() + n_old, counts.data(), sizeof(int32_t) * n_new);
  } else {
    grown = Buffer(std::max(need, 2 * f.d_nwords.bytes()), "inverted-file word counts");
    copy_d2d(grown.data(), f.d_nwords.data(), sizeof(int32_t) * n_old);
    copy_h2d(grown.as<int32_t>() + n_old, counts.data(), sizeof(int32_t) * n_new);
  }

  // 4. Host capacity, so that the commit does not allocate; then wait for the device (faults surface here).
  reserve_for(f.slot_ids, static_cast<size_t>(n_old + n_new));
  reserve_for(f.slot_nwords, static_cast<size_t>(n_old + n_new));
  // (>=: a default-constructed map holds no element without rehashing; reserve only when growing, as a
  // reserve to a smaller size may rehash too.)
  if (static_cast<double>(n_old + n_new) >= f.slot_of_id.bucket_count() * static_cast<double>(f.slot_of_id.max_load_factor()))
    f.slot_of_id.reserve(static_cast<size_t>(std::max(n_old + n_new, 2 * n_old)));
  sync("GPU inverted-file add");

  // 5. Commit: nothing below throws (push_back within the reserved capacity; the map merge moves the
  // nodes of `fresh` without rehashing, as the buckets were reserved).
  f.parts.swap(new_parts);
  for (int64_t i = 0; i < n_new; ++i) {
    f.slot_ids.push_back(new_ids[i]);
    f.slot_nwords.push_back(counts[i]);
  }
  f.slot_of_id.merge(fresh);
  if (grown.data()) f.d_nwords = std::move(grown);
  f.n_entries += E;
  f.next_id = std::max(f.next_id, max_id + 1);
  f.ranks_dirty = true;
  return new_ids;
}

int64_t InvertedFile::remove(int64_t n, const int64_t* ids) {
  Impl& f = *impl_;
  D2R_CHECK(n >= 0, "negative number of ids");
  std::lock_guard<std::mutex> lock(f.mu);
  FaultScope faults(f.fail_after);
  const int64_t ns = static_cast<int64_t>(f.slot_ids.size());
  std::vector<uint8_t> gone(static_cast<size_t>(ns), 0);
  int64_t removed = 0, first_gone = ns;
  for (int64_t i = 0; i < n; ++i) {
    auto it = f.slot_of_id.find(ids[i]);
    if (it == f.slot_of_id.end()) throw IdNotFound("image id " + std::to_string(ids[i]) + " is not in the index");
    if (!gone[it->second]) {
      gone[it->second] = 1;
      ++removed;
      first_gone = std::min<int64_t>(first_gone, it->second);
    }
  }
  if (removed == 0) return 0;

  // The new per-slot state: the kept slots renumbered in order.
  const size_t nk = static_cast<size_t>(ns - removed);
  std::vector<uint32_t> remap(static_cast<size_t>(ns));
  std::vector<int64_t> kept_before(static_cast<size_t>(ns) + 1);
  std::vector<int64_t> new_ids;
  std::vector<int32_t> new_counts;
  new_ids.reserve(nk);
  new_counts.reserve(nk);
  std::unordered_map<int64_t, uint32_t> new_map;
  new_map.reserve(nk);
  for (int64_t s = 0; s < ns; ++s) {
    kept_before[s] = static_cast<int64_t>(new_ids.size());
    if (gone[s]) {
      remap[s] = 0xffffffffu;
      continue;
    }
    remap[s] = static_cast<uint32_t>(new_ids.size());
    new_map.emplace(f.slot_ids[s], remap[s]);
    new_ids.push_back(f.slot_ids[s]);
    new_counts.push_back(f.slot_nwords[s]);
  }
  kept_before[ns] = static_cast<int64_t>(nk);

  // The new parts: those before the first removed slot are shared unchanged, the others filtered.
  Buffer d_remap = upload_array(remap.data(), remap.size(), "inverted-file removal buffers");
  std::vector<PartPtr> new_parts;
  new_parts.reserve(f.parts.size());
  int64_t new_entries = 0;
  for (const PartPtr& p : f.parts) {
    PartPtr q = p->slot_end <= first_gone ? p : f.filter_part(*p, d_remap, kept_before);
    if (q->n == 0) continue;
    new_entries += q->n;
    new_parts.push_back(std::move(q));
  }
  Buffer nw = upload_array(new_counts.data(), new_counts.size(), "inverted-file word counts");
  sync("GPU inverted-file remove");

  // Commit: swaps and moves only.
  f.parts.swap(new_parts);
  f.slot_ids.swap(new_ids);
  f.slot_nwords.swap(new_counts);
  f.slot_of_id.swap(new_map);
  f.d_nwords = std::move(nw);
  f.n_entries = new_entries;
  f.ranks_dirty = true;
  return removed;
}

void InvertedFile::merge() {
  Impl& f = *impl_;
  std::lock_guard<std::mutex> lock(f.mu);
  FaultScope faults(f.fail_after);
  if (f.parts.size() < 2) return;
  std::vector<PartPtr> ps = f.parts;
  // Greedy runs of consecutive parts that fit one part, each merged.
  for (size_t i = 0; i < ps.size(); ++i) {
    size_t j = i;
    int64_t total = 0;
    while (j < ps.size() && total + ps[j]->n <= kMaxPartEntries) total += ps[j++]->n;
    if (j - i >= 2) f.replace_range(ps, i, j);
  }
  sync("GPU inverted-file merge");
  f.parts.swap(ps);
}

TopK InvertedFile::search(const Batch& queries, int64_t k, const ScoreParams& p) const {
  const Impl& f = *impl_;
  std::lock_guard<std::mutex> lock(f.mu);
  FaultScope faults(f.fail_after);
  const int64_t n = static_cast<int64_t>(f.slot_ids.size());
  const int64_t kk = (k < 0 || k > n) ? n : k;
  Scoring sc;
  f.stage_queries(sc, queries, p);
  const int64_t nq = sc.u.n;
  TopK out;
  out.n_queries = nq;
  out.k = kk;
  out.scores.resize(static_cast<size_t>(nq * kk));
  out.ids.resize(static_cast<size_t>(nq * kk));
  if (nq == 0 || kk == 0) return out;
  f.begin_scoring(sc, p);
  if (kk > kMaxK) {  // dense scores, ranked on the host as the CPU index does
    f.dense(sc, nullptr, [&](int64_t q0, int64_t qc, const float* s) {
      for (int64_t q = 0; q < qc; ++q)
        topk(s + q * n, f.slot_ids.data(), n, kk, out.scores.data() + (q0 + q) * kk, out.ids.data() + (q0 + q) * kk);
    });
    sync("GPU search");
    return out;
  }
  f.ensure_ranks();
  ScoreArgs& a = sc.a;
  a.id_rank = f.d_rank.as<uint32_t>();
  a.kk = static_cast<int>(kk);
  const size_t per_query = static_cast<size_t>(a.n_ranges) * a.kk * sizeof(uint64_t);
  const int64_t qchunk =
      std::max<int64_t>(1, std::min<int64_t>({nq, 65535, static_cast<int64_t>((size_t{256} << 20) / per_query)}));
  Buffer cand(per_query * qchunk, "search candidates");
  Buffer cand_n(sizeof(uint32_t) * a.n_ranges * qchunk, "search candidates");
  Buffer d_scores(sizeof(float) * nq * kk, "search results"), d_ids(sizeof(int64_t) * nq * kk, "search results");
  a.cand = cand.as<uint64_t>();
  a.cand_n = cand_n.as<uint32_t>();
  for (int64_t q0 = 0; q0 < nq; q0 += qchunk) {
    const int64_t qc = std::min(qchunk, nq - q0);
    sc.launch(q0, qc);
    final_topk_kernel<<<static_cast<unsigned>(qc), kFinalThreads>>>(a.cand, a.cand_n, a.n_ranges, a.kk,
                                                                    static_cast<int>(kk), f.d_rank_to_id.as<int64_t>(),
                                                                    q0, d_scores.as<float>(), d_ids.as<int64_t>());
    D2R_CUDA_LAUNCH("final_topk_kernel");
  }
  d_scores.download(out.scores.data(), sizeof(float) * nq * kk);
  d_ids.download(out.ids.data(), sizeof(int64_t) * nq * kk);
  sync("GPU search");
  return out;
}

AllScores InvertedFile::score_all(const Batch& queries, const ScoreParams& p) const {
  const Impl& f = *impl_;
  std::lock_guard<std::mutex> lock(f.mu);
  FaultScope faults(f.fail_after);
  Scoring sc;
  f.stage_queries(sc, queries, p);
  const int64_t nq = sc.u.n, n = static_cast<int64_t>(f.slot_ids.size());
  AllScores out;
  out.ids = f.slot_ids;
  out.scores.resize(static_cast<size_t>(nq * n));
  if (nq == 0 || n == 0) return out;
  f.begin_scoring(sc, p);
  f.dense(sc, out.scores.data(), [](int64_t, int64_t, const float*) {});
  sync("GPU scoring");
  return out;
}

Content InvertedFile::export_content() const {
  const Impl& f = *impl_;
  std::lock_guard<std::mutex> lock(f.mu);
  FaultScope faults(f.fail_after);
  const int64_t W = f.n_words;
  Content c;
  c.image_ids = f.slot_ids;
  c.word_counts = f.slot_nwords;
  c.next_id = f.next_id;
  c.offsets.assign(static_cast<size_t>(W) + 1, 0);
  c.slots.resize(static_cast<size_t>(f.n_entries));
  c.codes.resize(static_cast<size_t>(f.n_entries) * f.cb);
  if (f.parts.size() == 1) {  // already one CSR part
    const Part& p = *f.parts[0];
    p.off.download(c.offsets.data(), sizeof(int64_t) * (W + 1));
    p.slot.download(c.slots.data(), sizeof(uint32_t) * p.n);
    p.code.download(c.codes.data(), static_cast<size_t>(p.n) * f.cb);
    sync("GPU inverted-file export");
    return c;
  }
  // Several parts (ascending slot ranges): interleaved per word on the host, part after part.
  std::vector<std::vector<int64_t>> offs(f.parts.size());
  for (size_t i = 0; i < f.parts.size(); ++i) offs[i] = download_array(f.parts[i]->off.as<int64_t>(), W + 1);
  for (int64_t w = 0; w < W; ++w) {
    int64_t len = 0;
    for (const auto& o : offs) len += o[w + 1] - o[w];
    c.offsets[w + 1] = c.offsets[w] + len;
  }
  std::vector<int64_t> cursor(c.offsets.begin(), c.offsets.end() - 1);
  std::vector<uint32_t> slots;
  std::vector<uint8_t> codes;
  const size_t cb = static_cast<size_t>(f.cb);
  for (size_t i = 0; i < f.parts.size(); ++i) {
    const Part& p = *f.parts[i];
    if (p.n == 0) continue;
    slots.resize(static_cast<size_t>(p.n));
    codes.resize(static_cast<size_t>(p.n) * cb);
    p.slot.download(slots.data(), sizeof(uint32_t) * p.n);
    p.code.download(codes.data(), codes.size());
    const std::vector<int64_t>& o = offs[i];
    for (int64_t w = 0; w < W; ++w) {
      const int64_t b = o[w], len = o[w + 1] - o[w];
      if (len == 0) continue;
      std::memcpy(c.slots.data() + cursor[w], slots.data() + b, sizeof(uint32_t) * len);
      std::memcpy(c.codes.data() + cursor[w] * cb, codes.data() + b * cb, cb * len);
      cursor[w] += len;
    }
  }
  sync("GPU inverted-file export");
  return c;
}

void InvertedFile::set_content(const int64_t* offsets, const uint32_t* slots, const uint8_t* codes, int64_t n_entries,
                               int64_t n_images, const int64_t* ids, const int32_t* word_counts, int64_t next_id) {
  Impl& f = *impl_;
  const int64_t W = f.n_words;
  // Validation of the host arrays, as the CPU index's set_content (no index state: no lock needed).
  D2R_CHECK(n_entries >= 0 && n_images >= 0, "corrupt index: negative sizes");
  D2R_CHECK(n_images < int64_t{0xffffffff}, "too many images for one GPU inverted file");
  D2R_CHECK(n_entries <= kMaxPartEntries, "the GPU inverted file holds at most 2^32 - 1 postings in one part, " +
                                              std::to_string(n_entries) + " given");
  D2R_CHECK(offsets[0] == 0, "corrupt index: posting offsets must start at 0");
  for (int64_t w = 0; w < W; ++w)
    D2R_CHECK(offsets[w + 1] >= offsets[w], "corrupt index: posting offsets must be non-decreasing");
  D2R_CHECK(offsets[W] == n_entries, "corrupt index: posting offsets must end at the number of postings");
  std::vector<int64_t> counted(static_cast<size_t>(n_images), 0);
  for (int64_t w = 0; w < W; ++w) {
    for (int64_t j = offsets[w]; j < offsets[w + 1]; ++j) {
      D2R_CHECK(slots[j] < static_cast<uint64_t>(n_images), "corrupt index: posting slot out of range");
      D2R_CHECK(j == offsets[w] || slots[j] > slots[j - 1], "corrupt index: posting list not sorted by slot");
      counted[slots[j]]++;
    }
  }
  std::unordered_map<int64_t, uint32_t> map;
  map.reserve(static_cast<size_t>(n_images));
  int64_t max_id = -1;
  for (int64_t s = 0; s < n_images; ++s) {
    D2R_CHECK(counted[s] == word_counts[s], "corrupt index: word count of an image does not match its postings");
    D2R_CHECK(ids[s] >= 0 && ids[s] < kMaxId, "corrupt index: image id out of range");
    D2R_CHECK(map.emplace(ids[s], static_cast<uint32_t>(s)).second, "corrupt index: negative or duplicate image id");
    max_id = std::max(max_id, ids[s]);
  }
  D2R_CHECK(next_id >= 0 && next_id > max_id && next_id <= kMaxId, "corrupt index: next_id must exceed every image id");
  std::vector<int64_t> new_ids(ids, ids + n_images);
  std::vector<int32_t> new_counts(word_counts, word_counts + n_images);

  std::lock_guard<std::mutex> lock(f.mu);
  FaultScope faults(f.fail_after);
  std::vector<PartPtr> new_parts;
  if (n_entries > 0) {
    auto p = std::make_shared<Part>();
    p->n = n_entries;
    p->slot_begin = 0;
    p->slot_end = n_images;
    p->off = upload_array(offsets, static_cast<size_t>(W) + 1, "inverted-file offsets");
    p->slot = upload_array(slots, static_cast<size_t>(n_entries), "inverted-file slots");
    p->code = upload_array(codes, static_cast<size_t>(n_entries) * f.cb, "inverted-file codes");
    if (!f.binary) {
      p->max_norm = max_code_norm(p->code.as<uint8_t>(), n_entries, f.dim);
      D2R_CHECK(std::isfinite(p->max_norm), "corrupt index: codes contain NaN or Inf");
    }
    new_parts.push_back(std::move(p));
  }
  Buffer nw = upload_array(new_counts.data(), new_counts.size(), "inverted-file word counts");
  sync("GPU inverted-file upload");

  // Commit: swaps and moves only.
  f.parts.swap(new_parts);
  f.slot_ids.swap(new_ids);
  f.slot_nwords.swap(new_counts);
  f.slot_of_id.swap(map);
  f.d_nwords = std::move(nw);
  f.n_entries = n_entries;
  f.next_id = next_id;
  f.ranks_dirty = true;
}

}  // namespace gpu
}  // namespace d2r
