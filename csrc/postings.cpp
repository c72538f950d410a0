#include "postings.h"

#include <algorithm>
#include <array>

namespace d2r {

namespace {

// Slicing-by-8 tables of the reflected polynomial 0xEDB88320 (zlib's CRC-32).
struct CrcTables {
  std::array<std::array<uint32_t, 256>, 8> t{};
  CrcTables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  }
};

const CrcTables& crc_tables() {
  static const CrcTables tables;
  return tables;
}

// The gap width of the block of slots s[0..n): bits of the largest s_i - s_{i-1} - 1.
inline int block_width(const uint32_t* s, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 1; i < n; ++i) m |= s[i] - s[i - 1] - 1;  // the OR has the max's bit length
  return bits_for(m);
}

inline size_t block_bytes(int64_t n, int b, int code_bytes) {
  return kBlockHeader + gap_bytes(static_cast<int>(n), b) + static_cast<size_t>(n) * code_bytes;
}

inline size_t varint_bytes(uint64_t v) {
  size_t b = 1;
  while (v >= 0x80) {
    v >>= 7;
    ++b;
  }
  return b;
}

}  // namespace

uint32_t crc32(const uint8_t* p, size_t n, uint32_t crc) {
  const auto& t = crc_tables().t;
  uint32_t c = ~crc;
  while (n >= 8) {
    uint32_t lo, hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
    lo ^= c;  // little endian, as the tables assume (x86-64, aarch64)
    c = t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^ t[4][lo >> 24] ^ t[3][hi & 0xFF] ^
        t[2][(hi >> 8) & 0xFF] ^ t[1][(hi >> 16) & 0xFF] ^ t[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  while (n--) c = t[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
  return ~c;
}

size_t encoded_bytes(const uint32_t* slots, int64_t n, int code_bytes) {
  if (n == 0) return 0;
  size_t total = varint_bytes(static_cast<uint64_t>(n));
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t m = std::min<int64_t>(kBlock, n - b);
    total += block_bytes(m, block_width(slots + b, m), code_bytes);
  }
  return total;
}

size_t encode_list(const uint32_t* slots, const uint8_t* codes, int64_t n, int code_bytes, uint8_t* out) {
  uint8_t* o = out;
  if (n == 0) return 0;
  for (uint64_t v = static_cast<uint64_t>(n);; v >>= 7) {
    *o++ = static_cast<uint8_t>((v & 0x7F) | (v >= 0x80 ? 0x80 : 0));
    if (v < 0x80) break;
  }
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int n_b = static_cast<int>(std::min<int64_t>(kBlock, n - b0));
    const uint32_t* s = slots + b0;
    const int b = block_width(s, n_b);
    std::memcpy(o, &s[0], 4);
    o[4] = static_cast<uint8_t>(b);
    o += kBlockHeader;
    const size_t gb = gap_bytes(n_b, b);
    std::memset(o, 0, gb);
    // Lane l's j-th value (v_{4j + l}) at bit j b of lane l's words; word t of lane l at 16 t + 4 l.
    // (b = 0: no gap bytes at all, nothing to write; the loop would touch bytes past the block's
    // header, beyond the list when its codes are short.)
    for (int i = 1; b > 0 && i < n_b; ++i) {
      const uint64_t v = static_cast<uint64_t>(s[i] - s[i - 1] - 1);
      const int lane = i & 3;
      const int bit = (i >> 2) * b;
      const int t = bit >> 5, sh = bit & 31;
      uint32_t w;
      std::memcpy(&w, o + 16 * t + 4 * lane, 4);
      w |= static_cast<uint32_t>(v << sh);
      std::memcpy(o + 16 * t + 4 * lane, &w, 4);
      if (sh + b > 32) {
        std::memcpy(&w, o + 16 * (t + 1) + 4 * lane, 4);
        w |= static_cast<uint32_t>(v >> (32 - sh));
        std::memcpy(o + 16 * (t + 1) + 4 * lane, &w, 4);
      }
    }
    o += gb;
    const size_t cbytes = static_cast<size_t>(n_b) * code_bytes;
    std::memcpy(o, codes + static_cast<size_t>(b0) * code_bytes, cbytes);
    o += cbytes;
  }
  return static_cast<size_t>(o - out);
}

}  // namespace d2r
