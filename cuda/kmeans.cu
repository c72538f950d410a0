// Lloyd k-means on the GPU (Codebook.train(device="cuda")).
//
// Assignment: the exact GPU quantizer (quantize.cu), so each point goes to its float64-nearest centroid.
// Update: points are sorted by centroid (stable radix sort) and each centroid's members are summed in
// float64 in ascending point order, a warp per centroid: the result is deterministic for a seed.
// Empty clusters are re-seeded from large ones with the symmetric perturbation faiss uses.
#include <cub/cub.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <unordered_set>
#include <vector>

#include "cuda_utils.cuh"

namespace d2r {
namespace gpu {
namespace {

constexpr int kWarps = 8;

__global__ void gather_rows_kernel(const float* __restrict__ x, int dim, const int64_t* __restrict__ rows, int64_t k,
                                   float* __restrict__ out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= k * dim) return;
  const int64_t r = i / dim, t = i % dim;
  out[i] = x[rows[r] * dim + t];
}

__global__ void iota32_kernel(int64_t n, uint32_t* v) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) v[i] = static_cast<uint32_t>(i);
}

__global__ void cluster_bounds_kernel(int64_t k, int64_t n, const uint32_t* __restrict__ sorted, int64_t* __restrict__ start) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c > k) return;
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (static_cast<int64_t>(sorted[mid]) < c) lo = mid + 1; else hi = mid;
  }
  start[c] = lo;
}

__global__ void update_kernel(int64_t k, int dim, const int64_t* __restrict__ start, const uint32_t* __restrict__ perm,
                              const float* __restrict__ x, float* __restrict__ centroids) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  if (c >= k) return;
  const int64_t b = start[c], e = start[c + 1];
  if (e == b) return;  // empty: handled on the host
  for (int t = lane; t < dim; t += 32) {
    double s = 0.0;
    for (int64_t i = b; i < e; ++i) s += static_cast<double>(x[static_cast<int64_t>(perm[i]) * dim + t]);
    centroids[c * dim + t] = static_cast<float>(s / static_cast<double>(e - b));
  }
}

}  // namespace

std::vector<double> kmeans(const float* x, int64_t n, int dim, int64_t k, int niter, uint64_t seed,
                           float* centroids_out) {
  require_device();
  if (k < 1 || n < k) throw std::invalid_argument("k-means needs 1 <= k <= number of points");
  if (n >= (int64_t{1} << 32)) throw std::invalid_argument("too many points for GPU k-means (sample them)");
  std::mt19937_64 rng(seed);
  // k distinct points (partial Fisher-Yates)
  // k distinct points (Floyd's sampling: O(k) memory), in the order drawn
  std::vector<int64_t> idx;
  idx.reserve(k);
  {
    std::unordered_set<int64_t> taken;
    for (int64_t j = n - k; j < n; ++j) {
      std::uniform_int_distribution<int64_t> u(0, j);
      const int64_t t = u(rng);
      const int64_t pick = taken.count(t) ? j : t;
      taken.insert(pick);
      idx.push_back(pick);
    }
  }
  const char* what = "k-means buffers";
  Buffer rows = upload_array(idx.data(), k, what);
  Buffer C(sizeof(float) * k * dim, "k-means centroids");
  gather_rows_kernel<<<grid_for(k * dim, 256), 256>>>(x, dim, rows.as<int64_t>(), k, C.as<float>());
  D2R_CUDA_LAUNCH("gather_rows_kernel");
  Buffer assign(sizeof(int32_t) * n, what), dist(sizeof(float) * n, what), perm(sizeof(uint32_t) * n, what),
      keys2(sizeof(uint32_t) * n, what), perm2(sizeof(uint32_t) * n, what), start(sizeof(int64_t) * (k + 1), what);
  size_t tmp = 0;
  D2R_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, tmp, reinterpret_cast<const uint32_t*>(assign.data()),
                                                 keys2.as<uint32_t>(), perm.as<uint32_t>(), perm2.as<uint32_t>(), n, 0,
                                                 bits_for(static_cast<uint64_t>(k))),
                 "cub::DeviceRadixSort");
  Buffer tbuf(tmp, what);
  std::vector<double> objective;
  std::vector<float> d_host(n);
  std::vector<int64_t> st(k + 1);
  for (int it = 0; it < niter; ++it) {
    Quantizer q(C.as<float>(), true, k, dim);
    q.search(x, n, 1, assign.as<int32_t>(), dist.as<float>());
    dist.download(d_host.data(), sizeof(float) * n);
    double obj = 0.0;
    for (int64_t i = 0; i < n; ++i) obj += d_host[i];
    objective.push_back(obj);
    iota32_kernel<<<grid_for(n, 256), 256>>>(n, perm.as<uint32_t>());
    D2R_CUDA_LAUNCH("iota32_kernel");
    D2R_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(tbuf.data(), tmp, reinterpret_cast<const uint32_t*>(assign.data()),
                                                   keys2.as<uint32_t>(), perm.as<uint32_t>(), perm2.as<uint32_t>(), n, 0,
                                                   bits_for(static_cast<uint64_t>(k))),
                   "cub::DeviceRadixSort");
    cluster_bounds_kernel<<<grid_for(k + 1, 256), 256>>>(k, n, keys2.as<uint32_t>(), start.as<int64_t>());
    D2R_CUDA_LAUNCH("cluster_bounds_kernel");
    update_kernel<<<grid_for(k, kWarps), kWarps * 32>>>(k, dim, start.as<int64_t>(), perm2.as<uint32_t>(), x, C.as<float>());
    D2R_CUDA_LAUNCH("update_kernel");
    start.download(st.data(), sizeof(int64_t) * (k + 1));
    std::vector<int64_t> size(k);
    bool empty = false;
    for (int64_t c = 0; c < k; ++c) {
      size[c] = st[c + 1] - st[c];
      empty |= size[c] == 0;
    }
    if (empty) {
      // faiss's split: copy a cluster chosen with probability ~ (size - 1), perturb both copies.
      std::vector<float> ch(static_cast<size_t>(k) * dim);
      C.download(ch.data(), ch.size() * sizeof(float));
      const float eps = 1.0f / 1024.0f;
      std::uniform_real_distribution<double> uni(0.0, 1.0);
      for (int64_t ci = 0; ci < k; ++ci) {
        if (size[ci] != 0) continue;
        int64_t cj = 0;
        for (;; cj = (cj + 1) % k)
          if (size[cj] > 1 && uni(rng) * static_cast<double>(n - k) < static_cast<double>(size[cj] - 1)) break;
        std::copy(ch.begin() + cj * dim, ch.begin() + (cj + 1) * dim, ch.begin() + ci * dim);
        for (int t = 0; t < dim; ++t) {
          const float s = (t % 2 == 0) ? 1.0f + eps : 1.0f - eps;
          ch[ci * dim + t] *= s;
          ch[cj * dim + t] *= 2.0f - s;
        }
        size[ci] = size[cj] / 2;
        size[cj] -= size[ci];
      }
      C.upload(ch.data(), ch.size() * sizeof(float));
    }
  }
  C.download(centroids_out, sizeof(float) * k * dim);
  sync("GPU k-means");
  return objective;
}

}  // namespace gpu
}  // namespace d2r
