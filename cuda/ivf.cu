// Inverted file in GPU memory, scoring and top-k (mirror of csrc/ivf.cpp and csrc/topk.cpp).
//
// Storage: a list of CSR parts, each {offsets per word, slots, codes}, built in bulk on the GPU by a
// stable radix sort of the entries by word (slots stay ascending within a word). An add builds one part;
// the newest parts are merged while the newest is at least half the size of the one before (amortised
// O(log n) merges per entry), and all parts are merged beyond kMaxParts.
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
#include <mutex>
#include <numeric>
#include <unordered_map>
#include <utility>
#include <vector>

#include "binarize.h"
#include "cuda_utils.cuh"
#include "fixed_point.h"
#include "reduce.h"
#include "selectivity.h"

namespace d2r {
namespace gpu {
namespace {

constexpr int kMaxParts = 16;
constexpr int kSlotsPerBlock = 8192;
constexpr int kScoreThreads = 512;
constexpr int kFinalThreads = 1024;

struct PartView {
  const int64_t* off;
  const uint32_t* slot;
  const uint8_t* code;
};
struct Parts {
  PartView p[kMaxParts];
  int n;
};

struct Part {
  Buffer off, slot, code;
  int64_t n = 0;
};

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

// A CSR part from entries (word, slot, code) in slot-ascending order per word.
Part build_part(int64_t n_words, int cb, int64_t n, Buffer& words, const Buffer& slots, const uint8_t* codes) {
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
  return p;
}

struct QueryUpload {
  Buffer off, words, codes;
  const int32_t* w = nullptr;
  const uint8_t* c = nullptr;
};

// What one scoring call (search or score_all) sets up: the queries on the device, the fixed-point
// Hamming table, the kernel arguments and the kernel's shared-memory size.
struct Scoring {
  QueryUpload u;
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

}  // namespace

struct InvertedFile::Impl {
  int64_t n_words = 0;
  int dim = 0, cb = 0;
  bool binary = true;
  std::vector<Part> parts;
  std::vector<int64_t> slot_ids;
  std::vector<int32_t> slot_nwords;
  std::unordered_map<int64_t, uint32_t> slot_of_id;
  Buffer d_nwords;
  mutable std::mutex mu;  // one operation at a time (the bindings release the GIL)
  mutable bool ranks_dirty = true;
  mutable Buffer d_rank, d_rank_to_id;

  int64_t entries() const {
    int64_t e = 0;
    for (const Part& p : parts) e += p.n;
    return e;
  }

  void upload_nwords() {
    d_nwords = upload_array(slot_nwords.data(), slot_nwords.size(), "inverted-file word counts");
  }

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
    d_rank = upload_array(rank.data(), n, "inverted-file id ranks");
    d_rank_to_id = upload_array(r2id.data(), n, "inverted-file id ranks");
    ranks_dirty = false;
  }

  // Merges parts [first, parts.size()) into one.
  void merge_tail(size_t first) {
    if (parts.size() - first < 2) return;
    int64_t n = 0;
    for (size_t i = first; i < parts.size(); ++i) n += parts[i].n;
    const char* what = "inverted-file merge buffers";
    Buffer words(sizeof(uint32_t) * std::max<int64_t>(n, 1), what), slots(sizeof(uint32_t) * std::max<int64_t>(n, 1), what),
        codes(static_cast<size_t>(cb) * std::max<int64_t>(n, 1), what);
    int64_t o = 0;
    for (size_t i = first; i < parts.size(); ++i) {
      const Part& p = parts[i];
      if (p.n == 0) continue;
      entry_words_kernel<<<grid_for(p.n, 256), 256>>>(p.n, p.off.as<int64_t>(), n_words, words.as<uint32_t>() + o);
      D2R_CUDA_LAUNCH("entry_words_kernel");
      copy_d2d(slots.as<uint32_t>() + o, p.slot.data(), sizeof(uint32_t) * p.n);
      copy_d2d(codes.as<uint8_t>() + o * cb, p.code.data(), static_cast<size_t>(cb) * p.n);
      o += p.n;
    }
    Part merged = build_part(n_words, cb, n, words, slots, codes.as<uint8_t>());
    parts.resize(first);
    parts.push_back(std::move(merged));
  }

  void compact_parts() {
    while (parts.size() >= 2 && parts.back().n * 2 >= parts[parts.size() - 2].n) merge_tail(parts.size() - 2);
    if (parts.size() > static_cast<size_t>(kMaxParts)) merge_tail(0);
  }

  void begin_scoring(Scoring& sc, int64_t nq, const int64_t* offsets, const int32_t* words, const uint8_t* codes,
                     bool on_device, const ScoreParams& p) const;

  Parts views() const {
    Parts v{};
    v.n = static_cast<int>(parts.size());
    for (size_t i = 0; i < parts.size(); ++i)
      v.p[i] = PartView{parts[i].off.as<int64_t>(), parts[i].slot.as<uint32_t>(), parts[i].code.as<uint8_t>()};
    return v;
  }
};

InvertedFile::InvertedFile(int64_t n_words, int dim, bool binary) : impl_(new Impl) {
  require_device();
  if (n_words < 1 || n_words > INT32_MAX) throw std::invalid_argument("n_words out of range");
  if (dim < 1) throw std::invalid_argument("dim must be positive");
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
int64_t InvertedFile::n_images() const { return static_cast<int64_t>(impl_->slot_ids.size()); }
int64_t InvertedFile::n_entries() const { return impl_->entries(); }
int InvertedFile::n_parts() const { return static_cast<int>(impl_->parts.size()); }
bool InvertedFile::contains(int64_t id) const { return impl_->slot_of_id.count(id) > 0; }
const std::vector<int64_t>& InvertedFile::slot_ids() const { return impl_->slot_ids; }
const std::vector<int32_t>& InvertedFile::slot_word_counts() const { return impl_->slot_nwords; }

size_t InvertedFile::memory_bytes() const {
  size_t b = 0;
  for (const Part& p : impl_->parts) b += p.off.bytes() + p.slot.bytes() + p.code.bytes();
  return b + impl_->d_nwords.bytes() + impl_->d_rank.bytes() + impl_->d_rank_to_id.bytes();
}

void InvertedFile::add(int64_t n, const int64_t* offsets, const int32_t* words, const uint8_t* codes, bool on_device,
                       const int64_t* ids) {
  Impl& f = *impl_;
  std::lock_guard<std::mutex> lock(f.mu);
  if (n <= 0) return;
  const int64_t E = offsets[n];
  if (offsets[0] != 0) throw std::invalid_argument("word_offsets must start at 0");
  for (int64_t i = 0; i < n; ++i)
    if (offsets[i + 1] < offsets[i]) throw std::invalid_argument("word_offsets must be non-decreasing");
  if (static_cast<int64_t>(f.slot_ids.size()) + n >= (int64_t{1} << 32) - 1)
    throw std::invalid_argument("too many images for one GPU inverted file");
  {
    std::unordered_map<int64_t, uint32_t> seen;
    for (int64_t i = 0; i < n; ++i) {
      if (f.slot_of_id.count(ids[i]) || !seen.emplace(ids[i], 0).second)
        throw std::invalid_argument("image id " + std::to_string(ids[i]) + " is already in the index");
    }
  }
  const char* what = "inverted-file add buffers";
  Buffer w_host_copy, c_host_copy;
  const int32_t* dw = words;
  const uint8_t* dc = codes;
  if (!on_device && E > 0) {
    w_host_copy = upload_array(words, E, what);
    c_host_copy = upload_array(codes, static_cast<size_t>(E) * f.cb, what);
    dw = w_host_copy.as<int32_t>();
    dc = c_host_copy.as<uint8_t>();
  }
  if (E > 0) {
    if (any_out_of_range(dw, E, f.n_words)) throw std::invalid_argument("word id out of range [0, n_words)");
    Buffer d_off = upload_array(offsets, n + 1, what);
    Buffer keys(sizeof(uint32_t) * E, what), slots(sizeof(uint32_t) * E, what);
    entry_slots_kernel<<<grid_for(E, 256), 256>>>(E, d_off.as<int64_t>(), n, dw,
                                                  static_cast<uint32_t>(f.slot_ids.size()), keys.as<uint32_t>(),
                                                  slots.as<uint32_t>());
    D2R_CUDA_LAUNCH("entry_slots_kernel");
    f.parts.push_back(build_part(f.n_words, f.cb, E, keys, slots, dc));  // read in place, host or device copy
    f.compact_parts();
  }
  for (int64_t i = 0; i < n; ++i) {
    f.slot_of_id[ids[i]] = static_cast<uint32_t>(f.slot_ids.size());
    f.slot_ids.push_back(ids[i]);
    f.slot_nwords.push_back(static_cast<int32_t>(offsets[i + 1] - offsets[i]));
  }
  f.upload_nwords();
  f.ranks_dirty = true;
  sync("GPU inverted-file add");
}

namespace {



void upload_queries(QueryUpload& u, int64_t nq, const int64_t* offsets, const int32_t* words, const uint8_t* codes,
                    bool on_device, int cb, int64_t n_words) {
  const int64_t E = offsets[nq];
  if (offsets[0] != 0) throw std::invalid_argument("query word_offsets must start at 0");
  for (int64_t i = 0; i < nq; ++i)
    if (offsets[i + 1] < offsets[i]) throw std::invalid_argument("query word_offsets must be non-decreasing");
  const char* what = "query buffers";
  u.off = upload_array(offsets, nq + 1, what);
  if (on_device) {
    u.w = words;
    u.c = codes;
  } else {
    u.words = upload_array(words, E, what);
    u.codes = upload_array(codes, static_cast<size_t>(E) * cb, what);
    u.w = u.words.as<int32_t>();
    u.c = u.codes.as<uint8_t>();
  }
  if (any_out_of_range(u.w, E, n_words)) throw std::invalid_argument("query word id out of range [0, n_words)");
}

size_t score_smem(const ScoreArgs& a) {
  return sizeof(int64_t) * (kSlotsPerBlock + a.table_len) + (static_cast<size_t>(a.qbatch) * a.cb + 15) / 16 * 16 +
         static_cast<size_t>(a.qbatch) * a.parts.n * (sizeof(int64_t) + sizeof(uint32_t)) + sizeof(uint32_t) * (256 + 4);
}

}  // namespace

void InvertedFile::Impl::begin_scoring(Scoring& sc, int64_t nq, const int64_t* offsets, const int32_t* words,
                                       const uint8_t* codes, bool on_device, const ScoreParams& p) const {
  upload_queries(sc.u, nq, offsets, words, codes, on_device, cb, n_words);
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
  a.q_off = sc.u.off.as<int64_t>();
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

void InvertedFile::search(int64_t nq, const int64_t* offsets, const int32_t* words, const uint8_t* codes,
                          bool on_device, int64_t k, const ScoreParams& p, float* out_scores, int64_t* out_ids) const {
  const Impl& f = *impl_;
  std::lock_guard<std::mutex> lock(f.mu);
  const int64_t n = n_images();
  if (k < 1 || k > kMaxK) throw std::invalid_argument("GPU search needs 1 <= k <= " + std::to_string(kMaxK));
  if (k > n) throw std::invalid_argument("k exceeds the number of indexed images");
  if (nq <= 0) return;
  f.ensure_ranks();
  Scoring sc;
  f.begin_scoring(sc, nq, offsets, words, codes, on_device, p);
  ScoreArgs& a = sc.a;
  a.id_rank = f.d_rank.as<uint32_t>();
  a.kk = static_cast<int>(k);
  const size_t per_query = static_cast<size_t>(a.n_ranges) * a.kk * sizeof(uint64_t);
  const int64_t qchunk = std::max<int64_t>(1, std::min<int64_t>({nq, 65535, static_cast<int64_t>((size_t{256} << 20) / per_query)}));
  Buffer cand(per_query * qchunk, "search candidates");
  Buffer cand_n(sizeof(uint32_t) * a.n_ranges * qchunk, "search candidates");
  Buffer d_scores(sizeof(float) * nq * k, "search results"), d_ids(sizeof(int64_t) * nq * k, "search results");
  a.cand = cand.as<uint64_t>();
  a.cand_n = cand_n.as<uint32_t>();
  for (int64_t q0 = 0; q0 < nq; q0 += qchunk) {
    const int64_t qc = std::min(qchunk, nq - q0);
    sc.launch(q0, qc);
    final_topk_kernel<<<static_cast<unsigned>(qc), kFinalThreads>>>(a.cand, a.cand_n, a.n_ranges, a.kk,
                                                                    static_cast<int>(k), f.d_rank_to_id.as<int64_t>(), q0,
                                                                    d_scores.as<float>(), d_ids.as<int64_t>());
    D2R_CUDA_LAUNCH("final_topk_kernel");
  }
  d_scores.download(out_scores, sizeof(float) * nq * k);
  d_ids.download(out_ids, sizeof(int64_t) * nq * k);
  sync("GPU search");
}

void InvertedFile::score_all(int64_t nq, const int64_t* offsets, const int32_t* words, const uint8_t* codes,
                             bool on_device, const ScoreParams& p, float* out) const {
  const Impl& f = *impl_;
  std::lock_guard<std::mutex> lock(f.mu);
  const int64_t n = n_images();
  if (nq <= 0 || n == 0) return;
  Scoring sc;
  f.begin_scoring(sc, nq, offsets, words, codes, on_device, p);
  sc.a.kk = 0;
  const int64_t qchunk =
      std::max<int64_t>(1, std::min<int64_t>({nq, 65535, static_cast<int64_t>((size_t{512} << 20) / (sizeof(float) * n))}));
  Buffer dense(sizeof(float) * n * qchunk, "dense scores");
  sc.a.dense = dense.as<float>();
  for (int64_t q0 = 0; q0 < nq; q0 += qchunk) {
    const int64_t qc = std::min(qchunk, nq - q0);
    sc.launch(q0, qc);
    dense.download(out + q0 * n, sizeof(float) * n * qc);
  }
  sync("GPU scoring");
}

void InvertedFile::export_csr(std::vector<int64_t>* offsets, std::vector<uint32_t>* slots, std::vector<uint8_t>* codes) {
  Impl& f = *impl_;
  std::lock_guard<std::mutex> lock(f.mu);
  f.merge_tail(0);
  offsets->assign(f.n_words + 1, 0);
  slots->clear();
  codes->clear();
  if (f.parts.empty()) return;
  const Part& p = f.parts[0];
  p.off.download(offsets->data(), sizeof(int64_t) * (f.n_words + 1));
  slots->resize(p.n);
  codes->resize(static_cast<size_t>(p.n) * f.cb);
  if (p.n) {
    p.slot.download(slots->data(), sizeof(uint32_t) * p.n);
    p.code.download(codes->data(), static_cast<size_t>(p.n) * f.cb);
  }
  sync("GPU inverted-file export");
}

void InvertedFile::set_content(const int64_t* offsets, const uint32_t* slots, const uint8_t* codes, int64_t n_images,
                               const int64_t* ids, const int32_t* word_counts) {
  Impl& f = *impl_;
  std::lock_guard<std::mutex> lock(f.mu);
  const int64_t E = offsets[f.n_words];
  Part p;
  p.n = E;
  p.off = upload_array(offsets, f.n_words + 1, "inverted-file offsets");
  p.slot = upload_array(slots, E, "inverted-file slots");
  p.code = upload_array(codes, static_cast<size_t>(E) * f.cb, "inverted-file codes");
  f.parts.clear();
  f.parts.push_back(std::move(p));
  f.slot_ids.assign(ids, ids + n_images);
  f.slot_nwords.assign(word_counts, word_counts + n_images);
  f.slot_of_id.clear();
  for (int64_t i = 0; i < n_images; ++i) f.slot_of_id[ids[i]] = static_cast<uint32_t>(i);
  f.upload_nwords();
  f.ranks_dirty = true;
  sync("GPU inverted-file upload");
}

}  // namespace gpu
}  // namespace d2r
