// Residual aggregation (METHOD.md section 3): VLAD, ASMK / ASMK*, R-VLAD, R-ASMK / R-ASMK*,
// Naive-R-ASMK. All sums are taken in double precision in a fixed order (ascending member position
// within a region, regions in ascending order), so the result does not depend on the thread count.
#pragma once

#include <cstdint>
#include <vector>

namespace d2r {

enum class AggKind {
  kAsmk = 0,        // per-word l2n of the residual sum (R-ASMK when an image has several regions)
  kNaiveRegional = 1  // sum over regions of |W_r|^-1/2 * l2n(v_r[k]); float codes only
};

// Descriptors, their word assignments and the codebook shared by every aggregation call.
struct AggInput {
  const float* x = nullptr;        // n_desc x dim
  int64_t n_desc = 0;
  const int32_t* assign = nullptr; // n_desc x m word ids
  int m = 1;
  const float* centroids = nullptr;  // n_words x dim
  int64_t n_words = 0;
  int dim = 0;
};

// Images made of regions: image i owns regions [image_regions[i], image_regions[i+1]); region r holds
// the descriptors members[region_members[r] .. region_members[r+1]) (indices into AggInput::x; a
// descriptor may belong to several regions). A plain image is one region listing its descriptors.
struct RegionLayout {
  const int64_t* image_regions = nullptr;  // n_images + 1
  int64_t n_images = 0;
  const int64_t* region_members = nullptr; // n_regions + 1
  const int64_t* members = nullptr;        // null: region r is the contiguous range itself
};

// Output: image i owns words [word_offsets[i], word_offsets[i+1]) (ascending ids) with codes
// (float32 n x dim) or packed sign bits (uint8 n x ceil(dim/8)).
struct Aggregated {
  std::vector<int64_t> word_offsets;
  std::vector<int32_t> words;
  std::vector<float> codes;
  std::vector<uint8_t> bits;
};

void aggregate(const AggInput& in, const RegionLayout& layout, AggKind kind, bool binary,
               Aggregated* out);

// Dense (R-)VLAD of each image, n_images x (n_words * dim): per region the residual sums, each
// region's whole VLAD l2-normalised when there are several regions (or when l2 is set and there is one),
// summed, divided by R, and finally l2-normalised when l2 is set.
void vlad(const AggInput& in, const RegionLayout& layout, bool l2, float* out);

// Checks every word id of the assignment lies in [0, n_words).
void check_assignments(const AggInput& in);

}  // namespace d2r
