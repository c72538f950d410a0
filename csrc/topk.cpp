#include "topk.h"

#include <algorithm>
#include <numeric>
#include <vector>

namespace d2r {

int64_t topk(const float* scores, const int64_t* ids, int64_t n, int64_t k, float* out_scores,
             int64_t* out_ids, const uint8_t* dead) {
  if (dead) {
    // The live items, then the plain selection over them.
    std::vector<float> s;
    std::vector<int64_t> i;
    for (int64_t j = 0; j < n; ++j) {
      if (dead[j]) continue;
      s.push_back(scores[j]);
      i.push_back(ids[j]);
    }
    return topk(s.data(), i.data(), static_cast<int64_t>(s.size()), k, out_scores, out_ids, nullptr);
  }
  if (k < 0 || k > n) k = n;
  if (k == 0) return 0;
  // "a ranks before b": higher score, then lower id.
  auto before = [&](int64_t a, int64_t b) {
    return scores[a] > scores[b] || (scores[a] == scores[b] && ids[a] < ids[b]);
  };
  std::vector<int64_t> heap;
  if (k * 8 >= n) {
    heap.resize(n);
    std::iota(heap.begin(), heap.end(), int64_t{0});
    std::partial_sort(heap.begin(), heap.begin() + k, heap.end(), before);
  } else {
    // Bounded heap whose top is the worst of the current k best.
    heap.reserve(k);
    for (int64_t i = 0; i < k; ++i) heap.push_back(i);
    std::make_heap(heap.begin(), heap.end(), before);
    for (int64_t i = k; i < n; ++i) {
      if (before(i, heap.front())) {
        std::pop_heap(heap.begin(), heap.end(), before);
        heap.back() = i;
        std::push_heap(heap.begin(), heap.end(), before);
      }
    }
    std::sort(heap.begin(), heap.end(), before);
  }
  for (int64_t j = 0; j < k; ++j) {
    out_scores[j] = scores[heap[j]];
    out_ids[j] = ids[heap[j]];
  }
  return k;
}

}  // namespace d2r
