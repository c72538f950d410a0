#include "scan.h"

#include "common.h"
#include "fixed_point.h"
#include "selectivity.h"

#include <array>
#include <atomic>
#include <utility>
#include <cstring>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define D2R_X86_KERNELS 1
#include <immintrin.h>
#endif

namespace d2r {

namespace {

// ---- scalar (the reference) ----------------------------------------------------------------------

inline int popcount64(uint64_t v) { return __builtin_popcountll(v); }

void bin16_scalar(const int64_t* table, const uint8_t* q, const uint8_t* codes, const uint32_t* slots, int i0, int i1,
                  uint32_t base, int64_t* acc) {
  uint64_t q0, q1;
  std::memcpy(&q0, q, 8);
  std::memcpy(&q1, q + 8, 8);
  for (int i = i0; i < i1; ++i) {
    uint64_t c0, c1;
    std::memcpy(&c0, codes + 16 * i, 8);
    std::memcpy(&c1, codes + 16 * i + 8, 8);
    acc[slots[i] - base] += table[popcount64(q0 ^ c0) + popcount64(q1 ^ c1)];
  }
}

void finish_scalar(const int64_t* a, const int32_t* nw, int64_t n, int64_t nq, bool normalize, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    if (nw[i] == 0) {
      out[i] = -1.0f;
      continue;
    }
    out[i] = score_from_fixed(a[i]);
    if (normalize) out[i] *= gamma_pair(nq, nw[i]);
  }
}

const ScanKernels kScalar = {"scalar", decode_slots_scalar, bin16_scalar, finish_scalar};

#ifdef D2R_X86_KERNELS

// ---- SSE2 gap decoding (x86-64 baseline) --------------------------------------------------------

// Group j of a block of width b (its gaps j, j + 32, j + 64, j + 96 in the 4 lanes): the 4 slots
// stored at out + 4 j, prefix-summed onto carry (the previous group's last slot, or the block's first
// slot); returns the new carry. Slot 0 is the header's: gap 0 of group 0 is ignored. Inlined into both
// decoders below, so the full-block unpackers, whose b and j are constants, keep constant shifts.
__attribute__((target("sse2"), always_inline)) inline __m128i unpack_group(const uint8_t* gaps, int j, int b,
                                                                          __m128i carry, uint32_t* out) {
  __m128i v = _mm_setzero_si128();
  if (b > 0) {
    const __m128i mask = _mm_set1_epi32(b >= 32 ? -1 : static_cast<int>((1ull << b) - 1));
    const int bit = j * b, t = bit >> 5, sh = bit & 31;
    v = _mm_srl_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(gaps + 16 * t)), _mm_cvtsi32_si128(sh));
    if (sh + b > 32)
      v = _mm_or_si128(v, _mm_sll_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(gaps + 16 * (t + 1))),
                                        _mm_cvtsi32_si128(32 - sh)));
    v = _mm_and_si128(v, mask);
  }
  __m128i g = _mm_add_epi32(v, _mm_set1_epi32(1));
  if (j == 0) g = _mm_and_si128(g, _mm_setr_epi32(0, -1, -1, -1));
  g = _mm_add_epi32(g, _mm_slli_si128(g, 4));
  g = _mm_add_epi32(g, _mm_slli_si128(g, 8));
  const __m128i s = _mm_add_epi32(g, carry);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 4 * j), s);
  return _mm_shuffle_epi32(s, 0xFF);
}

// A full block (128 gaps, 32 per lane) of width B, unrolled: every shift a constant.
template <int B>
__attribute__((target("sse2"))) void unpack_full(const uint8_t* gaps, uint32_t first, uint32_t* out) {
  __m128i carry = _mm_set1_epi32(static_cast<int>(first));
#pragma GCC unroll 32
  for (int j = 0; j < kBlock / 4; ++j) carry = unpack_group(gaps, j, B, carry, out);
}

using UnpackFn = void (*)(const uint8_t*, uint32_t, uint32_t*);

template <int... B>
constexpr std::array<UnpackFn, sizeof...(B)> unpack_table(std::integer_sequence<int, B...>) {
  return {unpack_full<B>...};
}

const std::array<UnpackFn, 33> kUnpackFull = unpack_table(std::make_integer_sequence<int, 33>{});

__attribute__((target("sse2"))) uint64_t decode_sse2(const Block& blk, uint32_t* out) {
  const int n = blk.n, b = blk.b;
  if (n == 1 || !block_fits_u32(blk)) return decode_slots_scalar(blk, out);
  if (n == kBlock) {
    kUnpackFull[b](blk.gaps, blk.first, out);
    return out[kBlock - 1];
  }
  __m128i carry = _mm_set1_epi32(static_cast<int>(blk.first));
  for (int j = 0, m = (n + 3) / 4; j < m; ++j) carry = unpack_group(blk.gaps, j, b, carry, out);
  return out[n - 1];
}

// ---- AVX2: Hamming distances by nibble lookup ---------------------------------------------------

// Per 8 bytes of x XOR qq, their bit count: [code a lo, code a hi | code b lo, code b hi]. (A function
// with the target attribute, not a lambda: a lambda does not inherit its enclosing function's target,
// and without -march the AVX2 intrinsics would not inline into it.)
__attribute__((target("avx2,popcnt"), always_inline)) inline __m256i counts_avx2(__m256i x, __m256i qq, __m256i lut,
                                                                                  __m256i low) {
  x = _mm256_xor_si256(x, qq);
  const __m256i c = _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(x, low)),
                                    _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(x, 4), low)));
  return _mm256_sad_epu8(c, _mm256_setzero_si256());
}

__attribute__((target("avx2,popcnt"))) void bin16_avx2(const int64_t* table, const uint8_t* q, const uint8_t* codes,
                                                      const uint32_t* slots, int i0, int i1, uint32_t base,
                                                      int64_t* acc) {
  const __m256i qq = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2,
                                       3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0F);
  int i = i0;
  alignas(32) int64_t h[4];
  for (; i + 4 <= i1; i += 4) {
    _mm_prefetch(reinterpret_cast<const char*>(codes + 16 * i + 1024), _MM_HINT_T0);  // as in bin16_avx512
    const __m256i s0 = counts_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 16 * i)), qq, lut, low);
    const __m256i s1 =
        counts_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + 16 * i + 32)), qq, lut, low);
    // [h_i, h_{i+2} | h_{i+1}, h_{i+3}]
    _mm256_store_si256(reinterpret_cast<__m256i*>(h),
                       _mm256_add_epi64(_mm256_unpacklo_epi64(s0, s1), _mm256_unpackhi_epi64(s0, s1)));
    acc[slots[i] - base] += table[h[0]];
    acc[slots[i + 1] - base] += table[h[2]];
    acc[slots[i + 2] - base] += table[h[1]];
    acc[slots[i + 3] - base] += table[h[3]];
  }
  bin16_scalar(table, q, codes, slots, i, i1, base, acc);
}

// ---- AVX-512: VPOPCNTDQ Hamming distances ----------------------------------------------------
// The table lookups and accumulator adds stay scalar: on Zen 4 the gather / scatter form
// (vpgatherqq, vpgatherdq, vpscatterdq per 8 postings) measured 9.2 ms of CPU per query against
// 7.3 ms for AVX2 with scalar adds (100k images, bench_scan.py, one thread).

__attribute__((target("avx512f,avx512vpopcntdq,avx512bw,avx512vl,avx2,popcnt"))) void bin16_avx512(
    const int64_t* table, const uint8_t* q, const uint8_t* codes, const uint32_t* slots, int i0, int i1, uint32_t base,
    int64_t* acc) {
  int64_t q0, q1;  // (set, not broadcast_i32x4: GCC 12's header warns on its undefined source)
  std::memcpy(&q0, q, 8);
  std::memcpy(&q1, q + 8, 8);
  const __m512i qq = _mm512_setr_epi64(q0, q1, q0, q1, q0, q1, q0, q1);
  const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
  const __m512i odd = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
  alignas(64) int64_t h[8];
  int i = i0;
  for (; i + 8 <= i1; i += 8) {
    // The codes 1 KB ahead (this block's, then the next block's): a list streams from memory.
    _mm_prefetch(reinterpret_cast<const char*>(codes + 16 * i + 1024), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(codes + 16 * i + 1088), _MM_HINT_T0);
    const __m512i p0 = _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(codes + 16 * i), qq));
    const __m512i p1 = _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_loadu_si512(codes + 16 * i + 64), qq));
    _mm512_store_si512(h, _mm512_add_epi64(_mm512_permutex2var_epi64(p0, even, p1),
                                           _mm512_permutex2var_epi64(p0, odd, p1)));
    for (int u = 0; u < 8; ++u) acc[slots[i + u] - base] += table[h[u]];
  }
  bin16_scalar(table, q, codes, slots, i, i1, base, acc);
}

// The same IEEE operations as finish_scalar, 8 images at a time (conversions, products, square
// root and quotient are correctly rounded in vectors too: bit-identical).
__attribute__((target("avx512f,avx512dq,avx512vl,avx2"))) void finish_avx512(const int64_t* a, const int32_t* nw,
                                                                            int64_t n, int64_t nq, bool normalize,
                                                                            float* out) {
  const __m512d scale = _mm512_set1_pd(1.0 / kScoreScale);
  const __m512d dq = _mm512_set1_pd(static_cast<double>(nq));
  const __m512d one = _mm512_set1_pd(1.0);
  const __m256 minus_one = _mm256_set1_ps(-1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(nw + i));
    __m256 s = _mm512_maskz_cvtpd_ps(0xFF, _mm512_mul_pd(_mm512_maskz_cvtepi64_pd(0xFF, _mm512_loadu_si512(a + i)), scale));
    if (normalize) {
      const __m512d d = _mm512_mul_pd(dq, _mm512_maskz_cvtepi32_pd(0xFF, w));
      s = _mm256_mul_ps(s, _mm512_maskz_cvtpd_ps(0xFF, _mm512_div_pd(one, _mm512_maskz_sqrt_pd(0xFF, d))));
    }
    const __mmask8 empty = _mm256_cmpeq_epi32_mask(w, _mm256_setzero_si256());
    _mm256_storeu_ps(out + i, _mm256_mask_blend_ps(empty, s, minus_one));
  }
  finish_scalar(a + i, nw + i, n - i, nq, normalize, out + i);
}

const ScanKernels kAvx2 = {"avx2", decode_sse2, bin16_avx2, finish_scalar};
const ScanKernels kAvx512 = {"avx512", decode_sse2, bin16_avx512, finish_avx512};

#endif  // D2R_X86_KERNELS

// Each SIMD level's variant (simd.h: a level is available only where the CPU has its instructions,
// which include those of the variant: avx2 = AVX2 + POPCNT + SSE2, avx512 adds F, BW, DQ, VL, VPOPCNTDQ).
const ScanKernels* variant_of(simd::Level level) {
#ifdef D2R_X86_KERNELS
  if (level == simd::Level::kAvx2) return &kAvx2;
  if (level == simd::Level::kAvx512) return &kAvx512;
#endif
  if (level == simd::Level::kScalar) return &kScalar;
  throw InvalidArgument(std::string("SIMD level ") + simd::level_name(level) + " has no scan kernels in this build");
}

// The variant in use: the active level's, until set_scan_variant.
std::atomic<const ScanKernels*>& current() {
  static std::atomic<const ScanKernels*> c{variant_of(simd::active())};
  return c;
}

}  // namespace

const ScanKernels& scan_kernels() { return *current().load(std::memory_order_acquire); }

const ScanKernels& scan_kernels_for(simd::Level level) {
  for (simd::Level l : simd::available())
    if (l == level) return *variant_of(level);
  throw InvalidArgument(std::string("SIMD level ") + simd::level_name(level) + " is not available on this CPU");
}

std::vector<std::string> scan_variants() {
  std::vector<std::string> out;
  for (simd::Level l : simd::available()) out.emplace_back(variant_of(l)->name);
  return out;
}

std::string scan_variant() { return scan_kernels().name; }

void set_scan_variant(const std::string& name) {
  for (simd::Level l : simd::available()) {
    const ScanKernels* k = variant_of(l);
    if (name == k->name) {
      current().store(k, std::memory_order_release);
      return;
    }
  }
  throw InvalidArgument("scan variant '" + name + "' is not available on this CPU");
}

}  // namespace d2r
