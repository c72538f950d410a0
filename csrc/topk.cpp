#include "topk.h"

#include <algorithm>
#include <numeric>
#include <vector>

namespace d2r {

void topk(const float* scores, const int64_t* ids, int64_t n, int64_t k, float* out_scores,
          int64_t* out_ids) {
  if (k < 0 || k > n) k = n;
  if (k == 0) return;
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
}

}  // namespace d2r
