// GPU aggregation (mirror of csrc/aggregate.cpp, AggKind::kAsmk): ASMK / ASMK* for single-region images,
// R-ASMK / R-ASMK* for images made of several regions, with float or packed binary codes.
//
// The CPU path sums residuals per (region, word) in float64 in ascending member order, l2-normalises
// each region's whole VLAD for multi-region images, sums the scaled regions per (image, word) in
// ascending region order, then l2-normalises per word. The GPU does the same arithmetic in the same
// order, so the codes are bit-identical:
//   1. one key (region << 32 | word) per (member, assignment), stable radix sort (member order kept);
//   2. a warp per (region, word) segment sums x - c in float64, lane-parallel over dimensions, members
//      sequentially (ascending), and takes the segment's squared norm with the shared sum_squares;
//   3. one thread per region sums its segments' squared norms in ascending word order -> scale;
//   4. a stable sort by (image << 32 | word) groups the segments per image word (regions ascending);
//      a warp per group sums scale * v, normalises, rounds to float32 and packs the signs;
//   5. the kept words are compacted in (image, word) order.
#include <cub/cub.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "binarize.h"
#include "cuda_utils.cuh"
#include "reduce.h"

namespace d2r {
namespace gpu {
namespace {

constexpr double kWordThreshold = 1e-6;
constexpr double kNormFloor = 1e-12;
constexpr int kWarps = 8;

__global__ void member_keys_kernel(int64_t n_entries, int m, const int64_t* __restrict__ member_region,
                                   const int64_t* __restrict__ member_desc, const int32_t* __restrict__ assign,
                                   uint64_t* __restrict__ keys, uint32_t* __restrict__ vals) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= n_entries) return;
  const int64_t j = e / m;
  const int a = static_cast<int>(e % m);
  const int64_t d = member_desc[j];
  const uint32_t w = static_cast<uint32_t>(assign[d * m + a]);
  keys[e] = (static_cast<uint64_t>(member_region[j]) << 32) | w;
  vals[e] = static_cast<uint32_t>(e);
}

__global__ void heads_kernel(int64_t n, const uint64_t* __restrict__ keys, uint32_t* __restrict__ head) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  head[i] = (i == 0 || keys[i] != keys[i - 1]) ? 1u : 0u;
}

// seg_start[s] = first sorted position of segment s; seg_key[s] its key.
__global__ void segments_kernel(int64_t n, const uint64_t* __restrict__ keys, const uint32_t* __restrict__ incl,
                                int64_t* __restrict__ seg_start, uint64_t* __restrict__ seg_key) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n) return;
  if (i == 0 || keys[i] != keys[i - 1]) {
    const uint32_t s = incl[i] - 1;
    seg_start[s] = i;
    seg_key[s] = keys[i];
  }
}

// Step 2: residual sums per (region, word) and their squared norms.
__global__ void residual_sums_kernel(int64_t n_seg, int64_t n_entries, int dim, int m,
                                     const int64_t* __restrict__ seg_start, const uint64_t* __restrict__ seg_key,
                                     const uint32_t* __restrict__ vals, const int64_t* __restrict__ member_desc,
                                     const float* __restrict__ x, const float* __restrict__ c,
                                     double* __restrict__ V, double* __restrict__ ss) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t s = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (s >= n_seg) return;
  const int64_t b = seg_start[s];
  const int64_t e = s + 1 < n_seg ? seg_start[s + 1] : n_entries;
  const uint32_t w = static_cast<uint32_t>(seg_key[s] & 0xffffffffu);
  const float* cw = c + static_cast<int64_t>(w) * dim;
  double* v = V + s * dim;
  for (int t = lane; t < dim; t += 32) {
    double acc = 0.0;
    for (int64_t i = b; i < e; ++i) {
      const int64_t d = member_desc[vals[i] / m];
      acc = __dadd_rn(acc, __dsub_rn(static_cast<double>(x[d * dim + t]), static_cast<double>(cw[t])));
    }
    v[t] = acc;
  }
  __syncwarp();
  if (lane == 0) ss[s] = sum_squares(v, dim);
}

// Step 3: per-region scale (1 for an image of one region).
__global__ void region_scale_kernel(int64_t n_regions, int64_t n_seg, const uint64_t* __restrict__ seg_key,
                                    const double* __restrict__ ss, const int64_t* __restrict__ region_nreg,
                                    double* __restrict__ scale) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= n_regions) return;
  const int64_t R = region_nreg[r];
  if (R <= 1) {
    scale[r] = 1.0;
    return;
  }
  // first segment of region r
  int64_t lo = 0, hi = n_seg;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (static_cast<int64_t>(seg_key[mid] >> 32) < r) lo = mid + 1; else hi = mid;
  }
  double total = 0.0;
  for (int64_t s = lo; s < n_seg && static_cast<int64_t>(seg_key[s] >> 32) == r; ++s) total = __dadd_rn(total, ss[s]);
  scale[r] = 1.0 / sqrt(fmax(total, kNormFloor)) / static_cast<double>(R);
}

__global__ void image_keys_kernel(int64_t n_seg, const uint64_t* __restrict__ seg_key,
                                  const int64_t* __restrict__ region_image, uint64_t* __restrict__ keys2,
                                  uint32_t* __restrict__ vals2) {
  const int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (s >= n_seg) return;
  const int64_t r = static_cast<int64_t>(seg_key[s] >> 32);
  keys2[s] = (static_cast<uint64_t>(region_image[r]) << 32) | (seg_key[s] & 0xffffffffu);
  vals2[s] = static_cast<uint32_t>(s);
}

// Step 4: per (image, word): sum of scale * v over regions, threshold, l2n, float32 code / sign bits.
__global__ void image_codes_kernel(int64_t n_g, int64_t n_seg, int dim, bool binary, int cb,
                                   const int64_t* __restrict__ g_start, const uint64_t* __restrict__ g_key,
                                   const uint32_t* __restrict__ vals2, const uint64_t* __restrict__ seg_key,
                                   const double* __restrict__ V, const double* __restrict__ scale,
                                   float* __restrict__ codes, uint8_t* __restrict__ bits,
                                   uint32_t* __restrict__ keep) {
  extern __shared__ __align__(16) unsigned char ism[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  double* u = reinterpret_cast<double*>(ism) + warp * dim;
  float* f = reinterpret_cast<float*>(reinterpret_cast<double*>(ism) + kWarps * dim) + warp * dim;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (g >= n_g) return;
  const int64_t b = g_start[g];
  const int64_t e = g + 1 < n_g ? g_start[g + 1] : n_seg;
  for (int t = lane; t < dim; t += 32) {
    double acc = 0.0;
    for (int64_t i = b; i < e; ++i) {
      const uint32_t s = vals2[i];
      const double sc = scale[seg_key[s] >> 32];
      acc = __dadd_rn(acc, __dmul_rn(V[static_cast<int64_t>(s) * dim + t], sc));
    }
    u[t] = acc;
  }
  __syncwarp();
  double ssq = 0.0;
  if (lane == 0) ssq = sum_squares(u, dim);
  ssq = __shfl_sync(0xffffffffu, ssq, 0);
  const bool kept = sqrt(ssq) > kWordThreshold;
  if (lane == 0) keep[g] = kept ? 1u : 0u;
  if (!kept) return;
  const double inv = 1.0 / sqrt(fmax(ssq, kNormFloor));
  for (int t = lane; t < dim; t += 32) {
    const float v = static_cast<float>(__dmul_rn(u[t], inv));
    if (binary) f[t] = v; else codes[g * dim + t] = v;
  }
  if (binary) {
    __syncwarp();
    if (lane == 0) pack_signs(f, dim, bits + g * cb);
  }
}

__global__ void compact_kernel(int64_t n_g, int cb, const uint32_t* __restrict__ keep,
                               const uint32_t* __restrict__ pos_incl, const uint64_t* __restrict__ g_key,
                               const uint8_t* __restrict__ codes_in, int32_t* __restrict__ words_out,
                               uint8_t* __restrict__ codes_out, unsigned long long* __restrict__ img_count) {
  const int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (g >= n_g || !keep[g]) return;
  const int64_t o = pos_incl[g] - 1;
  words_out[o] = static_cast<int32_t>(g_key[g] & 0xffffffffu);
  for (int i = 0; i < cb; ++i) codes_out[o * cb + i] = codes_in[g * cb + i];
  atomicAdd(img_count + (g_key[g] >> 32), 1ull);
}

// Stable radix sort of (key, value) pairs; the sorted arrays replace the inputs.
void sort_pairs(Buffer& keys, Buffer& vals, int64_t n, int end_bit, const char* what) {
  Buffer k2(sizeof(uint64_t) * n, what), v2(sizeof(uint32_t) * n, what);
  size_t tmp = 0;
  D2R_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, tmp, keys.as<uint64_t>(), k2.as<uint64_t>(),
                                                 vals.as<uint32_t>(), v2.as<uint32_t>(), n, 0, end_bit),
                 "cub::DeviceRadixSort");
  Buffer t(tmp, what);
  D2R_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(t.data(), tmp, keys.as<uint64_t>(), k2.as<uint64_t>(),
                                                 vals.as<uint32_t>(), v2.as<uint32_t>(), n, 0, end_bit),
                 "cub::DeviceRadixSort");
  keys = std::move(k2);
  vals = std::move(v2);
}

void inclusive_sum(const uint32_t* in, uint32_t* out, int64_t n, const char* what) {
  size_t tmp = 0;
  D2R_CUDA_CHECK(cub::DeviceScan::InclusiveSum(nullptr, tmp, in, out, n), "cub::DeviceScan");
  Buffer t(tmp, what);
  D2R_CUDA_CHECK(cub::DeviceScan::InclusiveSum(t.data(), tmp, in, out, n), "cub::DeviceScan");
}

// Segments of a sorted key array: returns their count; fills starts and keys.
int64_t find_segments(const Buffer& keys, int64_t n, Buffer* starts, Buffer* seg_keys, const char* what) {
  Buffer head(sizeof(uint32_t) * n, what), incl(sizeof(uint32_t) * n, what);
  heads_kernel<<<grid_for(n, 256), 256>>>(n, keys.as<uint64_t>(), head.as<uint32_t>());
  D2R_CUDA_LAUNCH("heads_kernel");
  inclusive_sum(head.as<uint32_t>(), incl.as<uint32_t>(), n, what);
  uint32_t count = 0;
  copy_d2h(&count, incl.as<uint32_t>() + (n - 1), sizeof(count));
  *starts = Buffer(sizeof(int64_t) * count, what);
  *seg_keys = Buffer(sizeof(uint64_t) * count, what);
  segments_kernel<<<grid_for(n, 256), 256>>>(n, keys.as<uint64_t>(), incl.as<uint32_t>(), starts->as<int64_t>(),
                                             seg_keys->as<uint64_t>());
  D2R_CUDA_LAUNCH("segments_kernel");
  return count;
}

}  // namespace

DeviceAggregated aggregate(const float* x, int64_t n_desc, const int32_t* assign, int m, const float* centroids,
                           int64_t n_words, int dim, const int64_t* image_regions, int64_t n_images,
                           const int64_t* region_members, const int64_t* members, bool binary) {
  require_device();
  if (dim < 1 || dim > 1024) throw std::invalid_argument("GPU aggregation supports dimensions 1..1024");
  if (m < 1) throw std::invalid_argument("multiple assignment m must be >= 1");
  DeviceAggregated out;
  out.n_images = n_images;
  out.binary = binary;
  out.code_bytes = binary ? (dim + 7) / 8 : static_cast<int>(sizeof(float)) * dim;
  out.word_offsets.assign(n_images + 1, 0);
  const int64_t n_regions = image_regions[n_images];
  const int64_t n_members = region_members[n_regions];
  const int64_t n_entries = n_members * m;
  if (n_entries >= (int64_t{1} << 32) || n_regions >= (int64_t{1} << 31) || n_images >= (int64_t{1} << 31))
    throw std::invalid_argument("batch too large for one GPU aggregation call (split it)");
  if (n_entries == 0) {
    out.words = std::make_shared<Buffer>();
    out.codes = std::make_shared<Buffer>();
    return out;
  }
  if (any_out_of_range(assign, n_desc * m, n_words))
    throw std::invalid_argument("assignments hold word ids outside [0, n_words)");
  // Host-side layout tables (small next to the descriptors).
  std::vector<int64_t> member_region(n_members), member_desc(n_members), region_nreg(n_regions),
      region_image(n_regions);
  for (int64_t i = 0; i < n_images; ++i)
    for (int64_t r = image_regions[i]; r < image_regions[i + 1]; ++r) {
      region_nreg[r] = image_regions[i + 1] - image_regions[i];
      region_image[r] = i;
      for (int64_t j = region_members[r]; j < region_members[r + 1]; ++j) {
        member_region[j] = r;
        member_desc[j] = members ? members[j] : j;
        if (member_desc[j] < 0 || member_desc[j] >= n_desc)
          throw std::invalid_argument("region members index descriptors out of range");
      }
    }
  const char* what = "GPU aggregation buffers";
  Buffer d_mreg = upload_array(member_region.data(), n_members, what);
  Buffer d_mdesc = upload_array(member_desc.data(), n_members, what);
  Buffer d_rnreg = upload_array(region_nreg.data(), n_regions, what);
  Buffer d_rimg = upload_array(region_image.data(), n_regions, what);

  // 1. keys per (member, assignment), sorted by (region, word), member order kept.
  Buffer keys(sizeof(uint64_t) * n_entries, what), vals(sizeof(uint32_t) * n_entries, what);
  member_keys_kernel<<<grid_for(n_entries, 256), 256>>>(n_entries, m, d_mreg.as<int64_t>(), d_mdesc.as<int64_t>(),
                                                         assign, keys.as<uint64_t>(), vals.as<uint32_t>());
  D2R_CUDA_LAUNCH("member_keys_kernel");
  sort_pairs(keys, vals, n_entries, 32 + bits_for(static_cast<uint64_t>(n_regions)), what);
  Buffer seg_start, seg_key;
  const int64_t n_seg = find_segments(keys, n_entries, &seg_start, &seg_key, what);

  // 2. residual sums
  Buffer V(sizeof(double) * n_seg * dim, "GPU aggregation residual sums"), ss(sizeof(double) * n_seg, what);
  residual_sums_kernel<<<grid_for(n_seg, kWarps), kWarps * 32>>>(n_seg, n_entries, dim, m, seg_start.as<int64_t>(),
                                                                 seg_key.as<uint64_t>(), vals.as<uint32_t>(),
                                                                 d_mdesc.as<int64_t>(), x, centroids,
                                                                 V.as<double>(), ss.as<double>());
  D2R_CUDA_LAUNCH("residual_sums_kernel");
  // 3. region scales
  Buffer scale(sizeof(double) * n_regions, what);
  region_scale_kernel<<<grid_for(n_regions, 256), 256>>>(n_regions, n_seg, seg_key.as<uint64_t>(), ss.as<double>(),
                                                         d_rnreg.as<int64_t>(), scale.as<double>());
  D2R_CUDA_LAUNCH("region_scale_kernel");
  // 4. group per (image, word)
  Buffer keys2(sizeof(uint64_t) * n_seg, what), vals2(sizeof(uint32_t) * n_seg, what);
  image_keys_kernel<<<grid_for(n_seg, 256), 256>>>(n_seg, seg_key.as<uint64_t>(), d_rimg.as<int64_t>(),
                                                   keys2.as<uint64_t>(), vals2.as<uint32_t>());
  D2R_CUDA_LAUNCH("image_keys_kernel");
  sort_pairs(keys2, vals2, n_seg, 32 + bits_for(static_cast<uint64_t>(n_images)), what);
  Buffer g_start, g_key;
  const int64_t n_g = find_segments(keys2, n_seg, &g_start, &g_key, what);
  const int cb = out.code_bytes;
  Buffer codes_all(static_cast<size_t>(cb) * n_g, "GPU aggregation codes"), keep(sizeof(uint32_t) * n_g, what);
  const size_t ism = static_cast<size_t>(kWarps) * dim * (sizeof(double) + sizeof(float));
  D2R_CUDA_CHECK(cudaFuncSetAttribute(image_codes_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(ism)),
                 "cudaFuncSetAttribute (aggregation shared memory)");
  image_codes_kernel<<<grid_for(n_g, kWarps), kWarps * 32, ism>>>(
      n_g, n_seg, dim, binary, cb, g_start.as<int64_t>(), g_key.as<uint64_t>(), vals2.as<uint32_t>(),
      seg_key.as<uint64_t>(), V.as<double>(), scale.as<double>(), binary ? nullptr : codes_all.as<float>(),
      binary ? codes_all.as<uint8_t>() : nullptr, keep.as<uint32_t>());
  D2R_CUDA_LAUNCH("image_codes_kernel");
  // 5. compaction
  Buffer pos(sizeof(uint32_t) * n_g, what);
  inclusive_sum(keep.as<uint32_t>(), pos.as<uint32_t>(), n_g, what);
  uint32_t n_out = 0;
  copy_d2h(&n_out, pos.as<uint32_t>() + (n_g - 1), sizeof(n_out));
  out.n_entries = n_out;
  out.words = std::make_shared<Buffer>(sizeof(int32_t) * std::max<uint32_t>(n_out, 1), "aggregated words");
  out.codes = std::make_shared<Buffer>(static_cast<size_t>(cb) * std::max<uint32_t>(n_out, 1), "aggregated codes");
  Buffer counts(sizeof(unsigned long long) * n_images, what);
  D2R_CUDA_CHECK(cudaMemset(counts.data(), 0, counts.bytes()), "cudaMemset");
  compact_kernel<<<grid_for(n_g, 256), 256>>>(n_g, cb, keep.as<uint32_t>(), pos.as<uint32_t>(), g_key.as<uint64_t>(),
                                              codes_all.as<uint8_t>(), out.words->as<int32_t>(),
                                              out.codes->as<uint8_t>(), counts.as<unsigned long long>());
  D2R_CUDA_LAUNCH("compact_kernel");
  std::vector<unsigned long long> cnt = download_array(counts.as<unsigned long long>(), n_images);
  for (int64_t i = 0; i < n_images; ++i) out.word_offsets[i + 1] = out.word_offsets[i] + static_cast<int64_t>(cnt[i]);
  sync("GPU aggregation");
  return out;
}

}  // namespace gpu
}  // namespace d2r
