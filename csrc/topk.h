// Top-k selection over a score array: score descending, ties by image id ascending.
#pragma once

#include <cstdint>

namespace d2r {

// scores[i] belongs to image ids[i] (i < n). Writes min(k, n) results to out_scores / out_ids in
// rank order. k < 0 (or >= n) gives the full ranking. With `dead`, items i with dead[i] != 0 are
// left out (and n counts only the others). Returns the number of results written.
int64_t topk(const float* scores, const int64_t* ids, int64_t n, int64_t k, float* out_scores,
             int64_t* out_ids, const uint8_t* dead = nullptr);

}  // namespace d2r
