// The inner loops of the posting-list scan (ivf.cpp score_slots), in variants by instruction set:
//
//   scalar  portable C++ (the reference: the other variants give bit-identical results)
//   avx2    SSE2 gap decoding, AVX2 Hamming distances (nibble lookup and byte sums)
//   avx512  SSE2 gap decoding, AVX-512 VPOPCNTDQ Hamming distances, gathered table lookups and
//           accumulator gather / scatter (the slots of a block are distinct: no conflicts)
//
// Each variant computes the same integers (slots, Hamming distances, fixed-point table entries
// added into 64-bit accumulators), so scores do not depend on the variant. The vector variants are
// compiled with function target attributes (GCC / Clang on x86-64) whatever the build's -march.
// There is one variant per SIMD level (simd.h), with the level's name and instructions: the variants
// offered are those of simd::available(), and the variant in use is the active level's
// (simd::active(): cpuid, or the environment variable D2R_SIMD; a bad value is an error there, never a
// silent fallback here). set_scan_variant overrides it, for tests and benchmarks only.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "postings.h"
#include "simd.h"

namespace d2r {

struct ScanKernels {
  const char* name;
  // The block's slots into out[0..n) (kBlock + 16 entries of room); returns the last one in 64
  // bits (the caller checks it against the segment; a sum past 2^32 gives a value >= 2^32).
  uint64_t (*decode)(const Block& blk, uint32_t* out);
  // acc[slots[i] - base] += table[popcount(q XOR code_i)] for i in [i0, i1), code_i the 16 bytes at
  // codes + 16 i; slots[i] - base < 2^31, distinct.
  void (*bin16)(const int64_t* table, const uint8_t* q, const uint8_t* codes, const uint32_t* slots, int i0, int i1,
                uint32_t base, int64_t* acc);
  // out[i] = the score of fixed-point sum a[i] for an image of nw[i] words (fixed_point.h,
  // selectivity.h gamma_pair; -1 without words), i in [0, n), for a query of nq > 0 words.
  void (*finish)(const int64_t* a, const int32_t* nw, int64_t n, int64_t nq, bool normalize, float* out);
};

// The variant in use (thread-safe): initially simd::active()'s (throws as it does).
const ScanKernels& scan_kernels();
// The variant of a SIMD level (InvalidArgument when the level is not available here).
const ScanKernels& scan_kernels_for(simd::Level level);
// The variants this CPU runs (the names of simd::available()), scalar first.
std::vector<std::string> scan_variants();
std::string scan_variant();
// Selects a variant by name (InvalidArgument when unknown or not supported by this CPU). Affects
// every inverted file of the process; for tests and benchmarks.
void set_scan_variant(const std::string& name);

}  // namespace d2r
