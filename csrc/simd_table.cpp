// The table of one level's kernels (dispatched source: compiled once per level, simd.h).
#include "kernels.h"

namespace d2r {
namespace simd {

const Kernels D2R_SIMD_TABLE = {
    static_cast<Level>(D2R_SIMD_LEVEL),
    &D2R_SIMD_NS::make_quantizer,
    &D2R_SIMD_NS::sum_squares,
    &D2R_SIMD_NS::score_block_binary,
    &D2R_SIMD_NS::score_block_float,
    &D2R_SIMD_NS::nearest_neighbors,
    &D2R_SIMD_NS::match_descriptors,
    &D2R_SIMD_NS::affine_ransac,
    &D2R_SIMD_NS::verify_many,
};

}  // namespace simd
}  // namespace d2r
