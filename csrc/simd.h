// Runtime CPU dispatch: one binary serves every x86-64 CPU.
//
// The SIMD-sensitive sources (the "dispatched sources": quantize.cpp, ransac.cpp, ivf_kernels.cpp and
// simd_table.cpp, listed in CMakeLists.txt as D2R_DISPATCH_SOURCES) are compiled once per level, each
// time with D2R_SIMD_LEVEL set to the level's number:
//
//   level    D2R_SIMD   instructions (the CPU must have all of them)
//   scalar   scalar     x86-64 baseline (SSE2); any CPU, also the only level off x86-64
//   avx2     avx2       AVX2, FMA, BMI1, BMI2, POPCNT
//   avx512   avx512     the avx2 set plus AVX-512 F, BW, DQ, VL, VPOPCNTDQ
//
// Every copy puts its code in its own namespace, d2r::D2R_SIMD_NS (d2r::simd_scalar, d2r::simd_avx2,
// d2r::simd_avx512), so the three copies never collide, and fills one table of function pointers,
// simd::Kernels (simd_table.cpp). The rest of the core is compiled once, for the baseline, and calls
// the kernels through simd::kernels(): the table of the level chosen once, at first use (the Python
// module asks at import), from cpuid (__builtin_cpu_supports, which also checks that the OS saves
// the vector registers), or from the environment variable D2R_SIMD=scalar|avx2|avx512. Forcing a
// level this CPU lacks, or an unknown value, is an error (simd::active() throws InvalidArgument, the
// import raises ImportError with its message), never a silent fallback.
//
// How a level's instructions are enabled: the dispatched sources are compiled with the baseline
// flags, and their code between D2R_SIMD_BEGIN and D2R_SIMD_END (simd_level.h) carries the level's
// target attribute (#pragma GCC target / #pragma clang attribute). Headers (the standard library's,
// ours) are included before D2R_SIMD_BEGIN: their inline functions and templates (std::sort,
// std::vector, ...) are then compiled for the baseline wherever they are not inlined, so the one copy
// the linker keeps of each runs on every CPU. (Compiling whole files with -mavx512f would instead
// let the linker pick an AVX-512 copy of, say, std::vector<float>::resize for the baseline code.)
//
// Exactness: quantisation, aggregation and scoring give the same results bit for bit at every level.
// The quantiser's result is certified exact at every level (its float32 pass may round differently,
// the float64 re-check decides); the scoring kernels are compiled with -ffp-contract=off, and the
// explicit fused multiply-adds (reduce.h: fma_if_fused) are std::fma at every level, so the same
// operations round the same way. Spatial verification (ransac.cpp) keeps the FMA contraction for
// speed (2.5x): its scalar level may differ from avx2 / avx512 for points or descriptors within
// float rounding of a threshold or a tie, as ransac.h says of builds. tests/core/test_simd_dispatch.py,
// tests/core/test_scan.py and the C++ tests (run once per level by .ci/run) compare the levels.
//
// The posting scan (scan.h / scan.cpp) follows the same level by another route: its kernels are
// hand-written intrinsics, compiled once with function target attributes, one ScanKernels table per
// level (with the level's name), and scan_kernels() starts at active()'s table (scan.cpp
// variant_of). set_scan_variant overrides it for tests and benchmarks; every table gives the same
// integers. 16-byte binary codes are scored there (ScanKernels::bin16); other code widths and float
// codes by this mechanism's score_block_* (ivf_kernels.cpp). There is no second copy of either.
//
// Adding a kernel:
//   1. Declare it in kernels.h, inside `namespace D2R_SIMD_NS` (it is declared once per level).
//   2. Add a function pointer of the same type to simd::Kernels below.
//   3. Add `&D2R_SIMD_NS::your_kernel` to the table in simd_table.cpp (same position as in Kernels).
//   4. Define it in a dispatched source (or a new one added to D2R_DISPATCH_SOURCES in
//      CMakeLists.txt), after its #includes, between D2R_SIMD_BEGIN and D2R_SIMD_END, inside
//      `namespace d2r { namespace D2R_SIMD_NS {`. D2R_SIMD_LEVEL (0, 1, 2) selects level-specific
//      code with #if (intrinsics: include <immintrin.h> before D2R_SIMD_BEGIN).
//   5. Call it from baseline code as simd::kernels().your_kernel(...). Results must not depend on the
//      level: add it to test_simd_levels (tests/cpp/test_core.cpp), which runs every level in one
//      process and compares them bit for bit. (The posting scan's kernels live in scan.cpp, see above;
//      InvertedFile::score_block, ivf.cpp, picks between them and score_block_* per decoded block.)
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace d2r {

class QuantizerImpl;   // quantize.h
struct ScoreBlock;     // kernels.h
struct RansacParams;   // ransac.h
struct ImageFeatures;  // ransac.h
struct VerifyParams;   // ransac.h

namespace simd {

enum class Level : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kNumLevels = 3;

// "scalar", "avx2", "avx512"
const char* level_name(Level level);

// Whether the level's code is in this binary (all three on x86-64, scalar elsewhere).
bool compiled(Level level);

// Whether this CPU (and OS) can run the level's instructions.
bool cpu_supports(Level level);

// Levels compiled in and supported here, lowest first.
std::vector<Level> available();

// The level in use: chosen on the first call (thread-safe): $D2R_SIMD if set (error: unknown value,
// or a level not available here), else the highest available. Throws InvalidArgument on the error
// (every later call throws it again).
Level active();

// The kernels of each level: one entry per dispatched function (see the top of this file).
struct Kernels {
  Level level;
  // quantize.cpp: the quantiser's search structure and search for a codebook (n_words x dim).
  std::unique_ptr<QuantizerImpl> (*make_quantizer)(const float* centroids, int64_t n_words, int dim);
  // reduce.h's sum_squares (fixed order, fused multiply-adds), for the aggregation.
  double (*sum_squares)(const double* v, int dim);
  // ivf_kernels.cpp: one decoded posting block scored against one query entry (kernels.h): binary
  // codes of any width but 16 bytes (those: scan.h ScanKernels::bin16), and float codes.
  void (*score_block_binary)(const ScoreBlock& b, const int64_t* table);
  void (*score_block_float)(const ScoreBlock& b, float alpha, float tau, float limit);
  // ransac.cpp (ransac.h documents them)
  void (*nearest_neighbors)(const float* q, int64_t nq, const float* db, int64_t ndb, int dim, int32_t* nn,
                            double* sq_dist, bool parallel);
  int64_t (*match_descriptors)(const float* q, int64_t nq, const float* db, int64_t ndb, int dim,
                               double max_distance, std::vector<int32_t>* q_idx, std::vector<int32_t>* db_idx,
                               std::vector<float>* dist, bool parallel);
  int (*affine_ransac)(const float* src_xy, const float* dst_xy, int64_t n, const RansacParams& params,
                       float* best_model, uint8_t* inlier_mask);
  void (*verify_many)(const ImageFeatures* queries, int64_t n_queries, const ImageFeatures* images,
                      int64_t n_images, int dim, const int64_t* pairs, int64_t n_pairs, const VerifyParams& params,
                      int32_t* inliers, int32_t* n_matches);
};

// The active level's kernels (active() on the first call; throws as it does).
const Kernels& kernels();

// A given level's kernels, whether or not it is active (tests compare levels in one process).
// Throws InvalidArgument when the level is not available here.
const Kernels& kernels_for(Level level);

}  // namespace simd
}  // namespace d2r
